"""Shared fixtures: devices, markers, seeded generators and real data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
HARVARD = SHARED / "data" / "harvard"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture
def generator() -> torch.Generator:
    """A seeded CPU generator: library code takes randomness only from one of these."""
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="session")
def harvard() -> Path:
    """The shared Harvard Whole Brain Atlas pairs (skips where ../shared is absent)."""
    if not HARVARD.is_dir():
        pytest.skip(f"{HARVARD} not found")
    return HARVARD

pytest_plugins = ["fixtures_ckpt"]  # tiny_checkpoint / tiny_model (tests/fixtures_ckpt.py)
