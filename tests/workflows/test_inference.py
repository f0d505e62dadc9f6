"""Using a saved adapter: lorakit eval reproduces the run's final metrics, lorakit generate answers with it, and the
base an adapter belongs on is found from what was saved with it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import yaml
from conftest import tiny_llama

from lorakit import LoraConfig, LoraModel, get_lora_model
from lorakit.cli import main
from lorakit.models.embedded_models import HUB_NAME, build_model
from lorakit.training.loop import train
from lorakit.training.options import TrainConfig
from lorakit.workflows.inference import base_model_for, base_spec_for, evaluate_adapter, generate, load_adapter_model

FAST = {"max_eval": 4, "max_new_tokens": 4, "progress": False, "warmup_steps": 1, "lr": 1e-2, "precision": "fp32"}


def test_eval_and_generate_commands_use_the_saved_adapter(tiny_llama_dir, tmp_path):
    result = train(model=tiny_llama_dir, steps=2, output_dir=str(tmp_path), **FAST)
    again = evaluate_adapter(tmp_path, TrainConfig.from_yaml(tmp_path / "train_config.yaml"))
    assert again["loss"] == pytest.approx(result["after"]["loss"], rel=1e-5)
    assert again["exact_match"] == result["after"]["exact_match"]
    proc = subprocess.run([sys.executable, "-m", "lorakit", "eval", str(tmp_path), "--json"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["loss"] == pytest.approx(again["loss"], rel=1e-5)
    text = generate("Order for Ada: 2 x scone (small), monday.", adapter=tmp_path, max_new_tokens=3)
    assert isinstance(text, str)
    assert main(["generate", "hi", "--adapter", str(tmp_path / "missing")]) == 2


def test_the_base_of_an_adapter_is_found_from_what_was_saved_with_it(tmp_path):
    lora = get_lora_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not say which base it was trained on; pass the base model"):
        base_spec_for(tmp_path)
    assert base_spec_for(tmp_path, model="minilm") == "minilm"  # named by the caller
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": HUB_NAME}))
    assert base_spec_for(tmp_path) == "default"  # SmolLM2's hub name is the embedded model
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": str(tmp_path)}))
    assert base_spec_for(tmp_path) == str(tmp_path)  # a folder that exists
    (tmp_path / "train_config.yaml").write_text(yaml.safe_dump({"model": "somewhere"}))
    assert base_spec_for(tmp_path) == "somewhere"  # the training run's model comes first


def test_a_folder_with_neither_adapter_nor_model_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds neither a LoRA adapter .adapter_config.json. nor a model"):
        generate("hi", adapter=tmp_path)


def _eval(*args: str, capsys) -> tuple[int, str, str]:
    code = main(["eval", *args, "--no-progress"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_eval_on_new_data_reads_only_that_file_and_checks_its_labels(sentiment_run, tmp_path, capsys):
    run, new = sentiment_run / "run", str(sentiment_run / "new.csv")
    moved = tmp_path / "run"  # the training file it names is gone: evaluating new data must not need it
    shutil.copytree(run, moved)
    saved = yaml.safe_load((moved / "train_config.yaml").read_text())
    (moved / "train_config.yaml").write_text(yaml.safe_dump(saved | {"data": str(tmp_path / "gone.tsv")}))
    code, _, err = _eval(str(moved), "--eval-data", new, "--text-field", "text", capsys=capsys)
    assert code == 2 and "new.csv:2: label 'pos' is not one of the classes (0, 1)" in err and "--label-map" in err
    code, out, _ = _eval(str(moved), "--eval-data", new, "--text-field", "text", "--label-map", "neg=0,pos=1",
                         "--json", capsys=capsys)
    right = json.loads(out)
    assert code == 0 and right["n"] == 12 and right["labels"] == ["0", "1"]  # all of it, not --max-eval's 4
    confusion = torch.tensor(right["confusion"])
    assert confusion.sum() == 12 and confusion.diagonal().sum() / 12 == pytest.approx(right["accuracy"])
    code, out, _ = _eval(str(moved), "--eval-data", new, "--text-field", "text", "--label-map", "neg=1,pos=0",
                         "--json", capsys=capsys)
    flipped = json.loads(out)  # the map is really applied: a flipped one swaps the confusion matrix's rows
    assert flipped["confusion"] == right["confusion"][::-1]


def test_eval_of_an_adapter_saved_from_python_uses_its_recorded_base(sentiment_run, tmp_path, tiny_bert_dir, capsys):
    lora = LoraModel.from_pretrained(base_model_for(sentiment_run / "run"), sentiment_run / "run")
    lora.save_pretrained(tmp_path, base_model_name_or_path=tiny_bert_dir)  # no train_config.yaml, no labels.json
    code, _, err = _eval(str(tmp_path), capsys=capsys)
    assert code == 2 and "has no train_config.yaml to say what it was trained on" in err
    code, out, _ = _eval(str(tmp_path), "--eval-data", str(sentiment_run / "new.csv"), "--text-field", "text",
                         "--label-map", "neg=0,pos=1", "--json", capsys=capsys)
    expected = evaluate_adapter(sentiment_run / "run", eval_data=str(sentiment_run / "new.csv"), text_field="text",
                                label_map=["neg=0", "pos=1"], progress=False)
    assert code == 0 and json.loads(out)["confusion"] == expected["confusion"]


def test_a_classifier_loads_with_its_head_and_labels_without_a_false_alarm(sentiment_run, tiny_bert_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lora, tokenizer = load_adapter_model(sentiment_run / "run")
    assert not [w for w in caught if "start from random values" in str(w.message)]
    assert lora.config.id2label == {0: "0", 1: "1"}
    probs = lora(**tokenizer(["a fine film", "so dull"], return_tensors="pt", padding=True)).logits.softmax(-1)
    assert probs.argmax(-1).tolist() == [1, 0]  # the trained head, not a random one
    with pytest.warns(UserWarning, match=r"lacks 2 weight\(s\) of BertForSequenceClassification, which start from "
                                         r"random values: classifier.bias, classifier.weight"):
        build_model(tiny_bert_dir, num_labels=2)  # no adapter supplies the head: a real warning
