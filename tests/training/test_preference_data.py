"""Preference rows become TRL's token ids: every format, truncation and dropped row as trl 1.16's DPOTrainer and
KTOTrainer prepare them, with the SmolLM2 tokenizer; unusable rows are named by their line.

TRL's side is its own code, unmodified: ``DPOTrainer._prepare_dataset`` / ``KTOTrainer._prepare_dataset`` called on
a bare trainer (``object.__new__``, with the tokenizer and the few attributes they read), then TRL's collators,
which do the ``max_length`` truncation. LLaMA-Factory rows (sharegpt pairs, ``messages`` + ``label``) are given to
TRL in its own conversational form: ``human``/``gpt`` renamed ``user``/``assistant``, the last KTO message the
completion.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers

from lorakit.training.data import IGNORE, DataError, pad_batch
from lorakit.training.preference import dpo_loss, sequence_logps
from lorakit.training.preference_data import load_pairs, load_unpaired, mismatched

trl = pytest.importorskip("trl", reason="TRL is the reference these token ids are compared with (pip install trl)")
datasets = pytest.importorskip("datasets", reason="TRL prepares its data with the datasets library")
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer  # noqa: E402
from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference, KTOTrainer  # noqa: E402

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "preference"
ROLE = {"human": "user", "gpt": "assistant", "system": "system"}


def _write(tmp_path, rows, name="data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows_of(batch, prefix=""):
    """The unpadded rows of a TRL collator's batch and their completion masks."""
    out = []
    for ids, attention, completion in zip(batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"],
                                          batch[f"{prefix}completion_mask"]):
        n = int(attention.sum())
        out.append((ids[:n].tolist(), completion[:n].tolist()))
    return out


def _assert_row(example, ids, completion_mask):
    """Our example is TRL's row: the same ids, and a target exactly where TRL's next token is a completion token."""
    assert example.input_ids == ids
    assert [t != IGNORE for t in example.targets] == [bool(m) for m in completion_mask[1:]] + [False]


def _trl_pairs(rows, tokenizer, max_length):
    trainer = object.__new__(DPOTrainer)
    trainer._tokenizer = tokenizer
    args = SimpleNamespace(dataset_num_proc=None, max_length=max_length, truncation_mode="keep_start")
    return DPOTrainer._prepare_dataset(trainer, datasets.Dataset.from_list(rows), tokenizer, args, "train")


def _assert_pairs_equal_trl(path, trl_rows, tokenizer, max_length):
    ours = load_pairs(path, tokenizer, max_length=max_length)
    prepared = _trl_pairs(trl_rows, tokenizer, max_length)
    assert len(ours.rows) == len(prepared) and len(ours.dropped) == len(trl_rows) - len(prepared)
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=max_length)(list(prepared))
    trl_rows_out = _rows_of(batch)
    n = len(prepared)
    cut = 0
    for i, (pair, trl_row) in enumerate(zip(ours.rows, prepared)):
        assert pair.prompt_ids == trl_row["prompt_ids"]
        chosen, rejected = pair.examples()
        _assert_row(chosen, *trl_rows_out[i])
        _assert_row(rejected, *trl_rows_out[n + i])
        cut += len(pair.chosen_ids) < len(trl_row["chosen_ids"]) or len(pair.rejected_ids) < len(
            trl_row["rejected_ids"])
    assert ours.truncated == cut
    return ours


SKY = [{"role": "user", "content": "What colour is the sky?"}]
BLUE, GREEN = [{"role": "assistant", "content": "Blue."}], [{"role": "assistant", "content": "Green, like grass."}]
PAIR_FORMATS = {
    "plain": [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
              {"prompt": "Two and two make", "chosen": " four, as everyone knows", "rejected": " five"}],
    "conversational": [{"prompt": SKY, "chosen": BLUE, "rejected": GREEN},
                       {"prompt": [{"role": "system", "content": "Be terse."}] + SKY, "chosen": BLUE,
                        "rejected": GREEN}],
    "implicit plain": [{"chosen": "The sky is blue.", "rejected": "The sky is green."},
                       {"chosen": "Paris is in France, of course", "rejected": "Paris is in Texas"}],
    "implicit conversational": [{"chosen": SKY + BLUE, "rejected": SKY + GREEN},
                                {"chosen": SKY + BLUE + SKY + GREEN,  # two turns: the prompt is the first three
                                 "rejected": SKY + BLUE + SKY + [{"role": "assistant", "content": "Still blue."}]}],
}


