"""Using a saved adapter: lorakit eval reproduces the run's final metrics, lorakit generate answers with it, and the
base an adapter belongs on is found from what was saved with it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from conftest import tiny_llama

from lorakit import LoraConfig, get_lora_model
from lorakit.cli import main
from lorakit.embedded_models import HUB_NAME
from lorakit.inference import base_spec_for, evaluate_adapter, generate
from lorakit.training.loop import train
from lorakit.training.options import TrainConfig

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
