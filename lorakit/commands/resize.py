"""``lorakit resize``: an adapter cut to a smaller rank by truncated SVD, with the logit error it brings."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from .base import Command
from .options import JsonOption, option


@dataclass(kw_only=True)
class ResizeOptions(JsonOption):
    adapter: str = option(help="an adapter folder (lorakit's or PEFT's)", positional=True)
    r: int = option(help="the new rank", aliases=("--rank",))
    output: str = option(help="folder for the new adapter")
    model: str | None = option(None, "the base model for the logit comparison (default: the one in the adapter's "
                                     "train_config.yaml)")


def run(opts: ResizeOptions) -> int:
    from ..models.svd import resize_adapter
    from ..workflows.inference import base_model_for

    try:
        model = base_model_for(opts.adapter, opts.model)
    except ValueError as err:
        model = None
        print(f"lorakit resize: {err}; no logit comparison", file=sys.stderr)
    report = resize_adapter(opts.adapter, opts.r, opts.output, model=model)
    if opts.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"wrote a rank-{report['rank']} adapter to {report['output']}, keeping {100 * report['energy_kept']:.2f}% "
          f"of the update energy")
    if "max_abs_logit_diff" in report:
        print(f"logits vs the original adapter on a probe batch: max |diff| {report['max_abs_logit_diff']:.3g}, "
              f"mean {report['mean_abs_logit_diff']:.3g} (largest logit {report['max_abs_logit']:.3g})")
    return 0


COMMAND = Command("resize", "cut an adapter to a smaller rank (truncated SVD) and report the error",
                  "Write the best rank-R approximation of every module's update as a new adapter and compare its "
                  "logits with the original's on a probe batch.", ResizeOptions, run)
