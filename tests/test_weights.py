"""weights.py: registry resolution order, sha256 verification, safe loading, no network."""

from __future__ import annotations

import hashlib
import io
import os
import socket
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bsafuse import weights
from bsafuse.cli import app
from bsafuse.errors import WeightsError
from bsafuse.weights import Checkpoint


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a socket in these tests is a failure."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a weights test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Env dir, user cache and shipped dir all point into tmp_path; the registry starts empty."""
    dirs = {name: tmp_path / name for name in ("env", "cache", "shipped")}
    for d in dirs.values():
        d.mkdir()
    monkeypatch.setenv(weights.ENV_DIR, str(dirs["env"]))
    monkeypatch.setattr(weights.platformdirs, "user_cache_path", lambda *_a, **_k: dirs["cache"])
    monkeypatch.setattr(weights, "SHIPPED_DIRS", (dirs["shipped"],))
    monkeypatch.setattr(weights, "REGISTRY", {})
    return dirs


def register(monkeypatch: pytest.MonkeyPatch, payload: bytes, *, url: str | None = None) -> Checkpoint:
    ckpt = Checkpoint("ct-mri", "ct.pt", hashlib.sha256(payload).hexdigest(), url=url)
    monkeypatch.setitem(weights.REGISTRY, ckpt.name, ckpt)
    return ckpt


