"""Parameter arithmetic from configs on the meta device, checked against PEFT."""

from __future__ import annotations

import json

import pytest

from lorakit import LoraConfig
from lorakit.calc import PRESETS, count_parameters, preset_model
from lorakit.cli import main

peft = pytest.importorskip("peft", reason="PEFT is the reference these tests compare with (pip install peft)")


def test_llama_2_7b_preset_gives_the_papers_numbers(capsys):
    assert main(["params", "--model", "llama-2-7b", "--r", "8", "--target", "q_proj,v_proj"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622"
    assert "adapter file: 16.00 MiB in fp32, 8.00 MiB in bf16" in out
    result = count_parameters(preset_model("llama-2-7b"),
                              LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    assert result["trainable"] == 16_777_216
    assert [(row["module"], row["count"], row["params_each"]) for row in result["targets"]] == [
        ("q_proj", 32, 131072), ("k_proj", 32, 131072), ("v_proj", 32, 131072), ("o_proj", 32, 131072)]


@pytest.mark.parametrize(("preset", "kwargs"), [
    ("gpt2", dict(r=8, target_modules=["c_attn"], fan_in_fan_out=True)),
    ("gpt2", dict(r=4, target_modules="all-linear", fan_in_fan_out=True)),
    ("bert-base", dict(r=8, target_modules=["query", "value"], task_type="SEQ_CLS")),
    ("bert-base", dict(r=16, target_modules="all-linear", task_type="SEQ_CLS")),
    ("llama-3-8b", dict(r=8, target_modules="all-linear")),
    ("mistral-7b", dict(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
])
def test_counts_equal_peft_on_meta(preset, kwargs):
    ours = count_parameters(preset_model(preset), LoraConfig(**kwargs))
    theirs = peft.get_peft_model(preset_model(preset), peft.LoraConfig(**kwargs))
    assert (ours["trainable"], ours["total"]) == theirs.get_nb_trainable_parameters()


def test_count_does_not_change_the_model_and_reports_the_head():
    model = preset_model("bert-base")
    result = count_parameters(model, LoraConfig(r=8, target_modules=["query", "value"], task_type="SEQ_CLS"))
    assert result["modules_to_save"] == ["classifier"]
    assert not any("Lora" in type(m).__name__ for m in model.modules())


def test_json_output(capsys):
    assert main(["params", "--model", "gpt2", "--target", "c_attn", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["targets"][0]["shape"] == [768, 2304] and result["lora_params"] == 12 * 8 * (768 + 2304)


def test_bad_input_is_one_clear_line(tmp_path, capsys):
    assert main(["params", "--model", "llama-2-8b"]) == 2
    assert "unknown model 'llama-2-8b': use a preset (llama-2-7b, " in capsys.readouterr().err
    assert main(["params", "--model", "llama-2-7b", "--r", "0"]) == 2
    assert "r must be a positive integer (r >= 1), got 0" in capsys.readouterr().err
    assert main(["params", "--model", "llama-2-7b", "--target", "q_prj"]) == 2
    assert "did you mean 'q_proj'" in capsys.readouterr().err
    (tmp_path / "config.json").write_text('{"hello": 1}')
    assert main(["params", "--model", str(tmp_path / "config.json")]) == 2
    assert "does not hold a Hugging Face model config" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown preset 'x'; presets: llama-2-7b"):
        preset_model("x")
    assert set(PRESETS) >= {"llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b", "mistral-7b", "gpt2",
                            "bert-base"}
