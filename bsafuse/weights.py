"""Checkpoints: the registry of released weights, where they are found, and how they are read.

A registry name (``ct-mri``, ``pet-mri``, ``spect-mri``) resolves, in this order, to the first
file that exists: ``$BSAFUSE_WEIGHTS_DIR`` -> the user cache (``platformdirs``) -> the files
shipped with the package (``bsafuse/_weights`` in a wheel, the repository's ``weights/`` folder
in an editable install) -> a download, only when the registry names a URL (the download goes
to ``<file>.part``, is verified, then renamed into place). An explicit path is used as given.
Every registered file is sha256-verified each time it is resolved; there is no off switch.

A checkpoint is a plain dict read with ``torch.load(weights_only=True)``, so a file that holds
pickled code is refused instead of run::

    {"format": 1, "config": ModelConfig.to_dict(), "state_dict": {...},
     "bsafuse_version": "0.1.0", optional "epoch", "optimizer", "scheduler", "mu", "rng", "metrics",
     "still_px", "prealign" (the pipeline's STILL_PX and default pre-alignment for these weights;
     shipped checkpoints may carry them)}

Torch is imported inside the functions that need it, so ``bsafuse weights list`` is instant.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import platformdirs

from bsafuse._version import __version__
from bsafuse.errors import WeightsError
from bsafuse.io.atomic import atomic_path

if TYPE_CHECKING:
    from bsafuse.model import BSAFusion

log = logging.getLogger(__name__)

ENV_DIR = "BSAFUSE_WEIGHTS_DIR"
FORMAT = 1  # version of the checkpoint dict layout
CHUNK = 1 << 20  # bytes read at a time when hashing or downloading
_PACKAGE = Path(__file__).resolve().parent
_REPO = _PACKAGE.parent
SHIPPED_DIRS = (
    _PACKAGE / "_weights",  # inside an installed wheel (pyproject force-includes weights/ there)
    *([_REPO / "weights"] if (_REPO / "pyproject.toml").is_file() else []),  # editable install
)
HOW_TO_PASS = (
    "pass a checkpoint of your own with --weights path/to/best.pt (for example from `bsafuse train`)"
)


@dataclass(frozen=True)
class Checkpoint:
    """One released checkpoint."""

    name: str  # what users type: --weights ct-mri
    filename: str
    sha256: str  # of the released file; checked every time it is resolved
    url: str | None = None  # None: shipped with the package, never downloaded


# The checkpoints shipped in weights/ (see weights/MODEL_CARD.md for how each was trained).
REGISTRY: dict[str, Checkpoint] = {
    c.name: c
    for c in (
        Checkpoint("ct-mri-v1", "bsafuse-ct-mri-v1.pt", "34caa3494cadcfb7aa99314c7bdbb943b74f6981d4d1ba15587ec85f04c0ab74"),
        Checkpoint("pet-mri-v1", "bsafuse-pet-mri-v1.pt", "1865a99f236e3d276d9dc3ab4e8ce197ed73e2583e7f37002b612dfd3b4b6012"),
        Checkpoint("spect-mri-v1", "bsafuse-spect-mri-v1.pt", "227424caf377c86226f6d60e3138cd2191d5433b1813a1d854a4c2fb9595fe3e"),
        Checkpoint("ct-mri-v2", "bsafuse-ct-mri-v2.pt", "fa2751f336c5356fa204232232a5403434d18949bab65eb01988f97735da22bb"),
        Checkpoint("pet-mri-v2", "bsafuse-pet-mri-v2.pt", "432d371c3ae837fdd3c0aea9df12ea078fa09730a330043fe2a20538dbb7a40f"),
        Checkpoint("spect-mri-v2", "bsafuse-spect-mri-v2.pt", "4d1911b6d254aaffc7a6696d8a6e157c361a67b26961cdedac468564f5047f78"),
    )
}
# The unversioned names stand for the newest release of each pair type (what `auto` picks).
ALIASES: dict[str, str] = {"ct-mri": "ct-mri-v2", "pet-mri": "pet-mri-v2", "spect-mri": "spect-mri-v2"}


def canonical(name: str) -> str:
    """The registry name `name` stands for: an alias's release where it is registered, else itself."""
    target = ALIASES.get(name)
    return target if target is not None and target in REGISTRY else name

_urlopen: Callable[..., IO[bytes]] = urllib.request.urlopen  # replaced in tests: no network there


def search_dirs() -> list[Path]:
    """Folders searched for a registered file, in resolution order."""
    folders = [Path(os.environ[ENV_DIR]).expanduser()] if os.environ.get(ENV_DIR) else []
    return [*folders, platformdirs.user_cache_path("bsafuse"), *SHIPPED_DIRS]


