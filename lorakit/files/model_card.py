"""The model card of a saved adapter: ``README.md`` next to its files, as PEFT writes one.

The card opens with the YAML front matter the Hugging Face Hub reads (``base_model``, ``library_name: peft``,
``tags``, ``pipeline_tag``), then says what the adapter is (base model, task type, its LoRA settings) and, for an
adapter ``lorakit train`` made, how the run went: steps, throughput, and the held-out metrics before and after.

A README.md that lorakit did not write (it lacks :data:`MARK`) is the user's: as PEFT does, only its front matter
is updated (library name, base model, tags); its text stays byte for byte. Loading an adapter never reads the card.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .io import CONFIG_NAME, atomic_write, read_adapter_config

README_NAME = "README.md"
# The line that makes a card lorakit's: while it is there, each save writes the card afresh.
MARK = ("<!-- Written by lorakit, and rewritten each time the adapter is saved. Delete this line to keep your edits: "
        "later saves then update only the YAML header. -->")
# The Hub's pipeline of each PEFT task type (PEFT itself sets only text-generation, for CAUSAL_LM).
PIPELINE_TAGS = {"CAUSAL_LM": "text-generation", "SEQ_CLS": "text-classification",
                 "SEQ_2_SEQ_LM": "text2text-generation", "QUESTION_ANS": "question-answering",
                 "TOKEN_CLS": "token-classification", "FEATURE_EXTRACTION": "feature-extraction"}
AUTO_PEFT = {"CAUSAL_LM": "AutoPeftModelForCausalLM", "SEQ_CLS": "AutoPeftModelForSequenceClassification",
             "SEQ_2_SEQ_LM": "AutoPeftModelForSeq2SeqLM", "QUESTION_ANS": "AutoPeftModelForQuestionAnswering",
             "TOKEN_CLS": "AutoPeftModelForTokenClassification",
             "FEATURE_EXTRACTION": "AutoPeftModelForFeatureExtraction"}
# Front matter as huggingface_hub finds it: a block between two '---' lines at the top of the file.
FRONT_MATTER = re.compile(r"^(\s*---[\r\n]+)([\S\s]*?)([\r\n]+---(\r\n|\n|$))")


def write_model_card(folder: str | os.PathLike, training: dict[str, Any] | None = None,
                     names: Sequence[str] | None = None) -> Path | None:
    """Write (or update) ``README.md`` in an adapter folder, atomically, from the adapter configs saved there.

    Args:
        folder: The folder ``save_pretrained`` wrote: an adapter in it (``default``) and/or in subfolders.
        training: What ``lorakit train`` knows at the end of a run: ``{"config": TrainConfig as a dict, "summary":
            the run's summary}`` (see ``summary.json``); None for an adapter saved from Python.
        names: The adapters to describe (those just saved); default: every adapter in the folder.

    Returns:
        The card's path, or None when the folder holds no adapter (nothing is written then).
    """
    folder = Path(folder)
    adapters = {name: c for name, c in _saved_adapters(folder).items() if names is None or name in names}
    if not adapters:
        return None
    path = folder / README_NAME
    front = _front_matter(adapters)
    if path.exists():
        try:
            existing = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as err:
            warnings.warn(f"{path} cannot be read as UTF-8 text ({err}); the model card was left as it is",
                          stacklevel=2)
            return path
        if MARK not in existing:  # the user's README: its front matter only, as PEFT does
            updated = _updated_front_matter(existing, front, path)
            if updated is not None and updated != existing:
                atomic_write(path, lambda tmp: Path(tmp).write_text(updated, encoding="utf-8"))
            return path
    text = render_card(front, adapters, training)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def _saved_adapters(folder: Path) -> dict[str, dict[str, Any]]:
    """Adapter name → its ``adapter_config.json``: ``default`` in ``folder``, the others in subfolders (PEFT's
    layout)."""
    found = {}
    if (folder / CONFIG_NAME).is_file():
        found["default"] = read_adapter_config(folder)
    if folder.is_dir():
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and (p / CONFIG_NAME).is_file()):
            found[sub.name] = read_adapter_config(sub)
    return found


def _hub_id(name: Any) -> str | None:
    """``name`` when it can be a Hub model id (``owner/model``, not a folder here); the Hub refuses a card whose
    ``base_model`` is anything else, such as a local path."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) or Path(name).exists():
        return None
    return name


def _front_matter(adapters: dict[str, dict[str, Any]]) -> dict[str, Any]:
    first = adapters.get("default") or next(iter(adapters.values()))
    base = first.get("base_model_name_or_path")
    hub = _hub_id(base)
    tags = [f"base_model:adapter:{hub}"] if hub else []
    tags += ["lora"] if any(c.get("peft_type", "LORA") == "LORA" for c in adapters.values()) else []
    tags += ["lorakit"] + (["transformers"] if base else [])
    front: dict[str, Any] = {"base_model": hub} if hub else {}
    front["library_name"] = "peft"
    pipeline = PIPELINE_TAGS.get(first.get("task_type") or "")
    if pipeline:
        front["pipeline_tag"] = pipeline
    front["tags"] = tags
    return front


def _updated_front_matter(text: str, ours: dict[str, Any], path: Path) -> str | None:
    """``text`` with our keys merged into its front matter: ``library_name`` and ``base_model`` set (PEFT sets
    them), our tags added to its own, ``pipeline_tag`` only where it has none. None (and a warning) when its front
    matter is not a YAML mapping: the file is then left alone."""
    import yaml

    match = FRONT_MATTER.match(text)
    header: Any = {}
    if match:
        try:
            header = yaml.safe_load(match.group(2)) or {}
        except yaml.YAMLError as err:
            warnings.warn(f"{path}: the YAML header is not valid YAML ({str(err).splitlines()[0]}); the card was "
                          f"left as it is", stacklevel=3)
            return None
        if not isinstance(header, dict):
            warnings.warn(f"{path}: the YAML header is not a mapping; the card was left as it is", stacklevel=3)
            return None
    merged = dict(header)
    merged["library_name"] = ours["library_name"]
    if "base_model" in ours:
        merged["base_model"] = ours["base_model"]
    if "pipeline_tag" in ours and not merged.get("pipeline_tag"):
        merged["pipeline_tag"] = ours["pipeline_tag"]
    theirs = merged.get("tags")
    theirs = [theirs] if isinstance(theirs, str) else list(theirs or [])
    merged["tags"] = theirs + [t for t in ours["tags"] if t not in theirs]
    if merged == header:
        return text
    block = "---\n" + yaml.safe_dump(merged, sort_keys=False, allow_unicode=True) + "---\n"
    return block + (text[match.end():] if match else "\n" + text)


def render_card(front: dict[str, Any], adapters: dict[str, dict[str, Any]],
                training: dict[str, Any] | None = None) -> str:
    """The text of lorakit's card: front matter, what the adapter is, its training run (if known), how to use it."""
    import torch
    import yaml

    from .. import __version__

    first = adapters.get("default") or next(iter(adapters.values()))
    base = first.get("base_model_name_or_path")
    task_type = first.get("task_type")
    kind = "prompt-tuning adapter" if first.get("peft_type") == "PROMPT_TUNING" else "LoRA adapter"
    base_text = (f"[`{base}`](https://huggingface.co/{base})" if _hub_id(base) else f"`{base}`") if base \
        else "a base model it does not name"
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip("\n"), "---", "", MARK, "",
             f"# {kind[0].upper() + kind[1:]} for {_short(base)}", "",
             f"A {kind} for {base_text}" + (f", task type `{task_type}`" if task_type else "")
             + ", in PEFT's file format: it loads with lorakit and with PEFT.", "",
             "## Adapter", "", *_settings_table(adapters), ""]
    if training:
        lines += _training_section(training.get("config") or {}, training.get("summary") or {})
    lines += _usage(task_type, len(adapters) > 1 or "default" not in adapters)
    lines += ["### Framework versions", "", f"- lorakit {__version__}", f"- PyTorch {torch.__version__}", ""]
    return "\n".join(lines)


