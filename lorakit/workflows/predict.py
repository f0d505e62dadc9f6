"""Predictions of a trained adapter on a data file, one JSON line per example (``lorakit predict``).

A classifier gives each text's predicted class and the probability of every class; a language model gives its
greedy answer to each prompt. When the file has reference labels or answers they are written next to the
predictions, so the output can be compared or scored later.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import torch

from ..core.errors import InvalidValue
from ..files.io import is_prompt_adapter, read_adapter_config
from ..models.devices import resolve_device
from ..training.builtin_task import SYSTEM
from ..training.data import read_prompts, read_table
from ..training.labels import is_classifier, map_labels, parse_label_map
from ..training.metrics import generate_texts
from ..training.saved_adapter import saved_config
from ..training.tasks import progress_bar
from .inference import load_adapter_model


def predictions(adapter: str | Path, data: str | Path, *, model: str | None = None, text_field: str = "sentence",
                label_field: str = "label", label_map: list[str] | None = None, batch_size: int = 32,
                max_length: int = 512, max_new_tokens: int = 128, device: str = "auto",
                trust_remote_code: bool = False, progress: bool = True) -> Iterator[dict[str, Any]]:
    """The adapter's prediction for each example of ``data``, in file order, one batch at a time.

    Args:
        adapter: A saved adapter folder (LoRA or prompt tuning) whose base can be found (or is given as ``model``).
        data: A classifier reads ``text_field`` (and ``label_field`` when present, as the reference) from a
            CSV/TSV/JSON(L) file; a language model reads prompts (chat, Alpaca or ``{"prompt": ...}`` records, or a
            ``.txt`` file with one prompt per line; see :func:`~lorakit.training.data.read_prompts`).
        label_map: ``FILE_LABEL=CLASS`` pairs that rename the file's reference labels.
        max_length: A classifier's input is cut at this many tokens.

    Yields:
        ``{"line", "text", "prediction", "probabilities", "reference"}`` for a classifier;
        ``{"line", "prompt", "prediction", "reference"}`` for a language model (``reference`` only when the file
        has one).
    """
    task_type = read_adapter_config(Path(adapter)).get("task_type") if not is_prompt_adapter(adapter) else None
    if task_type not in (None, "CAUSAL_LM", "SEQ_CLS"):
        raise InvalidValue(f"{adapter} is a {task_type} adapter; lorakit predict handles sequence classifiers (SEQ_CLS) "
                           f"and language models (CAUSAL_LM); evaluate it with lorakit eval")
    net, tokenizer = load_adapter_model(adapter, model, trust_remote_code)
    net.to(resolve_device(device)).eval()
    if is_classifier(adapter):
        rows = map_labels(read_table(data, text_field, label_field, labels_required=False), parse_label_map(label_map))
        yield from _classify(net, tokenizer, rows, batch_size, max_length, progress)
    else:
        prompts = read_prompts(data)
        if saved_config(adapter).get("task") == "builtin":  # trained with the built-in task's system message
            prompts = [(line, chat if chat[0]["role"] == "system" else [{"role": "system", "content": SYSTEM}, *chat],
                        ref) for line, chat, ref in prompts]
        yield from _answer(net, tokenizer, prompts, batch_size, max_new_tokens, progress)


def predict(adapter: str | Path, data: str | Path, output: str | Path | None = None, **options: Any) -> int:
    """Write :func:`predictions` as JSON lines to ``output`` (stdout when None); returns how many were written.

    The file is written as ``output.partial`` while predictions stream in (each line flushed as it is written) and
    renamed to ``output`` when all are done; on an error it is removed, so no file ever looks complete when it is not.
    """
    if output is None:
        return _write(predictions(adapter, data, **options), sys.stdout)
    output = Path(output)
    partial = output.with_name(output.name + ".partial")
    try:
        with partial.open("w", encoding="utf-8") as f:
            n = _write(predictions(adapter, data, **options), f)
        os.replace(partial, output)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return n


def _write(records: Iterator[dict[str, Any]], f: TextIO) -> int:
    n = 0
    for record in records:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        n += 1
        f.flush()
    return n


def _classify(net: torch.nn.Module, tokenizer: Any, rows: list[tuple[int, str, str | None]], batch_size: int,
              max_length: int, progress: bool) -> Iterator[dict[str, Any]]:
    classes = [net.config.id2label[i] for i in range(len(net.config.id2label))]
    device = next(net.parameters()).device
    with progress_bar(progress, len(rows), "predicting") as bar, torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            enc = tokenizer([text for _, text, _ in chunk], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt").to(device)
            probs = net(**enc).logits.float().softmax(-1).cpu()  # (batch, classes)
            for (line, text, label), p in zip(chunk, probs):
                record = {"line": line, "text": text, "prediction": classes[int(p.argmax())],
                          "probabilities": {name: round(float(v), 6) for name, v in zip(classes, p)}}
                if label is not None:
                    record["reference"] = label
                yield record
            if bar is not None:
                bar(len(chunk))


def _answer(net: torch.nn.Module, tokenizer: Any, prompts: list[tuple[int, list[dict[str, str]], str | None]],
            batch_size: int, max_new_tokens: int, progress: bool) -> Iterator[dict[str, Any]]:
    with progress_bar(progress, len(prompts), "predicting") as bar:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            answers = generate_texts(net, tokenizer, [chat for _, chat, _ in chunk], max_new_tokens, batch_size)
            for (line, chat, reference), answer in zip(chunk, answers):
                record = {"line": line, "prompt": chat[-1]["content"], "prediction": answer}
                if reference is not None:
                    record["reference"] = reference
                yield record
            if bar is not None:
                bar(len(chunk))
