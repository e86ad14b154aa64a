"""The fusion metrics against the MATLAB originals' values on 36 (A, B, F) triples.

../shared/metrics-reference/values.json holds what the fusion literature's own code (VIFB,
Z. Liu, Y. Han, Z. Wang; run under GNU Octave) gives; its README documents every convention.
float64 reaches ~1e-13 here; anything above 1e-6 would mean a different convention.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bsafuse.metrics import fusion_metrics, q_abf, q_cv, q_s, q_ssim, q_vif, ssim_index

REFERENCE = Path(__file__).resolve().parent / "data" / "metrics-reference"  # copied from ../shared
RTOL = 1e-6
METRIC_FUNCTIONS = {"q_abf": q_abf, "q_cv": q_cv, "q_vif": q_vif, "q_s": q_s, "q_ssim": q_ssim}


TRIPLES = json.loads((REFERENCE / "values.json").read_text())


def _load(relative: str) -> np.ndarray:
    return np.asarray(Image.open(REFERENCE / relative), dtype=np.float64)


@pytest.fixture(scope="module", params=TRIPLES, ids=[Path(t["fused"]).stem for t in TRIPLES])
def triple(request: pytest.FixtureRequest) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """(expected values, F, A, B) of one triple."""
    entry = request.param
    return entry, _load(entry["fused"]), _load(entry["a"]), _load(entry["b"])


@pytest.mark.parametrize("metric", list(METRIC_FUNCTIONS))
def test_metric_matches_matlab(triple: tuple, metric: str) -> None:
    expected, f, a, b = triple
    assert METRIC_FUNCTIONS[metric](f, a, b) == pytest.approx(expected[metric], rel=RTOL)


@pytest.mark.parametrize(("key", "source"), [("ssim_fa", "a"), ("ssim_fb", "b")])
def test_ssim_halves_match_wang(triple: tuple, key: str, source: str) -> None:
    expected, f, a, b = triple
    assert ssim_index(f, a if source == "a" else b) == pytest.approx(expected[key], rel=RTOL)


def test_fusion_metrics_gives_the_same_numbers(triple: tuple) -> None:
    expected, f, a, b = triple
    got = fusion_metrics(f.astype(np.uint8), a.astype(np.uint8), b.astype(np.uint8))
    assert got == pytest.approx({k: expected[k] for k in METRIC_FUNCTIONS}, rel=RTOL)
