"""Every public operation works under ``torch.inference_mode()`` and ``torch.no_grad()``, as servers and evaluation
code run them: wrap, add / load / delete adapters, a mixed batch, merge / unmerge, save, export, generate. The
results equal those computed with gradients enabled."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import random_lora, tiny_llama

from lorakit import LoraModel, get_lora_model

MODES = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two adapters saved with gradients enabled, and the logits each gives (the reference)."""
    folder = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(0)
    model = get_lora_model(tiny_llama(), random_lora(target_modules=["q_proj", "v_proj"]), "a")
    model.add_adapter("b", random_lora(target_modules="all-linear"))
    model.save_pretrained(folder)
    ids = torch.randint(0, 128, (2, 7))
    expected = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        expected[name] = _logits(model, ids)
    expected["mixed"] = _logits(model, ids, adapter_names=["a", "b"])
    return folder, ids, expected


@pytest.mark.parametrize("mode", MODES)
def test_wrap_add_load_mixed_merge_and_delete_under_each_mode(saved, mode):
    folder, ids, expected = saved
    with MODES[mode]():
        model = LoraModel.from_pretrained(tiny_llama(), folder / "a", adapter_name="a")
        model.load_adapter(folder / "b", adapter_name="b")
        model.add_adapter("new", random_lora(target_modules=["q_proj"]))
        model.set_adapter("a")
        torch.testing.assert_close(model(input_ids=ids).logits, expected["a"])
        mixed = model(input_ids=ids, adapter_names=["a", "b"]).logits
        torch.testing.assert_close(mixed, expected["mixed"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(input_ids=ids, adapter_names=["a", "b"]).logits, mixed)  # cached stacks
        model.set_adapter("b")
        model.merge_adapter()
        torch.testing.assert_close(model(input_ids=ids).logits, expected["b"], atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(input_ids=ids).logits, expected["b"], atol=1e-5, rtol=1e-5)
        model.delete_adapter("new")
        assert "new" not in model.peft_config


@pytest.mark.parametrize("mode", MODES)
def test_save_export_and_generate_under_each_mode(saved, tmp_path, mode):
    folder, ids, expected = saved
    with MODES[mode]():
        model = LoraModel.from_pretrained(tiny_llama(), folder / "b", adapter_name="b")
        model.save_pretrained(tmp_path / "again")
        out = model.generate(input_ids=ids[:1, :4], max_new_tokens=3, do_sample=False)
        assert out.shape == (1, 7)
        merged = model.merge_and_unload()
    reloaded = LoraModel.from_pretrained(tiny_llama(), tmp_path / "again" / "b", adapter_name="b")
    torch.testing.assert_close(_logits(reloaded, ids), expected["b"])
    torch.testing.assert_close(_logits(merged, ids), expected["b"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_export_merged_folder_under_each_mode(saved, tmp_path, mode):
    from lorakit.files.export import export_merged

    folder, ids, expected = saved
    with MODES[mode]():
        model = LoraModel.from_pretrained(tiny_llama(), folder / "b", adapter_name="b")
        export_merged(model, tmp_path / "merged")
    transformers = pytest.importorskip("transformers")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits(exported, ids), expected["b"], atol=1e-5, rtol=1e-5)
    with contextlib.suppress(AttributeError):
        assert not any(p.is_inference() for p in exported.parameters())
