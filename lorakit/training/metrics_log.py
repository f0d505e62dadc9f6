"""What a training run leaves to read: ``metrics.jsonl`` (one JSON object per step or evaluation) and a PNG of the
loss curve with the held-out metric."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class MetricsLog:
    """``metrics.jsonl``: one JSON object per logged step or evaluation (only the main process writes)."""

    path: Path
    enabled: bool
    records: list[dict[str, Any]] = field(default_factory=list)

    def start(self, resume_step: int | None) -> None:
        if not self.enabled:
            return
        if resume_step is None or not self.path.exists():
            self.path.write_text("")
            return
        # Drop what was logged after the checkpoint we resume from: those steps are run again. A line cut short by a
        # crash (or otherwise damaged) is dropped too, and said.
        records, damaged = [], 0
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line) if line.strip() else None
            except (json.JSONDecodeError, RecursionError):
                record = "damaged"
            if isinstance(record, dict) and isinstance(record.get("step", 0), int):
                records.append(record)
            elif record is not None:
                damaged += 1
        if damaged:
            print(f"lorakit: {self.path}: dropped {damaged} damaged line(s) of the metrics log", file=sys.stderr)
        self.records = [r for r in records if r.get("step", 0) <= resume_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def plot_loss(records: Sequence[dict[str, Any]], path: Path, title: str) -> Path | None:
    """A PNG of training loss per step (and evaluation points); None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval"]) for r in records if "eval" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train), label="training loss", color="tab:blue", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    metric = next((k for k in ("exact_match", "accuracy", "loss") if evals and k in evals[0][1]), None)
    if metric:
        ax2 = ax.twinx() if metric != "loss" else ax
        ax2.plot([s for s, _ in evals], [e[metric] for _, e in evals], "o--", color="tab:orange",
                 label=f"held-out {metric.replace('_', ' ')}")
        ax2.set_ylabel(f"held-out {metric.replace('_', ' ')}")
    handles = [h for a in fig.axes for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles=handles, loc="upper center")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
