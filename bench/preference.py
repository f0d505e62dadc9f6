"""Preference training: lorakit's `--task dpo` / `--task kto` against TRL's DPOTrainer / KTOTrainer + PEFT, each in
its own process, in one run.

Data: LLaMA-Factory's demo sets in ../shared/data/preference (`dpo_en_demo.json`, `kto_en_demo.json`, 300 rows
each): the first --train-rows rows train, the last --eval-rows are held out. Model: the embedded SmolLM2-135M-Instruct.
Both sides: LoRA r=16, alpha 32, all linear layers, --max-length tokens, --batch-size rows per step, one epoch,
learning rate --lr, β = 0.1, the reference = the base with the adapter disabled (TRL: `ref_model=None` with a PEFT
model), no gradient checkpointing (TRL's configs turn it on by default; lorakit's does not: both off, so the two do
the same work), and the precision lorakit's `auto` picks on this machine (TRL's configs default to bf16, many times
slower than fp32 on a CPU without fast bf16). The rows go to TRL in its conversational format, converted by lorakit's
reader, so both tokenize them to the same ids (tests/training/test_preference_data.py checks that).

Measured per side: policy tokens per second of the training steps (the tokens of the chosen and rejected rows, or of
KTO's examples; not padding, not the reference or KL passes), the process's peak RSS (getrusage, loading included),
and the held-out metrics after training (DPO: reward accuracy and margin; KTO: reward margin).

    python bench/preference.py [--task dpo|kto|both] [--train-rows 240] [--eval-rows 60] [--max-length 512]
                               [--batch-size 4] [--lr 5e-5] [--cases lorakit,trl]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import DATA, cpu_name, run_child  # noqa: E402
from _timing import markdown_table  # noqa: E402

FILES = {"dpo": "dpo_en_demo.json", "kto": "kto_en_demo.json"}
CASES = ["lorakit", "trl"]


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _split(task: str, args: argparse.Namespace, folder: Path) -> tuple[Path, Path]:
    path = DATA / "preference" / FILES[task]
    if not path.is_file():
        raise SystemExit(f"the benchmark needs {path}")
    rows = json.loads(path.read_text())
    train, held_out = rows[:args.train_rows], rows[-args.eval_rows:]
    out = []
    for name, part in (("train", train), ("eval", held_out)):
        file = folder / f"{task}_{name}.json"
        file.write_text(json.dumps(part, indent=1))  # a row per line or more: messages name rows by line
        out.append(file)
    return out[0], out[1]


def _precision() -> str:
    """What `lorakit train --precision auto` picks for the default model on this machine."""
    from lorakit.models.devices import model_shapes, resolve_device
    from lorakit.training.devices import Processes, run_precision

    device = resolve_device("cpu")
    return run_precision("auto", device, model_shapes("default", False, 4 * 512), Processes(device=device)).name


def run_lorakit(task: str, train_file: Path, eval_file: Path, args: argparse.Namespace) -> dict:
    from lorakit.training import train

    with tempfile.TemporaryDirectory() as out:
        result = train(model="default", task=task, data=str(train_file), eval_data=str(eval_file), r=16,
                       lora_alpha=32, target_modules="all-linear", max_length=args.max_length,
                       batch_size=args.batch_size, epochs=1, lr=args.lr, warmup_steps=0, max_eval=0,
                       eval_batch_size=4, progress=False, output_dir=out, precision=args.precision,
                       task_options={"beta": 0.1})
    return {"tokens_per_s": result["tokens"] / result["train_seconds"], "steps": result["steps"],
            "tokens": result["tokens"], "seconds": result["train_seconds"], "peak_rss_mib": _peak_rss_mib(),
            "precision": result["precision"], "after": {k: v for k, v in result["after"].items()
                                                        if isinstance(v, (int, float))}}


def _trl_rows(task: str, file: Path) -> list[dict]:
    """The rows in TRL's conversational format, as lorakit's reader sees them."""
    from lorakit.training.preference_data import pair_of, unpaired_of

    rows = json.loads(file.read_text())
    if task == "dpo":
        return [dict(zip(("prompt", "chosen", "rejected"), pair_of(r))) for r in rows]
    return [{"prompt": p, "completion": c, "label": y} for r in rows for p, c, y in unpaired_of(r)]


def run_trl(task: str, train_file: Path, eval_file: Path, args: argparse.Namespace) -> dict:
    import datasets
    import peft
    import transformers
    import trl

    from lorakit.models.embedded_models import model_source

    source = str(model_source("default", False))
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    bf16 = args.precision == "bf16"
    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size,
                  per_device_eval_batch_size=4, num_train_epochs=1, learning_rate=args.lr, lr_scheduler_type="linear",
                  warmup_steps=0, max_length=args.max_length, beta=0.1, bf16=bf16, fp16=False, use_cpu=True,
                  gradient_checkpointing=False, report_to="none", save_strategy="no", logging_steps=1,
                  dataloader_num_workers=0, seed=0, max_grad_norm=1.0)
    train_rows, eval_rows = _trl_rows(task, train_file), _trl_rows(task, eval_file)
    if task == "dpo":
        config, trainer_class = trl.DPOConfig(**common), trl.DPOTrainer
    else:
        config, trainer_class = trl.KTOConfig(**common), trl.KTOTrainer
    trainer = trainer_class(model=model, ref_model=None, args=config, processing_class=tokenizer,
                            train_dataset=datasets.Dataset.from_list(train_rows),
                            eval_dataset=datasets.Dataset.from_list(eval_rows), peft_config=lora)
    tokens = sum(_row_tokens(task, row) for row in trainer.train_dataset)
    start = time.perf_counter()
    out = trainer.train()
    seconds = out.metrics.get("train_runtime", time.perf_counter() - start)
    metrics = trainer.evaluate()
    return {"tokens_per_s": tokens / seconds, "steps": out.global_step, "tokens": tokens, "seconds": seconds,
            "peak_rss_mib": _peak_rss_mib(), "precision": "bf16" if bf16 else "fp32",
            "after": {k.removeprefix("eval_"): v for k, v in metrics.items() if isinstance(v, (int, float))}}


def _row_tokens(task: str, row: dict) -> int:
    """Policy tokens of one tokenized TRL row: prompt + each answer (DPO: both rows)."""
    if task == "dpo":
        return 2 * len(row["prompt_ids"]) + len(row["chosen_ids"]) + len(row["rejected_ids"])
    return len(row["prompt_ids"]) + len(row["completion_ids"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["dpo", "kto", "both"], default="both")
    parser.add_argument("--train-rows", type=int, default=240)
    parser.add_argument("--eval-rows", type=int, default=60)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated: lorakit, trl")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # a child process: one measurement, as JSON on the last line
        task, case = args.case.split(":")
        folder = Path(args.folder)
        files = folder / f"{task}_train.json", folder / f"{task}_eval.json"
        run = run_lorakit if case == "lorakit" else run_trl
        print(json.dumps(run(task, *files, args)))
        return

    precision = _precision()
    tasks = ["dpo", "kto"] if args.task == "both" else [args.task]
    rows, lines = [], []
    with tempfile.TemporaryDirectory() as folder:
        for task in tasks:
            _split(task, args, Path(folder))
            results = {}
            for case in args.cases.split(","):
                results[case] = run_child(__file__, "--case", f"{task}:{case}", "--folder", folder, "--precision",
                                          precision, "--train-rows", str(args.train_rows), "--max-length",
                                          str(args.max_length), "--batch-size", str(args.batch_size), "--lr",
                                          str(args.lr))
                r = results[case]
                print(f"  {task}:{case}: {r['tokens_per_s']:.1f} tok/s, peak RSS {r['peak_rss_mib']:.0f} MiB, "
                      f"{r['steps']} steps, after {json.dumps(r['after'])}", file=sys.stderr, flush=True)
            headline = "rewards/accuracies" if task == "dpo" else "rewards/margins"
            for case, r in results.items():
                rows.append([task, case, r["precision"], str(r["steps"]), f"{r['tokens_per_s']:.1f}",
                             f"{r['peak_rss_mib']:.0f}", f"{r['after'].get(headline, float('nan')):.3f}",
                             f"{r['after'].get('rewards/margins', float('nan')):.3f}"])
            if {"lorakit", "trl"} <= set(results):
                ours, theirs = results["lorakit"], results["trl"]
                gap = ours["after"].get(headline, 0) - theirs["after"].get(headline, 0)
                lines.append(f"{task}: lorakit vs TRL {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}× tokens/s "
                             f"(target ≥ 2×), peak RSS {ours['peak_rss_mib'] / theirs['peak_rss_mib']:.2f}× (target "
                             f"≤ 0.8×), held-out {headline} {gap:+.3f}"
                             + (" (target ≥ -0.02)" if task == "dpo" else ""))
    print(f"{cpu_name()} ({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}; "
          f"{args.train_rows} train rows, {args.eval_rows} held out, max length {args.max_length}, batch "
          f"{args.batch_size}, lr {args.lr:g}, LoRA r=16 all-linear, {precision}")
    print(markdown_table(["task", "engine", "precision", "steps", "policy tokens/s", "peak RSS MiB", "headline",
                          "reward margin"], rows))
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
