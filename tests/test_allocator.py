"""layerexit's commands keep freed activation memory in the process (glibc thresholds), so batches do not
page-fault through fresh memory; each case runs in a fresh interpreter because the setting is process-wide."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the thresholds are glibc's")

PROBE = """
import json, resource, torch
PASSES = %d
from layerexit.allocator import keep_freed_memory
applied = keep_freed_memory()
torch.manual_seed(0)
x, linear = torch.randn(32, 48, 384), torch.nn.Linear(384, 1536)

def batches():  # a layer's activations on batches that shrink as rows exit
    for rows in %r:
        hidden = linear(x[:rows])  # (rows, 48, 1536): up to 9 MB
        hidden = torch.nn.functional.gelu(hidden)
        out = hidden @ linear.weight  # (rows, 48, 384)

with torch.inference_mode():
    batches()  # the heap grows to its peak (a later pass may grow it once more: the free list's layout varies)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(PASSES):
        batches()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "faults": faults}))
"""
PASSES = 3
ROWS = [32, 30, 25, 20, 14, 9, 5, 3, 1] * 5
#: pages the measured passes would touch if every block were fresh memory: per row, a (48, 1536) linear
#: output, its GELU and a (48, 384) product, in float32
FRESH_PAGES = PASSES * sum(ROWS) * 48 * (1536 + 1536 + 384) * 4 // 4096


def _probe(**env) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    out = subprocess.run([sys.executable, "-c", PROBE % (PASSES, ROWS)], env={**clean, **env}, capture_output=True,
                         text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    kept = _probe()
    # the comparison: glibc's default threshold, held fixed (a user's MALLOC_ variable also turns off glibc's
    # adaptive threshold, which otherwise reuses some blocks or not depending on the order of frees)
    fresh = _probe(MALLOC_MMAP_THRESHOLD_="131072")
    assert kept["applied"] == {"allocator": "glibc", "mmap_threshold": 32 * 2**20, "trim_threshold": 2**30}
    assert fresh["applied"] is None
    # fixed default: every block above 128 KiB is mapped afresh and faulted in page by page (the probe sees it)
    assert fresh["faults"] > 0.5 * FRESH_PAGES, (fresh, FRESH_PAGES)
    # kept: the measured passes reuse the heap; usually no fault at all, at most one more growth of the heap
    # when the free list's layout leaves no hole big enough for a block
    assert kept["faults"] < 0.02 * FRESH_PAGES, (kept, FRESH_PAGES)


def test_a_users_own_allocator_settings_are_left_alone():
    assert _probe(MALLOC_TRIM_THRESHOLD_="1000000")["applied"] is None
    assert _probe(LD_PRELOAD="/usr/lib/libjemalloc.so.2")["applied"] is None  # absent file: ld.so only warns
