"""Measured comparisons: full fine-tuning vs LoRA vs QLoRA vs prompt tuning (``compare``), and LoRA's rank and
target modules (``sweep``), each trained by ``lorakit train`` on the same data with the same step budget.

``compare`` runs every method in its own process, so that each one's peak memory is its own, then times the
trained artifacts' forward pass as trained (adapter unmerged, 4-bit base, prompt in front) and merged into the
base where that is possible. It writes ``comparison.md``, ``comparison.json`` and ``comparison.png``.
``sweep`` trains one LoRA adapter per (rank, targets) pair and writes ``sweep.md``, ``sweep.json`` and
``sweep.png`` (quality against trainable parameters and against training time).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..core.errors import InvalidValue
from ..files.io import make_folder
from ..models.embedded_models import build_model
from ..models.model import LoraModel
from ..models.prompt_tuning import PromptTuningModel
from ..training.loop import train
from ..training.options import TrainConfig
from ..training.registry import peft_task_type
from .inference import base_model_for

METHODS = ("full", "lora", "qlora", "prompt")
# Learning rates that suit each method at lorakit's default budget (prompt tuning needs large steps: Lester et
# al. use 0.3; full fine-tuning small ones).
LEARNING_RATES = {"full": 5e-5, "lora": 2e-3, "qlora": 2e-3, "prompt": 3e-2}
# Single-word module names the sweep expands, so that `q,v` means q_proj,v_proj.
_SHORT = {"q", "k", "v", "o", "gate", "up", "down"}


def _say(message: str) -> None:
    print(f"lorakit: {message}", file=sys.stderr, flush=True)


def method_config(config: TrainConfig, method: str, output_dir: Path) -> TrainConfig:
    """``config`` for one method of the comparison: its learning rate, QLoRA as LoRA on an NF4 base."""
    changes: dict[str, Any] = {"method": "lora" if method == "qlora" else method, "lr": LEARNING_RATES[method],
                               "quantize": "nf4" if method == "qlora" else None, "output_dir": str(output_dir),
                               "progress": False}
    return dataclasses.replace(config, **changes)


def _quality(evaluation: dict[str, Any]) -> tuple[str, float]:
    for key in ("exact_match", "accuracy", "loss"):
        if key in evaluation:
            return key, float(evaluation[key])
    raise InvalidValue(f"no quality metric in {sorted(evaluation)}")


def _train_in_child(config: TrainConfig, folder: Path) -> dict[str, Any]:
    """``lorakit train --config`` in a child process (its peak memory is its own); the run's summary."""
    make_folder(folder, "output folder")
    config_file = folder / "requested_config.yaml"
    config.save_yaml(config_file)
    done = subprocess.run([sys.executable, "-m", "lorakit", "train", "--config", str(config_file)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"training in {folder} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return json.loads((folder / "summary.json").read_text())


def forward_ms(model: torch.nn.Module, inputs: dict[str, torch.Tensor], repeats: int = 5) -> float:
    """Median milliseconds of one forward pass (no gradients), after one warm-up."""
    model.eval()
    times = []
    with torch.no_grad():
        model(**inputs)
        for _ in range(repeats):
            start = time.perf_counter()
            model(**inputs)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def inference_times(method: str, folder: Path, config: TrainConfig, batch: int = 4, seq: int = 128
                    ) -> tuple[float, float | None]:
    """Forward milliseconds of the trained artifact on ``batch × seq`` tokens: as trained, and merged into the
    base (None for prompt tuning, whose prompt cannot be folded into weights)."""
    vocab = 1000  # any ids inside every vocabulary: only the time is measured
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if method == "full":
        ms = forward_ms(build_model(str(folder)), inputs)
        return ms, ms
    base = base_model_for(folder, config.model)
    if method == "prompt":
        return forward_ms(PromptTuningModel.from_pretrained(base, folder), inputs), None
    lora = LoraModel.from_pretrained(base, folder)
    unmerged = forward_ms(lora, inputs)
    return unmerged, forward_ms(lora.merge_and_unload(), inputs)


def compare(config: TrainConfig | None = None, methods: tuple[str, ...] = METHODS,
            output_dir: str | os.PathLike = "runs/compare") -> dict[str, Any]:
    """Train every method in ``methods`` on ``config``'s task and budget, measure, and write the comparison.

    Args:
        config: The task, model, data and step budget (default: the built-in task on the embedded SmolLM2).
            The method, learning rate and quantization are set per method (:data:`LEARNING_RATES`).
        methods: A subset of ``full``, ``lora``, ``qlora``, ``prompt``.

    Returns:
        ``rows`` (one dict of measurements per method), ``metric``, and the paths of the files written.
    """
    config = config or TrainConfig()
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InvalidValue(f"unknown method(s) {unknown}; methods: {', '.join(METHODS)}")
    if peft_task_type(config.task) != "CAUSAL_LM" and "prompt" in methods:
        _say(f"prompt tuning is for causal language models; left out of this {config.task} comparison")
        methods = tuple(m for m in methods if m != "prompt")
    if not methods:
        raise InvalidValue(f"nothing to compare: choose methods among {', '.join(METHODS)}")
    out = Path(output_dir)
    make_folder(out, "output folder (--output-dir)")
    rows = []
    for i, method in enumerate(methods, 1):
        folder = out / method
        _say(f"[{i}/{len(methods)}] training {method} in {folder}")
        summary = _train_in_child(method_config(config, method, folder), folder)
        metric, quality = _quality(summary["after"])
        _say(f"[{i}/{len(methods)}] timing {method}'s forward pass")
        as_trained, merged = inference_times(method, folder, config)
        rows.append({
            "method": method, "trainable_params": summary["trainable_params"],
            "trainable_percent": 100 * summary["trainable_params"] / summary["all_params"],
            "peak_rss_mib": summary["peak_rss_mib"], "tokens_per_s": summary["tokens_per_s"],
            "train_seconds": summary["train_seconds"], "metric": metric,
            "before": _quality(summary["before"])[1], "after": quality, "artifact_bytes": summary["adapter_bytes"],
            "forward_ms": as_trained, "forward_ms_merged": merged, "lr": LEARNING_RATES[method],
        })
    result = {"task": config.task, "model": config.model, "steps": summary["steps"], "metric": rows[0]["metric"],
              "rows": rows}
    (out / "comparison.json").write_text(json.dumps(result, indent=2))
    (out / "comparison.md").write_text(comparison_markdown(result))
    png = _plot_comparison(result, out / "comparison.png")
    return {**result, "markdown": str(out / "comparison.md"), "json": str(out / "comparison.json"),
            "png": str(png) if png else None}


def _size(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def comparison_markdown(result: dict[str, Any]) -> str:
    """The comparison table (the seed's, with numbers)."""
    metric = result["metric"]
    lines = [f"# Full fine-tuning vs LoRA vs QLoRA vs prompt tuning: {result['task']} on {result['model']}, "
             f"{result['steps']} steps each", "",
             f"| method | trainable params | trainable % | peak RSS | tokens/s | {metric} before → after | "
             f"artifact on disk | forward ms, as trained | forward ms, merged |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        merged = "cannot merge" if row["forward_ms_merged"] is None else f"{row['forward_ms_merged']:.1f}"
        lines.append(f"| {row['method']} | {row['trainable_params']:,d} | {row['trainable_percent']:.4f} | "
                     f"{row['peak_rss_mib']:.0f} MiB | {row['tokens_per_s']:.0f} | {row['before']:.3f} → "
                     f"{row['after']:.3f} | {_size(row['artifact_bytes'])} | {row['forward_ms']:.1f} | {merged} |")
    lines += ["", "Learning rates: " + ", ".join(f"{r['method']} {r['lr']:g}" for r in result["rows"]) + ". Forward "
              "times are for 4 × 128 tokens without gradients; full fine-tuning's model is its own merged form; "
              "QLoRA merged means dequantized into dense layers. Peak RSS is the training process's maximum from the "
              "end of model loading on (evaluations included); loading and quantizing come before it."]
    return "\n".join(lines) + "\n"


def _plot_comparison(result: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = result["rows"]
    names = [r["method"] for r in rows]
    panels = [("trainable parameters", [r["trainable_params"] for r in rows], True),
              ("peak RSS (MiB)", [r["peak_rss_mib"] for r in rows], False),
              ("training tokens/s", [r["tokens_per_s"] for r in rows], False),
              (f"held-out {result['metric']} after", [r["after"] for r in rows], False)]
    colors = {"full": "#888888", "lora": "#1f77b4", "qlora": "#2ca02c", "prompt": "#ff7f0e"}
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (title, values, log) in zip(axes, panels):
        ax.bar(names, values, color=[colors[n] for n in names])
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
    fig.suptitle(f"{result['task']} on {result['model']}, {result['steps']} steps each")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- sweep -----------------------------------------------------------------------------------------------


def expand_targets(spec: str) -> str:
    """``q,k,v,o`` → ``q_proj,k_proj,v_proj,o_proj`` (also gate, up, down); other specs unchanged."""
    if spec == "all-linear":
        return spec
    return ",".join(f"{name}_proj" if name in _SHORT else name for name in (s.strip() for s in spec.split(",")))


def sweep(config: TrainConfig | None = None, ranks: tuple[int, ...] = (4, 8, 16, 32),
          targets: tuple[str, ...] = ("q,v", "q,k,v,o", "all-linear"),
          output_dir: str | os.PathLike = "runs/sweep") -> dict[str, Any]:
    """Train one LoRA adapter per (rank, targets) pair with ``config``'s task and budget (α = 2r, so the scaling
    stays 2 at every rank); tabulate and plot.

    Returns:
        ``rows`` (rank, targets, trainable params, quality, train seconds per run), ``metric`` and the files.
    """
    config = config or TrainConfig()
    if not ranks or any(not isinstance(r, int) or r < 1 for r in ranks):
        raise InvalidValue(f"ranks must be positive integers, got {list(ranks)}")
    if not targets:
        raise InvalidValue("targets is empty: give at least one target set (e.g. 'q,v' or 'all-linear')")
    out = Path(output_dir)
    make_folder(out, "output folder (--output-dir)")
    rows = []
    runs = [(r, t) for t in targets for r in ranks]
    for i, (r, spec) in enumerate(runs, 1):
        folder = out / f"r{r}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', spec)}"
        _say(f"[{i}/{len(runs)}] r={r}, targets {spec}")
        summary = train(dataclasses.replace(config, method="lora", r=r, lora_alpha=2.0 * r,
                                            target_modules=expand_targets(spec), output_dir=str(folder),
                                            progress=False))
        metric, quality = _quality(summary["after"])
        rows.append({"r": r, "targets": spec, "trainable_params": summary["trainable_params"], "metric": metric,
                     "after": quality, "train_seconds": summary["train_seconds"],
                     "adapter_bytes": summary["adapter_bytes"]})
    result = {"task": config.task, "model": config.model, "metric": rows[0]["metric"], "rows": rows}
    (out / "sweep.json").write_text(json.dumps(result, indent=2))
    lines = [f"# LoRA rank and target sweep: {config.task} on {config.model}", "",
             f"| r | targets | trainable params | held-out {result['metric']} | train s | adapter |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {row['r']} | {row['targets']} | {row['trainable_params']:,d} | {row['after']:.3f} | "
              f"{row['train_seconds']:.0f} | {_size(row['adapter_bytes'])} |" for row in rows]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    png = _plot_sweep(result, out / "sweep.png")
    return {**result, "markdown": str(out / "sweep.md"), "json": str(out / "sweep.json"),
            "png": str(png) if png else None}


def _plot_sweep(result: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for spec in dict.fromkeys(r["targets"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["targets"] == spec]
        for ax, key in zip(axes, ("trainable_params", "train_seconds")):
            ax.plot([r[key] for r in rows], [r["after"] for r in rows], marker="o", label=spec)
            for r in rows:
                ax.annotate(f"r={r['r']}", (r[key], r["after"]), textcoords="offset points", xytext=(4, 4),
                            fontsize=8)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("trainable parameters")
    axes[1].set_xlabel("training seconds")
    for ax in axes:
        ax.set_ylabel(f"held-out {result['metric']}")
        ax.legend(title="targets")
    fig.suptitle(f"LoRA sweep: {result['task']} on {result['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
