"""``lorakit train``: fine-tune a model (LoRA, QLoRA, prompt tuning or in full) on a task; no arguments: the
built-in task on the embedded SmolLM2-135M-Instruct. Its options are TrainConfig's fields."""

from __future__ import annotations

import argparse
import os
import sys

from .base import Command


def arguments(parser: argparse.ArgumentParser) -> None:
    from ..training.options import add_arguments

    parser.add_argument("--config", help="a YAML file of options (the names below, with _ or -)")
    add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..training.loop import train
    from ..training.options import config_from_args

    config = config_from_args(args)
    if int(os.environ.get("RANK", "0")) == 0:
        base = f"{config.model} in {config.quantize}" if config.quantize else config.model
        print(f"lorakit train: {config.method} on {base} ({config.task}), output in {config.output_dir}",
              file=sys.stderr)
    result = train(config)
    if not result:  # not the main process of a torchrun job
        return 0
    print(format_summary(result))
    return 0


PERCENTS = ("exact_match", "accuracy", "rewards/accuracies", "f1")  # metrics that are shares, shown in percent


def metric(evaluation: dict, headline: str | None = None) -> str:
    """The headline of an evaluation: the task's headline metric when given and present, else exact match or
    accuracy, else the loss and perplexity."""
    for key in ([headline] if headline else []) + ["exact_match", "accuracy"]:
        if key in evaluation and key != "loss":
            name = key.replace("_", " ")
            return f"{name} {100 * evaluation[key]:.1f}%" if key in PERCENTS else f"{name} {evaluation[key]:.3f}"
    return f"loss {evaluation['loss']:.4f} (perplexity {evaluation['perplexity']:.2f})"


def format_summary(result: dict) -> str:
    """The short report printed at the end of ``lorakit train``."""
    trainable, total = result["trainable_params"], result["all_params"]
    base = f" on a 4-bit {result['quantize']} base" if result.get("quantize") else ""
    lines = [
        f"task:     {result['task']} ({result['method']}{base}, {result['precision']}, {result['device']}"
        f"{', ' + result['allocator'] if result.get('allocator', 'system') != 'system' else ''}"
        f"{', %d processes' % result['processes'] if result['processes'] > 1 else ''}"
        f"{' sharded (FSDP)' if result.get('fsdp') else ''})",
        *([f"dtype:    {result['precision_reason']}"] if str(result.get("precision_reason")).startswith("auto")
          else []),
        f"trained:  {trainable:,d} of {total:,d} parameters ({100 * trainable / total:.2f}%)",
        f"steps:    {result['steps']} in {result['train_seconds']:.0f} s, {result['tokens']:,d} tokens, "
        f"{result['tokens_per_s']:.0f} tokens/s; loss {result['first_loss']:.3f} -> {result['last_loss']:.3f}",
        *([f"MFU:      {100 * result['mfu']:.1f}% (in the steps: {result['model_flops_per_s'] / 1e9:.1f} useful "
            f"GFLOP/s of the {result['matmul_peak_flops_per_s'] / 1e9:.0f} this machine's matrix products reach in "
            f"{result['precision']})"] if result.get("mfu") else []),
        f"held-out: {metric(result['before'], result.get('headline_metric'))} before -> "
        f"{metric(result['after'], result.get('headline_metric'))} after",
    ]
    if result.get("headline_metric") != "exact_match" and "exact_match" in result["after"]:  # built-in preference
        changed = result["after"].get("answers_changed")
        lines.append(f"          {metric(result['before'], 'exact_match')} before -> "
                     f"{metric(result['after'], 'exact_match')} after"
                     + (f"; {changed} of {result['after']['n']} greedy answers changed" if changed is not None
                        else ""))
    samples, earlier = result["after"].get("samples"), (result.get("before") or {}).get("samples")
    if samples and earlier and earlier[0]["prompt"] == samples[0]["prompt"]:
        lines.append(f"example:  {samples[0]['prompt']!r}\n  before -> {earlier[0]['prediction']}\n"
                     f"  after  -> {samples[0]['prediction']}")
    elif samples:
        lines.append(f"example:  {samples[0]['prompt']!r}\n       -> {samples[0]['prediction']}")
    what = {"lora": "adapter", "prompt": "prompt"}.get(result["method"], "model")
    lines.append(f"saved:    {what} ({result['adapter_bytes'] / 2**20:.2f} MiB) in {result['output_dir']}"
                 + (f", loss curve {result['loss_curve']}" if result.get("loss_curve") else ""))
    lines.append(f"total:    {result['total_seconds']:.0f} s")
    return "\n".join(lines)


COMMAND = Command("train", "train a LoRA adapter (no arguments: the built-in task on SmolLM2-135M)",
                  "Fine-tune a model with LoRA (or in full). With no arguments: the embedded SmolLM2-135M-Instruct "
                  "learns the built-in order-to-JSON task; held-out exact match is measured before and after. "
                  "Options come from --config FILE.yaml and the command line (which wins). Under torchrun it trains "
                  "with DistributedDataParallel.", None, run, usage="lorakit train [--config FILE.yaml] [options]",
                  arguments=arguments)
