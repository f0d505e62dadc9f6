"""``lorakit sweep``: LoRA trained at several ranks and target sets on one task; a table and plots."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import InvalidValue
from .base import Command
from .compare import StudyOptions, print_study
from .options import option


@dataclass(kw_only=True)
class SweepOptions(StudyOptions):
    output_dir: str = option("runs/sweep", "where the runs and tables go")
    ranks: str = option("4,8,16,32", "comma-separated ranks")
    targets: str = option("q,v:q,k,v,o:all-linear", "target sets separated by ':'; q,k,v,o,gate,up,down mean "
                                                    "q_proj, ...")


def run(opts: SweepOptions) -> int:
    from ..workflows.compare import sweep

    try:
        ranks = tuple(int(r) for r in opts.ranks.split(","))
    except ValueError:
        raise InvalidValue(f"--ranks must be comma-separated integers, got {opts.ranks!r}") from None
    targets = tuple(t for t in opts.targets.split(":") if t)
    print_study(sweep(opts.train_config(), ranks, targets, opts.output_dir))
    return 0


COMMAND = Command("sweep", "train LoRA at several ranks and target sets; table and plots",
                  "One LoRA run per (rank, targets) pair with the same task and budget; writes sweep.md/.json and "
                  "sweep.png (quality vs trainable parameters and vs time).", SweepOptions, run)
