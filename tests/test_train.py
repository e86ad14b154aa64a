"""bsafuse.training: the Trainer on a tiny synthetic data folder (small model, 32 px), and the CLI's
argument handling. Exact resume is checked in process here; kills and signals in test_train_resume."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import pytest
import torch
from test_data import make_folder
from test_train_config import RUN_TOML
from typer.testing import CliRunner

from bsafuse.cli import app
from bsafuse.errors import DeviceError, InputError, OutputError
from bsafuse.training import TrainConfig, Trainer, TrainEvent, read_resume
from bsafuse.weights import load_checkpoint, read_checkpoint, save_checkpoint

NAMES = ["1001", "1002", "2001", "2002", "3001", "3002"]  # cases 1, 2 train (4 pairs), 3 validates


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("data") / "CT-MRI", NAMES, size=32)


def tiny_config(data: Path, run: Path, **changes: Any) -> TrainConfig:
    values: dict[str, Any] = {
        "image_size": 32,
        "epochs": 3,
        "batch_size": 2,
        "val_every": 1,
        "workers": 0,
        "val_cases": ("3",),
        "lr": 2e-4,
        "device": "cpu",
    }
    return TrainConfig.preset("quick", {**values, **changes}, data_dir=data, run_dir=run)  # flat layer


def _rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _same_numbers(a: list[dict[str, str]], b: list[dict[str, str]]) -> None:
    timing = {"seconds", "samples_per_s"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in a] == [
        {k: v for k, v in r.items() if k not in timing} for r in b
    ]


def _same_weights(a: Path, b: Path) -> None:
    sa, sb = read_checkpoint(a)["state_dict"], read_checkpoint(b)["state_dict"]
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


@pytest.fixture(scope="module")
def full_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three uninterrupted epochs: the reference the resumed runs must reproduce."""
    run = tmp_path_factory.mktemp("full")
    events: list[TrainEvent] = []
    result = Trainer(tiny_config(tiny_data, run), callback=events.append).fit()
    assert result.epochs_done == 3 and not result.stopped
    assert [e.kind for e in events if e.kind != "step"] == ["start", "epoch", "epoch", "epoch", "done"]
    return run


def test_mu_follows_the_ssim_ratio_unless_the_recipe_fixes_it(
    full_run: Path, tiny_data: Path, tmp_path: Path
) -> None:
    adaptive = [float(r["mu"]) for r in _rows(full_run)]
    assert adaptive[0] == 1.0 and adaptive[1] != 1.0  # the paper's rule moves it after epoch 1
    config = tiny_config(tiny_data, tmp_path, epochs=2)
    config = TrainConfig.preset(
        "quick", config.to_dict(), {"recipe": {"losses": {"mu": 1.5}}}, data_dir=tiny_data, run_dir=tmp_path
    )
    Trainer(config).fit()
    assert [float(r["mu"]) for r in _rows(tmp_path)] == [1.5, 1.5]
    assert read_checkpoint(tmp_path / "last.pt")["mu"] == 1.5


def test_frozen_parts_keep_their_weights_while_the_rest_trains(tiny_data: Path, tmp_path: Path) -> None:
    registration = ("encoder", "transfer_a", "transfer_b", "align")
    config = tiny_config(tiny_data, tmp_path, epochs=1)
    config = TrainConfig.preset(
        "quick", config.to_dict(), {"recipe": {"freeze": list(registration)}}, data_dir=tiny_data, run_dir=tmp_path
    )
    trainer = Trainer(config)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    after = read_checkpoint(tmp_path / "last.pt")["state_dict"]
    for key, value in before.items():
        same = torch.equal(value, after[key].to(value.dtype))
        assert same == (key.split(".")[0] in (*registration, "scorer")), key
    with pytest.raises(InputError, match=r"recipe\.freeze"):
        TrainConfig.preset("quick", {"recipe": {"freeze": ["decoder"]}}, data_dir=tiny_data, run_dir=tmp_path)


def test_fit_writes_run_files(full_run: Path) -> None:
    assert {p.name for p in full_run.iterdir()} >= {"config.json", "metrics.csv", "last.pt", "best.pt"}
    rows = _rows(full_run)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    for column in (
        "lr",
        "mu",
        "train_total",
        "train_consis",
        "train_smooth",
        "val_epe",
        "val_epe_none",
        "val_ncc",
        "val_q_abf",
        "train_flow",  # the quick recipe's supervised term (LossWeights.flow = 5) is logged too
    ):
        assert all(r[column] != "" for r in rows), column
    from bsafuse.losses import LOSS_TERMS

    assert {f"train_{t}" for t in LOSS_TERMS} <= set(rows[0])  # one column per term of L_total
    assert float(rows[0]["lr"]) == pytest.approx(2e-4) and float(rows[2]["lr"]) < float(rows[1]["lr"])
    last = read_checkpoint(full_run / "last.pt")
    assert (last["epoch"], last["step"]) == (3, 0)
    assert {"optimizer", "scheduler", "mu", "rng", "metrics", "train"} <= last.keys()
    assert last["train"]["config"]["recipe"]["image_size"] == 32
    recorded = json.loads((full_run / "config.json").read_text())["train"]  # the nested tree
    assert set(recorded) == {"recipe", "run"} and recorded["run"]["val_every"] == 1
    assert TrainConfig.from_dict(recorded) == TrainConfig.from_dict(last["train"]["config"])
    best_epe = min(float(r["val_epe"]) for r in rows)
    assert read_checkpoint(full_run / "best.pt")["metrics"]["best_val_epe"] == pytest.approx(
        best_epe, rel=1e-4
    )


