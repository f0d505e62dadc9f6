"""qa (PEFT's QUESTION_ANS): SQuAD files read (official JSON and JSONL) with errors that name the row, long contexts
cut into windows whose answer positions point at the answer, answers picked from hand-made scores, SQuAD's exact
match and F1 on a hand-counted example, a short run on a tiny BERT whose loss goes down, PEFT round trips, and a run
of the embedded MiniLM encoder on real SQuAD 2.0 questions."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import transformers

from lorakit import LoraConfig, LoraModel, get_lora_model
from lorakit.files.io import read_adapter_config
from lorakit.training.data import DataError
from lorakit.training.loop import train
from lorakit.training.metrics import normalize_answer, squad_scores
from lorakit.training.options import TrainConfig
from lorakit.training.tasks import QuestionAnsweringTask, build_task
from lorakit.training.tasks.qa import Question, best_answers, collate_windows, make_windows, qa_loss, read_squad

CPU = torch.device("cpu")
SQUAD = Path(__file__).resolve().parents[3] / "shared" / "data" / "squad" / "squad2_dev_cs224n_6078.json"


def tiny_bert_qa(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    return transformers.BertForQuestionAnswering(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    from lorakit.models.embedded_models import minilm_dir

    return transformers.AutoTokenizer.from_pretrained(str(minilm_dir()))


def _squad(paragraphs: list[dict]) -> dict:
    return {"version": "v2.0", "data": [{"title": "t", "paragraphs": paragraphs}]}


@pytest.fixture
def squad_file(tmp_path):
    """An official-format SQuAD 2.0 file the tiny model can learn from: 'what is the color?' is answered by the
    word after 'color', 'what is the animal?' by the word after 'animal'; a third of the questions are about a
    pet, which no context mentions (unanswerable)."""
    colors, animals = ["red", "green", "blue", "black"], ["cat", "dog", "bird", "fish"]
    paragraphs = []
    for i in range(24):
        color, animal = colors[i % 4], animals[(i // 4) % 4]
        context = f"the color is {color} and the animal is {animal} ."
        qas = [{"id": f"c{i}", "question": "what is the color?", "is_impossible": False,
                "answers": [{"text": color, "answer_start": context.index(color)}]},
               {"id": f"a{i}", "question": "what is the animal?", "is_impossible": False,
                "answers": [{"text": animal, "answer_start": context.index(f"is {animal}") + 3}]},
               {"id": f"p{i}", "question": "what is the pet?", "is_impossible": True, "answers": [],
                "plausible_answers": [{"text": animal, "answer_start": context.index(f"is {animal}") + 3}]}]
        paragraphs.append({"context": context, "qas": qas})
    path = tmp_path / "train.json"
    path.write_text(json.dumps(_squad(paragraphs)))
    return path


# -- reading -------------------------------------------------------------------------------------------------------


def test_reads_official_squad_and_jsonl_records(tmp_path):
    context = "Paris is the capital of France."
    official = tmp_path / "dev.json"
    official.write_text(json.dumps(_squad([{"context": context, "qas": [
        {"id": "q1", "question": "Capital?", "answers": [{"text": "Paris", "answer_start": 0}]},
        {"id": "q2", "question": "Moon?", "answers": [], "is_impossible": True}]}])))
    jsonl = tmp_path / "dev.jsonl"
    jsonl.write_text(json.dumps({"id": "h1", "question": "Country?", "context": context,
                                 "answers": {"text": ["France"], "answer_start": [24]}}) + "\n")
    q1, q2 = read_squad(official)
    assert (q1.id, q1.answers, q2.answers) == ("q1", (("Paris", 0),), ())
    (h1,) = read_squad(jsonl)
    assert (h1.id, h1.context, h1.answers) == ("h1", context, (("France", 24),))


def test_an_answer_not_at_its_answer_start_names_the_file_and_row(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_squad([{"context": "Paris is the capital of France.", "qas": [
        {"id": "q1", "question": "Capital?", "answers": [{"text": "Paris", "answer_start": 0}]},
        {"id": "q2", "question": "Country?", "answers": [{"text": "France", "answer_start": 23}]}]}])))
    with pytest.raises(DataError, match=r"bad\.json: data\[0\]\.paragraphs\[0\]\.qas\[1\] \(id 'q2'\): answers\[0\] "
                                        r"'France' is not at answer_start 23 of the context \(the context has ' "
                                        r"Franc' there\)"):
        read_squad(path)
    rows = tmp_path / "bad.jsonl"
    rows.write_text('{"question": "Q?", "context": "abc", "answers": [{"text": "b", "answer_start": 1}]}\n'
                    '{"question": "Q?", "context": "abc", "answers": [{"text": "b", "answer_start": 2}]}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: answers\[0\] 'b' is not at answer_start 2"):
        read_squad(rows)


# -- windows and answers -------------------------------------------------------------------------------------------


def test_long_contexts_become_overlapping_windows_that_point_at_the_answer(tokenizer):
    words = [f"w{i}" for i in range(60)]
    context = " ".join(words) + " the answer is zebra ."
    question = Question("q", "what is it?", context, (("zebra", context.index("zebra")),), "here")
    unanswerable = Question("u", "what is it?", context, (), "here")
    windows = make_windows(tokenizer, [question, unanswerable], max_length=48)
    mine = [w for w in windows if w.question == 0]
    assert len(mine) > 1 and len(mine) == len([w for w in windows if w.question == 1])
    assert all(len(w.encoding["input_ids"]) <= 48 for w in windows)
    with_answer = [w for w in mine if w.start > 0]
    assert with_answer == [mine[-1]]  # only the last window holds "zebra"; the others point at [CLS]
    w = with_answer[0]
    assert context[w.offsets[w.start][0]:w.offsets[w.end][1]] == "zebra"
    assert all(w.start == w.end == 0 for w in windows if w.question == 1)
    # consecutive windows overlap by max_length // 4 context tokens
    first_spans = [o for o in mine[0].offsets if o is not None]
    second_spans = [o for o in mine[1].offsets if o is not None]
    assert len(set(first_spans) & set(second_spans)) == 48 // 4


def test_best_answers_pick_the_best_valid_span_or_no_answer(tokenizer):
    context = "alpha beta gamma delta"
    questions = [Question("q", "which?", context, (("beta", 6),), "here")]
    (window,) = make_windows(tokenizer, questions, max_length=32)
    tokens = {context[o[0]:o[1]]: i for i, o in enumerate(window.offsets) if o is not None}
    n = len(window.offsets)
    start, end = torch.full((n,), -10.0), torch.full((n,), -10.0)
    start[tokens["delta"]], end[tokens["alpha"]] = 9.0, 8.0  # the best pair ends before it starts: invalid
    start[tokens["beta"]], end[tokens["gamma"]] = 5.0, 4.0
    start[0], end[0] = 4.0, 4.0  # [CLS]: the no-answer score, 8 < 9 (= beta..gamma: 5 + 4)
    assert best_answers(questions, [window], [start], [end], allow_null=True) == ["beta gamma"]
    start[0] = 6.0  # no answer now scores 10 > 9
    assert best_answers(questions, [window], [start], [end], allow_null=True) == [""]
    assert best_answers(questions, [window], [start], [end], allow_null=False) == ["beta gamma"]


def test_squad_scores_match_a_hand_count():
    predictions = ["The Eiffel Tower", "in Paris", "", "x", "1889"]
    references = [["eiffel tower"], ["Paris", "the city of Paris"], [], [], ["in 1889", "1889"]]
    scores = squad_scores(predictions, references)
    # EM: 1, 0, 1, 0, 1. F1: 1; "in paris" vs "paris" = 2·(1/2·1)/(1/2+1) = 2/3 (vs "city of paris" 1/2·1/3 → 0.4);
    # 1; 0; 1.
    assert scores["exact_match"] == pytest.approx(3 / 5)
    assert scores["f1"] == pytest.approx((1 + 2 / 3 + 1 + 0 + 1) / 5)
    assert scores["has_answer_exact_match"] == pytest.approx(2 / 3) and scores["no_answer_exact_match"] == 0.5
    assert scores["has_answer_n"] == 3 and scores["no_answer_n"] == 2
    assert normalize_answer("  The  Quick, brown fox!") == "quick brown fox"


# -- training and PEFT ---------------------------------------------------------------------------------------------


def test_a_short_run_lowers_the_loss_and_saves_a_peft_qa_adapter(tiny_bert_dir, squad_file, tmp_path):
    out = tmp_path / "run"
    result = train(model=tiny_bert_dir, task="qa", data=str(squad_file), eval_fraction=0.25, steps=30,
                   batch_size=8, lr=1e-2, warmup_steps=0, max_length=64, output_dir=str(out), progress=False)
    before, after = result["before"], result["after"]
    assert after["loss"] < 0.7 * before["loss"] and result["last_loss"] < result["first_loss"]
    assert after["n"] == 18 and {"exact_match", "f1", "has_answer_f1", "no_answer_exact_match"} <= after.keys()
    assert 0 <= after["exact_match"] <= after["f1"] <= 1
    saved = read_adapter_config(out)
    assert saved["task_type"] == "QUESTION_ANS" and "qa_outputs" in saved["modules_to_save"]
    task = build_task(TrainConfig(model=tiny_bert_dir, task="qa", data=str(squad_file), eval_fraction=0.25,
                                  max_length=64), CPU, "fp32", adapter=str(out))
    assert type(task) is QuestionAnsweringTask
    again = task.evaluate(task.model, "again")
    assert again["exact_match"] == after["exact_match"] and again["f1"] == pytest.approx(after["f1"])


def test_the_loss_is_transformers_qa_loss(tokenizer):
    model = tiny_bert_qa()
    model.resize_token_embeddings(len(tokenizer))
    context = "the color is red and the animal is cat ."
    questions = [Question("q", "what is the color?", context, (("red", context.index("red")),), "here"),
                 Question("u", "what is the pet?", context, (), "here")]
    batch = collate_windows(make_windows(tokenizer, questions, max_length=32), tokenizer.pad_token_id)
    loss_sum, count = qa_loss(model, batch)
    expected = model(**batch).loss  # transformers: the mean over the batch of (start CE + end CE) / 2
    torch.testing.assert_close(loss_sum / count, expected)
    assert int(count) == 2 and batch["start_positions"].tolist()[1] == 0


def _qa_logits(model, ids):
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return torch.stack([out.start_logits, out.end_logits])


def test_peft_reads_our_qa_adapter_and_we_read_peft_s(tmp_path, peft, ids):
    torch.manual_seed(4)
    ours = get_lora_model(tiny_bert_qa(), LoraConfig(task_type="QUESTION_ANS", r=4, lora_alpha=8,
                                                     init_lora_weights=False))
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:  # a trained head too
                p.add_(0.1 * torch.randn_like(p))
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_bert_qa(), str(tmp_path / "ours"))
    assert type(theirs).__name__ == "PeftModelForQuestionAnswering"
    with torch.no_grad():
        expected, got = _qa_logits(theirs, ids), _qa_logits(ours, ids)
        with ours.disable_adapter():
            assert not torch.allclose(_qa_logits(ours, ids), got, atol=1e-4)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    peft_model = peft.get_peft_model(tiny_bert_qa(), peft.LoraConfig(task_type="QUESTION_ANS", r=4, lora_alpha=8,
                                                                     init_lora_weights=False))
    with torch.no_grad():
        head = peft_model.base_model.model.qa_outputs.modules_to_save["default"]
        head.weight.add_(0.1 * torch.randn_like(head.weight))
    peft_model.save_pretrained(tmp_path / "theirs")
    loaded = LoraModel.from_pretrained(tiny_bert_qa(), tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(_qa_logits(loaded, ids), _qa_logits(peft_model, ids), atol=1e-5, rtol=1e-5)


# -- a real model on real data -------------------------------------------------------------------------------------


@pytest.mark.skipif(not SQUAD.is_file(), reason=f"the SQuAD 2.0 subset is not at {SQUAD}")
def test_minilm_learns_squad_questions(tmp_path):
    """The embedded all-MiniLM-L6-v2 encoder with a new span head, on the answerable questions of the first
    articles of SQuAD 2.0 (a JSONL subset written to a temporary folder); 20 steps of 8 windows."""
    document = json.loads(SQUAD.read_text(encoding="utf-8"))
    rows = [{"id": qa["id"], "question": qa["question"], "context": p["context"], "answers": qa["answers"]}
            for article in document["data"] for p in article["paragraphs"] for qa in p["qas"]
            if not qa["is_impossible"]]
    train_file, eval_file = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows[:400]))
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in rows[-60:]))
    t0 = time.perf_counter()
    result = train(model="minilm", task="qa", data=str(train_file), eval_data=str(eval_file), steps=20,
                   batch_size=8, lr=5e-3, warmup_steps=2, max_length=160, target_modules="all-linear",
                   output_dir=str(tmp_path / "run"), progress=False)
    seconds = time.perf_counter() - t0
    before, after = result["before"], result["after"]
    assert after["loss"] < 0.85 * before["loss"]
    assert after["f1"] > before["f1"], (before, after)
    assert seconds < 60, f"the run took {seconds:.0f} s"
