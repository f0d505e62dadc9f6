"""Beginner: teach a small BERT encoder sentiment with LoRA, then check what you saved.

The model is all-MiniLM-L6-v2 (22.7M parameters, embedded in a PyPI wheel), the data SST-2 (movie-review
sentences labelled positive/negative). LoRA trains rank-8 updates of the attention's query and value projections
plus the new classification head; everything else stays frozen. The script then saves the adapter, loads it onto
a fresh copy of the base and checks that the predictions are the same, and trains the whole model the classic way
for comparison.

    python examples/beginner/sst2_lora.py --data ../shared/data/sst2           # the full run
    python examples/beginner/sst2_lora.py --data ../shared/data/sst2 --smoke   # a few steps, with checks
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lorakit import LoraConfig, LoraModel, get_lora_model
from lorakit.models.embedded_models import minilm_dir


def read_sst2(path: Path, limit: int | None = None) -> tuple[list[str], list[int]]:
    """SST-2's TSV: a header line, then ``sentence<TAB>label`` (1 = positive)."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:limit]
    return [row["sentence"] for row in rows], [int(row["label"]) for row in rows]


def fresh_base() -> torch.nn.Module:
    """The pretrained encoder with a new two-class head (its initial weights fixed by the seed)."""
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)


def encode(tokenizer, sentences: list[str]) -> dict[str, torch.Tensor]:
    return tokenizer(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt")


@torch.no_grad()
def predict(model: torch.nn.Module, tokenizer, sentences: list[str]) -> torch.Tensor:
    """The logits for every sentence, ``(n, 2)``."""
    model.eval()
    return torch.cat([model(**encode(tokenizer, sentences[i:i + 128])).logits
                      for i in range(0, len(sentences), 128)])


def accuracy(logits: torch.Tensor, labels: list[int]) -> float:
    return (logits.argmax(-1) == torch.tensor(labels)).float().mean().item()


def fine_tune(model: torch.nn.Module, tokenizer, sentences: list[str], labels: list[int], lr: float,
              batch_size: int = 32, warmup: int = 30) -> list[float]:
    """One epoch of AdamW on the parameters that require gradients, linear warmup then linear decay; the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = list(range(len(sentences)))
    random.Random(0).shuffle(order)
    steps = math.ceil(len(order) / batch_size)
    warmup = min(warmup, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (steps - s) / (steps - warmup)))
    model.train()
    losses = []
    for step in range(steps):
        rows = order[step * batch_size:(step + 1) * batch_size]
        batch = encode(tokenizer, [sentences[i] for i in rows])
        loss = model(**batch, labels=torch.tensor([labels[i] for i in rows])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == steps:
            print(f"  step {step + 1}/{steps}  loss {sum(losses[-50:]) / len(losses[-50:]):.3f}", flush=True)
    return losses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/sst2", help="folder with SST-2's train.tsv and dev.tsv")
    parser.add_argument("--train", type=int, default=40000, help="training sentences (from the top of train.tsv)")
    parser.add_argument("--output-dir", default="runs/examples/beginner", help="where the adapter goes")
    parser.add_argument("--no-full", action="store_true", help="skip the full fine-tuning comparison")
    parser.add_argument("--smoke", action="store_true", help="a few steps on a few sentences, with checks")
    args = parser.parse_args()
    data, out = Path(args.data), Path(args.output_dir)
    if not (data / "train.tsv").is_file():
        raise SystemExit(f"SST-2 not found: {data / 'train.tsv'} does not exist (pass --data)")
    train_x, train_y = read_sst2(data / "train.tsv", 1024 if args.smoke else args.train)
    dev_x, dev_y = read_sst2(data / "dev.tsv", 256 if args.smoke else None)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    start = time.time()

    # 1. Wrap the base: rank-8 updates of query and value; the new head trains in full and is saved with them.
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                        modules_to_save=["classifier"], task_type="SEQ_CLS")
    model = get_lora_model(fresh_base(), config)
    model.print_trainable_parameters()
    trainable, total = model.get_nb_trainable_parameters()

    # 2. Train and evaluate.
    before = accuracy(predict(model, tokenizer, dev_x), dev_y)
    print(f"LoRA: training on {len(train_x):,d} sentences")
    t = time.time()
    losses = fine_tune(model, tokenizer, train_x, train_y, lr=2e-3)
    lora_seconds = time.time() - t
    logits = predict(model, tokenizer, dev_x)
    after = accuracy(logits, dev_y)
    print(f"LoRA: dev accuracy {100 * before:.1f}% -> {100 * after:.1f}% in {lora_seconds:.0f} s")

    # 3. Save: a few hundred KB, in PEFT's format.
    model.save_pretrained(out)
    size = (out / "adapter_model.safetensors").stat().st_size
    print(f"saved the adapter to {out}: {size / 1024:.0f} KiB ({size / trainable:.2f} bytes per trainable "
          f"parameter; the base model is {total * 4 / 2**20:.0f} MiB in fp32)")

    # 4. Load it back onto a fresh base: the same predictions.
    reloaded = LoraModel.from_pretrained(fresh_base(), out)
    reloaded_logits = predict(reloaded, tokenizer, dev_x)
    same = bool((reloaded_logits.argmax(-1) == logits.argmax(-1)).all())
    max_diff = (reloaded_logits - logits).abs().max().item()
    print(f"reloaded on a fresh base: same predictions: {same} (max |logit diff| {max_diff:.1e})")
    if not same:
        raise SystemExit("the reloaded adapter predicts differently: the saved files do not hold what was trained")

    results = {"trainable_params": trainable, "all_params": total, "accuracy_before": before,
               "accuracy_after": after, "lora_seconds": lora_seconds, "adapter_bytes": size,
               "reloaded_same_predictions": same, "reload_max_abs_diff": max_diff,
               "loss_first": sum(losses[:len(losses) // 4]) / max(1, len(losses) // 4),
               "loss_last": sum(losses[-(len(losses) // 4):]) / max(1, len(losses) // 4)}

    # 5. For comparison: train every parameter of a fresh base (the usual way, 300x more trainable parameters).
    if not args.no_full:
        full = fresh_base()
        print(f"full fine-tuning: training all {sum(p.numel() for p in full.parameters()):,d} parameters")
        t = time.time()
        fine_tune(full, tokenizer, train_x, train_y, lr=1e-4)
        results.update(full_seconds=time.time() - t, full_accuracy=accuracy(predict(full, tokenizer, dev_x), dev_y),
                       full_trainable_params=sum(p.numel() for p in full.parameters() if p.requires_grad))
        print(f"full fine-tuning: dev accuracy {100 * results['full_accuracy']:.1f}% in {results['full_seconds']:.0f} "
              f"s; LoRA reaches {100 * after / results['full_accuracy']:.1f}% of it with "
              f"{100 * trainable / results['full_trainable_params']:.2f}% of the trainable parameters")
    results["total_seconds"] = time.time() - start
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"done in {results['total_seconds']:.0f} s; results in {out / 'results.json'}")

    if args.smoke:  # what must hold even after a few steps
        lora_params = sum(layer.adapters["default"].lora_A.numel() + layer.adapters["default"].lora_B.numel()
                          for _, layer in model.lora_layers())
        head = sum(p.numel() for p in fresh_base().classifier.parameters())
        # 6 layers x (query, value) x r (in + out), plus the head
        assert trainable == lora_params + head == 6 * 2 * 8 * (384 + 384) + head, (trainable, lora_params, head)
        assert size < 400 * 1024 and size < trainable * 4 + 64 * 1024, size
        assert same and max_diff < 1e-5, (same, max_diff)
        assert results["loss_last"] < results["loss_first"], "the training loss must fall"
        assert all(layer.adapters["default"].lora_B.abs().sum() > 0 for _, layer in model.lora_layers()), \
            "every B must have left zero"
        if not args.no_full:
            assert results["full_trainable_params"] == total - trainable, "full FT trains every base parameter"
        print("smoke checks passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