@pytest.mark.parametrize("cut", [False, True])
@pytest.mark.parametrize("fmt", list(PAIR_FORMATS))
def test_pair_formats_give_trl_token_ids(tmp_path, smollm2_tokenizer, fmt, cut):
    """Cut: max_length leaves the shortest prompt two answer tokens (the longer prompts' rows are dropped)."""
    rows = PAIR_FORMATS[fmt]
    max_length = min(len(r["prompt_ids"]) for r in _trl_pairs(rows, smollm2_tokenizer, None)) + 2 if cut else 1024
    ours = _assert_pairs_equal_trl(_write(tmp_path, rows), rows, smollm2_tokenizer, max_length)
    assert ours.truncated > 0 if cut else ours.truncated == 0 and not ours.dropped


def _sharegpt_as_trl(row):
    return {"prompt": [{"role": ROLE[m["from"]], "content": m["value"]} for m in row["conversations"]],
            "chosen": [{"role": "assistant", "content": row["chosen"]["value"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]["value"]}]}


def _demo(name: str) -> Path:
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"the real preference data is not here: {path}")
    return path


@pytest.mark.parametrize("max_length", [2048, 300])
def test_llama_factory_sharegpt_pairs_give_trl_token_ids(tmp_path, smollm2_tokenizer, max_length):
    rows = json.loads(_demo("dpo_en_demo.json").read_text())[110:118]  # single- and multi-turn, with a system turn
    assert any(m["from"] == "system" for r in rows for m in r["conversations"])
    path = tmp_path / "dpo.json"
    path.write_text(json.dumps(rows, indent=2))
    ours = _assert_pairs_equal_trl(path, [_sharegpt_as_trl(r) for r in rows], smollm2_tokenizer, max_length)
    if max_length == 300:
        assert ours.truncated > 0 and ours.dropped
    else:  # each row named by the line its object starts on
        assert [p.line for p in ours.rows][:2] == [2, 2 + json.dumps(rows[0], indent=2).count("\n") + 1]


def _trl_unpaired(rows, tokenizer, max_length, batch_size):
    trainer = object.__new__(KTOTrainer)
    trainer._tokenizer = tokenizer
    trainer.calculate_KL, trainer.desirable_weight, trainer.undesirable_weight = True, 1.0, 1.0
    args = SimpleNamespace(dataset_num_proc=None, max_length=max_length, per_device_train_batch_size=batch_size)
    return KTOTrainer._prepare_dataset(trainer, datasets.Dataset.from_list(rows), tokenizer, args, "train")


def _assert_unpaired_equal_trl(path, trl_rows, tokenizer, max_length, batch_size=3):
    ours = load_unpaired(path, tokenizer, max_length=max_length)
    prepared = list(_trl_unpaired(trl_rows, tokenizer, max_length, batch_size))
    assert len(ours.rows) == len(prepared) and len(ours.dropped) == len(trl_rows) - len(prepared)
    collate = DataCollatorForUnpairedPreference(pad_token_id=tokenizer.pad_token_id, max_length=max_length)
    for start in range(0, len(prepared) - batch_size + 1, batch_size):  # full batches: TRL's KL rotation
        batch = collate(prepared[start:start + batch_size])
        examples = ours.rows[start:start + batch_size]
        assert [e.desirable for e in examples] == batch["label"].tolist()
        for e, (ids, completion) in zip(examples, _rows_of(batch)):
            _assert_row(e.example(), ids, completion)
        for kl, (ids, completion) in zip(mismatched(examples, max_length), _rows_of(batch, "KL_")):
            _assert_row(kl, ids, completion)
    return ours


