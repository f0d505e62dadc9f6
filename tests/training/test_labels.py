"""A classifier's classes: saved as labels.json next to the adapter and read back, counted from the saved head,
and a data file's labels checked against them or mapped onto them (--label-map)."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import tiny_bert_cls

from lorakit import LoraConfig, get_lora_model
from lorakit.training.data import DataError
from lorakit.training.labels import (
    LABELS_NAME,
    adapter_classes,
    check_labels,
    head_classes,
    is_classifier,
    map_labels,
    parse_label_map,
    save_labels,
    saved_labels,
)


def test_label_names_round_trip_as_transformers_id2label(tmp_path):
    save_labels(tmp_path, ["neg", "pos", "mixed"])
    saved = json.loads((tmp_path / LABELS_NAME).read_text())
    assert saved == {"id2label": {"0": "neg", "1": "pos", "2": "mixed"}, "label2id": {"neg": 0, "pos": 1, "mixed": 2}}
    assert saved_labels(tmp_path) == ["neg", "pos", "mixed"]


def test_without_labels_json_the_training_config_names_them(tmp_path):
    assert saved_labels(tmp_path) is None
    (tmp_path / "train_config.yaml").write_text(yaml.safe_dump({"task": "seq_cls", "data": "x.tsv",
                                                                "labels": ["b", "a"]}))
    assert saved_labels(tmp_path) == ["b", "a"]


@pytest.mark.parametrize(("content", "message"), [
    ({"id2label": []}, "expected an 'id2label' object"),
    ({"id2label": {"a": "x"}}, "id2label keys must be class indices"),
    ({"id2label": {"0": "x", "2": "y"}}, r"must name classes 0 to 1 once each; got \[0, 2\]"),
    ({"id2label": {"0": "x", "1": "x"}}, "class names must be distinct non-empty strings"),
])
def test_a_damaged_labels_file_is_an_error_naming_it(tmp_path, content, message):
    (tmp_path / LABELS_NAME).write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message) as err:
        saved_labels(tmp_path)
    assert LABELS_NAME in str(err.value)


def test_the_saved_head_says_how_many_classes_an_adapter_has(tmp_path):
    lora = get_lora_model(tiny_bert_cls(num_labels=3), LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    lora.save_pretrained(tmp_path)
    assert is_classifier(tmp_path) and head_classes(tmp_path) == 3
    assert adapter_classes(tmp_path) == ["0", "1", "2"]  # no names saved: the class indices
    save_labels(tmp_path, ["a", "b", "c"])
    assert adapter_classes(tmp_path) == ["a", "b", "c"]
    save_labels(tmp_path, ["a", "b"])
    with pytest.raises(ValueError, match="the head has 3 classes but 2 label names are saved"):
        adapter_classes(tmp_path)


def test_a_label_map_renames_a_files_labels():
    mapping = parse_label_map(["neg=0", " pos = 1"])
    assert mapping == {"neg": "0", "pos": "1"}
    rows = [(2, "bad", "neg"), (3, "good", "pos"), (4, "fine", "1")]
    assert map_labels(rows, mapping) == [(2, "bad", "0"), (3, "good", "1"), (4, "fine", "1")]
    for bad in (["neg"], ["=0"], ["neg="]):
        with pytest.raises(ValueError, match="write FILE_LABEL=CLASS pairs"):
            parse_label_map(bad)
    with pytest.raises(ValueError, match="names the file label 'neg' twice"):
        parse_label_map(["neg=0", "neg=1"])


def test_labels_that_are_not_classes_are_named_with_their_line():
    rows = [(2, "bad", "0"), (3, "good", "pos"), (4, "meh", "mixed")]
    with pytest.raises(DataError, match=r"new.csv:3: label 'pos' is not one of the classes \(0, 1\); the file's "
                                        r"labels that are not classes: mixed, pos. Map them with --label-map"):
        check_labels(rows, "new.csv", ["0", "1"], {})
    with pytest.raises(DataError, match=r"--label-map maps onto '2', which is not among the classes \(0, 1\)"):
        check_labels(rows[:1], "new.csv", ["0", "1"], {"neg": "2"})
    check_labels(rows[:1], "new.csv", ["0", "1"], {})  # all known: no error
