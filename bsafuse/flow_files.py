"""Writing flows to disk: `.npy` (2, H, W) float32 pixels, or a NIfTI displacement image."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bsafuse.errors import InputError
from bsafuse.io import MedicalImage

FLOW_SUFFIXES = (".npy", ".nii", ".nii.gz")  # what save_flow writes: numpy, or a NIfTI vector image


def save_flow(path: Path, flow: np.ndarray, *, like: MedicalImage | None = None) -> Path:
    """Write a flow atomically: `.npy` as (2, H, W) / (D, 2, H, W) float32, or NIfTI.

    The NIfTI form is a displacement-vector image (intent DISPVECT, shape (X, Y, Z, 1, 2)) in the
    fixed image's voxel order and affine, as bsafuse.io writes the fixed image itself. Its two
    components are bsafuse's (x = column, y = row) displacements in pixels of the fixed image as
    bsafuse reads it (LPS order), not millimetres.
    """
    name = path.name.lower()
    if name.endswith(".npy"):
        from bsafuse.io.atomic import atomic_path

        with atomic_path(path) as tmp:
            np.save(tmp, np.asarray(flow, dtype=np.float32))
        return path
    if name.endswith(FLOW_SUFFIXES[1:]):
        return _save_flow_nifti(path, np.asarray(flow, dtype=np.float32), like)
    raise InputError(f"--save-flow {path}: use a .npy or .nii.gz file name")


def _save_flow_nifti(path: Path, flow: np.ndarray, like: MedicalImage | None) -> Path:
    from bsafuse.io.atomic import atomic_path
    from bsafuse.io.geometry import reorder
    from bsafuse.io.image import NiftiLayout
    from bsafuse.io.nifti import LPS_TO_RAS, nibabel_module

    nib = nibabel_module()
    components = flow if flow.ndim == 3 else flow.transpose(1, 0, 2, 3)  # (2, H, W) or (2, D, H, W)
    xyz = [c.T[:, :, None] if c.ndim == 2 else c.transpose(2, 1, 0) for c in components]
    layout = like.nifti if like is not None else None
    if layout is None:
        world = like.index_to_world() if like is not None else np.eye(4)
        layout = NiftiLayout(LPS_TO_RAS @ world, np.eye(4, dtype=np.int64), xyz[0].shape)
    values = np.stack([reorder(c, layout.index_map) for c in xyz], axis=-1)  # (X, Y, Z, 2)
    values = values.reshape(*values.shape[:3], 1, 2).astype(np.float32)
    image = nib.Nifti1Image(values, layout.affine)
    image.header.set_intent("vector", (), name="bsafuse flow px")
    image.header.set_xyzt_units("mm")
    image.set_sform(layout.affine, code=layout.sform_code or 2)
    with atomic_path(path) as tmp:
        nib.save(image, tmp)
    return path