@pytest.mark.parametrize("max_length", [1024, 40])
def test_kto_plain_and_conversational_rows_give_trl_token_ids(tmp_path, smollm2_tokenizer, max_length):
    plain = [{"prompt": "The sky is", "completion": " blue.", "label": True},
             {"prompt": "Grass is", "completion": " red, surely, and so is the sea", "label": False},
             {"prompt": "Snow is", "completion": " white.", "label": True}]
    _assert_unpaired_equal_trl(_write(tmp_path, plain), plain, smollm2_tokenizer, max_length)
    chat = [{"prompt": SKY, "completion": BLUE, "label": True}, {"prompt": SKY, "completion": GREEN, "label": False},
            {"prompt": SKY + BLUE + SKY, "completion": GREEN, "label": False}]
    _assert_unpaired_equal_trl(_write(tmp_path, chat, "chat.jsonl"), chat, smollm2_tokenizer, max_length)


@pytest.mark.parametrize("max_length", [4096, 200])
def test_llama_factory_kto_messages_give_trl_token_ids(tmp_path, smollm2_tokenizer, max_length):
    rows = json.loads(_demo("kto_en_demo.json").read_text())[:6]
    assert {r["label"] for r in rows} == {True, False} and any(len(r["messages"]) > 2 for r in rows)
    path = tmp_path / "kto.json"
    path.write_text(json.dumps(rows))
    trl_rows = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:], "label": r["label"]} for r in rows]
    ours = _assert_unpaired_equal_trl(path, trl_rows, smollm2_tokenizer, max_length)
    assert ours.truncated > 0 or max_length == 4096


def test_a_prompt_that_fills_max_length_drops_the_row(tmp_path, smollm2_tokenizer):
    rows = [{"prompt": "word " * 40, "chosen": " yes", "rejected": " no"},
            {"prompt": "Hi", "chosen": " yes", "rejected": " no"}]
    data = load_pairs(_write(tmp_path, rows), smollm2_tokenizer, max_length=20)
    assert [p.line for p in data.rows] == [2] and data.dropped == [1]
    assert "1 dropped (the prompt fills max_length: lines 1)" in data.summary()
    with pytest.raises(DataError, match="every prompt fills max_length=1; raise it"):
        load_pairs(_write(tmp_path, rows), smollm2_tokenizer, max_length=1)


def test_max_prompt_length_keeps_the_end_of_the_prompt(tmp_path, smollm2_tokenizer):
    rows = [{"prompt": "one two three four five six seven eight", "chosen": " nine", "rejected": " ten"}]
    full = load_pairs(_write(tmp_path, rows), smollm2_tokenizer).rows[0]
    cut = load_pairs(_write(tmp_path, rows), smollm2_tokenizer, max_prompt_length=3)
    assert cut.rows[0].prompt_ids == full.prompt_ids[-3:] and cut.truncated == 1
    assert cut.rows[0].chosen_ids == full.chosen_ids


BAD_PAIRS = [
    ({"prompt": "Hi", "chosen": " a", "rejected": " b"}, None),
    ({"prompt": "Hi", "chosen": " a"}, "missing field 'rejected' (fields: prompt, chosen)"),
    ({"prompt": "Hi", "chosen": "  ", "rejected": " b"}, "empty chosen answer"),
    ({"prompt": "Hi", "chosen": " a", "rejected": " a"}, "chosen and rejected are the same"),
    ({"chosen": "same", "rejected": "same"}, "chosen and rejected are the same"),
    ({"chosen": "abc", "rejected": "xyz"}, "share no prompt"),
    ({"prompt": SKY, "chosen": " a", "rejected": " b"}, "must all be strings or all be message lists"),
    ({"conversations": [{"from": "observation", "value": "x"}], "chosen": {"from": "gpt", "value": "a"},
      "rejected": {"from": "gpt", "value": "b"}},
     "conversations[0] is from 'observation'; allowed: human, gpt, system"),
    ({"conversations": [{"from": "human", "value": "x"}], "chosen": {"from": "human", "value": "a"},
      "rejected": {"from": "gpt", "value": "b"}}, "chosen is not the assistant's answer"),
    ({"prompt": SKY, "chosen": [{"role": "bot", "content": "a"}], "rejected": GREEN},
     "chosen[0] has role 'bot'; allowed: system, user, assistant"),
]


