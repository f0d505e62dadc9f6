"""What several benchmarks share: the shared data's location, a peak-RSS sampler and the causal-LM batches."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


class PeakRSS:
    """Samples this process's resident memory every 5 ms while active; ``peak`` in MiB."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def __enter__(self) -> PeakRSS:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss()) / 2**20


def llm_batches(tokenizer, n: int) -> list[torch.Tensor]:
    """``n`` batches of 4 rows × 256 tokens of real text (the Alpaca outputs), or random tokens without the data."""
    path = DATA / "instruct" / "alpaca_small_2000.json"
    if path.is_file():
        text = "\n\n".join(r["output"] for r in json.loads(path.read_text()))
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:n * 4 * 256])
    else:  # the benchmark still runs without the shared data, on random tokens (said in the output)
        print("note: ../shared/data is absent; using random tokens", file=sys.stderr)
        ids = torch.randint(0, len(tokenizer), (n * 4 * 256,), generator=torch.Generator().manual_seed(0))
    return list(ids.view(n, 4, 256))


def engine_step(model: torch.nn.Module, precision: str):
    """One optimizer step of `lorakit train`'s engine on a batch of token ids (chunked loss, fused AdamW,
    clipping), as a function of the batch."""
    from lorakit.training.loop import make_optimizer
    from lorakit.training.loss import causal_lm_loss

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, 1e-4, 0.0)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(ids: torch.Tensor) -> None:
        targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
        with autocast:
            total, count = causal_lm_loss(model, {"input_ids": ids, "targets": targets})
        (total / count).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def cpu_name() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it (every published figure names its CPU)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")
    except OSError:
        return "unknown CPU"


def rss_mib() -> float:
    """This process's resident memory now, in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_child(script: str, *args: str) -> dict:
    """Run ``python script *args`` (a benchmark measuring one case in a fresh process) and return the JSON it
    prints on its last line; stop with its stderr if it fails."""
    import subprocess

    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
