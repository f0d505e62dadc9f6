"""Several processes: FSDP vs DDP vs one process, `lorakit train` on SmolLM2-135M (embedded), in one run.

Every case trains the same LoRA (r=8, all-linear) with the same global batch (4 rows × 256 packed tokens of the
Alpaca data in ../shared/data, or the built-in task without it) for --steps steps:

- one: one process, --batch-size 4;
- ddp: `torchrun --nproc_per_node 2`, --batch-size 2 each (every process holds the whole model);
- fsdp: the same with --fsdp (each process holds half of the weights).

Reported from each run's summary.json: training tokens/s (the loop only, not loading or evaluation), each process's
peak RSS while evaluating and training (after the model is loaded and sharded: VmHWM reset there), and each process's
resident parameter bytes. Each case runs once, one after another; with 2 processes on 2 cores each process has one
thread (OMP_NUM_THREADS=1), the one-process run two.

    python bench/distributed.py [--steps 8] [--precision fp32] [--out runs/bench-distributed]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _common import DATA

CASES = ("one", "ddp", "fsdp")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(case: str, steps: int, precision: str, out: Path) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of one case."""
    data = DATA / "instruct" / "alpaca_small_2000.json"
    task = ["--task", "causal_lm", "--data", str(data), "--max-length", "256"] if data.is_file() else []
    args = ["train", "--model", "default", *task, "--steps", str(steps), "--warmup-steps", "1", "--max-eval", "8",
            "--max-new-tokens", "4", "--no-progress", "--precision", precision, "--output-dir", str(out / case)]
    cores = os.cpu_count() or 1
    if case == "one":
        return [sys.executable, "-m", "lorakit", *args, "--batch-size", "4"], {"OMP_NUM_THREADS": str(cores)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                "127.0.0.1", "--master_port", str(_free_port()), "-m", "lorakit"]
    fsdp = ["--fsdp"] if case == "fsdp" else []
    return [*launcher, *args, "--batch-size", "2", *fsdp], {"OMP_NUM_THREADS": str(max(1, cores // 2))}


def run_case(case: str, steps: int, precision: str, out: Path) -> dict:
    cmd, env = command(case, steps, precision, out)
    done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{case} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    summary = json.loads((out / case / "summary.json").read_text())
    per_process = summary.get("peak_rss_mib_per_process") or [summary["peak_rss_mib"]]
    params = summary.get("param_bytes_per_process") or [summary.get("param_bytes")]
    return {"case": case, "processes": summary["processes"], "precision": summary["precision"],
            "tokens_per_s": summary["tokens_per_s"], "tokens": summary["tokens"],
            "peak_rss_mib": per_process, "param_mib": [b / 2**20 if b else None for b in params],
            "last_loss": summary["last_loss"]}


def table(rows: list[dict]) -> str:
    lines = [("| case | processes | precision | tokens/s | peak RSS per process (MiB) | parameters per process (MiB) "
              "| last loss |"), "|---|---:|---|---:|---|---|---:|"]
    for r in rows:
        rss = " / ".join(f"{m:.0f}" for m in r["peak_rss_mib"])
        params = " / ".join(f"{m:.0f}" for m in r["param_mib"] if m is not None)
        lines.append(f"| {r['case']} | {r['processes']} | {r['precision']} | {r['tokens_per_s']:.0f} | {rss} | "
                     f"{params} | {r['last_loss']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--precision", default="fp32", choices=("auto", "bf16", "fp32"))
    parser.add_argument("--out", default="runs/bench-distributed")
    args = parser.parse_args()
    out = Path(args.out)
    rows = []
    for case in CASES:
        shutil.rmtree(out / case, ignore_errors=True)  # a new run, not a resume
        rows.append(run_case(case, args.steps, args.precision, out))
        print(f"{case}: {rows[-1]['tokens_per_s']:.0f} tokens/s, peak RSS {rows[-1]['peak_rss_mib']}", flush=True)
    print(table(rows))
    (out / "distributed.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
