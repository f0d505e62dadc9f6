"""Intermediate: how rank and target modules change LoRA, and three task adapters sharing one base.

On the all-MiniLM-L6-v2 encoder (embedded in a wheel) with real data from ../shared/data:

1. Rank: r = 4, 8, 16, 32 on query,value (alpha = 2r, so the scaling stays 2), SST-2.
2. Targets at r = 8: query,value / query,key,value,attention.output.dense / all-linear, SST-2.
3. Three task adapters on one base: SST-2 sentiment, Rotten Tomatoes polarity, and SQuAD 2.0 answerability
   (can this paragraph answer this question?), each trained on its own, then loaded side by side into one model
   and switched with ``set_adapter``: every adapter is scored on every task.
4. Merge: fold the SST-2 adapter into the base; the merged model's outputs equal the adapter's.

Writes results.md (tables), results.json and results.png (quality vs trainable parameters) to --output-dir.

    python examples/intermediate/experiments.py --data ../shared/data            # the full run
    python examples/intermediate/experiments.py --data ../shared/data --smoke    # a few steps, with checks
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import time
from pathlib import Path

import torch

from lorakit import LoraModel, TrainConfig, train
from lorakit.models.embedded_models import build_model, minilm_dir

RANKS = (4, 8, 16, 32)
TARGETS = ("query,value", "query,key,value,attention.output.dense", "all-linear")


# -- the three tasks, as TSV files lorakit train reads (sentence <TAB> label) -------------------------------

def write_tsv(path: Path, rows: list[tuple[str, int]]) -> Path:
    """``sentence<TAB>label`` lines under a header, unquoted as lorakit reads TSV (tabs and line breaks in a text
    become spaces)."""
    lines = ["sentence\tlabel"] + [f"{' '.join(text.split())}\t{label}" for text, label in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def read_tsv(path: Path) -> list[tuple[str, int]]:
    """A TSV of ``sentence<TAB>label`` under a header (SST-2's format, and write_tsv's)."""
    with path.open(newline="") as f:
        return [(row["sentence"], int(row["label"]))
                for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def make_tasks(data: Path, folder: Path, n_train: int, n_eval: int) -> dict[str, tuple[Path, Path]]:
    """Train and held-out files for each task (at most n_train / n_eval rows)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    sst2_train = read_tsv(data / "sst2" / "train.tsv")[:n_train]
    sst2_dev = read_tsv(data / "sst2" / "dev.tsv")[:n_eval]
    rt = [(line.strip(), 1) for line in (data / "rt_polarity" / "rt-polarity.pos").read_text().splitlines()] + \
         [(line.strip(), 0) for line in (data / "rt_polarity" / "rt-polarity.neg").read_text().splitlines()]
    rng.shuffle(rt)
    squad = json.loads((data / "squad" / "squad2_dev_cs224n_6078.json").read_text())["data"]
    # Split SQuAD by article, so that no paragraph is seen in training and evaluation.
    pairs = [[(f"{qa['question']} [SEP] {p['context']}", int(not qa["is_impossible"]))
              for p in article["paragraphs"] for qa in p["qas"]] for article in squad]
    squad_train = [pair for article in pairs[:-3] for pair in article]
    squad_eval = [pair for article in pairs[-3:] for pair in article]
    rng.shuffle(squad_train)
    rng.shuffle(squad_eval)
    splits = {"sst2": (sst2_train, sst2_dev), "rt": (rt[n_eval:][:n_train], rt[:n_eval]),
              "squad": (squad_train[:n_train], squad_eval[:n_eval])}
    return {name: (write_tsv(folder / f"{name}-train.tsv", tr), write_tsv(folder / f"{name}-eval.tsv", ev))
            for name, (tr, ev) in splits.items()}


# -- training runs -------------------------------------------------------------------------------------------

