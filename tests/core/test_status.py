"""PEFT's methods on LoraModel: enable_adapter_layers / disable_adapter_layers, set_requires_grad, and the
get_layer_status / get_model_status reports (lorakit/status.py), each followed step by step against PEFT on the
same tiny models."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert_cls, tiny_llama

from lorakit import LoraConfig, get_lora_model, set_adapter_state_dict


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _status_pair(peft, make, first: dict, second: dict):
    """The same two adapters x and y, in PEFT and in lorakit (copied from PEFT's)."""
    theirs = peft.get_peft_model(make(), peft.LoraConfig(init_lora_weights=False, **first), adapter_name="x")
    theirs.add_adapter("y", peft.LoraConfig(init_lora_weights=False, **second))
    ours = get_lora_model(make(), LoraConfig(**first), "x")
    ours.add_adapter("y", LoraConfig(**second))
    for name in ("x", "y"):
        set_adapter_state_dict(ours, peft.get_peft_model_state_dict(theirs, adapter_name=name), name)
    return theirs, ours


def _assert_status_equal(ours, theirs, heads_merged_quirk: bool = False):
    """Every field of PEFT's layer and model status, as lorakit reports it.

    Two documented differences: a layer lists only the active adapters it has (PEFT lists the model's), and
    trained heads do not count as unmerged copies of a merged adapter (PEFT then says "irregular")."""
    got, expected = ours.get_layer_status(), theirs.get_layer_status()
    assert [s.name for s in got] == [s.name for s in expected]
    for g, e in zip(got, expected):
        for field in ("enabled", "merged_adapters", "requires_grad", "available_adapters", "devices",
                      "quantization_backend"):
            assert getattr(g, field) == getattr(e, field), (g.name, field)
        assert g.active_adapters == [n for n in e.active_adapters if n in e.available_adapters]
        assert g.module_type == {"lora.Linear": "LoraLinear", "lora.Embedding": "LoraEmbedding",
                                 "ModulesToSaveWrapper": "ModulesToSave"}[e.module_type]
    g, e = ours.get_model_status(), theirs.get_model_status()
    for field in ("base_model_type", "adapter_model_type", "peft_types", "trainable_params", "total_params",
                  "num_adapter_layers", "enabled", "active_adapters", "requires_grad", "available_adapters",
                  "devices", "quantization_backend") + (() if heads_merged_quirk else ("merged_adapters",)):
        assert getattr(g, field) == getattr(e, field), field


def test_status_and_layer_switches_follow_peft_with_heads(peft):
    theirs, ours = _status_pair(peft, tiny_bert_cls, {"target_modules": ["query", "value"], "task_type": "SEQ_CLS"},
                                {"target_modules": ["key"], "task_type": "SEQ_CLS"})
    _assert_status_equal(ours, theirs)
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 7))
    adapted = _logits(ours, ids)
    for step in ("disable", "enable", "y trains", "none train", "disable", "enable"):
        for model in (ours, theirs):
            if step in ("disable", "enable"):
                getattr(model, f"{step}_adapter_layers")()
            elif step == "y trains":
                model.set_requires_grad("y", True)
            else:
                model.set_requires_grad(["x", "y"], requires_grad=False)
        _assert_status_equal(ours, theirs)
        if step == "disable":
            with torch.no_grad():
                torch.testing.assert_close(_logits(ours, ids), theirs(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
            with ours.disable_adapter():
                base = _logits(ours, ids)
            torch.testing.assert_close(_logits(ours, ids), base)
            assert not torch.allclose(base, adapted, atol=1e-4)
    torch.testing.assert_close(_logits(ours, ids), adapted)  # enabled again
    ours.merge_adapter(["x"])
    theirs.merge_adapter(["x"])
    _assert_status_equal(ours, theirs, heads_merged_quirk=True)
    assert ours.get_model_status().merged_adapters == ["x"]


def test_status_of_stacked_and_half_merged_adapters_follows_peft(peft):
    theirs, ours = _status_pair(peft, tiny_llama, {"target_modules": ["q_proj", "embed_tokens"]},
                                {"target_modules": ["q_proj", "v_proj"]})
    ours.set_adapter(["x", "y"])
    theirs.base_model.set_adapter(["x", "y"])  # PeftModel.set_adapter takes one name
    _assert_status_equal(ours, theirs)
    for model in (ours, theirs):
        model.merge_adapter(["x", "y"])
    _assert_status_equal(ours, theirs)
    assert ours.get_model_status().merged_adapters == ["x", "y"]
    for model in (ours, theirs):  # y stays merged on q_proj only: half merged
        model.model.model.layers[0].self_attn.v_proj.unmerge()
    _assert_status_equal(ours, theirs)
    assert ours.get_model_status().merged_adapters == "irregular"


def test_disable_adapter_layers_unmerges_and_stops_training(three, ids):
    with three.disable_adapter():
        base = _logits(three, ids)
    three.set_adapter(["a", "b"])
    adapted = _logits(three, ids)
    three.merge_adapter()
    three.disable_adapter_layers()
    torch.testing.assert_close(_logits(three, ids), base, atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in three.parameters())
    assert three.get_model_status().enabled is False and three.get_model_status().merged_adapters == []
    three.enable_adapter_layers()
    torch.testing.assert_close(_logits(three, ids), adapted, atol=1e-5, rtol=1e-5)
    assert three.get_model_status().requires_grad == {"a": True, "b": True, "c": False}


def test_merging_while_disabled_is_refused_and_the_model_stays_the_base(three, ids):
    with three.disable_adapter():
        base = _logits(three, ids)
    three.set_adapter(["a", "b"])
    weights = [layer.base.weight.clone() for _, layer in three.lora_layers()]
    three.disable_adapter_layers()
    with pytest.raises(ValueError, match="while the adapter layers are disabled"):
        three.merge_adapter()
    with pytest.raises(ValueError, match="enable_adapter_layers"):
        three.merge_and_unload()
    torch.testing.assert_close(_logits(three, ids), base, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(w, layer.base.weight) for w, (_, layer) in zip(weights, three.lora_layers()))
    assert three.get_model_status().merged_adapters == []
    with three.disable_adapter(), pytest.raises(ValueError, match="while the adapter layers are disabled"):
        three.merge_adapter(["a"])
    three.enable_adapter_layers()
    three.merge_adapter()  # allowed again once enabled
    assert three.get_model_status().merged_adapters == ["a", "b"]


def test_status_without_adapter_layers_is_an_error_as_in_peft(three):
    three.unload()
    for report in (three.get_layer_status, three.get_model_status):
        with pytest.raises(ValueError, match=r"no adapter layers found in the model \(unload\(\)"):
            report()


def test_set_requires_grad_refuses_bad_arguments(three):
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['z'\]"):
        three.set_requires_grad(["a", "z"])
    with pytest.raises(TypeError, match="requires_grad must be True or False, got 'yes'"):
        three.set_requires_grad("a", "yes")
    with pytest.raises(TypeError, match=r"adapter_names must be an adapter name or a list of them, got None"):
        three.set_requires_grad(None)
    three.set_requires_grad("c")
    assert three.get_model_status().requires_grad == {"a": True, "b": False, "c": True}
    layer = three.get_layer_status()[0]
    assert layer.requires_grad == {"a": True, "b": False, "c": True} and layer.devices == {n: ["cpu"] for n in "abc"}
