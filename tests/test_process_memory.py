"""Process memory on Linux with glibc: the peak RSS reading follows a large allocation after a reset, and with the
mmap threshold pinned a freed block goes back to the system (checked in child processes: the setting lasts for the
whole process)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from lorakit.process_memory import peak_rss_mib, reset_peak_rss

# Resets the peak, allocates and touches 96 MiB, frees it; prints the peak before and after, then the peak again.
PEAK = """
import torch
from lorakit.process_memory import peak_rss_mib, reset_peak_rss, return_freed_memory
assert reset_peak_rss()
start = peak_rss_mib()
block = torch.ones(96 * 2**20 // 4)
after = peak_rss_mib()
del block
return_freed_memory()
print(start, after, peak_rss_mib())
"""

# Allocates, touches and frees an 8 MiB block three times with malloc, then prints the MiB still resident.
RETAINED = """
import ctypes, sys
from lorakit.process_memory import map_large_allocations
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
def rss():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:")) / 1024
if sys.argv[1] == "pinned":
    assert map_large_allocations()
start = rss()
for _ in range(3):
    p = libc.malloc(8 << 20)
    ctypes.memset(p, 1, 8 << 20)
    libc.free(p)
print(rss() - start)
"""


def test_peak_rss_sees_a_large_allocation():
    if not reset_peak_rss():
        pytest.skip("this system does not let a process reset its peak RSS (/proc/self/clear_refs)")
    assert peak_rss_mib() > 0
    # In a fresh process: this one may serve a new block from memory it already holds, which RSS does not show.
    done = subprocess.run([sys.executable, "-c", PEAK], capture_output=True, text=True, check=True)
    start, after, peak = (float(v) for v in done.stdout.split())
    assert after >= start + 90 and peak >= start + 90  # the 96 MiB block shows, and stays in the peak once freed


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="map_large_allocations only acts on glibc")
def test_with_the_threshold_pinned_freed_blocks_go_back_to_the_system():
    def retained(mode: str) -> float:
        done = subprocess.run([sys.executable, "-c", RETAINED, mode], capture_output=True, text=True, check=True)
        return float(done.stdout)

    assert retained("pinned") < 1.0
    assert retained("default") > 4.0  # glibc's own threshold grows after the first free and keeps the block
