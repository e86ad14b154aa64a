"""Image geometry: index <-> world (LPS) matrices, axis orders, and the views of a volume.

See `bsafuse.io.image` for the convention: world(x, y, z) = origin + direction @ (spacing * index).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from bsafuse.errors import InputError


def geometry_matrix(
    spacing: tuple[float, ...], origin: tuple[float, ...], direction: tuple[float, ...]
) -> NDArray[np.float64]:
    """4x4 index -> LPS matrix from SimpleITK-style spacing, origin and direction."""
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(direction, dtype=np.float64).reshape(3, 3) * np.asarray(spacing)
    matrix[:3, 3] = origin
    return matrix


def geometry_from_matrix(
    matrix: NDArray[np.float64],
) -> tuple[tuple[float, float, float], tuple[float, float, float], tuple[float, ...]]:
    """(spacing, origin, direction) of a 4x4 index -> LPS matrix; columns must be non-zero."""
    columns = matrix[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing == 0) or abs(np.linalg.det(columns)) < 1e-12 * float(np.prod(spacing)):
        raise ValueError("the index-to-world matrix is singular")
    direction = columns / spacing
    return (
        (float(spacing[0]), float(spacing[1]), float(spacing[2])),
        (float(matrix[0, 3]), float(matrix[1, 3]), float(matrix[2, 3])),
        tuple(float(v) for v in direction.ravel()),
    )


def closest_axes(matrix: NDArray[np.float64], shape_xyz: tuple[int, int, int]) -> NDArray[np.int64]:
    """Index map (4x4) from an LPS-ordered grid to `matrix`'s own index order.

    The LPS-ordered grid steps along the voxel axis closest to each world axis, in the positive
    direction: x toward patient left, y toward posterior, z toward superior. Oblique grids keep
    their obliquity (only axes are swapped and flipped, never resampled).
    """
    cosines = np.abs(matrix[:3, :3] / np.linalg.norm(matrix[:3, :3], axis=0))
    index_map = np.zeros((4, 4), dtype=np.int64)
    index_map[3, 3] = 1
    free_world, free_voxel = [0, 1, 2], [0, 1, 2]
    for _ in range(3):  # greedy, largest cosine first (as nibabel.orientations.io_orientation)
        sub = cosines[np.ix_(free_world, free_voxel)]
        w, v = np.unravel_index(int(np.argmax(sub)), sub.shape)
        world, voxel = free_world.pop(int(w)), free_voxel.pop(int(v))
        sign = 1 if matrix[world, voxel] > 0 else -1
        index_map[voxel, world] = sign
        index_map[voxel, 3] = 0 if sign > 0 else shape_xyz[voxel] - 1
    return index_map


def reorder(array_xyz: NDArray[Any], index_map: NDArray[np.int64]) -> NDArray[Any]:
    """Apply a signed-permutation index map: out[index_map @ i] = array_xyz[i] (x, y, z order)."""
    signs = index_map[:3, :3]
    source_axes = [int(np.flatnonzero(signs[k])[0]) for k in range(3)]
    out = np.transpose(array_xyz, source_axes)
    for k in range(3):
        if signs[k, source_axes[k]] < 0:
            out = np.flip(out, axis=k)
    return np.ascontiguousarray(out)


def invert_index_map(index_map: NDArray[np.int64]) -> NDArray[np.int64]:
    """Inverse of a signed-permutation index map (exact, integer)."""
    inverse = np.eye(4, dtype=np.int64)
    inverse[:3, :3] = index_map[:3, :3].T
    inverse[:3, 3] = -index_map[:3, :3].T @ index_map[:3, 3]
    return inverse


def view_map(axis: str, index: int, shape_zyx: tuple[int, int, int]) -> NDArray[np.int64]:
    """Index map from a 2-D view's (column, row, 0) to an LPS-ordered volume's (x, y, z).

    Views are shown as radiologists read them: axial (axis "z") with anterior up and the patient's
    left on the right; coronal ("y") and sagittal ("x") with superior up, the patient's left on the
    right (coronal) and anterior on the left (sagittal). The third index runs along `axis`.
    """
    depth = shape_zyx[0]
    rows = {
        "z": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, index]],
        "y": [[1, 0, 0, 0], [0, 0, 1, index], [0, -1, 0, depth - 1]],
        "x": [[0, 0, 1, index], [1, 0, 0, 0], [0, -1, 0, depth - 1]],
    }[axis]
    return np.array([*rows, [0, 0, 0, 1]], dtype=np.int64)


def take_view(volume_zyx: NDArray[Any], axis: str, index: int) -> NDArray[Any]:
    """The 2-D view `view_map` describes, as an (H, W) array."""
    if axis == "z":
        return volume_zyx[index]
    if axis == "y":
        return volume_zyx[::-1, index, :]
    return volume_zyx[::-1, :, index]


AXES = {"x": 0, "y": 1, "z": 2}  # world axis of each `axis` name (LPS: x left, y posterior, z superior)


def orient_volume(
    values_zyx: NDArray[Any],
    matrix: NDArray[np.float64],
    *,
    slice_index: int | None,
    axis: str,
    path: Path | str,
) -> tuple[NDArray[Any], NDArray[np.float64], NDArray[np.int64]]:
    """Put a volume in LPS order and pick what the caller asked for.

    `values_zyx` is in the file's own order and `matrix` maps its (x, y, z) indices to LPS. Returns
    (array, index-to-world matrix of the array, index map from the array's (x, y, z) to the file's).
    Without `slice_index` the result is the LPS-ordered (D, H, W) volume, or the 2-D view across
    its single slice when one dimension is 1. With it, the 2-D view along `axis` at that index;
    `slice_index` counts voxels in the file's own order along the file axis closest to `axis`.
    """
    file_xyz = values_zyx.shape[::-1]
    to_file = closest_axes(matrix, file_xyz)
    volume = reorder(values_zyx.transpose(2, 1, 0), invert_index_map(to_file)).transpose(2, 1, 0)
    lps = matrix @ to_file
    if slice_index is None:
        flat = [name for name, size in zip("zyx", volume.shape, strict=True) if size == 1]
        if not flat:
            return volume, lps, to_file
        axis, index = flat[0], 0
    else:
        if axis not in AXES:
            raise InputError(f"axis must be 'x', 'y' or 'z', got {axis!r}")
        file_axis = int(np.flatnonzero(to_file[:3, AXES[axis]])[0])
        size = file_xyz[file_axis]
        if not 0 <= slice_index < size:
            raise InputError(
                f"slice_index {slice_index} is outside {path}: it has {size} slices along axis "
                f"{axis} (0 to {size - 1})"
            )
        flipped = to_file[file_axis, AXES[axis]] < 0
        index = size - 1 - slice_index if flipped else slice_index
    view = view_map(axis, index, volume.shape)
    return np.ascontiguousarray(take_view(volume, axis, index)), lps @ view, to_file @ view