def _short(base: str | None) -> str:
    """The base's name for the title: a Hub id as it is, a local folder by its last part."""
    if not base:
        return "an unnamed base model"
    return base if _hub_id(base) else Path(base).name or base


def _metric(value: Any) -> str:
    """A loss or metric: four decimals, which tell two close values apart (large ones, like perplexities, one)."""
    if not _is_number(value):
        return ""
    return f"{value:,d}" if isinstance(value, int) else f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.4f}"


def _settings_table(adapters: dict[str, dict[str, Any]]) -> list[str]:
    """One column per adapter; the rows every adapter has (r, alpha, targets, dropout) and those any one sets."""
    rows: dict[str, dict[str, str]] = {}

    def put(row: str, name: str, value: Any) -> None:
        rows.setdefault(row, {})[name] = value if isinstance(value, str) else _value(value)

    for name, c in adapters.items():
        put("PEFT type", name, c.get("peft_type", "LORA"))
        if c.get("peft_type", "LORA") != "LORA":
            for key in ("num_virtual_tokens", "prompt_tuning_init"):
                if c.get(key) is not None:
                    put(key, name, c[key])
            continue
        r, alpha = c.get("r"), c.get("lora_alpha")
        put("r", name, r)
        put("lora_alpha", name, alpha)
        if isinstance(r, (int, float)) and isinstance(alpha, (int, float)) and r > 0:
            rslora = bool(c.get("use_rslora"))
            put("scaling (lora_alpha / √r)" if rslora else "scaling (lora_alpha / r)", name,
                alpha / math.sqrt(r) if rslora else alpha / r)
        targets = c.get("target_modules")
        put("target_modules", name, ", ".join(targets) if isinstance(targets, list) else targets)
        put("lora_dropout", name, c.get("lora_dropout", 0.0))
        for key in ("exclude_modules", "modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform"):
            if c.get(key):
                put(key, name, c[key])
        for key in ("use_dora", "use_rslora", "lora_bias"):
            if c.get(key):
                put(key, name, True)
        if c.get("bias", "none") != "none":
            put("bias", name, c["bias"])
        if c.get("init_lora_weights", True) is not True:
            put("init_lora_weights", name, c["init_lora_weights"])
    names = list(adapters)
    header = "| setting | " + " | ".join(f"`{n}`" for n in names) + " |"
    out = [header, "|---" * (len(names) + 1) + "|"]
    out += [f"| {row} | " + " | ".join(values.get(n, "") for n in names) + " |" for row, values in rows.items()]
    return out


