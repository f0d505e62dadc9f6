"""Task types: build_task picks the class and the base dtype from the config, and each task's batches, loss and
held-out data on the tiny models (causal LM: packed or padded with the right counts; classification: labels and
heads)."""

from __future__ import annotations

import pytest
import torch

from lorakit.models.model import LoraModel
from lorakit.training.data import IGNORE
from lorakit.training.options import TrainConfig
from lorakit.training.tasks import BuiltinTask, CausalLMTask, ClassificationTask, build_task

CPU = torch.device("cpu")


@pytest.fixture
def tsv(tmp_path):
    path = tmp_path / "train.tsv"
    rows = [("a fine film", "pos"), ("a dull film", "neg"), ("so so", "meh")] * 8
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    return path


def test_build_task_picks_the_causal_lm_task_and_its_batches(tiny_llama_dir):
    task = build_task(TrainConfig(model=tiny_llama_dir, max_eval=3, eval_batch_size=2), CPU, "fp32")
    assert type(task) is BuiltinTask and isinstance(task, CausalLMTask) and isinstance(task.model, LoraModel)
    assert task.name == "the built-in order-to-JSON task" and len(task.eval_batches) == 2  # 3 held out, by 2
    indices = [0, 1, 2, 3]
    examples = [task.train[i] for i in indices]
    packed = task.batch(indices)
    assert packed.targets == sum(e.n_targets for e in examples) and packed.tokens == sum(len(e) for e in examples)
    assert "position_ids" in packed.tensors and int((packed.tensors["targets"] != IGNORE).sum()) == packed.targets
    result = task.loss(task.model, packed.tensors)
    loss_sum, count = result.sum, result.count
    assert int(count) == packed.targets and loss_sum.requires_grad and loss_sum.item() > 0


def test_without_packing_or_with_prompt_tuning_the_rows_are_padded(tiny_llama_dir):
    for config in (TrainConfig(model=tiny_llama_dir, packing=False), TrainConfig(model=tiny_llama_dir,
                                                                                 method="prompt")):
        task = build_task(config, CPU, "fp32")
        batch = task.batch([0, 1, 2])
        assert "position_ids" not in batch.tensors and batch.tensors["input_ids"].shape[0] == 3
        assert int(batch.tensors["attention_mask"].sum()) == batch.tokens


def test_bf16_keeps_a_frozen_base_in_bf16_and_what_trains_in_fp32(tiny_llama_dir):
    task = build_task(TrainConfig(model=tiny_llama_dir), CPU, "bf16")
    dtypes = {p.dtype for p in task.model.parameters() if not p.requires_grad}
    assert dtypes == {torch.bfloat16}
    assert {p.dtype for p in task.model.parameters() if p.requires_grad} == {torch.float32}
    full = build_task(TrainConfig(model=tiny_llama_dir, method="full"), CPU, "bf16")
    assert {p.dtype for p in full.model.parameters()} == {torch.float32}  # fp32 masters for full fine-tuning
    trainable, total = full.count_parameters()
    assert trainable == total


def test_build_task_picks_the_classification_task_and_its_batches(tiny_bert_dir, tsv):
    config = TrainConfig(model=tiny_bert_dir, task="seq_cls", data=str(tsv), target_modules="query,value")
    task = build_task(config, CPU, "fp32")
    assert type(task) is ClassificationTask and task.labels == ["meh", "neg", "pos"]  # sorted from the data
    assert task.model.config.id2label == {0: "meh", 1: "neg", 2: "pos"}
    assert len(task.train) == 23  # 5% of 24 held out (at least one)
    batch = task.batch([0, 1, 2])
    assert batch.tensors["labels"].tolist() == [2, 1, 0] and batch.targets == 3
    assert batch.tokens == int(batch.tensors["attention_mask"].sum())
    result = task.loss(task.model, batch.tensors)
    loss_sum, count = result.sum, result.count
    assert int(count) == 3 and loss_sum.item() > 0
    assert set(task.evaluate(task.model, "before")) == {"accuracy", "f1", "n", "confusion", "labels"}
    trainable, _ = task.count_parameters()
    assert trainable == task.model.get_nb_trainable_parameters()[0] > 0


def test_classification_needs_two_labels_and_enough_examples(tiny_bert_dir, tmp_path):
    one = tmp_path / "one.tsv"
    one.write_text("sentence\tlabel\na\tx\nb\tx\n")
    with pytest.raises(ValueError, match=r"only one label \('x'\); a classifier needs at least two"):
        build_task(TrainConfig(model=tiny_bert_dir, task="seq_cls", data=str(one)), CPU, "fp32")
    tiny = tmp_path / "tiny.tsv"
    tiny.write_text("sentence\tlabel\na\tx\n")
    with pytest.raises(ValueError, match="has 1 examples: too few to hold 1 out; pass --eval-data"):
        build_task(TrainConfig(model=tiny_bert_dir, task="seq_cls", data=str(tiny), labels=["x", "y"]), CPU,
                   "fp32")


def test_a_model_that_is_not_a_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a Hugging Face model folder"):
        build_task(TrainConfig(model=str(tmp_path)), CPU, "fp32")


def test_a_decoder_without_a_pad_token_id_classifies_batches_with_the_tokenizers(tmp_path, tiny_llama_dir, tsv,
                                                                                 capsys):
    import json
    import shutil

    folder = tmp_path / "no-pad"
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("pad_token_id", None)
    (folder / "config.json").write_text(json.dumps(config))
    task = build_task(TrainConfig(model=str(folder), task="seq_cls", data=str(tsv), eval_data=str(tsv), max_eval=4,
                                  eval_batch_size=4,
                                  target_modules="q_proj", progress=False), CPU, "fp32")
    assert task.model.config.pad_token_id == task.tokenizer.pad_token_id is not None
    assert "has no pad_token_id; padding with the tokenizer's token" in capsys.readouterr().err
    assert task.evaluate(task.model, "before")["n"] == 4  # a batch of 4 sequences goes through


@pytest.mark.parametrize(("options", "message"), [
    ({"target_modules": "q_prj"}, r"'q_prj' matches no module in the model \(did you mean 'q_proj'"),
    ({"task": "causal_lm", "data": "/no/such/file.jsonl"}, "dataset file '/no/such/file.jsonl' does not exist"),
    ({"task": "causal_lm", "data": "{tsv}", "eval_data": "/no/such/dev.jsonl"}, "'/no/such/dev.jsonl' does not exist"),
])
def test_mistakes_are_found_before_any_weight_is_loaded(options, message, tiny_llama_dir, tsv, monkeypatch):
    from lorakit.training.tasks import causal_lm, qa, seq2seq, seq_cls, token_cls

    def no_loading(*args, **kwargs):
        raise AssertionError("the weights were loaded before the mistake was found")

    for module in (causal_lm, qa, seq2seq, seq_cls, token_cls):
        monkeypatch.setattr(module, "load_model", no_loading)
    options = {k: v.format(tsv=tsv) if isinstance(v, str) else v for k, v in options.items()}
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        build_task(TrainConfig(model=tiny_llama_dir, **options), CPU, "fp32")
