"""Resident memory vs speed of `lorakit train` on the CPU under different allocator settings, side by side in one run.

Each setting runs the default `lorakit train` (the built-in task on the embedded SmolLM2-135M-Instruct, LoRA r=8 on
all-linear, batch 8, the precision `auto` picks here) for a few steps in its own process, and records:

- peak RSS: the process's high-water mark (VmHWM) from just before the first evaluation to the end of training (the
  trainer resets it after loading the model; the evaluation before training runs on 2 examples only);
- s/step: the median of the steps after the first (which also pays one-time costs);
- the estimate of the live tensors: `estimate_run` (what `lorakit memory` and the preflight print) for the run's
  own precision, at the length of its longest micro-batch (the built-in task pads each micro-batch to its longest
  example, not to --max-length 512; the estimate at 512 is printed too).

Settings: glibc's default; MALLOC_ARENA_MAX; M_MMAP_THRESHOLD pinned (via mallopt at start, as lorakit sets it, or
GLIBC_TUNABLES); M_TRIM_THRESHOLD / M_TOP_PAD; `malloc_trim(0)` at every step's end, or once after loading the model;
jemalloc and tcmalloc via LD_PRELOAD (Debian's libjemalloc2 and libtcmalloc-minimal4: PyPI ships neither library).
Environment settings are set before the child starts. mmap-256k (what --low-memory sets) is the floor: freed
memory goes back at once, so the resident memory follows the live tensors.

    python bench/allocator.py [--steps 5] [--rounds 2] [--settings default,trim-step,...]
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _common import cpu_name  # noqa: E402
from _timing import markdown_table  # noqa: E402

# mallopt parameter numbers, from glibc's malloc.h
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -2, -3, -8
KiB, MiB = 1024, 1024 * 1024
LIB = Path("/usr/lib/x86_64-linux-gnu")
TRAIN_MAX_LENGTH = 512  # `lorakit train`'s default --max-length
JEMALLOC, TCMALLOC = LIB / "libjemalloc.so.2", LIB / "libtcmalloc_minimal.so.4"

# name → (environment of the child, mallopt calls made at its start, malloc_trim(0) at every step's end)
SETTINGS: dict[str, tuple[dict[str, str], list[tuple[int, int]], bool]] = {
    "default": ({}, [], False),
    "arena-max-1": ({"MALLOC_ARENA_MAX": "1"}, [], False),
    "arena-max-2": ({"MALLOC_ARENA_MAX": "2"}, [], False),
    "mmap-256k": ({}, [(M_MMAP_THRESHOLD, 256 * KiB)], False),  # = --low-memory
    "mmap-1m": ({}, [(M_MMAP_THRESHOLD, 1 * MiB)], False),
    "mmap-4m": ({}, [(M_MMAP_THRESHOLD, 4 * MiB)], False),
    "mmap-16m": ({}, [(M_MMAP_THRESHOLD, 16 * MiB)], False),
    "mmap-32m": ({}, [(M_MMAP_THRESHOLD, 32 * MiB)], False),  # glibc's dynamic ceiling, pinned from the start
    # Setting either of these also stops glibc's dynamic mmap threshold (it stays at 128 KiB).
    "trim-thr-1m": ({}, [(M_TRIM_THRESHOLD, 1 * MiB)], False),
    "top-pad-0+trim-thr-128k": ({}, [(M_TOP_PAD, 0), (M_TRIM_THRESHOLD, 128 * KiB)], False),
    "trim-step": ({}, [], True),
    "mmap-4m+trim-step": ({}, [(M_MMAP_THRESHOLD, 4 * MiB)], True),
    "mmap-32m+trim-step": ({}, [(M_MMAP_THRESHOLD, 32 * MiB)], True),
    "env-tunable-mmap-4m": ({"GLIBC_TUNABLES": f"glibc.malloc.mmap_threshold={4 * MiB}"}, [], False),
    "trim-load": ({}, [], False),
    "trim-load+trim-step": ({}, [], True),
    "mmap-1m+trim-load": ({}, [(M_MMAP_THRESHOLD, 1 * MiB)], False),
    "mmap-4m+trim-load+trim-step": ({}, [(M_MMAP_THRESHOLD, 4 * MiB)], True),
    "jemalloc": ({"LD_PRELOAD": str(JEMALLOC)}, [], False),
    "jemalloc-decay-0": ({"LD_PRELOAD": str(JEMALLOC), "MALLOC_CONF": "dirty_decay_ms:0,muzzy_decay_ms:0"}, [],
                         False),
    "jemalloc-decay-1s": ({"LD_PRELOAD": str(JEMALLOC), "MALLOC_CONF": "dirty_decay_ms:1000,muzzy_decay_ms:1000"},
                          [], False),
    "tcmalloc": ({"LD_PRELOAD": str(TCMALLOC)}, [], False),
    "tcmalloc-release-10": ({"LD_PRELOAD": str(TCMALLOC), "TCMALLOC_RELEASE_RATE": "10"}, [], False),
}

# These also call malloc_trim(0) once the model is loaded (before the trainer resets the peak).
TRIM_AFTER_LOAD = {"trim-load", "trim-load+trim-step", "mmap-1m+trim-load", "mmap-4m+trim-load+trim-step"}


def run_setting(name: str, steps: int) -> dict:
    """In this (child) process: apply ``name``'s runtime settings, train ``steps`` steps of the default run; peak RSS,
    s/step, the estimate."""
    _, mallopts, trim_each_step = SETTINGS[name]
    libc = ctypes.CDLL("libc.so.6")
    for param, value in mallopts:  # before torch is imported, like an environment tunable
        if libc.mallopt(param, value) != 1:
            raise SystemExit(f"mallopt({param}, {value}) failed")

    import lorakit.training.loop as loop
    from lorakit.models.devices import resolve_precision
    from lorakit.training.options import TrainConfig
    from lorakit.training.preflight import estimate_run, run_dtypes, stored_dtype

    if trim_each_step:  # the bench's hook at the step boundary: the loop writes one metrics record per step
        class TrimmingLog(loop.MetricsLog):
            def write(self, record: dict) -> None:
                super().write(record)
                if "loss" in record:
                    libc.malloc_trim(0)

        loop.MetricsLog = TrimmingLog
    seen = {"length": 0, "rss_after_load_mib": 0.0}
    build_task = loop.build_task

    def recording_build_task(*args, **kwargs):  # notes the process's size once the model is loaded, and the
        task = build_task(*args, **kwargs)  # longest micro-batch (the estimate is taken at that length)
        if name in TRIM_AFTER_LOAD:
            libc.malloc_trim(0)
        seen["rss_after_load_mib"] = _rss_mib()
        batch = task.batch

        def recording_batch(indices):
            mb = batch(indices)
            seen["length"] = max(seen["length"], mb.tensors["input_ids"].shape[1])
            return mb

        task.batch = recording_batch
        return task

    loop.build_task = recording_build_task
    maps = Path("/proc/self/maps").read_text()
    allocator = "jemalloc" if "libjemalloc" in maps else "tcmalloc" if "libtcmalloc" in maps else "glibc"
    with tempfile.TemporaryDirectory() as out:
        overrides = {"steps": steps, "output_dir": out, "progress": False, "max_eval": 2, "preflight": False}
        summary = loop.train(**overrides)
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    step_s = [r["step_s"] for r in records if "step_s" in r]
    config = TrainConfig(**overrides).resolved()
    precision = resolve_precision(config.precision, __import__("torch").device("cpu"))
    dtypes = run_dtypes(config, precision, stored_dtype(config))
    estimate = estimate_run(dataclasses.replace(config, max_length=seen["length"]), dtypes=dtypes)
    configured = estimate_run(config, dtypes=dtypes)
    return {"peak_rss_mib": summary["peak_rss_mib"], "step_s": statistics.median(step_s[1:]), "first_step_s": step_s[0],
            "tokens_per_step": summary["tokens"] / steps, "estimate_mib": estimate.total / MiB,
            "estimate_max_length_mib": configured.total / MiB, "longest": seen["length"],
            "rss_after_load_mib": seen["rss_after_load_mib"],
            "precision": summary["precision"], "allocator": allocator}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


def spawn(name: str, steps: int) -> dict | None:
    """Measure ``name`` in a fresh process (its environment set before it starts); None, said on stderr, if it
    fails (the other settings still run)."""
    env = {**os.environ, **SETTINGS[name][0]}
    out = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(steps)], capture_output=True,
                         text=True, env=env)
    if out.returncode != 0:
        print(f"  {name} failed:\n{out.stderr[-2000:]}", file=sys.stderr, flush=True)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per setting (the first is not timed)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of every setting, interleaved (median reported)")
    parser.add_argument("--settings", help=f"comma-separated, of: {', '.join(SETTINGS)} (default: all)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_setting(args.child, args.steps)))
        return
    names = args.settings.split(",") if args.settings else list(SETTINGS)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown setting(s) {unknown}; choose from {list(SETTINGS)}")
    if any(str(JEMALLOC) in SETTINGS[n][0].get("LD_PRELOAD", "") for n in names) and not JEMALLOC.exists() or any(
            str(TCMALLOC) in SETTINGS[n][0].get("LD_PRELOAD", "") for n in names) and not TCMALLOC.exists():
        raise SystemExit("jemalloc/tcmalloc settings need: apt-get install libjemalloc2 libtcmalloc-minimal4")

    runs: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            result = spawn(name, args.steps)
            if result is None:
                continue
            runs.setdefault(name, []).append(result)
            print(f"  {name}: peak RSS {result['peak_rss_mib']:.0f} MiB, {result['step_s']:.2f} s/step "
                  f"({result['allocator']}, {result['precision']})", file=sys.stderr, flush=True)
    med = {n: {k: statistics.median(x[k] for x in rs) for k in ("peak_rss_mib", "step_s", "estimate_mib",
                                                                  "rss_after_load_mib")}
           | {"precision": rs[0]["precision"], "allocator": rs[0]["allocator"],
              "tokens_per_step": rs[0]["tokens_per_step"], "longest": rs[0]["longest"],
              "estimate_max_length_mib": rs[0]["estimate_max_length_mib"]} for n, rs in runs.items()}
    base = med.get("default")
    rows = []
    for n, m in med.items():
        vs = f"{m['step_s'] / base['step_s'] - 1:+.1%}" if base else "n/a"
        rss_vs = f"{m['peak_rss_mib'] / base['peak_rss_mib']:.2f}×" if base else "n/a"
        rows.append([n, m["allocator"], f"{m['rss_after_load_mib']:.0f}", f"{m['peak_rss_mib']:.0f}",
                     f"{m['peak_rss_mib'] / m['estimate_mib']:.2f}", rss_vs, f"{m['step_s']:.2f}", vs])
    any_run = next(iter(med.values()))
    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores); default `lorakit train` run, {args.steps} steps "
          f"(~{any_run['tokens_per_step']:.0f} tokens/step, {any_run['precision']}), {args.rounds} round(s), medians; "
          f"estimate of live tensors (estimate_run at the longest micro-batch, {any_run['longest']} tokens): "
          f"{any_run['estimate_mib']:.0f} MiB (at --max-length {TRAIN_MAX_LENGTH}: "
          f"{any_run['estimate_max_length_mib']:.0f} MiB)")
    print(markdown_table(["setting", "allocator", "RSS after load MiB", "peak RSS MiB", "RSS / estimate",
                          "RSS vs default", "s/step", "time vs default"], rows))


if __name__ == "__main__":
    main()