def test_trained_checkpoint_is_a_fusion_checkpoint(full_run: Path) -> None:
    model = load_checkpoint(full_run / "best.pt").eval()
    assert model.config.image_size == 32
    with torch.no_grad():
        out = model(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32))
    assert out.fused.shape == (1, 1, 32, 32)


def _stop_at(trainer_box: list[Trainer], epoch: int, step: int | None) -> Callable[[TrainEvent], None]:
    """Ask for a stop after `step` of `epoch` (None: at the end of the epoch)."""

    def callback(event: TrainEvent) -> None:
        if (event.kind, event.epoch, event.step if step else None) == (
            "step" if step else "epoch",
            epoch,
            step,
        ):
            trainer_box[0].request_stop()

    return callback


@pytest.mark.slow
def test_resume_at_an_epoch_boundary_is_exact(tiny_data: Path, full_run: Path, tmp_path: Path) -> None:
    box: list[Trainer] = []
    box.append(Trainer(tiny_config(tiny_data, tmp_path), callback=_stop_at(box, epoch=2, step=None)))
    assert box[0].fit().epochs_done == 2
    config, state = read_resume(tmp_path / "last.pt")
    assert state["step"] == 0
    result = Trainer(config, resume=state).fit()
    assert result.epochs_done == 3
    _same_weights(full_run / "last.pt", tmp_path / "last.pt")
    _same_numbers(_rows(full_run), _rows(tmp_path))


@pytest.mark.slow
def test_stop_mid_epoch_saves_and_resumes_exactly(tiny_data: Path, full_run: Path, tmp_path: Path) -> None:
    box: list[Trainer] = []
    box.append(Trainer(tiny_config(tiny_data, tmp_path), callback=_stop_at(box, epoch=2, step=1)))
    result = box[0].fit()
    assert result.stopped and result.epochs_done == 1
    saved = read_checkpoint(tmp_path / "last.pt")
    assert (saved["epoch"], saved["step"]) == (1, 1)
    assert len(_rows(tmp_path)) == 1
    config, state = read_resume(tmp_path / "last.pt")
    assert Trainer(config, resume=state).fit().epochs_done == 3
    _same_weights(full_run / "last.pt", tmp_path / "last.pt")
    _same_numbers(_rows(full_run), _rows(tmp_path))


@pytest.mark.slow
def test_metrics_rows_after_the_checkpoint_are_dropped_on_resume(tiny_data: Path, tmp_path: Path) -> None:
    Trainer(tiny_config(tiny_data, tmp_path, epochs=1)).fit()
    with (tmp_path / "metrics.csv").open("a") as f:  # as if killed between the row and last.pt
        f.write("2,0.1,1" + "," * 18 + "\n")
    config, state = read_resume(tmp_path / "last.pt")
    Trainer(config.resumed_with({"epochs": 2}), resume=state).fit()
    assert [r["epoch"] for r in _rows(tmp_path)] == ["1", "2"]


def _flat(config: TrainConfig) -> dict[str, Any]:
    """`config` in the flat layout that runs wrote before the recipe/run tree (config.json "train")."""
    tree = config.to_dict()
    recipe, run = tree["recipe"], tree["run"]
    losses, deform, augment = recipe.pop("losses"), recipe.pop("deform"), recipe.pop("augment")
    return {**run, **recipe, "loss_weights": losses, "deform": {**deform, **augment}, "mu_init": 1.0,
            "quality_metrics": True}  # fmt: skip


@pytest.mark.slow
def test_a_checkpoint_with_the_flat_config_layout_resumes(tiny_data: Path, tmp_path: Path) -> None:
    Trainer(tiny_config(tiny_data, tmp_path, epochs=1)).fit()
    old = read_checkpoint(tmp_path / "last.pt")
    started = TrainConfig.from_dict(old["train"]["config"])
    old["train"]["config"] = _flat(started)  # as a checkpoint of the earlier layout holds it
    torch.save(old, tmp_path / "last.pt")
    config, state = read_resume(tmp_path / "last.pt")
    assert config == started
    assert Trainer(config.resumed_with({"epochs": 2}), resume=state).fit().epochs_done == 2
    assert "recipe" in read_checkpoint(tmp_path / "last.pt")["train"]["config"]  # rewritten nested


