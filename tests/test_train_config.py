"""bsafuse.training.config: the TrainConfig tree, its dict layouts (nested and the older flat one),
its layers (preset < TOML file < options) and its checks; and the import order of bsafuse.training."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bsafuse.cli import app
from bsafuse.config import LossWeights
from bsafuse.deform import DeformParams
from bsafuse.errors import InputError
from bsafuse.training import PRESETS, Recipe, RunSettings, TrainConfig
from bsafuse.training.config import recipe_of
from bsafuse.typed_dicts import merge

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
RUN_TOML = """
[recipe]
image_size = 32
epochs = 3
batch_size = 4
val_cases = ["3"]

[recipe.losses]
flow = 4.0

[run]
workers = 0
device = "cpu"
"""


@pytest.mark.parametrize("preset", list(PRESETS))
def test_to_dict_and_from_dict_round_trip_through_json(preset: str) -> None:
    config = TrainConfig.preset(preset, {"val_cases": ["16", "20"]}, data_dir="d", run_dir="r")  # type: ignore[arg-type]
    data = config.to_dict()
    assert set(data) == {"recipe", "run"} and "flip" not in data["recipe"]["deform"]
    assert TrainConfig.from_dict(json.loads(json.dumps(data))) == config
    assert isinstance(config.recipe.val_cases, tuple) and isinstance(config.recipe.losses, LossWeights)


def test_the_flat_layout_of_earlier_runs_is_read() -> None:
    stored = json.loads((REPO / "weights" / "v2-metrics" / "ct-mri-config.json").read_text())["train"]
    config = TrainConfig.from_dict(stored)
    recipe, run = config.recipe, config.run
    assert (recipe.model, recipe.image_size, recipe.epochs, recipe.lr, recipe.init) == ("small", 256, 38, 5e-4, "ct-mri")
    assert recipe.losses == LossWeights(flow=5.0) and recipe.val_cases == ("20",)
    assert recipe.deform == DeformParams(rotate_deg=4.0, translate_px=5.0, scale=0.04)
    assert recipe.training_deform == dataclasses.replace(recipe.deform, flip=True, rot90=True)
    assert (run.data_dir, run.device, run.workers, run.val_every) == ("../shared/data/harvard/CT-MRI", "cpu", 0, 5)
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert recipe_of(stored) == recipe == recipe_of(config.to_dict())  # either layout, no run needed
    assert recipe_of({"val_cases": ["2"], "seed": 3}).val_cases == ("2",)
    with pytest.raises(ValueError, match=r"mu_init 0.5 is no longer a setting; training uses mu_init = 1.0"):
        TrainConfig.from_dict({**stored, "mu_init": 0.5})


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        ({"recipe": {"lr": -1e-3}}, r"recipe.lr \(--lr\) -0.001 is not valid; use a positive learning rate"),
        ({"recipe": {"lr": 1e-8}}, r"recipe.lr \(--lr\) 1e-08 is not valid; .* at least lr_min \(5e-07\)"),
        ({"recipe": {"losses": {"ssim": 1.0}}}, r"recipe.losses has no setting 'ssim'; its settings are ce1, ce2"),
        ({"recipe": {"losses": {"grad": -1}}}, r"recipe.losses: LossWeights.grad must be >= 0, got -1.0"),
        ({"recipe": {"deform": {"rotate_deg": 90}}}, r"recipe.deform: DeformParams.rotate_deg must be at most 45"),
        ({"recipe": {"deform": {"flip": True}}}, r"recipe.deform.flip True is not valid; .* recipe.augment.flip"),
        ({"recipe": {"model": "huge"}}, r"recipe.model \(--config\) 'huge' is not valid; use paper or small"),
        ({"recipe": {"epochs": 2.5}}, r"recipe.epochs must be an integer, got 2.5"),
        ({"recipe": {"curriculum_epochs": -2}}, r"recipe.curriculum_epochs -2 is not valid; use 0 \(off\)"),
        ({"recipe": {"val_cases": "16"}}, r"recipe.val_cases must be a list, got '16'"),
        ({"run": {"workers": -1}}, r"run.workers \(--workers\) -1 is not valid"),
        ({"run": {"device": 0}}, r"run.device must be a string, got 0"),
        ({"batch": 8}, r"the training config has no setting 'batch'"),
    ],
)
def test_bad_values_raise_value_error_naming_them(layer: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig.preset("paper", layer, data_dir="d", run_dir="r")


def test_checks_run_on_direct_construction_too() -> None:
    with pytest.raises(ValueError, match=r"recipe.batch_size \(--batch-size\) 0 is not valid; use 1 or more"):
        Recipe(batch_size=0)
    with pytest.raises(ValueError, match=r"run.precision \(--precision\) 'fp16' is not valid"):
        RunSettings(data_dir="d", run_dir="r", precision="fp16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"run.run_dir is missing"):
        TrainConfig.from_dict({"run": {"data_dir": "d"}})


def test_layers_merge_key_by_key_and_none_is_not_given() -> None:
    base = {"recipe": {"epochs": 3, "losses": {"flow": 5.0}}}
    assert merge(base, {"recipe": {"epochs": None, "losses": {"grad": 2.0}}}, None) == {
        "recipe": {"epochs": 3, "losses": {"flow": 5.0, "grad": 2.0}}
    }
    assert merge({}, {"recipe": {"losses": {"flow": None}}}) == {"recipe": {"losses": {}}}


def test_resume_may_extend_epochs_and_change_run_settings_but_not_the_recipe() -> None:
    config = TrainConfig(recipe=Recipe(epochs=10), run=RunSettings(data_dir="d", run_dir="r"))
    resumed = config.resumed_with({"recipe": {"epochs": 20, "lr": config.recipe.lr}, "run": {"workers": 0}})
    assert (resumed.recipe.epochs, resumed.run.workers) == (20, 0)
    with pytest.raises(InputError, match=r"cannot change recipe.lr \(--lr\) to 0.001 \(the run has 5e-05\)"):
        config.resumed_with({"lr": 1e-3})
    with pytest.raises(InputError, match=r"recipe.losses.flow \(--flow-weight\) to 5.0 \(the run has 0.0\)"):
        config.resumed_with({"recipe": {"losses": {"flow": 5.0}}})


def test_presets_and_overrides() -> None:
    paper = TrainConfig.preset("paper", data_dir="d", run_dir="r").recipe
    assert (paper.model, paper.lr, paper.lr_min, paper.batch_size, paper.epochs, paper.losses.inten) == (
        "paper",
        5e-5,
        5e-7,
        32,
        3000,
        0.5,
    )
    quick = TrainConfig.preset("quick", {"epochs": None, "batch_size": 4}, data_dir="d", run_dir="r")
    assert quick.recipe.model == "small" and quick.recipe.image_size == 64 and quick.recipe.batch_size == 4
    assert quick.recipe.epochs == 110  # None: not given
    with pytest.raises(InputError, match=r"recipe.image_size \(--image-size\) 100 is not valid"):
        dataclasses.replace(quick.recipe, image_size=100)


def test_configure_lays_options_over_the_file_over_the_preset(tmp_path: Path) -> None:
    from bsafuse.cli.train import configure

    (tmp_path / "run.toml").write_text(RUN_TOML)
    options = {"recipe": {"epochs": 7, "lr": None}, "run": {"data_dir": "d", "run_dir": "r", "device": None}}
    config, state = configure("quick", tmp_path / "run.toml", None, options)
    assert state is None
    assert (config.recipe.epochs, config.recipe.image_size, config.recipe.lr) == (7, 32, 1e-3)
    assert (config.run.device, config.run.workers, config.run.data_dir) == ("cpu", 0, "d")
    assert config.recipe.losses.flow == 4.0 and config.recipe.losses.inten == 0.5  # merged key by key


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[recipe]\nlr = -1.0\n", r"recipe.lr \(--lr\) -1.0 is not valid; use a positive learning rate"),
        ("[recipe.losses]\ngard = 1.0\n", r"recipe.losses has no setting 'gard'; its settings are ce1, ce2"),
        ("[recipe]\nepochs = '3'\n", r"recipe.epochs must be an integer, got '3'"),
        ("[run]\nprecision = 'fp16'\n", r"run.precision \(--precision\) 'fp16' is not valid; use fp32 or bf16"),
        ("[recipe\n", r"run.toml is not a valid TOML file"),
        ("epochs = 3\n[run]\ndevice = 'cpu'\n", r"either nested \(recipe, run\) or flat, not both"),
    ],
)
def test_cli_bad_config_file_is_one_line(tmp_path: Path, toml: str, message: str) -> None:
    (tmp_path / "run.toml").write_text(toml)
    args = ["train", str(tmp_path), "-o", str(tmp_path / "run"), "--config-file", str(tmp_path / "run.toml")]
    result = runner.invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 1, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert re.search(message, result.output), result.output
    assert not (tmp_path / "run").exists()  # refused before any work


def test_cli_bad_option_value_is_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", str(tmp_path), "-o", str(tmp_path / "run"), "--lr", "-1"])
    assert result.exit_code == 1 and "recipe.lr (--lr) -1.0 is not valid" in result.output
    result = runner.invoke(app, ["train", str(tmp_path), "-o", str(tmp_path / "run"), "--preset", "fast"])
    assert result.exit_code == 2  # not one of the Literal's choices: a usage error
