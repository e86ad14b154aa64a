"""Classical registration with SimpleITK: pre-alignment (design.md §5) and the `simpleitk` baseline.

:func:`register_classical` registers a 2-D moving image to a fixed one of the same size with Mattes
mutual information (works across modalities) over an image pyramid: "rigid" (Euler), "affine"
(the rigid result refined as an affine), "bspline" (the affine result plus a cubic B-spline
free-form deformation on an 8 x 8 mesh).

Choices, measured on deformed Harvard CT/PET/SPECT-MRI pairs (see the tests for the planted cases):

- *Start.* The moments-centred start (CenteredTransformInitializer MOMENTS) rescues large offsets,
  but across modalities the centres of mass disagree (bright CT bone and scanner table, PET showing
  only the brain: a median 22 px off on *aligned* PET-MRI pairs), and the optimiser does not always
  climb back; nor does it find rotations of ten degrees from a start at zero, or of 16-20 degrees
  from a start at eight. The moments-centred and the untouched start, each at five angles, are
  therefore optimised at the coarsest level, and the best five go on (`_rigid` gives the
  measurements).
- *Affine from rigid.* Optimising all six affine parameters from the start let scale and shear run
  off across modalities; refining the rigid result with smaller steps halved the end-point error.
- *Mask.* The metric samples the fixed image's foreground (> FOREGROUND, dilated), so that the
  empty background does not dominate the joint histogram.
- Every masked pixel is used (no random sampling) and the optimisers are deterministic: the same
  inputs give the same flow.

Convention: a SimpleITK transform maps a *fixed*-image point to the *moving*-image point to
sample; with unit spacing and zero origin, physical points are pixel coordinates (x = column,
y = row), so ``flow(p) = T(p) - p`` is bsafuse's flow (warp.py): ``warp(moving, flow)`` lies on the
fixed image.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, TypeVar

import numpy as np
import SimpleITK as sitk

from bsafuse.errors import InputError

Kind = Literal["rigid", "affine", "bspline"]
T = TypeVar("T", bound=sitk.Transform)
KINDS: tuple[str, ...] = ("rigid", "affine", "bspline")
HISTOGRAM_BINS = 32  # Mattes mutual information
PYRAMID = ((4, 2.0), (2, 1.0), (1, 0.0))  # (shrink factor, smoothing sigma in pixels), coarse to fine
START_ANGLES_DEG = (0.0, -8.0, 8.0, -16.0, 16.0)  # rigid start rotations (the optimiser misses larger turns)
REFINED = 5  # rigid starts that go on to the finer pyramid levels
MIN_LEVEL_SIZE = 32  # pixels: coarser pyramid levels are skipped for small images
BSPLINE_MESH = 8  # control-mesh cells per side
FOREGROUND = 0.05  # fixed-image intensity above which the metric samples
MIN_MASK_SHARE = 0.05  # a smaller foreground is ignored (the whole image is used)


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Run ITK single-threaded: its multi-threaded sums come in a varying order, so the optimiser
    (chaotic across modalities, for the B-spline stage) would not give the same flow twice."""
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _as_image(array: np.ndarray, name: str) -> sitk.Image:
    array = np.asarray(array)
    if array.ndim != 2:
        raise InputError(f"{name} must be a 2-D grey image (H, W), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number) or not np.isfinite(array).all():
        raise InputError(f"{name} must hold finite numbers (NaN or infinity found, or not numeric)")
    if min(array.shape) < 16:
        raise InputError(
            f"{name} is {array.shape[0]}x{array.shape[1]}; classical registration needs >= 16x16"
        )
    if float(array.max() - array.min()) <= 0:
        raise InputError(f"{name} is constant (every pixel {float(array.flat[0]):g}); nothing to register")
    return sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))  # spacing 1, origin 0


def _foreground(fixed: sitk.Image) -> sitk.Image | None:
    mask = sitk.BinaryDilate(sitk.Cast(fixed > FOREGROUND, sitk.sitkUInt8), [5, 5])
    share = float(sitk.GetArrayViewFromImage(mask).mean())
    return mask if share >= MIN_MASK_SHARE else None


