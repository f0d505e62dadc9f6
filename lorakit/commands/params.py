"""``lorakit params``: what a LoRA config trains, counted from a model's config alone."""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..core.config import TASK_TYPES, LoraConfig, parse_targets
from .base import Command
from .options import MODEL_HELP, PRESETS_HELP, JsonOption, LoraShape, TrustOption, option


@dataclass(kw_only=True)
class ParamsOptions(LoraShape, JsonOption, TrustOption):
    model: str = option("default", PRESETS_HELP + MODEL_HELP)
    target_modules: str | None = option(None, "comma-separated module names (q_proj,v_proj), 'all-linear', or a "
                                              "regex (default: the architecture's default)", aliases=("--target",))
    lora_alpha: float | None = option(None, "lora_alpha (default: equal to r)", aliases=("--alpha",))
    task_type: str | None = option(None, "PEFT task type (SEQ_CLS also trains the classification head)",
                                   choices=TASK_TYPES)


def run(opts: ParamsOptions) -> int:
    from ..models.calc import count_parameters, meta_model

    config = LoraConfig(r=opts.r, lora_alpha=opts.lora_alpha if opts.lora_alpha is not None else opts.r,
                        target_modules=parse_targets(opts.target_modules), task_type=opts.task_type)
    result = count_parameters(meta_model(opts.model, opts.trust_remote_code), config)
    print(json.dumps(result, indent=2) if opts.json else format_params(result))
    return 0


def format_params(result: dict) -> str:
    """PEFT's trainable-parameters line, the per-target table and the adapter file's size."""
    header = (f"{'module':<16} {'type':<10} {'weight shape':>14} {'r':>4} {'layers':>7} {'params each':>12} "
              f"{'params':>13}")
    lines = [result["line"], "", header, "-" * len(header)]
    for row in result["targets"]:
        shape = "x".join(map(str, row["shape"]))
        lines.append(f"{row['module']:<16} {row['type']:<10} {shape:>14} {row['r']:>4} {row['count']:>7} "
                     f"{row['params_each']:>12,d} {row['params']:>13,d}")
    sizes = result["adapter_bytes"]
    lines.append(f"\nLoRA parameters: {result['lora_params']:,d} ({100 * result['lora_params'] / result['base_total']:.4f}% "
                 f"of the base model's {result['base_total']:,d})")
    if result["modules_to_save"]:
        lines.append(f"trained in full and saved: {', '.join(result['modules_to_save'])}")
    lines.append(f"adapter file: {sizes['fp32'] / 2**20:.2f} MiB in fp32, {sizes['bf16'] / 2**20:.2f} MiB in bf16")
    return "\n".join(lines)


COMMAND = Command("params", "count what a LoRA config trains, from a config alone (no weights)",
                  "Build the model on the meta device, apply the LoRA config and print PEFT's trainable-parameters "
                  "line, a per-target table and the adapter file size.", ParamsOptions, run)