def test_bad_pairs_are_skipped_and_named_by_line(tmp_path, smollm2_tokenizer):
    path = _write(tmp_path, [row for row, _ in BAD_PAIRS])
    data = load_pairs(path, smollm2_tokenizer)
    assert [p.line for p in data.rows] == [1]
    assert [line for line, _ in data.skipped] == list(range(2, len(BAD_PAIRS) + 1))
    for (_, reason), (_, expected) in zip(data.skipped, BAD_PAIRS[1:]):
        assert expected in reason
    assert f"{len(BAD_PAIRS) - 1} skipped ({path}:2: missing field 'rejected'" in data.summary()
    assert "; and 4 more)" in data.summary()


def test_bad_pairs_refuse_the_file_with_on_bad_error(tmp_path, smollm2_tokenizer):
    path = _write(tmp_path, [row for row, _ in BAD_PAIRS[:4]])
    with pytest.raises(DataError, match=rf"3 rows cannot be used: {path}:2: missing field 'rejected'.*; {path}:3: "
                                        rf"empty chosen answer; {path}:4: chosen and rejected are the same "
                                        r"\(--bad-rows skip leaves them out\)"):
        load_pairs(path, smollm2_tokenizer, on_bad="error")
    with pytest.raises(DataError, match=rf"{path.parent / 'bad.jsonl'}: no usable rows: .*:1: empty chosen"):
        load_pairs(_write(tmp_path, [BAD_PAIRS[2][0]], "bad.jsonl"), smollm2_tokenizer)
    with pytest.raises(ValueError, match="on_bad must be one of skip, error, got 'drop'"):
        load_pairs(path, smollm2_tokenizer, on_bad="drop")


def test_bad_kto_rows_are_named_by_line(tmp_path, smollm2_tokenizer):
    rows = [{"messages": SKY + BLUE, "label": True},
            {"messages": SKY + BLUE, "label": 1},
            {"messages": SKY, "label": False},
            {"prompt": "Hi", "completion": "", "label": False},
            {"prompt": "Hi", "completion": " there"},
            {"prompt": "Hi", "chosen": " a", "rejected": " b"}]
    data = load_unpaired(_write(tmp_path, rows), smollm2_tokenizer)
    assert [(e.line, e.desirable) for e in data.rows] == [(1, True), (6, True), (6, False)]  # a pair, unpaired
    assert data.skipped == [(2, "'label' must be true or false, got 1"),
                            (3, "the last message must be the assistant's answer, after at least one prompt message"),
                            (4, "empty completion"),
                            (5, "missing field 'label' (fields: prompt, completion)")]
    with pytest.raises(ValueError, match="needs at least 2 examples per batch, got 1"):
        mismatched(data.rows[:1])


def test_parquet_rows_read_as_the_jsonl_rows_and_are_named_by_row(tmp_path, smollm2_tokenizer):
    rows = PAIR_FORMATS["conversational"] + [{"prompt": SKY, "chosen": BLUE, "rejected": BLUE}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "data.parquet"))
    from_parquet = load_pairs(tmp_path / "data.parquet", smollm2_tokenizer)
    from_jsonl = load_pairs(_write(tmp_path, rows), smollm2_tokenizer)
    assert from_parquet.rows == from_jsonl.rows and len(from_parquet.rows) == 2
    assert f"{tmp_path / 'data.parquet'}, row 3: chosen and rejected are the same" in from_parquet.summary()


def test_pairs_batch_into_sequence_logps_and_a_loss(tmp_path, smollm2_tokenizer, tiny_llama_dir):
    """The data and the losses fit: chosen rows then rejected rows, padded by lorakit's pad_batch; every answer
    token, and no prompt or padding token, is scored; the policy as its own reference gives DPO's ln 2."""
    pairs = load_pairs(_write(tmp_path, PAIR_FORMATS["conversational"] + PAIR_FORMATS["plain"]),
                       smollm2_tokenizer).rows
    examples = [p.examples() for p in pairs]
    batch = pad_batch([c for c, _ in examples] + [r for _, r in examples], smollm2_tokenizer.pad_token_id)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps, counts = sequence_logps(logits, batch["targets"])
    assert counts.tolist() == [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]
    n = len(pairs)
    out = dpo_loss(logps[:n], logps[n:], logps[:n], logps[n:])
    torch.testing.assert_close(out.losses, torch.full((n,), math.log(2)), atol=1e-6, rtol=0)
