"""Keeping a CPU training process's resident memory close to what its tensors need (glibc, Linux).

PyTorch's CPU tensors come from ``malloc``. glibc serves large requests with their own memory mappings and
returns them on ``free``, but after the first such free it raises that threshold (up to 32 MiB), so the
activations of a training step (a few MiB each) land on the heap, whose freed memory mostly stays with the
process. Measured on SmolLM2-135M (LoRA, 4 × 256 tokens, fp32): peak RSS 3122 MiB with glibc's default, 2471 MiB
with the threshold pinned at 256 KiB, but 254 → 143 tokens/s, as every page of every activation is then faulted
in and zeroed afresh. So it is an option (``lorakit train --low-memory``), not the default. Elsewhere (macOS, musl)
these functions do nothing.

No setting made from inside the process keeps resident memory at that floor for free: on the default ``lorakit
train`` run (bf16), pinning the threshold at 1-4 MiB, ``malloc_trim`` at every step's end, or both, save 6-14% of
the peak for 3-13% slower steps (``bench/allocator.py``). jemalloc or tcmalloc, loaded with ``LD_PRELOAD`` before
Python starts, come within 3-6% of the floor at the same speed or faster; that choice belongs to whoever starts
the process.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

_M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's malloc.h
MMAP_THRESHOLD = 256 * 1024


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
    except (OSError, AttributeError):
        return None
    return libc


def map_large_allocations(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve every allocation of ``threshold`` bytes or more with its own mapping, returned to the system when
    freed (glibc's ``M_MMAP_THRESHOLD``, which also stops glibc from raising it). For the whole process; True if
    it took effect."""
    libc = _glibc()
    return bool(libc and libc.mallopt(_M_MMAP_THRESHOLD, threshold))


def return_freed_memory() -> None:
    """Hand the heap's free memory back to the system (glibc's ``malloc_trim``)."""
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)


def reset_peak_rss() -> bool:
    """Start measuring the process's peak resident memory afresh (Linux ≥ 4.0); True if it took effect."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_rss_mib() -> float | None:
    """The most resident memory this process has had since start (or :func:`reset_peak_rss`), in MiB; None where
    the OS does not say."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB elsewhere


# -- a faster allocator, where the system has one ------------------------------------------------------------

ALLOCATOR_ENV = "LORAKIT_ALLOCATOR"  # "system" keeps the C library's malloc; set to the library in use otherwise
# tcmalloc first: on a 2-core Zen 4 (bench/allocator.py) its training steps were 13% faster than glibc's and its peak
# RSS 1.06× the floor; jemalloc's 1.03× at glibc's speed.
ALLOCATORS = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libjemalloc.so.2")
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def preferred_allocator(dirs: tuple[str, ...] = LIBRARY_DIRS) -> str | None:
    """The path of tcmalloc or jemalloc where the system has one (e.g. Debian's ``libtcmalloc-minimal4`` or
    ``libjemalloc2``), else None. Only on Linux: elsewhere the C library's allocator is kept."""
    if not sys.platform.startswith("linux"):
        return None
    for name in ALLOCATORS:
        for folder in dirs:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return path
    return None


def allocator_in_use() -> str:
    """``tcmalloc``, ``jemalloc`` or ``system``: what serves this process's allocations, as its environment says."""
    preload = os.environ.get("LD_PRELOAD", "")
    return next((name for name in ("tcmalloc", "jemalloc") if name in preload), "system")


def exec_with_allocator(argv: list[str], dirs: tuple[str, ...] = LIBRARY_DIRS) -> None:
    """Restart this command as ``python -m lorakit ARGV`` with tcmalloc or jemalloc preloaded, when the system has one
    and neither ``LORAKIT_ALLOCATOR=system``, a preloaded allocator nor ``--low-memory`` (a glibc setting) says
    otherwise; return when it does not.

    glibc's malloc keeps much of the memory freed within a training step (peak RSS 1.31× what the live tensors
    need, bench/allocator.py), and no setting made from inside the process closes that gap at full speed; tcmalloc
    and jemalloc do, but a C library's allocator can only be replaced before the process starts.
    """
    if os.environ.get(ALLOCATOR_ENV) or allocator_in_use() != "system" or "--low-memory" in argv:
        return
    library = preferred_allocator(dirs)
    if library is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = f"{library}:{env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else library
    env[ALLOCATOR_ENV] = library  # the restarted process does not restart again
    env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(2**62))  # no "large alloc" lines for big models
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "lorakit", *argv], env)
