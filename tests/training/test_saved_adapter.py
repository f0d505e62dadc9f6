"""What a saved adapter says about itself: the base and task it belongs to, the options to evaluate it with, and a
run that starts from it (--init-adapter): its rank, targets, classes and base, and trained weights as the start."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_bert_cls
from safetensors.torch import load_file

from lorakit import LoraConfig, get_lora_model
from lorakit.models.embedded_models import minilm_dir
from lorakit.training.loop import train
from lorakit.training.options import TrainConfig
from lorakit.training.saved_adapter import base_spec_for, eval_config, task_of, with_init_adapter
from lorakit.training.tasks import build_task
from lorakit.workflows.inference import evaluate_adapter

FAST = {"progress": False, "warmup_steps": 1, "precision": "fp32", "max_eval": 0}


def _api_adapter(folder, base: str | None) -> None:
    """A classifier adapter saved from Python: no train_config.yaml, no labels.json."""
    lora = get_lora_model(tiny_bert_cls(num_labels=2), LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    lora.save_pretrained(folder, base_model_name_or_path=base)


def test_the_base_and_task_come_from_the_adapter_config_when_no_run_saved_them(tmp_path, tiny_bert_dir):
    _api_adapter(tmp_path, tiny_bert_dir)
    assert base_spec_for(tmp_path) == tiny_bert_dir and task_of(tmp_path) == "seq_cls"
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    for task_type, task in (("QUESTION_ANS", "qa"), ("TOKEN_CLS", "token_cls"), ("SEQ_2_SEQ_LM", "seq2seq"),
                            ("CAUSAL_LM", "causal_lm"), (None, "causal_lm")):
        (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"task_type": task_type}))
        assert task_of(tmp_path) == task
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": str(minilm_dir())}))
    assert base_spec_for(tmp_path) == "minilm"  # the embedded encoder, wherever its wheel is installed
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "org/missing"}))
    with pytest.raises(ValueError, match="was trained on 'org/missing', which is neither an embedded model nor a "
                                         r"folder here; pass the base model folder \(--model DIR\)"):
        base_spec_for(tmp_path)


def test_evaluating_an_adapter_without_a_training_config_needs_the_data(tmp_path, tiny_bert_dir):
    _api_adapter(tmp_path, tiny_bert_dir)
    with pytest.raises(ValueError, match=r"has no train_config.yaml to say what it was trained on; pass the data to "
                                         r"evaluate on \(--eval-data FILE\)"):
        eval_config(tmp_path)
    config = eval_config(tmp_path, eval_data="new.csv", text_field="text")
    assert (config.model, config.task, config.labels) == (tiny_bert_dir, "seq_cls", ["0", "1"])
    assert config.max_eval == 0  # new data is evaluated whole
    assert eval_config(tmp_path, eval_data="new.csv", max_eval=5).max_eval == 5


def test_new_eval_data_overrides_the_saved_run_without_its_training_file(sentiment_run):
    config = eval_config(sentiment_run / "run", eval_data=str(sentiment_run / "new.csv"), text_field="text")
    assert config.eval_data.endswith("new.csv") and config.data.endswith("train.tsv") and config.max_eval == 0
    assert config.labels == ["0", "1"]  # recorded by the run


def test_init_adapter_takes_the_adapters_rank_targets_classes_and_base(sentiment_run, tiny_llama_dir):
    run = sentiment_run / "run"
    config = with_init_adapter(TrainConfig(task="seq_cls", data="x.csv", r=64, init_adapter=str(run)))
    saved = TrainConfig.from_yaml(run / "train_config.yaml")
    assert (config.model, config.r, config.lora_alpha) == (saved.model, 8, 16.0)
    assert set(config.target_modules.split(",")) == {"query", "value"} and config.labels == ["0", "1"]
    with pytest.raises(ValueError, match="was trained for SEQ_CLS; it cannot continue as --task causal_lm"):
        with_init_adapter(TrainConfig(task="causal_lm", data="x.jsonl", init_adapter=str(run)))
    with pytest.raises(ValueError, match=r"--labels a,b differ from the classes of --init-adapter .* \(0,1\)"):
        with_init_adapter(TrainConfig(task="seq_cls", data="x.csv", labels=["a", "b"], init_adapter=str(run)))
    with pytest.raises(FileNotFoundError, match="no adapter_config.json there"):
        with_init_adapter(TrainConfig(task="seq_cls", data="x.csv", init_adapter=str(sentiment_run)))
    with pytest.raises(ValueError, match="--init-adapter continues a LoRA adapter, so it needs --method lora"):
        TrainConfig(task="seq_cls", data="x.csv", method="full", init_adapter=str(run))


def test_training_further_starts_from_the_saved_adapter(sentiment_run, tmp_path):
    run, new = sentiment_run / "run", str(sentiment_run / "new.csv")
    options = {"task": "seq_cls", "data": new, "eval_data": new, "text_field": "text", "label_map": ["neg=0", "pos=1"],
               "init_adapter": str(run), "batch_size": 4, "lr": 5e-2, **FAST}
    task = build_task(with_init_adapter(TrainConfig(**options)), torch.device("cpu"), "fp32")
    saved = load_file(run / "adapter_model.safetensors")
    task.model.save_pretrained(tmp_path / "start")
    start = load_file(tmp_path / "start" / "adapter_model.safetensors")
    assert saved.keys() == start.keys() and all(torch.equal(saved[k], start[k]) for k in saved)
    trains = {n: p.requires_grad for n, p in task.model.named_parameters() if "lora_" in n or "modules_to_save" in n}
    assert len(trains) == len(saved) and all(trains.values())  # every saved tensor trains further, the head too

    more = train(steps=2, output_dir=str(tmp_path), **options)
    again = evaluate_adapter(run, eval_data=new, text_field="text", label_map=["neg=0", "pos=1"])
    assert more["before"]["confusion"] == again["confusion"]  # it starts as the saved adapter scores
    end = load_file(tmp_path / "adapter_model.safetensors")
    assert saved.keys() == end.keys()  # the same adapter (rank, targets, head) ...
    assert any(not torch.equal(saved[k], end[k]) for k in saved)  # ... trained further
    assert json.loads((tmp_path / "labels.json").read_text())["id2label"] == {"0": "0", "1": "1"}
