"""Shared fixtures: devices, markers, seeded generators and real data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
HARVARD = SHARED / "data" / "harvard"  # the whole shared training set (absent in some checkouts)
DATA = REPO / "tests" / "data"
# A few Harvard Whole Brain Atlas pairs (CT-MRI 16003, 34015; PET-MRI 25020, 25057, 41060) and the
# fusion metrics' MATLAB reference values, copied from ../shared so CI needs nothing outside the repo.
HARVARD_PAIRS = DATA / "harvard"
METRICS_REFERENCE = DATA / "metrics-reference"

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
    """Harvard Whole Brain Atlas pairs: the copies in tests/data (always there)."""
    return HARVARD_PAIRS


@pytest.fixture(scope="session")
def harvard_full() -> Path:
    """The whole shared Harvard training set (skips where ../shared is absent)."""
    if not HARVARD.is_dir():
        pytest.skip(f"{HARVARD} not found")
    return HARVARD


pytest_plugins = ["fixtures_ckpt"]  # tiny_checkpoint / tiny_model (tests/fixtures_ckpt.py)
