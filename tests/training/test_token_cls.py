"""token_cls (PEFT's TOKEN_CLS): tokens/tags JSONL read with errors that name the line, each word's tag on its first
subword (others and special tokens ignored, as transformers aligns them), token accuracy and seqeval's entity F1 on
hand-counted examples, a short run on a tiny BERT whose loss goes down, and PEFT round trips."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from lorakit import LoraConfig, LoraModel, get_lora_model
from lorakit.files.io import read_adapter_config
from lorakit.training.data import IGNORE, DataError
from lorakit.training.loop import train
from lorakit.training.metrics import entities, tagging_scores
from lorakit.training.options import TrainConfig
from lorakit.training.tasks import TokenClassificationTask, build_task
from lorakit.training.tasks.token_cls import collate_sentences, encode_sentences, read_tagged, tag_ids, token_loss

CPU = torch.device("cpu")


def tiny_bert_tagger(seed: int = 0, num_labels: int = 5) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=num_labels)
    return transformers.BertForTokenClassification(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    from lorakit.models.embedded_models import minilm_dir

    return transformers.AutoTokenizer.from_pretrained(str(minilm_dir()))


@pytest.fixture
def tagged(tmp_path):
    """Sentences whose names are people after 'met' and places after 'in', with IOB2 tags."""
    people, places = [["ann"], ["bob", "smith"], ["carol"], ["dave", "jones"]], [["paris"], ["new", "york"], ["rome"]]
    rows = []
    for i in range(40):
        person, place = people[i % 4], places[i % 3]
        tokens = ["we", "met", *person, "in", *place, "."]
        tags = ["O", "O", "B-PER", *["I-PER"] * (len(person) - 1), "O", "B-LOC", *["I-LOC"] * (len(place) - 1), "O"]
        rows.append({"tokens": tokens, "tags": tags})
    path = tmp_path / "ner.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_rows_name_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"tokens": ["a", "b"], "tags": ["O", "O"]}\n{"tokens": ["a", "b", "c"], "tags": ["O", "O"]}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: 2 tags for 3 tokens; every token needs exactly one tag"):
        read_tagged(path)
    path.write_text('{"tokens": ["a"], "labels": ["O"]}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: missing field 'tags'"):
        read_tagged(path)
    path.write_text('{"tokens": ["a"], "tags": ["B-XYZ"]}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: unknown tag 'B-XYZ'; the tags are O, B-PER"):
        tag_ids(read_tagged(path), path, ["O", "B-PER"])


def test_a_word_s_tag_goes_on_its_first_subword(tokenizer):
    words = [["Zyrtec", "is", "sold", "in", "Johannesburg"]]
    (sentence,) = encode_sentences(tokenizer, words, [[1, 0, 0, 0, 2]], max_length=32)
    pieces = [tokenizer.tokenize(w) for w in words[0]]
    assert pieces[0] == ["z", "##yr", "##tec"]  # one word, three tokens
    expected = [IGNORE]  # [CLS]
    for word_tag, word_pieces in zip([1, 0, 0, 0, 2], pieces):
        expected += [word_tag] + [IGNORE] * (len(word_pieces) - 1)
    expected += [IGNORE]  # [SEP]
    assert sentence.labels == expected and sentence.n_words == 5
    (cut,) = encode_sentences(tokenizer, words, [[1, 0, 0, 0, 2]], max_length=6)  # [CLS] z ##yr ##tec is [SEP]
    assert cut.n_words == 2


def test_entities_and_scores_match_a_hand_count():
    assert entities(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    assert entities(["O", "I-PER", "I-LOC", "B-LOC", "I-LOC"]) == [("PER", 1, 1), ("LOC", 2, 2), ("LOC", 3, 4)]
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "B-LOC"]]
    scores = tagging_scores(pred, gold)
    # words: 4 + 2, right: 3 + 1. Entities: gold 3 (PER, LOC, ORG), predicted 3 (PER, ORG, LOC at 1), 2 right.
    assert scores["accuracy"] == pytest.approx(4 / 6) and scores["words"] == 6
    assert scores["entity_precision"] == pytest.approx(2 / 3) and scores["entity_recall"] == pytest.approx(2 / 3)
    assert scores["entity_f1"] == pytest.approx(2 / 3)
    plain = tagging_scores([["NOUN", "VERB"]], [["NOUN", "NOUN"]])  # not IOB tags: accuracy only
    assert plain["accuracy"] == 0.5 and "entity_f1" not in plain


def test_the_loss_is_transformers_token_loss(tokenizer):
    model = tiny_bert_tagger(num_labels=3)
    model.resize_token_embeddings(len(tokenizer))
    sentences = encode_sentences(tokenizer, [["Zyrtec", "is", "here"], ["a"]], [[1, 0, 2], [0]], max_length=16)
    batch = collate_sentences(sentences, tokenizer.pad_token_id)
    loss_sum, count = token_loss(model, batch)
    assert int(count) == 4  # one per word
    torch.testing.assert_close(loss_sum / count, model(**batch).loss)


def test_a_short_run_lowers_the_loss_and_saves_a_peft_token_cls_adapter(tiny_bert_dir, tagged, tmp_path):
    out = tmp_path / "run"
    result = train(model=tiny_bert_dir, task="token_cls", data=str(tagged), eval_fraction=0.25, steps=30,
                   batch_size=8, lr=1e-2, warmup_steps=0, output_dir=str(out), progress=False)
    before, after = result["before"], result["after"]
    assert after["loss"] < 0.7 * before["loss"] and result["last_loss"] < result["first_loss"]
    assert after["accuracy"] > before["accuracy"] and after["entity_f1"] >= before["entity_f1"]
    assert after["labels"] == ["B-LOC", "B-PER", "I-LOC", "I-PER", "O"] and after["n"] == 10
    saved = read_adapter_config(out)
    assert saved["task_type"] == "TOKEN_CLS" and "classifier" in saved["modules_to_save"]
    assert json.loads((out / "labels.json").read_text())["id2label"]["4"] == "O"
    task = build_task(TrainConfig(model=tiny_bert_dir, task="token_cls", data=str(tagged), eval_fraction=0.25),
                      CPU, "fp32", adapter=str(out))
    assert type(task) is TokenClassificationTask
    assert task.evaluate(task.model, "again")["accuracy"] == after["accuracy"]


def _logits(model, ids):
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_peft_reads_our_token_cls_adapter_and_we_read_peft_s(tmp_path, peft, ids):
    torch.manual_seed(5)
    ours = get_lora_model(tiny_bert_tagger(), LoraConfig(task_type="TOKEN_CLS", r=4, lora_alpha=8,
                                                         init_lora_weights=False))
    assert [name for name, _ in ours.saved_modules()] == ["classifier"]  # the head trains, as PEFT's does
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_bert_tagger(), str(tmp_path / "ours"))
    assert type(theirs).__name__ == "PeftModelForTokenClassification"
    with torch.no_grad():
        got = _logits(ours, ids)
        with ours.disable_adapter():
            assert not torch.allclose(_logits(ours, ids), got, atol=1e-4)
        torch.testing.assert_close(got, _logits(theirs, ids), atol=1e-5, rtol=1e-5)

    # PEFT's file lists modules_to_save ["classifier", "score"]; BERT has no "score", which is not an error.
    peft_model = peft.get_peft_model(tiny_bert_tagger(), peft.LoraConfig(task_type="TOKEN_CLS", r=4, lora_alpha=8,
                                                                         init_lora_weights=False))
    with torch.no_grad():
        head = peft_model.base_model.model.classifier.modules_to_save["default"]
        head.weight.add_(0.1 * torch.randn_like(head.weight))
    peft_model.save_pretrained(tmp_path / "theirs")
    loaded = LoraModel.from_pretrained(tiny_bert_tagger(), tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(_logits(loaded, ids), _logits(peft_model, ids), atol=1e-5, rtol=1e-5)
