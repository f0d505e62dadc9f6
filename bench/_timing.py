"""Shared helpers of the benchmarks: interleaved timing, so that machine noise hits every contender alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, iters: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin (A, B, C, A, B, C, ...)."""
    samples = interleaved_samples(fns, rounds, iters, warmup)
    return {name: statistics.median(values) for name, values in samples.items()}


def overhead(samples: dict[str, list[float]], name: str, reference: str) -> float:
    """Median over rounds of ``name``'s time relative to ``reference`` in the same round, minus 1.

    A round times every contender back to back, so a ratio within a round cancels the slow drifts of a shared
    machine that a ratio of medians keeps.
    """
    return statistics.median(a / b for a, b in zip(samples[name], samples[reference])) - 1


def interleaved_samples(fns: dict[str, Callable[[], object]], rounds: int, iters: int,
                        warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each function in each round, timed round-robin (A, B, C, A, B, C, ...)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        order = list(fns.items()) if r % 2 == 0 else list(reversed(fns.items()))
        for name, fn in order:
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            samples[name].append((time.perf_counter() - start) / iters)
    return samples


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ratio_quartiles(samples: dict[str, list[float]], name: str, reference: str) -> str:
    """The 25th and 75th percentiles of ``name``'s per-round time ratio to ``reference``, minus 1, in %."""
    ratios = [a / b for a, b in zip(samples[name], samples[reference])]
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return f"{100 * (q1 - 1):+.1f}…{100 * (q3 - 1):+.1f}%"


def fastest_ratio(samples: dict[str, list[float]], name: str, reference: str) -> str:
    """``name``'s fastest round over ``reference``'s fastest, minus 1, in %: a shared machine's noise only ever
    slows a round down, so the fastest rounds are a second estimate, less sensitive to bursts than the median."""
    return f"{100 * (min(samples[name]) / min(samples[reference]) - 1):+.1f}%"
