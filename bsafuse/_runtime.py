"""Process settings that make CPU inference and training fast; applied by the command line.

Two settings, both measured on 2-core machines (benchmarks/README.md):

- ``OMP_WAIT_POLICY=PASSIVE``: OpenMP worker threads sleep between parallel regions instead of
  spinning. On a CPU shared with other work (a data loader, a second process, a training job)
  spinning threads steal the cores the busy threads need; passive waiting was faster in every
  loaded measurement and cost nothing measurable on a quiet machine. OpenMP reads it once, when
  torch loads, so it must be set before ``import torch``; an explicit user setting is kept.
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

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30  # bytes of free memory kept at the top of the heap before trimming


def tune_process(*, omp: bool = True, malloc: bool = True) -> dict[str, bool]:
    """Apply the settings above where they can still take effect; returns what was applied.

    `omp`: set OMP_WAIT_POLICY=PASSIVE unless the variable is set or torch is already loaded.
    `malloc`: glibc only (Linux); elsewhere nothing happens. Also skipped when the environment
    variable BSAFUSE_NO_MALLOC_TUNING is set (to compare, or if another allocator is preloaded).
    """
    applied = {"omp_passive": False, "malloc": False}
    if omp and "OMP_WAIT_POLICY" not in os.environ and "torch" not in sys.modules:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        applied["omp_passive"] = True
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
