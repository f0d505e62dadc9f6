"""The classes of a sequence classifier: their names saved with the adapter, read back, and a file's labels mapped
onto them.

A ``seq_cls`` adapter's head outputs one logit per class; which name each index stands for is written next to the
adapter as ``labels.json`` (transformers' ``id2label`` / ``label2id``, the same mapping the head's model config
carries). Evaluation, prediction and further training read it back, so a file whose labels differ is an error that
names them, or is mapped onto the adapter's classes with ``--label-map``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from safetensors import safe_open

from ..core.config import SEQ_CLS_HEAD_NAMES
from ..core.errors import InvalidValue
from ..files.io import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config, read_json_object
from .data import DataError, DataSource, locate
from .options import TrainConfig

LABELS_NAME = "labels.json"
HEADS = SEQ_CLS_HEAD_NAMES  # the heads PEFT trains next to a SEQ_CLS adapter


def save_labels(folder: str | Path, labels: Sequence[str]) -> None:
    """Write ``labels.json`` (``id2label`` and ``label2id``, as in a transformers config) into ``folder``."""
    mapping = {"id2label": {str(i): name for i, name in enumerate(labels)},
               "label2id": {name: i for i, name in enumerate(labels)}}
    (Path(folder) / LABELS_NAME).write_text(json.dumps(mapping, indent=2, ensure_ascii=False) + "\n",
                                            encoding="utf-8")


def saved_labels(folder: str | Path) -> list[str] | None:
    """The class names saved with an adapter, in class order: its ``labels.json``, else the ``labels`` of its
    ``train_config.yaml``; None when neither names them.

    Raises:
        ValueError: ``labels.json`` is damaged (the message names the file and what is wrong).
    """
    folder = Path(folder)
    path = folder / LABELS_NAME
    if path.is_file():
        id2label = read_json_object(path).get("id2label")
        if not isinstance(id2label, dict) or not id2label:
            raise InvalidValue(f"{path}: expected an 'id2label' object of class index → name")
        try:
            indices = sorted(int(k) for k in id2label)
        except ValueError:
            raise InvalidValue(f"{path}: id2label keys must be class indices 0, 1, …; got {sorted(id2label)}") from None
        if indices != list(range(len(indices))):
            raise InvalidValue(f"{path}: id2label must name classes 0 to {len(indices) - 1} once each; got {indices}")
        names = [id2label[str(i)] if str(i) in id2label else id2label[i] for i in indices]
        if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            raise InvalidValue(f"{path}: class names must be distinct non-empty strings; got {names}")
        return names
    saved = folder / "train_config.yaml"
    if saved.is_file():
        return TrainConfig.from_yaml(saved).labels
    return None


def head_classes(folder: str | Path) -> int | None:
    """How many classes the classification head saved in an adapter outputs (None when it saves no head).

    Read from the tensor shapes of ``adapter_model.safetensors`` without loading the weights: the head's output
    layer is its 2-D weight with the fewest rows (``classifier.weight``, or ``out_proj`` after a ``dense`` layer).
    """
    folder = Path(folder)
    config = read_adapter_config(folder)
    heads = set(config.get("modules_to_save") or ()) | set(HEADS)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        return None
    rows = []
    with safe_open(str(weights), framework="pt") as f:
        keys = f.keys()  # a safetensors file handle, not a dict
        for key in keys:
            parts = key.split(".")
            if parts[-1] == "weight" and any(p in heads for p in parts[:-1]):
                shape = f.get_slice(key).get_shape()
                if len(shape) == 2:
                    rows.append(shape[0])
    return min(rows) if rows else None


def adapter_classes(folder: str | Path) -> list[str] | None:
    """The classes of a saved ``seq_cls`` adapter: its saved names, else ``"0"``, ``"1"``, … for as many classes as
    its head has; None when it has neither (not a classifier).

    Raises:
        ValueError: The saved names and the head disagree on the number of classes.
    """
    names, n = saved_labels(folder), head_classes(folder)
    if names is not None and n is not None and len(names) != n:
        raise InvalidValue(f"{folder}: the head has {n} classes but {len(names)} label names are saved "
                           f"({', '.join(names)})")
    if names is None and n is not None:
        return [str(i) for i in range(n)]
    return names


def is_classifier(folder: str | Path) -> bool:
    """Whether an adapter folder holds a sequence classifier (PEFT's ``SEQ_CLS`` task type)."""
    path = Path(folder)
    return (path / CONFIG_NAME).is_file() and read_adapter_config(path).get("task_type") == "SEQ_CLS"


def parse_label_map(pairs: Sequence[str] | None) -> dict[str, str]:
    """``["neg=0", "pos=1"]`` → ``{"neg": "0", "pos": "1"}``: a data file's labels and the class each one is.

    Raises:
        ValueError: A pair is not ``FILE_LABEL=CLASS`` or a file label is given twice.
    """
    mapping: dict[str, str] = {}
    for pair in pairs or ():
        label, sep, target = pair.partition("=")
        if not sep or not label.strip() or not target.strip():
            raise InvalidValue(f"--label-map {pair!r}: write FILE_LABEL=CLASS pairs, e.g. --label-map neg=0,pos=1")
        if label.strip() in mapping:
            raise InvalidValue(f"--label-map names the file label {label.strip()!r} twice")
        mapping[label.strip()] = target.strip()
    return mapping


def map_labels(rows: Sequence[tuple[int, str, str]], mapping: dict[str, str]) -> list[tuple[int, str, str]]:
    """``(line, text, label)`` rows with each label renamed by ``mapping`` (labels not in it stay)."""
    return [(line, text, mapping.get(label, label)) for line, text, label in rows]


def check_labels(rows: Sequence[tuple[int, str, str]], path: str | Path | DataSource, classes: Sequence[str],
                 mapping: dict[str, str]) -> None:
    """Every label of ``rows`` (already mapped) must be one of ``classes``; else an error naming the file, the line,
    the label, the classes and how to map them.

    Raises:
        DataError: A label that is not a class, or a ``--label-map`` target that is not a class.
    """
    unknown_targets = sorted(set(mapping.values()) - set(classes))
    if unknown_targets:
        raise DataError(f"--label-map maps onto {', '.join(map(repr, unknown_targets))}, which "
                        f"{'is' if len(unknown_targets) == 1 else 'are'} not among the classes "
                        f"({', '.join(classes)})")
    allowed = set(classes)
    for line, _, label in rows:
        if label not in allowed:
            found = sorted({lab for _, _, lab in rows} - allowed)
            raise DataError(f"{locate(path, line)}: label {label!r} is not one of the classes ({', '.join(classes)}); "
                            f"the file's labels that are not classes: {', '.join(found)}. Map them with "
                            f"--label-map FILE_LABEL=CLASS,… (for instance --label-map {found[0]}=CLASS,…)")
