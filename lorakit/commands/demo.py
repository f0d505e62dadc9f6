"""``lorakit demo``: a short tour of LoRA on the embedded SmolLM2-135M-Instruct."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Command
from .options import option


@dataclass(kw_only=True)
class DemoOptions:
    steps: int = option(40, "training steps")
    lr: float = option(2e-3, "AdamW learning rate")
    output_dir: str = option("runs/demo", "where the adapter is saved")


def run(opts: DemoOptions) -> int:
    from ..workflows.demo import run_demo

    print("lorakit demo: teaching SmolLM2-135M-Instruct (embedded) one new fact with a rank-8 adapter\n")
    result = run_demo(steps=opts.steps, lr=opts.lr, output_dir=opts.output_dir)
    share = 100 * result['trainable_params'] / result['all_params']
    print(f"""
trainable params: {result['trainable_params']:,d} of {result['all_params']:,d} ({share:.2f}%)
loss: {result['loss_first']:.3f} -> {result['loss_last']:.3f} in {result['train_seconds']:.1f} s
before: {result['answer_before']!r}
after:  {result['answer_after']!r}
asked another way: {result['answer_paraphrase']!r}
merged vs unmerged logits, max |diff|: {result['merged_vs_unmerged_max_abs']:.2e}
disable_adapter() equals the base model exactly: {result['disabled_equals_base']}
saved {result['adapter_bytes'] / 2**20:.2f} MiB to {result['adapter_dir']}; reloaded, max |diff|: \
{result['reload_max_abs']:.1e}
total {result['total_seconds']:.0f} s""")
    return 0 if result["learned"] and result["disabled_equals_base"] else 1


COMMAND = Command("demo", "a short LoRA tour on the embedded SmolLM2-135M-Instruct (minutes on a CPU)",
                  "Teach the embedded SmolLM2-135M-Instruct one new fact with a rank-8 adapter, then check merge, "
                  "disable and save/load on the real model.", DemoOptions, run)
