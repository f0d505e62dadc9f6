"""LoRA+ against plain LoRA at the same budget: the built-in task with `lorakit train`'s defaults, and SST-2.

Each pair of runs differs only in `--loraplus-lr-ratio` (B's learning rate over A's; PEFT's create_loraplus_optimizer
groups). Built-in task: SmolLM2-135M-Instruct, 40 steps, every other option at its default, exact match and loss
on its 100 held-out orders. SST-2: all-MiniLM-L6-v2, r=8 on query,value plus the head, the first --train sentences of the
training split, one epoch, batch 32, dev accuracy on all 872 dev sentences (bench/sst2.py's set-up).

    python bench/loraplus.py [--runs plain,16] [--tasks builtin,sst2] [--train 4000] [--seed 0]

--runs lists the runs of each task: `plain` (plain LoRA), `R` (LoRA+ with ratio R at the task's learning rate) or
`R@LR` (LoRA+ with ratio R at learning rate LR; PEFT suggests a somewhat lower base rate with LoRA+).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from lorakit import TrainConfig, train

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2"


TASKS = ("builtin", "sst2")
FAST_LOSS = 0.05  # "first step with loss < 0.05": how soon a run fits the training data


def _curve(out: str, after: dict) -> dict:
    """From the run's metrics.jsonl: the mean training loss over the first and the last quarter of the steps, and
    the first step whose training loss is below FAST_LOSS (None if none); the held-out loss after training."""
    steps = [(r["step"], r["loss"]) for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    losses = [loss for _, loss in steps]
    quarter = max(1, len(losses) // 4)
    return {"loss_first_quarter": sum(losses[:quarter]) / quarter, "loss_last_quarter": sum(losses[-quarter:]) / quarter,
            "first_step_below": next((step for step, loss in steps if loss < FAST_LOSS), None),
            "heldout_loss": after.get("loss")}


def _builtin(ratio: float | None, lr: float | None, out: str, seed: int) -> dict:
    result = train(TrainConfig(loraplus_lr_ratio=ratio, output_dir=out, progress=False, seed=seed,
                               **({} if lr is None else {"lr": lr})))
    return {"metric": result["after"]["exact_match"], "seconds": result["train_seconds"], **_curve(out, result["after"])}


def _sst2(ratio: float | None, lr: float | None, out: str, seed: int, subset: Path) -> dict:
    config = TrainConfig(model="minilm", task="seq_cls", data=str(subset), eval_data=str(DATA / "dev.tsv"), max_eval=0,
                         r=8, lora_alpha=16, target_modules="query,value", lr=lr or 2e-3, epochs=1.0, batch_size=32,
                         max_length=64, warmup_steps=30, schedule="linear", loraplus_lr_ratio=ratio, output_dir=out,
                         seed=seed, progress=False)
    result = train(config)
    return {"metric": result["after"]["accuracy"], "seconds": result["train_seconds"], **_curve(out, result["after"])}


def _parse_run(spec: str) -> tuple[float | None, float | None]:
    """``plain`` → (None, None); ``16`` → (16, None); ``16@1e-3`` → (16, 0.001)."""
    if spec == "plain":
        return None, None
    ratio, _, lr = spec.partition("@")
    try:
        return float(ratio), float(lr) if lr else None
    except ValueError:
        raise SystemExit(f"--runs: {spec!r} is not plain, RATIO or RATIO@LR") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="plain,16", help="comma-separated: plain, RATIO or RATIO@LR (see above)")
    parser.add_argument("--tasks", default="builtin,sst2", help=f"comma-separated: {', '.join(TASKS)}")
    parser.add_argument("--train", type=int, default=4000, help="SST-2 training sentences (from the top of train.tsv)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every run (data order, initialisation)")
    parser.add_argument("--output-dir", default="runs/bench-loraplus", help="where adapters and logs go")
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"--tasks: unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    runs = [_parse_run(spec) for spec in args.runs.split(",")]
    missing = [name for name in ("train.tsv", "dev.tsv") if not (DATA / name).is_file()]
    if "sst2" in tasks and missing:
        raise SystemExit(f"SST-2 is not at {DATA} ({', '.join(missing)} missing); this benchmark reads "
                         f"../shared/data/sst2")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        subset = Path(tmp) / "train.tsv"
        if "sst2" in tasks:
            lines = (DATA / "train.tsv").read_text().splitlines()
            subset.write_text("\n".join(lines[:1 + args.train]) + "\n")
        for task in tasks:
            for spec, (ratio, lr) in zip(args.runs.split(","), runs):
                label = "plain LoRA" if ratio is None else f"LoRA+ ratio {ratio:g}"
                label += "" if lr is None else f", lr {lr:g}"
                out = f"{args.output_dir}/{task}-{spec.replace('@', '-lr')}-seed{args.seed}"
                got = (_builtin(ratio, lr, out, args.seed) if task == "builtin"
                       else _sst2(ratio, lr, out, args.seed, subset))
                rows.append({"task": task, "run": label, "seed": args.seed, **got})
                metric = "exact match" if task == "builtin" else "dev accuracy"
                heldout = "n/a" if got["heldout_loss"] is None else f"{got['heldout_loss']:.4f}"
                print(f"{task}, {label}: {metric} {100 * got['metric']:.1f}%, held-out loss {heldout}, mean "
                      f"training loss {got['loss_first_quarter']:.4f} over the first quarter of the steps, "
                      f"{got['loss_last_quarter']:.4f} over the last, first step with loss < {FAST_LOSS} "
                      f"{got['first_step_below']}, {got['seconds']:.0f} s of training", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
