"""What a training run leaves to read: ``metrics.jsonl`` (one JSON object per step or evaluation), the same scalars
as TensorBoard event files when asked (``--report-to tensorboard``), and a PNG of the loss curve with the held-out
metric."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import FileProblem, MissingDependency, write_failure

TENSORBOARD_DIR = "runs"  # next to metrics.jsonl: `tensorboard --logdir OUTPUT_DIR` finds it


@dataclass
class MetricsLog:
    """``metrics.jsonl``: one JSON object per logged step or evaluation (only the main process writes); with
    ``report_to="tensorboard"`` the same scalars also go to a :class:`TensorBoardLog` in ``runs/`` beside it."""

    path: Path
    enabled: bool
    records: list[dict[str, Any]] = field(default_factory=list)
    report_to: str = "none"
    board: TensorBoardLog | None = field(default=None, repr=False)

    def start(self, resume_step: int | None) -> None:
        if not self.enabled:
            return
        if resume_step is None or not self.path.exists():
            self.path.write_text("")
            self._open_board()
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
        self._open_board()

    def _open_board(self) -> None:
        if self.report_to == "tensorboard":
            self.board = TensorBoardLog(self.path.parent / TENSORBOARD_DIR, self.records)

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.enabled:
            line = json.dumps(record) + "\n"
            size = self.path.stat().st_size if self.path.exists() else 0
            try:
                with self.path.open("a") as f:
                    f.write(line)
            except OSError as err:
                with contextlib.suppress(OSError):
                    os.truncate(self.path, size)  # no half line left behind
                raise FileProblem(f"could not add step {record.get('step')} to {self.path} ({write_failure(err)}); "
                                  f"the lines before it are intact, and so are the checkpoints") from None
            if self.board is not None:
                self.board.write(record)

    def close(self) -> None:
        """Finish the TensorBoard event file, if any (``metrics.jsonl`` is complete after every write)."""
        if self.board is not None:
            self.board.close()
            self.board = None


def summary_writer_class() -> type:
    """TensorBoard's ``SummaryWriter`` (through PyTorch), or an ImportError that says what to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise MissingDependency(f"--report-to tensorboard needs TensorBoard ({err}); pip install 'lorakit[tensorboard]'"
                                ) from None
    return SummaryWriter


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a ``metrics.jsonl`` record by TensorBoard tag: ``train/<key>`` for a training step's,
    ``eval/<key>`` for an evaluation's (nested mappings joined with ``/``); lists and text (samples, class names, a
    confusion matrix) are left out, as are booleans."""
    out: dict[str, float] = {}

    def add(prefix: str, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if key == "step":
                continue
            if isinstance(value, dict):
                add(f"{prefix}/{key}", value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{prefix}/{key}"] = float(value)

    add("train", {k: v for k, v in record.items() if k != "eval"})
    if isinstance(record.get("eval"), dict):
        add("eval", record["eval"])
    return out


class TensorBoardLog:
    """The scalars of ``metrics.jsonl`` as TensorBoard event files in ``log_dir``, each record's at its step.

    It starts from ``records`` (what ``metrics.jsonl`` holds when the run starts: nothing, or the records up to the
    checkpoint a resumed run continues from) and replaces the event files of earlier starts, so the folder shows
    exactly what ``metrics.jsonl`` does: TensorBoard's own fix for a rewound run (``purge_step``) is ignored by its
    fast data server. Every record is flushed at once, so a run that stops leaves a complete log.
    """

    def __init__(self, log_dir: Path, records: list[dict[str, Any]]) -> None:
        writer_class = summary_writer_class()
        log_dir.mkdir(parents=True, exist_ok=True)
        earlier = sorted(log_dir.glob("events.out.tfevents.*"))
        self.writer = writer_class(str(log_dir))
        for record in records:
            self._add(record)
        self.writer.flush()
        for path in earlier:  # only after the new file holds their records (up to the resumed step)
            path.unlink(missing_ok=True)

    def _add(self, record: dict[str, Any]) -> None:
        step = record.get("step", 0)
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=step)

    def write(self, record: dict[str, Any]) -> None:
        self._add(record)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


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
