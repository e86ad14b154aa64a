"""Shape checks with messages that say what was expected and what came (kornia style)."""

from __future__ import annotations

from torch import Tensor


def check_shape(x: Tensor, spec: str, *, name: str) -> None:
    """Raise ValueError unless `x` matches `spec`: letters are free sizes, digits are fixed.

    Example: ``check_shape(flow, "B 2 H W", name="flow")``.
    """
    dims = spec.split()
    fits = x.ndim == len(dims) and all(d.isalpha() or int(d) == n for d, n in zip(dims, x.shape, strict=False))
    if not fits:
        raise ValueError(f"{name} must have shape ({', '.join(dims)}), got {tuple(x.shape)}")


def check_same_size(a: Tensor, b: Tensor, *, names: tuple[str, str]) -> None:
    """Raise ValueError unless the last two dimensions of `a` and `b` agree."""
    if a.shape[-2:] != b.shape[-2:]:
        raise ValueError(
            f"{names[0]} is {tuple(a.shape[-2:])} but {names[1]} is {tuple(b.shape[-2:])}; "
            "they must have the same height and width"
        )