def download_dir() -> Path:
    """Where downloads go: $BSAFUSE_WEIGHTS_DIR when set, else the user cache."""
    return search_dirs()[0]


# DICOM Modality (CT, PT = PET, NM = nuclear medicine, i.e. SPECT) or data folder name -> weights
MODALITY_WEIGHTS = {"CT": "ct-mri", "PT": "pet-mri", "PET": "pet-mri", "NM": "spect-mri", "SPECT": "spect-mri"}


def auto_name(*, is_colour: bool, modality: str | None = None) -> str:
    """The registry name `--weights auto` picks for a moving image (design.md §6).

    The modality first (MODALITY_WEIGHTS: the DICOM Modality CT, PT or NM, or a data folder's
    name), for grey and colour images alike. Without one (PNG, NIfTI, other modalities):
    grey -> ct-mri, colour -> pet-mri (a colour PNG does not say whether it is PET or SPECT).
    """
    by_modality = MODALITY_WEIGHTS.get((modality or "").upper())
    if by_modality is not None:
        return by_modality
    return "pet-mri" if is_colour else "ct-mri"


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, expected: str) -> None:
    """Raise WeightsError unless the file's sha256 is `expected`."""
    actual = sha256_of(path)
    if actual != expected.lower():
        raise WeightsError(
            f"{path} does not match its published sha256 (got {actual[:12]}..., want {expected[:12]}...); "
            "the file is corrupt or was replaced: delete it and run again"
        )


def find(name: str) -> Path | None:
    """The first existing file of a registered checkpoint, verified; None if there is none."""
    ckpt = REGISTRY[name]
    for folder in search_dirs():
        candidate = folder / ckpt.filename
        if candidate.is_file():
            verify(candidate, ckpt.sha256)
            return candidate
    return None


def resolve(weights: str | os.PathLike[str]) -> Path:
    """Registry name or path to a checkpoint file -> a local file that is safe to load."""
    text = canonical(os.fspath(weights))
    if text in REGISTRY:
        found = find(text)
        if found is not None:
            return found
        ckpt = REGISTRY[text]
        if ckpt.url is None:
            places = ", ".join(str(d) for d in search_dirs())
            raise WeightsError(
                f"weights {text!r} ({ckpt.filename}) are in none of: {places}; "
                f"copy the file into one of them or point {ENV_DIR} at its folder"
            )
        return download(ckpt, download_dir())
    path = Path(text).expanduser()
    if path.is_file():
        return path  # the user's own checkpoint: used as given, not hashed
    if path.is_dir():
        raise WeightsError(
            f"--weights {text!r} is a folder; give the checkpoint file inside it (e.g. best.pt)"
        )
    known = ", ".join([*ALIASES, *REGISTRY])
    raise WeightsError(
        f"--weights {text!r} is neither an existing file nor a known name ({known}); {HOW_TO_PASS}"
    )


def download(ckpt: Checkpoint, folder: Path) -> Path:
    """Fetch a registered URL into `folder`: <file>.part, sha256 check, then os.replace()."""
    assert ckpt.url is not None
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / ckpt.filename
    part = target.with_name(target.name + ".part")
    log.info("downloading %s from %s", ckpt.filename, ckpt.url)
    try:
        with _urlopen(ckpt.url) as response, open(part, "wb") as out:
            for block in iter(lambda: response.read(CHUNK), b""):
                out.write(block)
    except OSError as exc:  # URLError is an OSError
        part.unlink(missing_ok=True)
        raise WeightsError(
            f"could not download {ckpt.name!r} from {ckpt.url}: {exc}; "
            f"download it by hand into {folder} or {HOW_TO_PASS}"
        ) from None
    try:
        verify(part, ckpt.sha256)
    except WeightsError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, target)
    return target


@dataclass(frozen=True)
class Found:
    """Where a registered checkpoint is, for `bsafuse weights list` and `verify`."""

    name: str
    filename: str
    path: Path | None
    verified: bool | None  # None: no file to check


def inventory() -> Iterator[Found]:
    """Every registered name with the first file found for it, verified."""
    for name, ckpt in REGISTRY.items():
        path = next((d / ckpt.filename for d in search_dirs() if (d / ckpt.filename).is_file()), None)
        ok = None if path is None else sha256_of(path) == ckpt.sha256.lower()
        yield Found(name, ckpt.filename, path, ok)


