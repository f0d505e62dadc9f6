"""Preference and KTO data files as a hostile or careless user writes them, generated table by table: every field of
every row format with each wrong JSON type, damaged messages, and damaged files (empty, not UTF-8, cut short, not
rows, a line that is not an object, NaN, nested too deep, a folder, missing). A bad row is skipped with its line and
one sentence that names the field (or, with ``on_bad="error"``, refuses the file); a file that cannot be read as
rows is one error that names it; nothing raises anything else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.core.errors import is_user_error
from lorakit.training.preference_data import load_pairs, load_unpaired

SKY = [{"role": "user", "content": "What colour is the sky?"}]
BLUE = [{"role": "assistant", "content": "Blue."}]
GREEN = [{"role": "assistant", "content": "Green."}]
WRONG = {"null": None, "number": 1, "float": 0.5, "bool": True, "string": "x", "list": [], "object": {}}

# A good row of each format, and the JSON types each of its fields takes.
PAIR_ROWS = {
    "plain": ({"prompt": "Sky?", "chosen": " Blue.", "rejected": " Green."},
              {"prompt": {"string"}, "chosen": {"string"}, "rejected": {"string"}}),
    "conversational": ({"prompt": SKY, "chosen": BLUE, "rejected": GREEN},
                       {"prompt": {"list"}, "chosen": {"list"}, "rejected": {"list"}}),
    "full texts": ({"chosen": "Sky? Blue.", "rejected": "Sky? Green."}, {"chosen": {"string"}, "rejected": {"string"}}),
    "sharegpt": ({"conversations": [{"from": "human", "value": "Sky?"}], "chosen": {"from": "gpt", "value": "Blue."},
                  "rejected": {"from": "gpt", "value": "Green."}},
                 {"conversations": {"list"}, "chosen": {"object"}, "rejected": {"object"}}),
}
KTO_ROWS = {
    "plain": ({"prompt": "Sky?", "completion": " Blue.", "label": True},
              {"prompt": {"string"}, "completion": {"string"}, "label": {"bool"}}),
    "messages": ({"messages": SKY + BLUE, "label": False}, {"messages": {"list"}, "label": {"bool"}}),
}


def _type_cases(rows: dict) -> list[tuple[str, dict, str]]:
    """(id, damaged row, the field its reason must name) for every field with every JSON type it does not take."""
    out = []
    for fmt, (row, fields) in rows.items():
        for name, allowed in fields.items():
            for kind, value in WRONG.items():
                if kind not in allowed:
                    out.append((f"{fmt}-{name}-{kind}", {**row, name: value}, name))
            out.append((f"{fmt}-{name}-missing", {k: v for k, v in row.items() if k != name}, name))
    return out


def _message_cases(row: dict, field: str) -> list[tuple[str, dict, str]]:
    """Damaged messages inside ``row[field]`` (a message list)."""
    message = row[field][0]
    damaged = {
        "not-an-object": "hello", "no-role": {"content": message["content"]}, "no-content": {"role": message["role"]},
        "role-unknown": {**message, "role": "bot"}, "content-number": {**message, "content": 7},
        "content-null": {**message, "content": None}, "role-list": {**message, "role": ["user"]},
    }
    return [(f"{field}-{name}", {**row, field: [value]}, field) for name, value in damaged.items()]


PAIR_CASES = _type_cases(PAIR_ROWS) + _message_cases(PAIR_ROWS["conversational"][0], "prompt") + \
    _message_cases(PAIR_ROWS["conversational"][0], "chosen") + [
        ("empty-chosen", {**PAIR_ROWS["plain"][0], "chosen": "   "}, "chosen"),
        ("same-answers", {**PAIR_ROWS["plain"][0], "rejected": " Blue."}, "same"),
        ("sharegpt-answer-from-human", {**PAIR_ROWS["sharegpt"][0], "chosen": {"from": "human", "value": "x"}},
         "chosen"),
        ("sharegpt-empty-conversations", {**PAIR_ROWS["sharegpt"][0], "conversations": []}, "conversations"),
        ("full-texts-no-common-prompt", {"chosen": "Blue.", "rejected": "Green."}, "prompt"),
    ]
KTO_CASES = _type_cases(KTO_ROWS) + _message_cases(KTO_ROWS["messages"][0], "messages") + [
    ("label-string-true", {**KTO_ROWS["plain"][0], "label": "true"}, "label"),
    ("label-zero", {**KTO_ROWS["plain"][0], "label": 0}, "label"),
    ("messages-no-answer", {"messages": SKY, "label": True}, "assistant"),
    ("messages-answer-only", {"messages": BLUE, "label": True}, "assistant"),
    ("empty-completion", {**KTO_ROWS["plain"][0], "completion": ""}, "completion"),
]


def _write(folder: Path, rows: list) -> Path:
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _check_skipped(data, reason_names: str) -> None:
    assert len(data.rows) >= 1 and [line for line, _ in data.skipped] == [2], data.skipped
    reason = data.skipped[0][1]
    assert reason and "\n" not in reason and reason_names in reason, reason


# Each reader, and a good row it reads before the damaged one.
READERS = {"pairs": (load_pairs, PAIR_ROWS["plain"][0]), "kto": (load_unpaired, KTO_ROWS["plain"][0])}
ROW_CASES = [("pairs", *c) for c in PAIR_CASES] + [("kto", *c) for c in KTO_CASES]


@pytest.mark.parametrize("reader, case, row, names", ROW_CASES, ids=[f"{c[0]}-{c[1]}" for c in ROW_CASES])
def test_a_damaged_row_is_skipped_with_its_line_and_field(tmp_path, smollm2_tokenizer, reader, case, row, names):
    load, good = READERS[reader]
    path = _write(tmp_path, [good, row])
    _check_skipped(load(path, smollm2_tokenizer), names)
    with pytest.raises(ValueError, match=rf"{path}:2: .*{names}") as refused:
        load(path, smollm2_tokenizer, on_bad="error")
    assert is_user_error(refused.value) and "\n" not in str(refused.value)


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


FILE_DAMAGE = [
    ("empty", "data.jsonl", b""),
    ("only-blank-lines", "data.jsonl", b"\n\n  \n"),
    ("not-utf8", "data.jsonl", b'{"prompt": "\xff\xfe", "chosen": " a", "rejected": " b"}\n'),
    ("cut-short", "data.jsonl", b'{"prompt": "Sky?", "chosen": " Blue.", "rej'),
    ("json-not-rows", "data.json", b'{"prompt": "Sky?"}'),
    ("json-list-of-numbers", "data.json", b"[1, 2, 3]"),
    ("json-cut-short", "data.json", b'[{"prompt": "Sky?", "chosen": " a", "rejected": " b"},'),
    ("nan-label", "data.jsonl", b'{"prompt": "Sky?", "completion": " Blue.", "label": NaN}\n'),
    ("nested-too-deep", "data.jsonl", _deep(100_000).encode()),
    ("nested-too-deep-array", "data.json", _deep(100_000).encode()),
    ("row-is-a-number", "data.jsonl", b'{"prompt": "Sky?", "chosen": " a", "rejected": " b"}\n5\n'),
    ("row-is-a-list", "data.jsonl", b'{"prompt": "Sky?", "chosen": " a", "rejected": " b"}\n[1, 2]\n'),
    ("row-is-null", "data.jsonl", b'{"prompt": "Sky?", "chosen": " a", "rejected": " b"}\nnull\n'),
    ("binary", "data.parquet", b"\x00\x01not parquet at all"),
    ("unknown-suffix", "data.csv2", b"prompt,chosen\n"),
]


@pytest.mark.parametrize("case, name, content", FILE_DAMAGE, ids=[c[0] for c in FILE_DAMAGE])
@pytest.mark.parametrize("reader", ["pairs", "kto"])
def test_a_damaged_file_is_one_error_naming_it(tmp_path, smollm2_tokenizer, case, name, content, reader):
    path = tmp_path / name
    path.write_bytes(content)
    load = READERS[reader][0]
    with pytest.raises(Exception) as refused:
        load(path, smollm2_tokenizer)
    message = str(refused.value)
    assert is_user_error(refused.value), f"{type(refused.value).__name__}: {message}"
    assert str(path) in message and "\n" not in message, message


@pytest.mark.parametrize("reader", ["pairs", "kto"])
def test_a_missing_file_or_a_folder_is_one_error_naming_it(tmp_path, smollm2_tokenizer, reader):
    load = READERS[reader][0]
    for path in (tmp_path / "nowhere.jsonl", tmp_path):
        with pytest.raises(Exception) as refused:
            load(path, smollm2_tokenizer)
        assert is_user_error(refused.value) and str(path) in str(refused.value), str(refused.value)


def test_a_huge_answer_is_truncated_not_refused(tmp_path, smollm2_tokenizer):
    path = _write(tmp_path, [{"prompt": "Sky?", "chosen": " Blue." * 50_000, "rejected": " Green."}])
    data = load_pairs(path, smollm2_tokenizer, max_length=64)
    assert data.truncated == 1 and len(data.rows[0].prompt_ids) + len(data.rows[0].chosen_ids) <= 64
