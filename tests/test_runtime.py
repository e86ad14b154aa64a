"""bsafuse._runtime: the OpenMP wait policy chosen before torch loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROBE = (
    "import json, os; from bsafuse._runtime import tune_process; "
    "a = tune_process(malloc=False{extra}); "
    "print(json.dumps([a['omp_wait_policy'], os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT')]))"
)


def probe(env: dict[str, str], extra: str = "") -> list[str | None]:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "WORLD_SIZE", "GOMP_SPINCOUNT")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(extra=extra)],
        env={**clean, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


@pytest.mark.parametrize(
    ("env", "extra", "expected"),
    [
        ({}, "", ["ACTIVE", "ACTIVE", "10000000"]),  # a lone process spins, for a while
        ({"GOMP_SPINCOUNT": "7"}, "", ["ACTIVE", "ACTIVE", "7"]),  # the user's spin stays
        ({"WORLD_SIZE": "2"}, "", ["PASSIVE", "PASSIVE", None]),  # torchrun: processes share cores
        ({}, ", shared_cores=True", ["PASSIVE", "PASSIVE", None]),  # bsafuse train: DataLoader workers
        ({"OMP_WAIT_POLICY": "ACTIVE", "WORLD_SIZE": "2"}, "", [None, "ACTIVE", None]),  # the user's choice stays
    ],
)
def test_wait_policy(env: dict[str, str], extra: str, expected: list[str | None]) -> None:
    assert probe(env, extra) == expected