def save_checkpoint(
    path: str | os.PathLike[str], model: BSAFusion, *, half: bool = False, **extras: Any
) -> Path:
    """Write `model` (its config and weights) plus any `extras` (epoch, optimizer, ...) atomically.

    `half=True` stores floating-point weights as float16 (half the size; they are read back into
    float32). The file is written to a temporary name in the same folder and renamed into place,
    so a kill mid-write never leaves a truncated checkpoint.
    """
    import torch

    path = Path(path)
    state = {
        k: (v.half() if half and v.is_floating_point() else v).detach().cpu()
        for k, v in model.state_dict().items()
    }
    payload = {
        "format": FORMAT,
        "config": config_of(model).to_dict(),
        "state_dict": state,
        "bsafuse_version": __version__,
        **extras,
    }
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())  # a checkpoint must survive a crash right after the rename
    return path


def read_checkpoint(path: str | os.PathLike[str], *, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint dict with weights_only=True and check its layout (no model is built).

    Raises WeightsError for a missing or unreadable file, pickled code, or a dict that is not a
    bsafuse checkpoint.
    """
    import pickle

    import torch

    path = Path(path)
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"checkpoint {path} does not exist; {HOW_TO_PASS}") from None
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if "GLOBAL" in line]
        if lines:  # the file names a Python callable: executing it could run anything
            raise WeightsError(
                f"{path} holds Python objects other than tensors and plain data ({lines[0][:160]}); "
                "bsafuse refuses to unpickle code. Re-save the checkpoint with bsafuse.weights.save_checkpoint"
            ) from None
        raise WeightsError(
            f"{path} is not a readable torch checkpoint (corrupt, truncated or another format)"
        ) from None
    except (LookupError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        # torch's unpickler stumbling over a file that is not a checkpoint at all (a text file)
        raise WeightsError(
            f"{path} is not a torch checkpoint (it does not hold pickled tensors: {type(exc).__name__}); "
            f"{HOW_TO_PASS}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        detail = " ".join(str(exc).split())[:200] or ("it ends early" if isinstance(exc, EOFError) else "-")
        raise WeightsError(
            f"{path} is not a readable torch checkpoint ({type(exc).__name__}: {detail})"
        ) from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("state_dict"), dict)
        or not all(isinstance(key, str) for key in data["state_dict"])
        or not isinstance(data.get("config"), dict)
    ):
        keys = sorted(map(str, data))[:6] if isinstance(data, dict) else type(data).__name__
        raise WeightsError(
            f"{path} is not a bsafuse checkpoint (expected a dict holding 'format', a 'config' dict and a "
            f"'state_dict' dict of named tensors; found {keys}); save models with bsafuse.weights.save_checkpoint"
        )
    if data.get("format") != FORMAT:
        raise WeightsError(
            f"{path} has checkpoint format {data.get('format')!r}, this bsafuse reads format {FORMAT}; "
            "upgrade bsafuse or re-save the checkpoint"
        )
    return data


def load_checkpoint(
    source: str | os.PathLike[str] | dict[str, Any], *, map_location: Any = "cpu"
) -> BSAFusion:
    """Build the model a checkpoint describes and load its weights (strictly).

    `source` is a path or a dict from `read_checkpoint` (the trainer reads the dict once for the
    model and the optimizer). A config that does not fit the stored weights is a WeightsError.
    """
    from bsafuse.model import BSAFusion

    data = source if isinstance(source, dict) else read_checkpoint(source, map_location=map_location)
    where = "the checkpoint" if isinstance(source, dict) else str(source)
    try:
        return BSAFusion.from_checkpoint(data)
    except (ValueError, TypeError, KeyError) as exc:
        raise WeightsError(f"{where} cannot be loaded: {exc}") from None


def export_checkpoint(
    source: str | os.PathLike[str], output: str | os.PathLike[str], *, half: bool = False,
    still_px: float | None = None, prealign: str | None = None,
) -> str:  # fmt: skip
    """Write a checkpoint for sharing (config, weights, epoch, metrics and the source's calibration;
    no optimiser or training state), fp16 weights with `half`; returns its sha256, the value to
    register beside it. `still_px` and `prealign` set the pipeline's STILL_PX and default
    pre-alignment for these weights (design.md §5)."""
    source, output = Path(source), Path(output)
    if output.resolve() == source.resolve():
        raise WeightsError(f"{output} is the input checkpoint; write the export to another file")
    data = read_checkpoint(source)
    calibration = {"still_px": still_px, "prealign": prealign}
    data.update({k: v for k, v in calibration.items() if v is not None})  # checked by load_checkpoint below
    kept = {k: data[k] for k in ("epoch", "metrics", *calibration) if data.get(k) is not None}
    save_checkpoint(output, load_checkpoint(data), half=half, **kept)
    return sha256_of(output)


def config_of(model: Any) -> Any:
    """The ModelConfig a model was built from."""
    for attr in ("config", "cfg"):
        config = getattr(model, attr, None)
        if config is not None and hasattr(config, "to_dict"):
            return config
    raise TypeError(f"{type(model).__name__} has no .config with to_dict(); is it a BSAFusion model?")
