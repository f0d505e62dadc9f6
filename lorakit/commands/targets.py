"""``lorakit targets``: the modules a LoRA config would wrap, listed without loading weights."""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..core.config import ALL_LINEAR, TASK_TYPES, LoraConfig, parse_targets
from .base import Command
from .options import MODEL_HELP, JsonOption, LoraShape, TrustOption, option


@dataclass(kw_only=True)
class TargetsOptions(LoraShape, JsonOption, TrustOption):
    model: str = option("default", MODEL_HELP, positional=True)
    target_modules: str | None = option(
        None, "comma-separated module names (q_proj,v_proj), 'all-linear', or a regex full-matched against module "
              "names (default: what `lorakit train` wraps: all-linear, or with --task-type SEQ_CLS the "
              "architecture's PEFT default, e.g. query,value for BERT)", aliases=("--target",))
    exclude_modules: str | None = option(None, "modules to leave out, same syntax as --target-modules",
                                         aliases=("--exclude",))
    task_type: str | None = option(None, "PEFT task type (SEQ_CLS also trains the classification head)",
                                   choices=TASK_TYPES)


def run(opts: TargetsOptions) -> int:
    from ..core.inject import describe_targets
    from ..models.embedded_models import build_model

    targets = parse_targets(opts.target_modules)
    if targets is None and opts.task_type != "SEQ_CLS":
        targets = ALL_LINEAR  # what `lorakit train` wraps on a language model
    config = LoraConfig(r=opts.r, target_modules=targets, exclude_modules=parse_targets(opts.exclude_modules),
                        task_type=opts.task_type)
    model = build_model(opts.model, meta=True, trust_remote_code=opts.trust_remote_code)
    rows = describe_targets(model, config)
    total = sum(p.numel() for p in model.parameters())
    lora = sum(row["params"] for row in rows)
    if opts.json:
        print(json.dumps({"modules": rows, "lora_params": lora, "base_params": total}, indent=2))
        return 0
    width = max(len(row["name"]) for row in rows)
    for row in rows:
        shape = "x".join(map(str, row["shape"]))
        print(f"{row['name']:<{width}}  {row['type']:<10} {shape:>12}  r={row['r']:<3} {row['params']:>10,d}")
    print(f"\n{len(rows)} modules, {lora:,d} LoRA parameters ({100 * lora / (lora + total):.4f}% of "
          f"{lora + total:,d})")
    return 0


COMMAND = Command("targets", "list the modules a LoRA config would wrap, without loading weights",
                  "Build the model on the meta device (no weights, no memory) and list the modules the config "
                  "would wrap, with their shapes and LoRA parameters.", TargetsOptions, run)
