"""Reading datasets (JSON, JSONL, TSV/CSV) with errors that name the file and line, chat rendering with loss
masks, padding and packing."""

from __future__ import annotations

import json

import pytest

from lorakit.models.chat import prompt_ids
from lorakit.training.data import (
    IGNORE,
    DataError,
    Example,
    chat_of,
    load_causal_lm,
    pack_batch,
    pad_batch,
    read_prompts,
    read_records,
    read_table,
    tokenize_chat,
)


def test_jsonl_error_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    with pytest.raises(DataError, match=r"train.jsonl:2: malformed JSON"):
        read_records(path)


def test_json_array_error_and_record_lines(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "{not a brace}"}\n]\n')
    records = read_records(path)
    assert [line for line, _ in records] == [2, 3]
    with pytest.raises(DataError, match=r"train.json:3: missing field 'output'"):
        chat_of(records[1][1], f"{path}:{records[1][0]}")
    path.write_text('[{"a": 1},\n {"b": }]')
    with pytest.raises(DataError, match=r"train.json:2: malformed JSON"):
        read_records(path)


@pytest.mark.parametrize("content, message", [("", "the file is empty"), ("\n\n", "no records"),
                                               ('[1, 2]', "item 0 is not a JSON object")])
def test_empty_or_wrong_records(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_records(path)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_records("nope.jsonl")


def test_table_errors_name_the_line(tmp_path):
    tsv = tmp_path / "d.tsv"
    tsv.write_text("sentence\tlabel\ngood film\t1\nbad film\t0\nodd\t7\n")
    rows = read_table(tsv)
    assert rows[0] == (2, "good film", "1")
    with pytest.raises(DataError, match=r"d.tsv:1: no column 'label' \(columns: sentence, label2\)"):
        tsv.write_text("sentence\tlabel2\ngood film\t1\n")
        read_table(tsv)
    assert read_table(tsv, labels_required=False) == [(2, "good film", None)]  # texts to predict
    tsv.write_text("sentence\tlabel\ngood film\t1\nbad film\t0\nodd\t7\n")
    with pytest.raises(DataError, match=r"d.tsv:1: no column 'text' \(columns: sentence, label\)"):
        read_table(tsv, text_field="text")
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\n,1\n")
    with pytest.raises(DataError, match=r"d.csv:2: empty 'text'"):
        read_table(csv, text_field="text")
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "x"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:1: missing field 'label'"):
        read_table(jsonl, text_field="text")


def test_chat_loss_only_on_assistant_turns(smollm2_tokenizer):
    tok = smollm2_tokenizer
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."}]
    example = tokenize_chat(tok, chat, max_length=512)
    assert len(example.targets) == len(example.input_ids)
    # The targets are the next tokens, so the learned text is the assistant turns (each with its end marker).
    learned = tok.decode([t for t in example.targets if t != IGNORE])
    assert learned.replace("\n", "") == "Hello.<|im_end|>Goodbye.<|im_end|>"
    # The prompt of the first answer is exactly what generation would be fed.
    first = prompt_ids(tok, chat[:2])
    assert example.input_ids[:len(first)] == first
    assert all(t == IGNORE for t in example.targets[:len(first) - 1])


def test_alpaca_and_text_files(tmp_path, smollm2_tokenizer):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"instruction": "Add", "input": "2+2", "output": "4"}) + "\n"
                    + json.dumps({"text": "plain words here"}) + "\n")
    alpaca, text = load_causal_lm(path, smollm2_tokenizer, max_length=512)
    assert smollm2_tokenizer.decode([t for t in alpaca.targets if t != IGNORE]).strip() == "4<|im_end|>"
    assert text.n_targets == len(text) - 1  # plain LM: every next token
    with pytest.raises(DataError, match="a.jsonl:1: no response tokens left within max_length=5"):
        load_causal_lm(path, smollm2_tokenizer, max_length=5)


def test_pack_batch_positions_and_targets():
    a, b, c = Example([1, 2, 3], [2, 3, IGNORE]), Example([4, 5], [5, IGNORE]), Example([6, 7, 8, 9], [7, 8, 9, IGNORE])
    batch = pack_batch([a, b, c], max_length=6, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["targets"].tolist() == [[2, 3, IGNORE, 5, IGNORE], [7, 8, 9, IGNORE, IGNORE]]
    padded = pad_batch([a, b], pad_id=0)
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert padded["targets"][1].tolist() == [5, IGNORE, IGNORE]


def test_prompts_to_answer_come_from_chat_alpaca_prompt_records_or_lines(tmp_path):
    records = [{"prompt": "p1"}, {"instruction": "i2", "input": "x"}, {"instruction": "i3", "output": "o3"},
               {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u4"}]},
               {"messages": [{"role": "user", "content": "u5"}, {"role": "assistant", "content": "a5"}]}]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    prompts = read_prompts(path)
    assert [(line, chat[-1]["content"], ref) for line, chat, ref in prompts] == [
        (1, "p1", None), (2, "i2\n\nx", None), (3, "i3", "o3"), (4, "u4", None), (5, "u5", "a5")]
    assert prompts[3][1][0] == {"role": "system", "content": "s"}
    txt = tmp_path / "p.txt"
    txt.write_text("first\n\nsecond\n")
    assert [(line, chat) for line, chat, _ in read_prompts(txt)] == [
        (1, [{"role": "user", "content": "first"}]), (3, [{"role": "user", "content": "second"}])]
    path.write_text('{"prompt": ""}\n')
    with pytest.raises(DataError, match=r"p.jsonl:1: 'prompt' must be a non-empty string"):
        read_prompts(path)
