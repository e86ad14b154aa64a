"""The tiny checkpoint the CLI, API and example tests run with (random weights, `small` config).

Its working size is 64 px instead of 256 (16x fewer pixels, ~10x faster on a CPU), which also
makes every 256x256 test input go through the resample-in / resample-out path of `bsafuse.api`.

Loaded as a pytest plugin from conftest.py (`pytest_plugins = ["tests.fixtures_ckpt"]` or an
import of the fixtures). Construction draws from a forked RNG with a fixed seed, so the file's
weights are the same on every run and the global RNG of the test session is left untouched.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

SEED = 1234
WORKING_SIZE = 64  # pixels


def build_tiny_model() -> torch.nn.Module:
    """BSAFusion(ModelConfig.small() at a 64 px working size), weights from a fixed seed, eval mode."""
    from bsafuse.config import ModelConfig
    from bsafuse.model import BSAFusion

    with torch.random.fork_rng(devices=[]):  # the seed stays inside this block
        torch.manual_seed(SEED)
        model = BSAFusion(dataclasses.replace(ModelConfig.small(), image_size=WORKING_SIZE))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a small-config checkpoint written with weights.save_checkpoint (session-wide)."""
    from bsafuse.weights import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    return save_checkpoint(path, build_tiny_model())


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint: Path) -> torch.nn.Module:
    """The tiny checkpoint loaded on the CPU (shared: treat it as read-only)."""
    from bsafuse.api import load_model

    return load_model(tiny_checkpoint, device="cpu")
