"""``lorakit inspect``: the singular values of a trained adapter's updates, and the rank it really uses."""

from __future__ import annotations

import json
from dataclasses import dataclass

from .base import Command
from .options import JsonOption, option


@dataclass(kw_only=True)
class InspectOptions(JsonOption):
    adapter: str = option(help="an adapter folder (lorakit's or PEFT's)", positional=True)


def run(opts: InspectOptions) -> int:
    from ..models.svd import inspect_adapter

    info = inspect_adapter(opts.adapter)
    overall = info["overall"]
    if opts.json:
        print(json.dumps({**info, "modules": [vars(m) for m in info["modules"]]}, indent=2))
        return 0
    width = max(len(m.name) for m in info["modules"])
    print(f"{'module':<{width}}  {'r':>3}  {'rank 90%':>8}  {'rank 99%':>8}  singular values")
    for m in info["modules"]:
        values = " ".join(f"{v:.3g}" for v in m.singular_values[:6]) + (" ..." if m.r > 6 else "")
        print(f"{m.name:<{width}}  {m.r:>3}  {m.rank_90:>8}  {m.rank_99:>8}  {values}")
    kept = ", ".join(f"{k}: {100 * v:.1f}%" for k, v in enumerate(overall["kept"], 1))
    print(f"\nupdate energy kept by the top k directions of every module (k: share): {kept}")
    print(f"rank {overall['rank_90']} keeps 90% and rank {overall['rank_99']} keeps 99% of this r={info['r']} "
          f"adapter's update" + (f"; try `lorakit resize {opts.adapter} --r {overall['rank_99']}`"
                                 if overall["rank_99"] < info["r"] else ""))
    return 0


COMMAND = Command("inspect", "singular values of a trained adapter's updates and the rank it uses",
                  "Per wrapped module and overall: the singular values of the update scaling*B*A and the smallest "
                  "rank keeping 90% / 99% of its energy.", InspectOptions, run)
