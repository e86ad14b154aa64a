"""Process settings that make CPU inference and training fast; applied by the command line.

Two settings, both measured on 2-core machines (benchmarks/README.md):

- ``OMP_WAIT_POLICY``: whether OpenMP worker threads spin (ACTIVE) or sleep (PASSIVE) between
  parallel regions. A forward pass is hundreds of short parallel regions, so a lone process is
  fastest spinning: on a quiet 2-core machine, batch 1 took 0.24 s with ACTIVE against 0.29-0.36 s
  with PASSIVE and 0.31-0.33 s with the OpenMP default, and batch 8 1.7 s against 2.1 s. Training
  with two DataLoader workers on the same two cores spins faster too: `bsafuse train --preset
  residual` on CT, one epoch, runs alternating, 2.11 / 2.19 / 2.25 samples/s with ACTIVE against
  1.71 / 1.99 / 2.00 with PASSIVE (without workers 2.06 against 1.86; 2026-12-07). Where several
  processes each run their own OpenMP threads on one CPU (torchrun), spinning threads steal the
  cores the busy ones need, and PASSIVE is the choice. So: ACTIVE, PASSIVE under torchrun with
  several processes. OpenMP reads it once, when torch loads, so it must be set before
  ``import torch``; a user setting is kept. With ACTIVE, GNU OpenMP (torch's on Linux) spins
  without end, so between two network passes its idle threads hold the cores that the
  pre-alignment's SimpleITK threads need; ``GOMP_SPINCOUNT`` (SPIN_COUNT turns of the wait loop)
  lets them sleep once torch has been idle that long. Measured 2026-12-07 on a 2-core machine
  (`benchmarks/bench_prealign.py`, the rigid starts in two threads against one): 1.18-1.45 x
  faster with the endless spin, 1.41-1.86 x with SPIN_COUNT (two runs); the network's own speed showed no
  difference beyond the runs' spread (`bench_fuse.py --only optimised`, paper and small, batch 1
  and 8, the two settings in alternating processes, two runs each).
- glibc ``malloc`` keeps large blocks: blocks over 32 MiB (a 256 x 256 feature map of 64
  channels for two images is 33.5 MiB) are otherwise mmap-ed fresh and unmapped on free, and
  every new block page-faults in at about 4 GB/s, which made a batch-8 forward pass ~30 % and a
  training step ~40 % slower. With mmap off for malloc and trimming raised, freed blocks are reused.
  Peak memory is unchanged; memory freed late in a run returns to the system only at exit.

Library users who want the same can call `tune_process()` before importing torch.
This module imports nothing heavy (no torch, no numpy).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from typing import Any

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30  # bytes of free memory kept at the top of the heap before trimming
SPIN_COUNT = "10000000"  # GOMP_SPINCOUNT with ACTIVE: idle OpenMP threads sleep after this many turns


def tune_process(*, omp: bool = True, malloc: bool = True, shared_cores: bool | None = None) -> dict[str, Any]:
    """Apply the settings above where they can still take effect; returns what was applied.

    `omp`: set OMP_WAIT_POLICY unless the variable is set or torch is already loaded: PASSIVE when
    `shared_cores` (default: under torchrun with several processes), else ACTIVE, with
    GOMP_SPINCOUNT = SPIN_COUNT unless that is set.
    `malloc`: glibc only (Linux); elsewhere nothing happens. Also skipped when the environment
    variable BSAFUSE_NO_MALLOC_TUNING is set (to compare, or if another allocator is preloaded).
    """
    applied: dict[str, Any] = {"omp_wait_policy": None, "gomp_spincount": None, "malloc": False}
    if shared_cores is None:
        shared_cores = os.environ.get("WORLD_SIZE", "1") not in ("", "1")
    if omp and "OMP_WAIT_POLICY" not in os.environ and "torch" not in sys.modules:
        os.environ["OMP_WAIT_POLICY"] = applied["omp_wait_policy"] = "PASSIVE" if shared_cores else "ACTIVE"
        if not shared_cores and "GOMP_SPINCOUNT" not in os.environ:
            os.environ["GOMP_SPINCOUNT"] = applied["gomp_spincount"] = SPIN_COUNT
    if malloc and not os.environ.get("BSAFUSE_NO_MALLOC_TUNING"):
        applied["malloc"] = _keep_large_blocks()
    return applied


def _keep_large_blocks() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    ok = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not ok:
        log.debug("mallopt refused the large-block settings; keeping the defaults")
    return ok