class _Setup:
    """What every registration of one pair shares: images, mask, pyramid, metric sampling, and the
    threads that independent optimisations may run in."""

    def __init__(self, moving: sitk.Image, fixed: sitk.Image, *, sampling: float, seed: int, workers: int) -> None:
        self.moving, self.fixed, self.mask = moving, fixed, _foreground(fixed)
        self.sampling, self.seed, self.workers = sampling, seed, workers
        size = min(fixed.GetSize())
        self.levels = [level for level in PYRAMID if size // level[0] >= MIN_LEVEL_SIZE] or [PYRAMID[-1]]

    def method(self, levels: list[tuple[int, float]]) -> sitk.ImageRegistrationMethod:
        method = sitk.ImageRegistrationMethod()
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HISTOGRAM_BINS)
        if self.sampling >= 1.0:
            method.SetMetricSamplingStrategy(method.NONE)  # every pixel: deterministic
        else:
            method.SetMetricSamplingStrategy(method.RANDOM)
            method.SetMetricSamplingPercentage(self.sampling, self.seed)
        if self.mask is not None:
            method.SetMetricFixedMask(self.mask)
        method.SetInterpolator(sitk.sitkLinear)
        method.SetShrinkFactorsPerLevel([shrink for shrink, _ in levels])
        method.SetSmoothingSigmasPerLevel([sigma for _, sigma in levels])
        method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
        return method

    def optimise(
        self, start: T, levels: list[tuple[int, float]], iterations: int, *, step: float = 1.0
    ) -> tuple[T, float]:
        """Regular-step gradient descent from `start`; returns (transform, final metric value)."""
        method = self.method(levels)
        method.SetOptimizerAsRegularStepGradientDescent(
            learningRate=step, minStep=1e-3, numberOfIterations=iterations, gradientMagnitudeTolerance=1e-8
        )
        method.SetOptimizerScalesFromPhysicalShift()
        transform = type(start)(start)  # a copy of the same class, optimised in place
        method.SetInitialTransform(transform, inPlace=True)
        method.Execute(self.fixed, self.moving)
        return transform, method.GetMetricValue()

    def optimise_each(
        self, starts: Sequence[T], levels: list[tuple[int, float]], iterations: int
    ) -> list[tuple[T, float]]:
        """`optimise` from each start, in order; up to `workers` at a time (SimpleITK releases the
        GIL while it registers, and each optimisation is single-threaded and deterministic, so the
        results do not depend on the threads)."""
        workers = min(self.workers, len(starts))
        if workers <= 1:
            return [self.optimise(start, levels, iterations) for start in starts]
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(lambda start: self.optimise(start, levels, iterations), starts))


def _rigid(setup: _Setup, iterations: int) -> sitk.Euler2DTransform:
    """Rigid (Euler): several starts at the coarsest level, the best few refined, the best kept.

    Starts: the moments-centred and the untouched (image-centred) start, each at every angle of
    START_ANGLES_DEG. All are optimised at the coarsest level; the REFINED best of them go through
    the rest of the pyramid and the lowest final metric wins (a coarse metric alone picked a wrong
    start now and then). Measured on 8 deformed validation pairs each (default deformation, seed 0,
    2026-12-02), mean end-point error, one start pair vs three angles: CT 7.65 -> 5.05 px, PET 4.76 ->
    3.77 px, SPECT 3.89 -> 3.94 px, for about 1.7x the time. Five angles (ten starts) with the
    best five refined, instead of three angles with the best three refined (2026-12-06, `bsafuse
    evaluate` on the validation cases, the default pipeline's mean end-point error, default / large
    motion): CT 4.23 / 6.84 -> 4.04 / 4.35 px, PET 5.42 / 7.41 -> 4.91 / 5.43 px, SPECT 4.07 / 4.45
    -> 4.17 / 4.32 px, for 1.9x the time (three CT pairs, both settings interleaved in one run);
    from a start at 8 degrees the optimiser alone does not recover turns of 16-20 degrees.
    """
    starts = []  # GEOMETRY on same-size images: the untouched start, centred on the image
    for mode in (
        sitk.CenteredTransformInitializerFilter.MOMENTS,
        sitk.CenteredTransformInitializerFilter.GEOMETRY,
    ):
        centred = sitk.CenteredTransformInitializer(setup.fixed, setup.moving, sitk.Euler2DTransform(), mode)
        for degrees in START_ANGLES_DEG:
            start = sitk.Euler2DTransform(centred)
            start.SetAngle(math.radians(degrees))
            starts.append(start)
    coarse = sorted(setup.optimise_each(starts, setup.levels[:1], iterations), key=lambda p: p[1])
    if len(setup.levels) == 1:
        return coarse[0][0]
    refined = setup.optimise_each([transform for transform, _ in coarse[:REFINED]], setup.levels[1:], iterations)
    best, _ = min(refined, key=lambda pair: pair[1])  # metric: lower is better
    return best