def run(files: tuple[Path, Path], out: Path, r: int, targets: str, steps: int | None) -> dict:
    """One LoRA run with lorakit.train; its summary."""
    config = TrainConfig(model="minilm", task="seq_cls", data=str(files[0]), eval_data=str(files[1]), max_eval=0,
                         r=r, lora_alpha=2 * r, target_modules=targets, lr=2e-3, batch_size=32, max_length=128,
                         warmup_steps=min(30, (steps or 300) // 10), steps=steps, output_dir=str(out),
                         progress=False)
    summary = train(config)
    print(f"  r={r:<3} {targets:<40} accuracy {100 * summary['after']['accuracy']:.1f}%  "
          f"{summary['trainable_params']:>9,d} trainable  {summary['train_seconds']:.0f} s", flush=True)
    return {"r": r, "targets": targets, "trainable_params": summary["trainable_params"],
            "accuracy": summary["after"]["accuracy"], "train_seconds": summary["train_seconds"],
            "adapter_bytes": summary["adapter_bytes"]}


@torch.no_grad()
def logits_of(model: torch.nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    model.eval()
    return torch.cat([model(**tokenizer(texts[i:i + 64], padding=True, truncation=True, max_length=128,
                                        return_tensors="pt")).logits for i in range(0, len(texts), 64)])


def accuracy(logits: torch.Tensor, labels: list[int]) -> float:
    return (logits.argmax(-1) == torch.tensor(labels)).float().mean().item()


# -- the report ------------------------------------------------------------------------------------------------

def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((left, "ranks", "rank (query,value)"), (right, "targets", "target modules (r=8)")):
        rows = results[key]
        ax.plot([row["trainable_params"] for row in rows], [100 * row["accuracy"] for row in rows], marker="o")
        for row in rows:
            label = f"r={row['r']}" if key == "ranks" else row["targets"].replace("attention.output.dense", "ao")
            ax.annotate(label, (row["trainable_params"], 100 * row["accuracy"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.margins(x=0.2, y=0.15)  # room for the labels of the outermost points
        ax.set_xlabel("trainable parameters (log)")
        ax.set_ylabel("SST-2 dev accuracy (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(results: dict) -> str:
    lines = ["## Rank (query,value, alpha = 2r)", "", "| r | trainable params | SST-2 accuracy | train s | adapter |",
             "|---|---|---|---|---|"]
    lines += [f"| {row['r']} | {row['trainable_params']:,d} | {100 * row['accuracy']:.1f}% | "
              f"{row['train_seconds']:.0f} | {row['adapter_bytes'] / 1024:.0f} KiB |" for row in results["ranks"]]
    lines += ["", "## Target modules (r = 8)", "", "| targets | trainable params | SST-2 accuracy | train s |",
              "|---|---|---|---|"]
    lines += [f"| {row['targets']} | {row['trainable_params']:,d} | {100 * row['accuracy']:.1f}% | "
              f"{row['train_seconds']:.0f} |" for row in results["targets"]]
    tasks = list(results["switching"])
    header = "| adapter \\ task | " + " | ".join(tasks) + " |"
    lines += ["", "## Three adapters on one base (accuracy of each adapter on each task)", "", header,
              "|---|" + "---|" * len(tasks)]
    lines += [f"| {a} | " + " | ".join(f"{100 * results['switching'][a][t]:.1f}%" for t in tasks) + " |"
              for a in tasks]
    merge = results["merge"]
    summary = (f"max |logit difference| merged vs unmerged: {merge['max_abs_diff']:.1e}; identical predictions: "
               f"{merge['same_predictions']}")
    lines += ["", "## Merging the SST-2 adapter into the base", "", summary]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data", help="folder with sst2/, rt_polarity/ and squad/")
    parser.add_argument("--train", type=int, default=4000, help="training examples per run")
    parser.add_argument("--eval", type=int, default=872, help="held-out examples per task")
    parser.add_argument("--output-dir", default="runs/examples/intermediate")
    parser.add_argument("--smoke", action="store_true", help="a few steps per run, with checks")
    args = parser.parse_args()
    data, out = Path(args.data), Path(args.output_dir)
    for needed in ("sst2/train.tsv", "rt_polarity/rt-polarity.pos", "squad/squad2_dev_cs224n_6078.json"):
        if not (data / needed).is_file():
            raise SystemExit(f"{data / needed} does not exist (pass --data, the folder of ../shared/data)")
    start = time.time()
    steps = 4 if args.smoke else None  # None: one epoch over --train examples
    tasks = make_tasks(data, out / "data", 128 if args.smoke else args.train, 64 if args.smoke else args.eval)

    print("1. rank, on query,value")
    ranks = [run(tasks["sst2"], out / f"rank-{r}", r, "query,value", steps) for r in RANKS]
    print("2. target modules, at r=8")
    targets = [next(row for row in ranks if row["r"] == 8)] + \
        [run(tasks["sst2"], out / f"targets-{i}", 8, spec, steps) for i, spec in enumerate(TARGETS[1:], 1)]

    print("3. three task adapters on one base")
    folders = {"sst2": out / "rank-8"}
    for name in ("rt", "squad"):
        run(tasks[name], out / f"task-{name}", 8, "query,value", steps)
        folders[name] = out / f"task-{name}"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    model = LoraModel.from_pretrained(build_model("minilm"), folders["sst2"], "sst2")
    for name in ("rt", "squad"):
        model.load_adapter(folders[name], name)
    held_out = {name: read_tsv(files[1]) for name, files in tasks.items()}
    switching: dict[str, dict[str, float]] = {}
    outputs = {}
    for adapter in folders:
        model.set_adapter(adapter)  # the same base; only the active adapter (and its head) changes
        switching[adapter] = {}
        for task, rows in held_out.items():
            logits = logits_of(model, tokenizer, [text for text, _ in rows])
            switching[adapter][task] = accuracy(logits, [label for _, label in rows])
            if task == "sst2":
                outputs[adapter] = logits
        print(f"  adapter {adapter:<6} " + "  ".join(f"{t}: {100 * a:.1f}%" for t, a in switching[adapter].items()))

    print("4. merging the SST-2 adapter into the base")
    model.set_adapter("sst2")
    texts = [text for text, _ in held_out["sst2"]]
    merged = model.merge_and_unload(["sst2"])  # a plain BertForSequenceClassification, the update folded in
    merged_logits = logits_of(merged, tokenizer, texts)
    merge = {"max_abs_diff": (merged_logits - outputs["sst2"]).abs().max().item(),
             "same_predictions": bool((merged_logits.argmax(-1) == outputs["sst2"].argmax(-1)).all())}
    print(f"  merged vs unmerged: max |logit diff| {merge['max_abs_diff']:.1e}, identical predictions: "
          f"{merge['same_predictions']}")

    results = {"ranks": ranks, "targets": targets, "switching": switching, "merge": merge,
               "total_seconds": time.time() - start}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    plot(results, out / "results.png")
    print(f"\n{markdown(results)}\nwrote {out / 'results.md'}, results.json, results.png in "
          f"{results['total_seconds']:.0f} s")

    if args.smoke:  # what must hold even after a few steps
        per_rank = [row["trainable_params"] - ranks[0]["trainable_params"] for row in ranks]
        unit = per_rank[1] // (RANKS[1] - RANKS[0])
        assert unit > 0 and per_rank == [unit * (r - RANKS[0]) for r in RANKS], "LoRA parameters grow linearly in r"
        assert [row["trainable_params"] for row in targets] == sorted(row["trainable_params"] for row in targets)
        assert len({row["trainable_params"] for row in targets}) == 3
        assert not torch.equal(outputs["sst2"], outputs["rt"]) and not torch.equal(outputs["rt"], outputs["squad"]), \
            "switching adapters must change the outputs"
        assert merge["same_predictions"] and merge["max_abs_diff"] < 1e-4, merge
        assert (out / "results.png").stat().st_size > 10_000
        print("smoke checks passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