def test_resolution_order_env_then_cache_then_shipped(
    isolated: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    register(monkeypatch, b"weights")
    (isolated["shipped"] / "ct.pt").write_bytes(b"weights")
    assert weights.resolve("ct-mri") == isolated["shipped"] / "ct.pt"
    (isolated["cache"] / "ct.pt").write_bytes(b"weights")
    assert weights.resolve("ct-mri") == isolated["cache"] / "ct.pt"
    (isolated["env"] / "ct.pt").write_bytes(b"weights")
    assert weights.resolve("ct-mri") == isolated["env"] / "ct.pt"


def test_env_dir_is_searched_first_even_when_unset_elsewhere(isolated: dict[str, Path]) -> None:
    assert weights.search_dirs()[0] == isolated["env"]
    assert weights.download_dir() == isolated["env"]


def test_sha_mismatch_is_a_weights_error(isolated: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    register(monkeypatch, b"the released file")
    (isolated["cache"] / "ct.pt").write_bytes(b"something else")
    with pytest.raises(WeightsError, match=r"ct\.pt does not match its published sha256.*delete it"):
        weights.resolve("ct-mri")


def test_explicit_path_is_used_as_given(tmp_path: Path, isolated: dict[str, Path]) -> None:
    mine = tmp_path / "best.pt"
    mine.write_bytes(b"x")
    assert weights.resolve(str(mine)) == mine
    assert weights.resolve(mine) == mine


def test_unknown_name_and_missing_file(isolated: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"'nope' is neither an existing file nor a known name"):
        weights.resolve("nope")
    with pytest.raises(WeightsError, match=r"is a folder"):
        weights.resolve(tmp_path)


def test_unknown_name_lists_the_shipped_names_and_how_to_pass_a_checkpoint() -> None:
    with pytest.raises(WeightsError) as caught:
        weights.resolve("mri-ct")
    message = str(caught.value)
    assert all(name in message for name in [*weights.ALIASES, *weights.REGISTRY])
    assert "--weights path/to/best.pt" in message


def test_registered_but_absent_without_url(
    isolated: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    register(monkeypatch, b"w")
    with pytest.raises(WeightsError, match=r"are in none of: .*BSAFUSE_WEIGHTS_DIR"):
        weights.resolve("ct-mri")


def test_download_goes_through_part_file_and_is_verified(
    isolated: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = b"released weights" * 1000
    register(monkeypatch, payload, url="https://example.invalid/ct.pt")
    opened: list[str] = []

    def opener(url: str) -> io.BytesIO:
        opened.append(url)
        assert not (isolated["env"] / "ct.pt").exists()  # never written in place
        return io.BytesIO(payload)

    monkeypatch.setattr(weights, "_urlopen", opener)
    path = weights.resolve("ct-mri")
    assert path == isolated["env"] / "ct.pt" and path.read_bytes() == payload
    assert opened == ["https://example.invalid/ct.pt"]
    assert not list(isolated["env"].glob("*.part"))
    assert weights.resolve("ct-mri") == path and len(opened) == 1  # found, not fetched again


def test_corrupt_download_is_removed(isolated: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    register(monkeypatch, b"good", url="https://example.invalid/ct.pt")
    monkeypatch.setattr(weights, "_urlopen", lambda url: io.BytesIO(b"tampered"))
    with pytest.raises(WeightsError, match="does not match its published sha256"):
        weights.resolve("ct-mri")
    assert list(isolated["env"].iterdir()) == []


def test_failed_download_names_the_url(isolated: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    register(monkeypatch, b"good", url="https://example.invalid/ct.pt")

    def offline(url: str) -> io.BytesIO:
        raise OSError("network is unreachable")

    monkeypatch.setattr(weights, "_urlopen", offline)
    with pytest.raises(
        WeightsError, match=r"could not download 'ct-mri' from https://example\.invalid/ct\.pt"
    ):
        weights.resolve("ct-mri")


def test_auto_name() -> None:
    assert weights.auto_name(is_colour=False) == "ct-mri"
    assert weights.auto_name(is_colour=False, modality="NM") == "spect-mri"  # grey SPECT DICOM
    assert weights.auto_name(is_colour=False, modality="PT") == "pet-mri"  # grey PET DICOM
    assert weights.auto_name(is_colour=True, modality="MR") == "pet-mri"  # no modality weights: colour rule
    assert weights.auto_name(is_colour=True, modality="PT") == "pet-mri"
    assert weights.auto_name(is_colour=True) == "pet-mri"
    assert weights.auto_name(is_colour=True, modality="NM") == "spect-mri"


# ------------------------------------------------------------------------------ save and load


def test_save_load_round_trip(tmp_path: Path, tiny_checkpoint: Path) -> None:
    model = weights.load_checkpoint(tiny_checkpoint)
    data = weights.read_checkpoint(tiny_checkpoint)
    assert data["format"] == 1 and isinstance(data["bsafuse_version"], str)
    for key, value in model.state_dict().items():
        assert torch.equal(value, data["state_dict"][key])
    again = weights.save_checkpoint(tmp_path / "sub" / "copy.pt", model, epoch=3, metrics={"ssim": 0.5})
    assert weights.read_checkpoint(again)["epoch"] == 3
    assert [p.name for p in again.parent.iterdir()] == ["copy.pt"]  # written atomically


def test_half_checkpoint_is_smaller_and_loads_as_float32(tmp_path: Path, tiny_checkpoint: Path) -> None:
    model = weights.load_checkpoint(tiny_checkpoint)
    half = weights.save_checkpoint(tmp_path / "half.pt", model, half=True)
    assert half.stat().st_size < 0.6 * tiny_checkpoint.stat().st_size
    loaded = weights.load_checkpoint(half)
    for key, value in loaded.state_dict().items():
        if value.is_floating_point():
            assert value.dtype == torch.float32
            assert torch.allclose(value, model.state_dict()[key], atol=1e-2, rtol=1e-3)


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "config": {}, "state_dict": Payload()}, path)
    with pytest.raises(WeightsError, match=r"evil\.pt holds Python objects.*refuses to unpickle code"):
        weights.load_checkpoint(path)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file at all")
    with pytest.raises(WeightsError, match=r"junk\.pt is not a readable torch checkpoint"):
        weights.load_checkpoint(junk)
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, plain)
    with pytest.raises(WeightsError, match=r"plain\.pt is not a bsafuse checkpoint"):
        weights.load_checkpoint(plain)
    with pytest.raises(WeightsError, match=r"does not exist"):
        weights.load_checkpoint(tmp_path / "missing.pt")
    # text files, which torch's unpickler reads as garbage opcodes (IndexError, KeyError before)
    for text in ("root:x:0:0:root:/root:/bin/bash\n", "hello\n"):
        path = tmp_path / "text.pt"
        path.write_text(text)
        with pytest.raises(WeightsError, match=r"text\.pt is not a torch checkpoint"):
            weights.load_checkpoint(path)


def test_config_that_does_not_fit_the_weights(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from bsafuse.config import ModelConfig

    data = weights.read_checkpoint(tiny_checkpoint)
    data["config"] = ModelConfig.paper().to_dict()
    path = tmp_path / "mismatch.pt"
    torch.save(data, path)
    with pytest.raises(WeightsError, match=r"mismatch\.pt cannot be loaded: .*does not fit its config"):
        weights.load_checkpoint(path)


# ------------------------------------------------------------------------------------ the CLI


def test_cli_list_path_verify(isolated: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["weights", "list"])
    assert result.exit_code == 0, result.output
    assert "ct.pt" not in result.output  # nothing registered yet
    result = runner.invoke(app, ["weights", "verify"])
    assert result.exit_code == 0 and "nothing to verify" in result.output
    result = runner.invoke(app, ["weights", "path", "ct-mri"])
    assert result.exit_code == 1 and "neither an existing file nor a known name" in result.output

    register(monkeypatch, b"good")
    (isolated["cache"] / "ct.pt").write_bytes(b"good")
    result = runner.invoke(app, ["weights", "path", "ct-mri"])
    assert result.exit_code == 0 and result.stdout.strip() == str(isolated["cache"] / "ct.pt")
    result = runner.invoke(app, ["weights", "list", "--json"])
    assert '"verified": true' in result.stdout
    (isolated["cache"] / "ct.pt").write_bytes(b"bad")
    result = runner.invoke(app, ["weights", "verify"])
    assert result.exit_code == 1 and "do not match their sha256" in result.output
    assert "Traceback" not in result.output


def test_cli_export_strips_training_state_and_prints_the_sha256(tmp_path: Path, tiny_checkpoint: Path) -> None:
    run = tmp_path / "best.pt"
    model = weights.load_checkpoint(tiny_checkpoint)
    weights.save_checkpoint(run, model, epoch=7, optimizer={"state": {}, "param_groups": []}, mu=0.9)
    out = tmp_path / "release.pt"
    result = CliRunner().invoke(app, ["weights", "export", str(run), "-o", str(out), "--half"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == hashlib.sha256(out.read_bytes()).hexdigest()
    data = weights.read_checkpoint(out)
    assert data["epoch"] == 7 and "optimizer" not in data and "mu" not in data
    assert all(v.dtype == torch.float16 for v in data["state_dict"].values() if v.is_floating_point())
    exported = weights.load_checkpoint(out)
    for (name, a), (_, b) in zip(model.state_dict().items(), exported.state_dict().items(), strict=True):
        assert torch.allclose(a.float(), b, atol=1e-3 * max(1.0, a.abs().max().item())), name
    same = CliRunner().invoke(app, ["weights", "export", str(out), "-o", str(out)])
    assert same.exit_code == 1 and "is the input checkpoint" in same.output


def test_still_px_is_a_calibration_of_exported_weights_not_of_training(tmp_path: Path, tiny_checkpoint: Path) -> None:
    assert weights.load_checkpoint(tiny_checkpoint).still_px is None  # none stored: the pipeline's STILL_PX
    calibrated = tmp_path / "calibrated.pt"
    result = CliRunner().invoke(app, ["weights", "export", str(tiny_checkpoint), "-o", str(calibrated), "--still-px", "1.25"])
    assert result.exit_code == 0, result.output
    model = weights.load_checkpoint(calibrated)
    assert model.still_px == 1.25 and weights.read_checkpoint(calibrated)["still_px"] == 1.25
    again = tmp_path / "again.pt"  # re-exporting keeps it, as it keeps the epoch
    weights.export_checkpoint(calibrated, again, half=True)
    assert weights.load_checkpoint(again).still_px == 1.25
    # a run fine-tuned from calibrated weights saves no calibration: its network is another one
    weights.save_checkpoint(tmp_path / "run.pt", model, epoch=1)
    assert "still_px" not in weights.read_checkpoint(tmp_path / "run.pt")
    refused = CliRunner().invoke(app, ["weights", "export", str(tiny_checkpoint), "-o", str(tmp_path / "x.pt"), "--still-px", "-1"])
    assert refused.exit_code == 1 and "--still-px must be a positive number" in refused.output
    assert not (tmp_path / "x.pt").exists()
    with pytest.raises(WeightsError, match="still_px must be a positive number"):
        weights.export_checkpoint(tiny_checkpoint, tmp_path / "y.pt", still_px=0.0)
    assert not (tmp_path / "y.pt").exists()


def test_the_default_pre_alignment_is_a_calibration_of_exported_weights(tmp_path: Path, tiny_checkpoint: Path) -> None:
    assert weights.load_checkpoint(tiny_checkpoint).prealign is None  # none stored: DEFAULT_PREALIGN
    calibrated = tmp_path / "calibrated.pt"
    result = CliRunner().invoke(
        app, ["weights", "export", str(tiny_checkpoint), "-o", str(calibrated), "--prealign", "affine", "--still-px", "1"]
    )
    assert result.exit_code == 0, result.output
    model = weights.load_checkpoint(calibrated)
    assert (model.prealign, model.still_px) == ("affine", 1.0)
    again = tmp_path / "again.pt"  # a re-export keeps it; another value replaces it
    weights.export_checkpoint(calibrated, again, prealign="rigid")
    assert (weights.load_checkpoint(again).prealign, weights.load_checkpoint(again).still_px) == ("rigid", 1.0)
    weights.save_checkpoint(tmp_path / "run.pt", model, epoch=1)  # training saves no calibration
    assert "prealign" not in weights.read_checkpoint(tmp_path / "run.pt")
    refused = CliRunner().invoke(
        app, ["weights", "export", str(tiny_checkpoint), "-o", str(tmp_path / "x.pt"), "--prealign", "bspline"]
    )
    assert refused.exit_code != 0 and not (tmp_path / "x.pt").exists()
    with pytest.raises(WeightsError, match="prealign must be one of none, rigid, affine"):
        weights.export_checkpoint(tiny_checkpoint, tmp_path / "y.pt", prealign="bspline")
    assert not (tmp_path / "y.pt").exists()


def test_the_shipped_pet_weights_carry_their_own_calibration() -> None:
    # PET round 6 reports less motion on moved PET slices than the networks the default was chosen on
    assert weights.load_checkpoint(weights.resolve("pet-mri-v2")).still_px == 1.0
    # and its own pre-alignment: rigid, then affine (PET's default deformation 5.01 -> 4.55 px)
    assert weights.load_checkpoint(weights.resolve("pet-mri-v2")).prealign == "affine"
    assert weights.load_checkpoint(weights.resolve("ct-mri-v2")).prealign is None
    assert weights.load_checkpoint(weights.resolve("spect-mri-v2")).prealign is None
    assert weights.load_checkpoint(weights.resolve("ct-mri-v2")).still_px is None
    assert weights.load_checkpoint(weights.resolve("spect-mri-v2")).still_px is None
