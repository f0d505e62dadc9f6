"""Parquet, Arrow and save_to_disk data: every reader gives the same examples from them as from the equivalent
JSONL/CSV/TSV file, and their errors name the file, the split, the row and the field."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.feather as feather
import pytest
import torch

from lorakit.cli import main
from lorakit.training.data import (
    DataError,
    DataSource,
    data_source,
    existing_file,
    load_causal_lm,
    locate,
    read_prompts,
    read_records,
    read_table,
)
from lorakit.training.options import TrainConfig
from lorakit.training.tasks import ClassificationTask, Start, build_task
from lorakit.training.tasks.qa import read_squad
from lorakit.training.tasks.seq2seq import read_pairs
from lorakit.training.tasks.token_cls import read_tagged

CPU = torch.device("cpu")
ARROW_FORMATS = ("parquet", "arrow_stream", "arrow_file", "dataset", "dataset_dict")


def write_all(folder: Path, name: str, records: list[dict]) -> dict[str, str | DataSource]:
    """``records`` as JSONL, parquet, an Arrow IPC stream (as datasets writes them), an Arrow IPC file (Feather
    v2), a saved Dataset folder and the 'train' split of a saved DatasetDict folder (whose 'validation' split holds
    the first two records)."""
    ds = datasets.Dataset.from_list(records)
    out: dict[str, str | DataSource] = {"jsonl": str(folder / f"{name}.jsonl")}
    Path(out["jsonl"]).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    ds.to_parquet(str(folder / f"{name}.parquet"))
    out["parquet"] = str(folder / f"{name}.parquet")
    with pa.OSFile(str(folder / f"{name}.arrow"), "wb") as sink, pa.ipc.new_stream(sink, ds.data.schema) as writer:
        writer.write_table(ds.data.table)
    out["arrow_stream"] = str(folder / f"{name}.arrow")
    feather.write_feather(ds.data.table, str(folder / f"{name}-file.arrow"), compression="uncompressed")
    out["arrow_file"] = str(folder / f"{name}-file.arrow")
    ds.save_to_disk(str(folder / f"{name}-dataset"))
    out["dataset"] = str(folder / f"{name}-dataset")
    splits = {"train": ds, "validation": ds.select(range(min(2, len(ds))))}
    datasets.DatasetDict(splits).save_to_disk(str(folder / f"{name}-dict"))
    out["dataset_dict"] = data_source(folder / f"{name}-dict", "train")
    return out


SENTIMENT = [{"sentence": f"film number {i} was {'fine' if i % 3 else 'dull'}", "label": "pos" if i % 3 else "neg"}
             for i in range(12)]
ALPACA = [{"instruction": "Say hi", "input": "", "output": "hi"},
          {"instruction": "Add the numbers", "input": "2 and 3", "output": "5"},
          {"instruction": "Name a colour", "input": "", "output": "blue"}]
CHAT = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                      {"role": "assistant", "content": "Paris"}]},
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                      {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]}]
PAIRS = [{"input": "translate: cat", "target": "chat"}, {"input": "translate: dog", "target": "chien"},
         {"input": "translate: bird", "target": "oiseau"}]
TAGGED = [{"tokens": ["John", "lives", "in", "Paris"], "tags": ["B-PER", "O", "O", "B-LOC"]},
          {"tokens": ["Mary", "works"], "tags": ["B-PER", "O"]}]
SQUAD = [{"id": "q1", "question": "Where does John live?", "context": "John lives in Paris.",
          "answers": {"text": ["Paris"], "answer_start": [14]}},
         {"id": "q2", "question": "Who works?", "context": "Mary works at home.",
          "answers": {"text": ["Mary"], "answer_start": [0]}},
         {"id": "q3", "question": "Is it raining?", "context": "The sun shines.",
          "answers": {"text": [], "answer_start": []}}]


def test_seq_cls_tables_give_the_same_rows_in_every_format(tmp_path):
    sources = write_all(tmp_path, "sst", SENTIMENT)
    for name, delimiter in (("csv", ","), ("tsv", "\t")):
        path = tmp_path / f"sst.{name}"
        path.write_text("sentence,label\n".replace(",", delimiter) +
                        "".join(f"{r['sentence']}{delimiter}{r['label']}\n" for r in SENTIMENT))
        sources[name] = str(path)
    expected = [(r["sentence"], r["label"]) for r in SENTIMENT]
    for kind, source in sources.items():
        rows = read_table(source)
        assert [(text, label) for _, text, label in rows] == expected, kind
        if kind in ARROW_FORMATS:
            assert [row for row, _, _ in rows] == list(range(1, len(SENTIMENT) + 1)), kind  # 1-based rows
    # integer labels (a ClassLabel column, as datasets' GLUE has) read as their decimal strings, as in JSONL
    numbered = [{"sentence": r["sentence"], "label": int(r["label"] == "pos")} for r in SENTIMENT]
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    datasets.Dataset.from_list(numbered, features=features).to_parquet(str(tmp_path / "glue.parquet"))
    (tmp_path / "glue.jsonl").write_text("".join(json.dumps(r) + "\n" for r in numbered))
    assert [r[1:] for r in read_table(tmp_path / "glue.parquet")] == [r[1:] for r in read_table(tmp_path /
                                                                                                   "glue.jsonl")]


@pytest.mark.parametrize("records", [ALPACA, CHAT], ids=["alpaca", "chat"])
def test_causal_lm_records_give_the_same_examples_in_every_format(records, tmp_path, smollm2_tokenizer):
    sources = write_all(tmp_path, "sft", records)
    expected = load_causal_lm(sources["jsonl"], smollm2_tokenizer, 256)
    prompts = [p[1:] for p in read_prompts(sources["jsonl"])]
    assert len(expected) == len(records) and all(e.n_targets > 0 for e in expected)
    for kind in ARROW_FORMATS:
        assert load_causal_lm(sources[kind], smollm2_tokenizer, 256) == expected, kind
        assert [p[1:] for p in read_prompts(sources[kind])] == prompts, kind


def test_seq2seq_token_cls_and_qa_records_are_the_same_in_every_format(tmp_path):
    for name, records, read, key in (
            ("pairs", PAIRS, read_pairs, lambda row: row[1:]),
            ("tagged", TAGGED, read_tagged, lambda row: row[1:]),
            ("squad", SQUAD, read_squad, lambda q: (q.id, q.question, q.context, q.answers))):
        sources = write_all(tmp_path, name, records)
        expected = [key(item) for item in read(sources["jsonl"])]
        assert len(expected) == len(records)
        for kind in ARROW_FORMATS:
            assert [key(item) for item in read(sources[kind])] == expected, (name, kind)
    assert read_squad(sources["dataset_dict"])[1].where.endswith("squad-dict (split 'train'), row 2")


def test_a_classification_task_reads_the_train_and_validation_splits_of_one_folder(tiny_bert_dir, tmp_path):
    sources = write_all(tmp_path, "sst", SENTIMENT)
    folder = str(sources["dataset_dict"].path)
    config = TrainConfig(model=tiny_bert_dir, task="seq_cls", data=folder, eval_data=folder, progress=False)
    task = build_task(config, CPU, "fp32")
    assert type(task) is ClassificationTask
    index = {"neg": 0, "pos": 1}
    assert task.train == [(r["sentence"], index[r["label"]]) for r in SENTIMENT]  # --split train by default
    # --eval-split: validation by default (the first two records)
    assert [row.tolist() for row in task.eval_batches[0]["labels"]] == [index[r["label"]] for r in SENTIMENT[:2]]
    # with no validation split, test is used; with neither, the error names the splits there are
    only_test = tmp_path / "only-test"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(SENTIMENT),
                          "test": datasets.Dataset.from_list(SENTIMENT[:3])}).save_to_disk(str(only_test))
    assert data_source(only_test, None, ("validation", "test")).split == "test"
    with pytest.raises(DataError, match=r"holds the splits train, test: none is 'validation'"):
        data_source(only_test, None, ("validation",))


# -- errors --------------------------------------------------------------------------------------------------------


def test_a_parquet_file_without_the_field_names_the_file_the_field_and_the_columns(tmp_path):
    sources = write_all(tmp_path, "pairs", [{"input": "a", "output": "b"}, {"input": "c", "output": "d"}])
    with pytest.raises(DataError, match=r"pairs\.parquet: no column 'sentence' \(columns: input, output\)"):
        read_table(sources["parquet"])
    with pytest.raises(DataError, match=r"pairs\.parquet, row 1: missing field 'target' \(fields: input, output\)"):
        read_pairs(sources["parquet"])
    with pytest.raises(DataError, match=r"pairs-dict \(split 'train'\): no column 'text' \(columns: input, output\)"):
        read_table(sources["dataset_dict"], text_field="text")


def test_an_unknown_split_names_the_splits_there_are(tmp_path):
    sources = write_all(tmp_path, "sst", SENTIMENT)
    folder = sources["dataset_dict"].path
    with pytest.raises(DataError, match=r"sst-dict: no split 'dev'; its splits are train, validation"):
        data_source(folder, "dev")
    # through the options and the CLI: one line, no traceback
    config = TrainConfig(model="unused", task="seq_cls", data=str(folder), split="dev")
    with pytest.raises(DataError, match=r"no split 'dev'; its splits are train, validation"):
        ClassificationTask(config, CPU, torch.float32, Start())  # the data is read before the model
    # a split for something that has none, and --eval-split without --eval-data
    with pytest.raises(DataError, match=r"sst\.parquet: split 'test' asked for, but a parquet file has no splits"):
        data_source(sources["parquet"], "test")
    with pytest.raises(ValueError, match=r"--eval-split test picks a split of --eval-data, which is not given"):
        TrainConfig(task="seq_cls", data=str(folder), eval_split="test")
    # a DatasetDict folder of several splits read without one (as lorakit predict does) asks for one
    with pytest.raises(DataError, match=r"holds the splits train, validation: choose one with --split .* or give "
                                        r"the split's own folder, .*sst-dict/train"):
        read_records(folder)
    assert [r[1:] for r in read_table(folder / "validation")] == [(r["sentence"], r["label"]) for r in SENTIMENT[:2]]


def test_a_folder_that_is_not_a_datasets_folder_is_refused(tmp_path, capsys):
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"sentence": "a", "label": "x"}\n')
    with pytest.raises(DataError, match=r"plain is a folder, but not one written by datasets' save_to_disk"):
        read_table(folder)
    with pytest.raises(DataError, match=r"not one written by datasets' save_to_disk"):
        existing_file(folder)
    for name in ("broken.parquet", "broken.arrow"):  # not what the name says
        (tmp_path / name).write_text("sentence,label\na,b\n")
        with pytest.raises(DataError, match=rf"{name}: not readable as {name.split('.')[1]} \(Arrow"):
            read_table(tmp_path / name)
    assert main(["train", "--task", "seq_cls", "--data", str(folder), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("lorakit train: error: ") and "not one written by datasets'" in err


def test_a_value_of_the_wrong_type_names_the_file_the_split_and_the_row(tmp_path):
    sources = write_all(tmp_path, "bad", [{"sentence": "fine", "label": 1.0}, {"sentence": "dull", "label": 0.5}])
    with pytest.raises(DataError, match=r"bad\.parquet, row 1: 'label' is a number; a label is a string or an integer"):
        read_table(sources["parquet"])
    # an Arrow column has one type: a wrong value is a whole column of another type, or a null cell
    sources = write_all(tmp_path, "nulls", [{"sentence": "fine", "label": "a"}, {"sentence": None, "label": "b"}])
    with pytest.raises(DataError, match=r"nulls-dict \(split 'train'\), row 2: 'sentence' is null, not a string"):
        read_table(sources["dataset_dict"])
    sources = write_all(tmp_path, "pairs", [{"input": "x", "target": "y"}, {"input": "z", "target": ""}])
    with pytest.raises(DataError, match=r"pairs-dataset, row 2: 'target' must be a non-empty string"):
        read_pairs(sources["dataset"])
    sources = write_all(tmp_path, "tags", [{"tokens": ["a", "b"], "tags": ["O"]}])
    with pytest.raises(DataError, match=r"tags-file\.arrow, row 1: 1 tags for 2 tokens"):
        read_tagged(sources["arrow_file"])
    sources = write_all(tmp_path, "chat", [{"instruction": "hi", "input": "", "output": 3}])
    with pytest.raises(DataError, match=r"chat-dataset, row 1: 'output' is a number, not a string"):
        read_prompts(sources["dataset"])
    assert locate(sources["jsonl"], 4) == f"{sources['jsonl']}:4"  # text files keep their line numbers


def test_without_datasets_the_error_says_what_to_install(tmp_path, monkeypatch):
    sources = write_all(tmp_path, "sst", SENTIMENT)
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    for kind in ARROW_FORMATS:
        with pytest.raises(ImportError, match=r"needs the datasets library: pip install 'lorakit\[data\]'"):
            read_table(sources[kind])
    assert len(read_table(sources["jsonl"])) == len(SENTIMENT)  # the text readers need no datasets


def test_lorakit_train_on_parquet(tiny_bert_dir, tmp_path):
    sources = write_all(tmp_path, "sst", SENTIMENT * 2)
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_bert_dir, "--task", "seq_cls", "--data", sources["parquet"],
                 "--eval-data", str(sources["dataset_dict"].path), "--steps", "3", "--batch-size", "4",
                 "--target-modules", "query,value", "--precision", "fp32", "--no-progress",
                 "--output-dir", str(out)]) == 0
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "labels.json").read_text())["id2label"] == {"0": "neg", "1": "pos"}
    saved = TrainConfig.from_yaml(out / "train_config.yaml")
    assert saved.data == sources["parquet"] and saved.eval_split is None
