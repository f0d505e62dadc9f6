"""export_merged: a plain Hugging Face folder with the adapters folded in, from full-precision and 4-bit bases,
loading with the logits of the LoraModel it came from (which stays unchanged)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from conftest import random_lora, tiny_bert_cls, tiny_llama, tiny_llama_64, trained_lora

from lorakit import LoraConfig, get_lora_model
from lorakit.core.quant import quantize


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("make", [tiny_llama, tiny_bert_cls])
def test_export_merged_loads_as_a_plain_transformers_model(make, tmp_path):
    kwargs = dict(r=4, target_modules="all-linear") | ({"task_type": "SEQ_CLS"} if make is tiny_bert_cls else {})
    model = trained_lora(make, kwargs)
    ids = torch.randint(0, 128, (2, 7))
    expected = _logits(model, ids)
    model.export_merged(tmp_path / "merged")
    auto = transformers.AutoModelForSequenceClassification if make is tiny_bert_cls else \
        transformers.AutoModelForCausalLM
    plain = auto.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(plain, ids), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(_logits(model, ids), expected)  # the LoraModel is unchanged (still unmerged)
    assert not any(layer.merged_adapters for _, layer in model.lora_layers())


def test_export_and_merge_and_unload_agree_with_merged_and_dora_adapters(tmp_path, ids):
    model = get_lora_model(tiny_llama(), random_lora(target_modules=["q_proj", "v_proj"]), "a")
    model.add_adapter("d", random_lora(target_modules=["q_proj"], use_dora=True))
    model.merge_adapter(["a"])  # already merged: must not be folded in twice, nor when not asked for
    model.export_merged(tmp_path / "d_only", adapter_names=["d"])
    model.export_merged(tmp_path / "both", adapter_names=["a", "d"])
    model.unmerge_adapter()
    for folder, names in (("d_only", ["d"]), ("both", ["a", "d"])):
        exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / folder).eval()
        reference = copy.deepcopy(model).merge_and_unload(names)
        torch.testing.assert_close(_logits(exported, ids), _logits(reference, ids), atol=1e-5, rtol=1e-5)


def test_export_merged_from_a_4bit_base_is_a_dense_model(ids, tmp_path):
    base = quantize(tiny_llama_64(), "nf4", compute_dtype=torch.float32)
    lora = get_lora_model(base, LoraConfig(r=4, target_modules="all-linear"))
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in lora.lora_layers():
            for adapter in layer.adapters.values():
                adapter.lora_B.normal_(std=0.1)
    before = _logits(lora, ids)
    lora.export_merged(tmp_path / "merged")
    dense = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    after = _logits(dense, ids)
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()


@pytest.mark.parametrize("where", ["the output is a file", "a parent is a file"])
@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_an_output_path_that_is_a_file_is_named_in_words_and_nothing_is_written(where, fmt, tmp_path):
    model = get_lora_model(tiny_llama(), random_lora(target_modules=["q_proj"]))
    (tmp_path / "taken").write_text("keep me")
    out = tmp_path / "taken" if where == "the output is a file" else tmp_path / "taken" / "export"
    with pytest.raises(ValueError, match=r"'.*taken.*' is a file, not a folder") as raised:
        model.export_merged(out, format=fmt, quant="f32" if fmt == "gguf" else None)
    assert "Errno" not in str(raised.value)
    assert (tmp_path / "taken").read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_saving_an_adapter_into_a_file_is_named_in_words(tmp_path):
    model = get_lora_model(tiny_llama(), random_lora(target_modules=["q_proj"]))
    (tmp_path / "taken").write_text("keep me")
    with pytest.raises(ValueError, match="adapter folder '.*taken' is a file, not a folder"):
        model.save_pretrained(tmp_path / "taken")
    assert (tmp_path / "taken").read_text() == "keep me"
