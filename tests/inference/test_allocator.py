"""pcee.inference.allocator: freed memory stays in the process, so a repeated allocation of the
same size does not page-fault again (checked in fresh processes: the setting is process-wide)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from pcee.inference.allocator import keep_freed_memory

# allocate, touch and free a 40 MiB block (above the 32 MiB glibc's dynamic mmap threshold stops at, as a
# batch's activations can be) 11 times; report the minor page faults of the last 10
PROBE = """
import json, resource, sys
import numpy as np
from pcee.inference.allocator import keep_freed_memory_as_set
applied = keep_freed_memory_as_set()
def once():
    a = np.ones(5 << 20)  # 40 MiB, every page written
    del a
once()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    once()
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _probe(keep: str) -> dict:
    env = {"PATH": "/usr/bin:/bin", "PCEE_KEEP_FREED_MEMORY": keep}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's; elsewhere the call is a no-op")
def test_kept_memory_is_reused_without_page_faults():
    default, kept = _probe("false"), _probe("true")
    assert default["applied"] is False and kept["applied"] is True
    # glibc's default: each block mmap'd afresh and unmapped on free, so faulted in again (fewer faults than
    # 4 KiB pages where the kernel backs it with huge pages: 5,320 for the 10 blocks on the dev machine)
    assert default["faults"] >= 100
    assert kept["faults"] <= default["faults"] // 10  # kept: the first block's pages are reused (0 seen)


def test_bad_limits_are_refused():
    for bad in (0, -1, 2**31):
        with pytest.raises(ValueError, match="limit_bytes"):
            keep_freed_memory(bad)
