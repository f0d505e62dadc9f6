"""LoraModel: many adapters on one base, add/set/delete, disable, merge/unmerge, merge_and_unload and unload."""

from __future__ import annotations

import pytest
import torch
from conftest import random_lora, tiny_bert_cls, tiny_llama

from lorakit import LoraConfig, get_lora_model


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def test_add_set_delete_and_active_adapters(three, ids):
    assert three.active_adapters == ["a"] and sorted(three.peft_config) == ["a", "b", "c"]
    outs = {}
    for name in "abc":
        three.set_adapter(name)
        assert three.active_adapters == [name]
        outs[name] = _logits(three, ids)
    assert not torch.allclose(outs["a"], outs["b"]) and not torch.allclose(outs["a"], outs["c"])
    three.delete_adapter("a")
    assert three.active_adapters == ["c"]  # deleting an inactive adapter leaves the active one alone
    three.set_adapter("b")
    three.delete_adapter("b")
    assert sorted(three.peft_config) == ["c"] and three.active_adapters == ["c"]  # the active one falls back
    assert not any("b" in layer.adapters or "a" in layer.adapters for _, layer in three.lora_layers())
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['zz'\]; adapters: \['c'\]"):
        three.set_adapter("zz")
    with pytest.raises(ValueError, match="adapter 'c' already exists"):
        three.add_adapter("c", LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="'c' is the only adapter; use unload"):
        three.delete_adapter("c")


def test_only_active_adapters_train(three):
    three.set_adapter(["b", "c"])
    trainable = {n.split(".adapters.")[1].split(".")[0] for n, p in three.named_parameters() if p.requires_grad}
    assert trainable == {"b", "c"}


def test_stacking_adds_the_updates(three, ids):
    with three.disable_adapter():
        base = _logits(three, ids)
    three.set_adapter("a")
    a = _logits(three, ids)
    three.set_adapter("c")
    c = _logits(three, ids)
    three.set_adapter(["a", "c"])
    both = _logits(three, ids)
    # Only q/v layers carry a and c, so the updates of one layer's output add exactly; the logits do not, but
    # stacking must differ from either alone and equal merging both.
    assert not torch.allclose(both, a) and not torch.allclose(both, c) and not torch.allclose(both, base)
    three.merge_adapter()
    torch.testing.assert_close(_logits(three, ids), both, atol=1e-5, rtol=1e-5)


def test_disable_adapter_is_the_base_model_exactly(three, ids):
    base = _logits(tiny_llama(), ids)
    for merged in (False, True):
        three.set_adapter(["a", "b"])
        if merged:
            three.merge_adapter()
        with three.disable_adapter():
            assert torch.equal(_logits(three, ids), base) if not merged else torch.allclose(
                _logits(three, ids), base, atol=1e-6)
        assert not torch.allclose(_logits(three, ids), base, atol=1e-3)
        three.unmerge_adapter()


def test_nested_disable_adapter_stays_disabled_until_the_outer_block_ends(three, ids):
    three.set_adapter(["a", "b"])
    with three.disable_adapter():
        base = _logits(three, ids)
        with three.disable_adapter():
            pass
        assert torch.equal(_logits(three, ids), base)
        assert torch.equal(_logits(three, ids, adapter_names=["a", "b", "a"]), base)  # disabled wins
    assert not torch.equal(_logits(three, ids), base)


def test_merged_equals_unmerged_and_unmerge_restores_the_weights(three, ids):
    original = {k: v.clone() for k, v in three.model.state_dict().items() if ".base." in k}
    three.set_adapter(["a", "b"])
    unmerged = _logits(three, ids)
    three.merge_adapter()
    merged = _logits(three, ids)
    assert (merged - unmerged).abs().max() <= 1e-5 * unmerged.abs().max()
    three.unmerge_adapter()
    for key, value in three.model.state_dict().items():
        if key in original:
            torch.testing.assert_close(value, original[key], atol=1e-6, rtol=0)


def test_merge_and_unload_gives_a_plain_model_with_the_same_output(three, ids):
    three.set_adapter("b")
    expected = _logits(three, ids)
    plain = three.merge_and_unload()
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert not any("Lora" in type(m).__name__ for m in plain.modules())
    torch.testing.assert_close(_logits(plain, ids), expected, atol=1e-5, rtol=1e-5)


def test_merge_and_unload_keeps_the_head_of_the_adapters_it_merges():
    model = get_lora_model(tiny_bert_cls(), random_lora(target_modules=["query"], task_type="SEQ_CLS"), "a")
    model.add_adapter("b", random_lora(target_modules=["query"], task_type="SEQ_CLS"))
    head_b = model.model.classifier.modules_to_save["b"]
    plain = model.merge_and_unload(["b"])  # "a" is the active one
    assert plain.classifier is head_b


def test_unload_gives_the_base_back_untouched(three, ids):
    base = tiny_llama()
    three.merge_adapter()
    plain = three.unload()
    assert set(plain.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(_logits(plain, ids), _logits(base, ids), atol=1e-6, rtol=1e-6)


def test_seq_cls_head_is_trained_per_adapter_and_disabled_with_them():
    model = get_lora_model(tiny_bert_cls(), random_lora(target_modules=["query", "value"], task_type="SEQ_CLS"))
    head = model.model.classifier
    assert type(head).__name__ == "ModulesToSave"
    assert all(p.requires_grad for p in head.modules_to_save["default"].parameters())
    assert not any(p.requires_grad for p in head.original_module.parameters())
    with torch.no_grad():
        head.modules_to_save["default"].weight.add_(1.0)
    ids = torch.randint(0, 128, (2, 6))
    with model.disable_adapter():
        assert torch.equal(_logits(model, ids), _logits(tiny_bert_cls(), ids))


@pytest.mark.parametrize("name", ["", "a/b", "..", "../x", "a\\b", "x.y", "__base__"])
def test_bad_adapter_names_are_refused(three, name):
    with pytest.raises(ValueError, match="invalid adapter name"):
        three.add_adapter(name, LoraConfig(target_modules=["q_proj"]))
    assert sorted(three.peft_config) == ["a", "b", "c"]


def test_forward_to_attributes_of_the_model(three):
    assert three.config.model_type == "llama"
    assert three.get_base_model() is three.model