def test_init_fine_tunes_from_weights_at_another_working_size(full_run: Path, tmp_path: Path) -> None:
    from bsafuse.training.network import initial_model

    source = read_checkpoint(full_run / "best.pt")
    model = initial_model(str(full_run / "best.pt"), 64)  # trained at 32 px
    assert model.config.image_size == 64
    assert model.config.align.max_step == pytest.approx(2 * source["config"]["align"]["max_step"])
    state = model.state_dict()
    for key, value in source["state_dict"].items():
        if key.endswith("position"):  # the learned positional map, resized to the new size
            assert state[key].shape[-2:] == (64, 64) and value.shape[-2:] == (32, 32)
            # exactly what the encoder itself would use at 64 px (encoder.positional_map)
            resized = torch.nn.functional.interpolate(value, size=(64, 64), mode="bilinear", align_corners=False)
            torch.testing.assert_close(state[key], resized, rtol=0, atol=0)
        else:
            torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    # a run with init starts from those weights, with a fresh optimiser and schedule
    data_dir = source["train"]["config"]["run"]["data_dir"]
    trainer = Trainer(tiny_config(Path(data_dir), tmp_path, epochs=1, image_size=64, init=str(full_run / "best.pt")))
    assert trainer.scheduler.last_epoch == 0 and not trainer.optimizer.state
    for key, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)


def test_init_with_other_fusion_widths_loads_the_rest_and_builds_the_fusion_fresh(
    full_run: Path, tiny_data: Path, tmp_path: Path
) -> None:
    source = read_checkpoint(full_run / "best.pt")
    wide = {"channels": [64, 32, 16, 12], "heads": [4, 2, 1, 1]}  # the paper's fusion widths
    assert source["config"]["fuse"]["channels"] != wide["channels"]
    config = TrainConfig.preset(
        "quick",
        tiny_config(tiny_data, tmp_path, epochs=1, init=str(full_run / "best.pt")).to_dict(),
        {"recipe": {"fuse": wide, "freeze": ["encoder", "transfer_a", "transfer_b", "align"]}},
        data_dir=tiny_data,
        run_dir=tmp_path,
    )
    trainer = Trainer(config)
    state = trainer.model.state_dict()
    assert list(trainer.model.config.fuse.channels) == wide["channels"]
    for key, value in source["state_dict"].items():
        if key.startswith("fuse."):
            continue
        torch.testing.assert_close(state[key], value.to(state[key].dtype), rtol=0, atol=0, msg=key)
    # the new fusion: the paper's widths, drawn from the run's seed (the same in a second build)
    assert state["fuse.reconstruction.out.weight"].shape == (1, 12, 3, 3)
    again = Trainer(config).model.state_dict()
    for key in (k for k in state if k.startswith("fuse.")):
        torch.testing.assert_close(again[key], state[key], rtol=0, atol=0, msg=key)
    trainer.fit()  # it trains, and its checkpoint carries the new widths
    stored = read_checkpoint(tmp_path / "last.pt")
    assert stored["config"]["fuse"]["channels"] == wide["channels"]
    bad = TrainConfig.preset("quick", config.to_dict(), {"recipe": {"fuse": {"channels": [8, 8], "heads": [1, 1]}}})
    with pytest.raises(InputError, match=r"recipe\.fuse .* does not fit the network: .* needs K - 1 = 4"):
        Trainer(bad)


def test_init_with_a_max_anchor_keeps_every_weight_and_starts_at_the_pixel_maximum(
    full_run: Path, tiny_data: Path, tmp_path: Path
) -> None:
    source = read_checkpoint(full_run / "best.pt")
    fuse = {**source["config"]["fuse"], "anchor": "max"}  # the same widths
    config = TrainConfig.preset(
        "quick",
        tiny_config(tiny_data, tmp_path, epochs=1, init=str(full_run / "best.pt")).to_dict(),
        {"recipe": {"fuse": fuse}},
        data_dir=tiny_data,
        run_dir=tmp_path,
    )
    model = Trainer(config).model
    assert model.config.fuse.anchor == "max"
    state = model.state_dict()
    restarted = ("fuse.reconstruction.out.weight", "fuse.reconstruction.out.bias")
    assert source["state_dict"][restarted[0]].abs().max().item() > 0
    for key, value in source["state_dict"].items():
        expected = torch.zeros_like(state[key]) if key in restarted else value.to(state[key].dtype)
        torch.testing.assert_close(state[key], expected, rtol=0, atol=0, msg=key)
    # and back: without the anchor that conv is drawn afresh, every other weight kept
    save_checkpoint(tmp_path / "anchored.pt", model)
    plain = {**fuse, "anchor": "none"}
    back = TrainConfig.preset("quick", config.to_dict(), {"recipe": {"fuse": plain, "init": str(tmp_path / "anchored.pt")}})
    again = Trainer(back).model.state_dict()
    assert again[restarted[0]].abs().max().item() > 0
    for key, value in state.items():
        if key not in restarted:
            torch.testing.assert_close(again[key], value, rtol=0, atol=0, msg=key)