def _affine(setup: _Setup, rigid: sitk.Euler2DTransform, iterations: int) -> sitk.AffineTransform:
    """The rigid result refined as an affine on the finer pyramid levels, with smaller steps."""
    affine = sitk.AffineTransform(2)
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    transform, _ = setup.optimise(affine, setup.levels[-2:], max(1, iterations // 2), step=0.25)
    return transform


def _bspline(setup: _Setup, prior: sitk.Transform, iterations: int, mesh: int) -> sitk.Transform:
    """A cubic B-spline (`mesh` cells per side) refining `prior`; returns prior o bspline."""
    bspline = sitk.BSplineTransformInitializer(setup.fixed, [mesh, mesh], 3)
    method = setup.method(setup.levels[-2:])
    method.SetOptimizerAsLBFGSB(
        gradientConvergenceTolerance=1e-5,
        numberOfIterations=iterations,
        maximumNumberOfCorrections=5,
        maximumNumberOfFunctionEvaluations=4 * iterations,
        costFunctionConvergenceFactor=1e7,
    )
    method.SetMovingInitialTransform(prior)
    method.SetInitialTransform(bspline, inPlace=True)
    method.Execute(setup.fixed, setup.moving)
    # A composite applies its last transform first: p -> prior(bspline(p)), as the registration did.
    return sitk.CompositeTransform([prior, bspline])


def register_classical(
    moving: np.ndarray,
    fixed: np.ndarray,
    *,
    kind: Kind = "affine",
    seed: int = 0,
    sampling: float = 1.0,
    iterations: int = 100,
    bspline_iterations: int = 30,
    bspline_mesh: int = BSPLINE_MESH,
    workers: int = 1,
) -> np.ndarray:
    """Register `moving` onto `fixed` with SimpleITK; return the flow in bsafuse's convention.

    Args:
        moving, fixed: 2-D float arrays of the same shape, intensities in [0, 1] (any modality pair:
            the metric is mutual information).
        kind: "rigid" (rotation + translation), "affine", or "bspline" (affine, then a B-spline
            free-form deformation on an 8 x 8 mesh).
        seed: seed of the metric's random pixel sampling (only used when `sampling` < 1).
        sampling: share of pixels the metric uses; 1.0 (default) uses all, deterministically.
        iterations, bspline_iterations: optimiser budgets per pyramid level (the affine refinement
            of the rigid result gets half of `iterations`).
        bspline_mesh: B-spline control-mesh cells per side. Across modalities a free-form stage
            tends to chase intensity differences (measured: it raises the affine end-point error),
            a coarser mesh less so; within one modality 8 recovers elastic warps well.
        workers: threads for the rigid step's independent starts (the flow does not depend on it).

    Returns:
        (2, H, W) float32 flow in pixels (channel 0 = x): ``warp(moving, flow)`` lies on `fixed`.

    Raises:
        InputError: bad arrays, or a registration that fails (e.g. the images hardly overlap).
    """
    return register_stages(
        moving,
        fixed,
        kind=kind,
        seed=seed,
        sampling=sampling,
        iterations=iterations,
        bspline_iterations=bspline_iterations,
        bspline_mesh=bspline_mesh,
        workers=workers,
    )[-1]


def register_stages(
    moving: np.ndarray,
    fixed: np.ndarray,
    *,
    kind: Kind = "affine",
    seed: int = 0,
    sampling: float = 1.0,
    iterations: int = 100,
    bspline_iterations: int = 30,
    bspline_mesh: int = BSPLINE_MESH,
    workers: int = 1,
) -> tuple[np.ndarray, ...]:
    """`register_classical`, returning the flow after each stage up to `kind`: (rigid,), (rigid,
    affine) or (rigid, affine, bspline), each computed from the one before (one registration)."""
    if kind not in KINDS:
        raise InputError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not 0 < sampling <= 1:
        raise InputError(f"sampling must be in (0, 1], got {sampling}")
    if bspline_mesh < 1 or iterations < 1 or bspline_iterations < 1:
        raise InputError("iterations, bspline_iterations and bspline_mesh must be at least 1")
    moving_image, fixed_image = _as_image(moving, "moving image"), _as_image(fixed, "fixed image")
    if moving_image.GetSize() != fixed_image.GetSize():
        raise InputError(
            f"moving image is {np.shape(moving)} but fixed image is {np.shape(fixed)}; "
            "resample the moving image onto the fixed grid first"
        )
    setup = _Setup(moving_image, fixed_image, sampling=sampling, seed=seed, workers=max(1, workers))
    stages = KINDS[: KINDS.index(kind) + 1]
    try:
        with _single_thread():
            rigid = _rigid(setup, iterations)
            transforms: list[sitk.Transform] = [rigid]
            if "affine" in stages:
                transforms.append(_affine(setup, rigid, iterations))
            if "bspline" in stages:
                transforms.append(_bspline(setup, transforms[-1], bspline_iterations, bspline_mesh))
            flows = tuple(_flow(transform, fixed_image) for transform in transforms)
    except RuntimeError as exc:  # SimpleITK reports every ITK exception as RuntimeError
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise InputError(
            f"{kind} registration with SimpleITK failed: {lines[-1] if lines else 'unknown ITK error'}. "
            "The images may hardly overlap or hold too little structure; check that they show the same anatomy"
        ) from None
    for stage, flow in zip(stages, flows, strict=True):
        if not np.isfinite(flow).all():
            raise InputError(f"{stage} registration with SimpleITK diverged (non-finite transform)")
    return flows


def _flow(transform: sitk.Transform, fixed: sitk.Image) -> np.ndarray:
    """The (2, H, W) float32 flow of `transform` on the fixed image's grid."""
    field = sitk.TransformToDisplacementField(
        transform,
        sitk.sitkVectorFloat64,
        fixed.GetSize(),
        fixed.GetOrigin(),
        fixed.GetSpacing(),
        fixed.GetDirection(),
    )
    return np.moveaxis(sitk.GetArrayFromImage(field), -1, 0).astype(np.float32)  # (H, W, 2) -> (2, H, W)
