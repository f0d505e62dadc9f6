"""Process memory on Linux with glibc: the peak RSS reading follows a large allocation after a reset, and with the
mmap threshold pinned a freed block goes back to the system (checked in child processes: the setting lasts for the
whole process)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from lorakit.core.process_memory import peak_rss_mib, reset_peak_rss

# Resets the peak, allocates and touches 96 MiB, frees it; prints the peak before and after, then the peak again.
PEAK = """
import torch
from lorakit.core.process_memory import peak_rss_mib, reset_peak_rss, return_freed_memory
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
from lorakit.core.process_memory import map_large_allocations
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


# -- tcmalloc / jemalloc where the system has one -----------------------------------------------------------------

def _libraries(folder, *names):
    for name in names:
        (folder / name).write_bytes(b"")
    return (str(folder / "missing"), str(folder))


def test_the_preferred_allocator_is_tcmalloc_then_jemalloc(tmp_path, monkeypatch):
    from lorakit.core.process_memory import preferred_allocator

    monkeypatch.setattr(sys, "platform", "linux")
    assert preferred_allocator(_libraries(tmp_path)) is None
    assert preferred_allocator(_libraries(tmp_path, "libjemalloc.so.2")) == str(tmp_path / "libjemalloc.so.2")
    assert preferred_allocator(_libraries(tmp_path, "libtcmalloc_minimal.so.4")) == \
        str(tmp_path / "libtcmalloc_minimal.so.4")
    monkeypatch.setattr(sys, "platform", "darwin")
    assert preferred_allocator(_libraries(tmp_path)) is None


def test_train_restarts_once_with_the_allocator_preloaded(tmp_path, monkeypatch):
    import lorakit.core.process_memory as pm

    calls = []
    monkeypatch.setattr(pm.os, "execve", lambda exe, args, env: calls.append((exe, args, env)))
    monkeypatch.setattr(sys, "platform", "linux")
    for key in ("LORAKIT_ALLOCATOR", "LD_PRELOAD", "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"):
        monkeypatch.delenv(key, raising=False)
    dirs = _libraries(tmp_path, "libtcmalloc_minimal.so.4")
    library = str(tmp_path / "libtcmalloc_minimal.so.4")

    pm.exec_with_allocator(["train", "--steps", "3"], dirs)
    (exe, args, env), = calls
    assert exe == sys.executable and args == [sys.executable, "-m", "lorakit", "train", "--steps", "3"]
    assert env["LD_PRELOAD"] == library and env["LORAKIT_ALLOCATOR"] == library  # the restart does not restart
    # Not again in the restarted process; not when asked for the system's; not over a preloaded allocator; not
    # with --low-memory (a glibc setting); an existing LD_PRELOAD is kept.
    for env_key, value in (("LORAKIT_ALLOCATOR", library), ("LORAKIT_ALLOCATOR", "system"),
                           ("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")):
        with monkeypatch.context() as m:
            m.setenv(env_key, value)
            pm.exec_with_allocator(["train"], dirs)
    pm.exec_with_allocator(["train", "--low-memory"], dirs)
    assert len(calls) == 1
    monkeypatch.setenv("LD_PRELOAD", "/opt/libother.so")
    pm.exec_with_allocator(["train"], dirs)
    assert calls[-1][2]["LD_PRELOAD"] == f"{library}:/opt/libother.so"
    monkeypatch.setenv("LD_PRELOAD", "")
    assert pm.allocator_in_use() == "system"
    monkeypatch.setenv("LD_PRELOAD", library)
    assert pm.allocator_in_use() == "tcmalloc"


def test_only_the_train_command_restarts(monkeypatch):
    import lorakit.cli
    import lorakit.core.process_memory as pm

    restarted = []
    monkeypatch.setattr(pm, "exec_with_allocator", lambda argv: restarted.append(argv))
    monkeypatch.setattr(lorakit.cli, "main", lambda argv: 0)
    for argv, expected in ((["train", "--steps", "1"], [["train", "--steps", "1"]]), (["eval", "x"], [])):
        restarted.clear()
        monkeypatch.setattr(sys, "argv", ["lorakit", *argv])
        assert lorakit.cli.console_main() == 0
        assert restarted == expected