def _value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,d}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_value(v) for v in value)
    return str(value).replace("|", "\\|")


def _training_section(config: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    """The run as ``lorakit train`` reported it: options that shaped it, and the held-out metrics."""
    rows = [("task", f"{config.get('task')}: {summary.get('task')}" if summary.get("task") else config.get("task")),
            ("method", config.get("method") + (f" on a 4-bit {config['quantize']} base" if config.get("quantize")
                                               else "") if config.get("method") else None),
            ("steps", summary.get("steps")),
            ("examples per step", _batch(config, summary)),
            ("learning rate", f"{config['lr']:g}, {config.get('schedule')} schedule, {config.get('warmup_steps')} "
                              f"warmup steps" if config.get("lr") is not None else None),
            ("LoRA+ ratio (B's rate over A's)", config.get("loraplus_lr_ratio")),
            ("training loss", f"{_metric(summary['first_loss'])} → {_metric(summary['last_loss'])}"
             if summary.get("first_loss") is not None and summary.get("last_loss") is not None else None),
            ("tokens", summary.get("tokens")),
            ("training time", f"{summary['train_seconds']:.1f} s" if summary.get("train_seconds") else None),
            ("tokens/s", f"{summary['tokens_per_s']:.0f}" if summary.get("tokens_per_s") else None),
            ("precision, device", f"{summary.get('precision')}, {summary.get('device')}"
             if summary.get("precision") else None),
            ("resumed from", summary.get("resumed_from")),
            ("seed", config.get("seed"))]
    lines = ["## Training", "", "Trained with `lorakit train`:", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {_value(value)} |" for name, value in rows if value is not None]
    lines.append("")
    before, after = summary.get("before") or {}, summary.get("after") or {}
    metrics = [k for k in after if _is_number(after[k]) or _is_number(before.get(k))]
    if metrics:
        lines += ["## Evaluation", "", "On the held-out data, before and after training:", "",
                  "| metric | before | after |", "|---|---|---|"]
        lines += [f"| {k} | {_metric(before.get(k))} | {_metric(after.get(k))} |" for k in metrics]
        lines.append("")
    return lines


def _batch(config: dict[str, Any], summary: dict[str, Any]) -> str | None:
    if config.get("batch_size") is None:
        return None
    parts = [f"{config['batch_size']} per micro-batch"]
    if config.get("grad_accum", 1) > 1:
        parts.append(f"× {config['grad_accum']} accumulated")
    if summary.get("processes", 1) > 1:
        parts.append(f"× {summary['processes']} processes")
    return " ".join(parts)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _usage(task_type: str | None, subfolders: bool) -> list[str]:
    auto = AUTO_PEFT.get(task_type or "", "AutoPeftModel")
    where = "ADAPTER_DIR" + ("  # the folder of one adapter" if subfolders else "")
    commands = ["`lorakit eval ADAPTER_DIR`", "`lorakit predict ADAPTER_DIR --data FILE`"]
    if task_type in ("CAUSAL_LM", "SEQ_2_SEQ_LM"):
        commands.append("`lorakit generate \"...\" --adapter ADAPTER_DIR`")
    if task_type == "CAUSAL_LM":
        commands.append("`lorakit serve --adapter NAME=ADAPTER_DIR`")
    return ["## How to use", "", "With lorakit, on the base the adapter names (or pass `model=` a folder of it):", "",
            "```python", "from lorakit.workflows.inference import load_adapter_model", "",
            f"model, tokenizer = load_adapter_model(\"{where}\")", "```", "",
            f"or from the command line: {', '.join(commands)}. With PEFT:", "", "```python",
            f"from peft import {auto}", "", f"model = {auto}.from_pretrained(\"{where}\")", "```", ""]