def test_more_workers_than_cores_are_capped_with_a_note(tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import os

    from bsafuse.cli.train import _fit_workers

    cores = len(os.sched_getaffinity(0))
    capped = _fit_workers(tiny_config(tiny_data, tmp_path, workers=cores + 6))
    assert capped.run.workers == cores
    assert f"--workers {cores + 6} is more than this machine's {cores} CPU cores" in capsys.readouterr().err
    same = tiny_config(tiny_data, tmp_path, workers=0)
    assert _fit_workers(same) is same


def test_bf16_on_a_cpu_is_refused_before_any_work(tiny_data: Path, tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="bf16 runs on CUDA only"):
        Trainer(tiny_config(tiny_data, tmp_path, precision="bf16"))


def test_a_fresh_run_does_not_overwrite_a_run(full_run: Path, tiny_data: Path) -> None:
    with pytest.raises(OutputError, match="already holds a run"):
        Trainer(tiny_config(tiny_data, full_run)).fit()


# ---------------------------------------------------------------- command line
runner = CliRunner()


def test_cli_help_lists_the_training_options() -> None:
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in (
        "--preset",
        "--config",
        "--epochs",
        "--batch-size",
        "--lr",
        "--device",
        "--precision",
        "--workers",
        "--seed",
        "--resume",
        "--val-cases",
        "--val-every",
        "--image-size",
        "--config-file",
    ):
        assert option in result.output
    from bsafuse.training.config import OPTIONS
    from bsafuse.training.presets import ModelSize, Preset

    assert set(OPTIONS.values()) - {"DATA_DIR"} <= set(result.output.split()) | {"--output"}
    for choices in (Preset, ModelSize):  # the choices are the Literal's
        assert "|".join(get_args(choices)) in result.output


def test_cli_needs_a_run_folder(tiny_data: Path) -> None:
    result = runner.invoke(app, ["train", str(tiny_data)])
    assert result.exit_code == 2


def test_cli_refuses_to_resume_a_weights_only_checkpoint(tiny_checkpoint: Path) -> None:
    result = runner.invoke(app, ["train", "--resume", str(tiny_checkpoint)])
    assert result.exit_code == 1
    assert "no training state" in result.output and "Traceback" not in result.output


def test_cli_bad_data_folder_is_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", str(tmp_path), "-o", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert "has no MRI/ folder" in result.output




@pytest.mark.slow
def test_cli_trains_and_the_result_fuses(tiny_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    (tmp_path / "run.toml").write_text(RUN_TOML)
    args = ["train", str(tiny_data), "-o", str(run), "--preset", "quick", "--config-file",
            str(tmp_path / "run.toml"), "--epochs", "1"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "val EPE" in result.output and (run / "best.pt").is_file()
    recipe = json.loads((run / "config.json").read_text())["train"]["recipe"]
    assert recipe["epochs"] == 1  # the option overrides the file
    assert (recipe["image_size"], recipe["losses"]["flow"]) == (32, 4.0)  # the file overrides the preset
    assert (recipe["lr"], recipe["model"]) == (1e-3, "small")  # the preset, where neither says more
    fused = tmp_path / "fused.png"
    result = runner.invoke(
        app,
        [
            "fuse",
            str(tiny_data / "CT" / "1001.png"),
            str(tiny_data / "MRI" / "1001.png"),
            "-o",
            str(fused),
            "--weights",
            str(run / "best.pt"),
            "--device",
            "cpu",
        ],
    )
    if "not available" in result.output:
        pytest.skip("bsafuse fuse is not in this build yet")
    assert result.exit_code == 0, result.output
    assert fused.is_file()


@pytest.mark.slow
def test_cli_resume_auto_starts_then_continues(tiny_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["train", str(tiny_data), "-o", str(run), "--preset", "quick", "--image-size", "32", "--batch-size", "4",
            "--workers", "0", "--val-cases", "3", "--device", "cpu", "--resume", "auto"]  # fmt: skip
    assert runner.invoke(app, [*args, "--epochs", "1"]).exit_code == 0  # nothing to resume: starts
    result = runner.invoke(app, [*args, "--epochs", "2"])  # resumes from run/last.pt
    assert result.exit_code == 0, result.output
    assert [r["epoch"] for r in _rows(run)] == ["1", "2"]
    assert read_checkpoint(run / "last.pt")["epoch"] == 2
