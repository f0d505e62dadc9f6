"""LoraModel: many adapters on one base, disable, merge/unmerge/unload, mixed batches, combinations."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_rows_match_single_adapter_runs, tiny_bert_cls, tiny_llama

from lorakit import LoraConfig, get_lora_model


def _random_adapter(r=4, **kwargs):
    return LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False, **kwargs)


@pytest.fixture
def three():
    """A tiny Llama with adapters a (q,v), b (all-linear) and c (q,v, rank 2), all with non-zero updates."""
    model = get_lora_model(tiny_llama(), _random_adapter(target_modules=["q_proj", "v_proj"]), "a")
    model.add_adapter("b", _random_adapter(target_modules="all-linear"))
    model.add_adapter("c", _random_adapter(r=2, target_modules=["q_proj", "v_proj"]))
    return model


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


def test_unload_gives_the_base_back_untouched(three, ids):
    base = tiny_llama()
    three.merge_adapter()
    plain = three.unload()
    assert set(plain.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(_logits(plain, ids), _logits(base, ids), atol=1e-6, rtol=1e-6)


def test_seq_cls_head_is_trained_per_adapter_and_disabled_with_them():
    model = get_lora_model(tiny_bert_cls(), _random_adapter(target_modules=["query", "value"], task_type="SEQ_CLS"))
    head = model.model.classifier
    assert type(head).__name__ == "ModulesToSave"
    assert all(p.requires_grad for p in head.modules_to_save["default"].parameters())
    assert not any(p.requires_grad for p in head.original_module.parameters())
    with torch.no_grad():
        head.modules_to_save["default"].weight.add_(1.0)
    ids = torch.randint(0, 128, (2, 6))
    with model.disable_adapter():
        assert torch.equal(_logits(model, ids), _logits(tiny_bert_cls(), ids))


@pytest.mark.parametrize("with_base_row", [False, True])
@pytest.mark.parametrize("tokens", [7, 1], ids=["prefill", "decode"])
def test_mixed_batch_rows_equal_single_adapter_runs(three, with_base_row, tokens):
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (5, tokens))
    assert_rows_match_single_adapter_runs(three, ids, ["a", "b", "c", "__base__" if with_base_row else "a", "b"])


def test_mixed_batch_generate_matches_per_row_generate(three):
    torch.manual_seed(2)
    ids = torch.randint(1, 128, (3, 5))
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mixed = three.generate(input_ids=ids, adapter_names=["a", "__base__", "b"], **kwargs)
        three.set_adapter("a")
        row0 = three.generate(input_ids=ids[:1], **kwargs)
        with three.disable_adapter():
            row1 = three.generate(input_ids=ids[1:2], **kwargs)
        three.set_adapter("b")
        row2 = three.generate(input_ids=ids[2:], **kwargs)
    assert torch.equal(mixed, torch.cat([row0, row1, row2]))


def test_mixed_batch_errors(three, ids):
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['x'\]"):
        three(input_ids=ids, adapter_names=["a", "x", "b"])
    three.merge_adapter()
    with pytest.raises(ValueError, match="mixed batches need unmerged adapters"):
        three(input_ids=ids, adapter_names=["a", "a", "b"])


@pytest.mark.parametrize("name", ["", "a/b", "..", "../x", "a\\b", "x.y", "__base__"])
def test_bad_adapter_names_are_refused(three, name):
    with pytest.raises(ValueError, match="invalid adapter name"):
        three.add_adapter(name, LoraConfig(target_modules=["q_proj"]))
    assert sorted(three.peft_config) == ["a", "b", "c"]


def _update(model, name, path="model.layers.0.self_attn.q_proj"):
    return model.model.get_submodule(path).delta_weight(name)


def test_cat_combination_is_the_exact_weighted_sum(three):
    three.add_weighted_adapter(["a", "c"], [0.7, -1.3], "ac", combination_type="cat")
    assert three.peft_config["ac"].r == 6
    for i in (0, 1):
        path = f"model.layers.{i}.self_attn.v_proj"
        expected = 0.7 * _update(three, "a", path) - 1.3 * _update(three, "c", path)
        torch.testing.assert_close(_update(three, "ac", path), expected, atol=1e-6, rtol=1e-5)


def test_svd_combination_at_full_rank_reproduces_the_sum(three):
    three.add_weighted_adapter(["a", "c"], [0.5, 2.0], "svd", combination_type="svd", svd_rank=6)
    expected = 0.5 * _update(three, "a") + 2.0 * _update(three, "c")
    torch.testing.assert_close(_update(three, "svd"), expected, atol=1e-5, rtol=1e-4)
    three.add_weighted_adapter(["a", "c"], [0.5, 2.0], "svd2", combination_type="svd", svd_rank=2)
    best = torch.linalg.svd(expected)
    rank2 = best.U[:, :2] * best.S[:2] @ best.Vh[:2]
    torch.testing.assert_close(_update(three, "svd2"), rank2, atol=1e-5, rtol=1e-4)


def test_linear_combination_follows_peft_and_needs_equal_ranks(three):
    three.add_weighted_adapter(["a"], [2.0], "twice_a", combination_type="linear")
    torch.testing.assert_close(_update(three, "twice_a"), 2.0 * _update(three, "a"), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match=r"needs adapters of equal rank, got ranks \[4, 2\]"):
        three.add_weighted_adapter(["a", "c"], [1, 1], "bad", combination_type="linear")
    with pytest.raises(ValueError, match="combination_type must be one of linear, cat, svd; got 'ties'"):
        three.add_weighted_adapter(["a", "c"], [1, 1], "bad", combination_type="ties")
    with pytest.raises(ValueError, match="got 1 weights for 2 adapters"):
        three.add_weighted_adapter(["a", "c"], [1], "bad", combination_type="cat")
    assert "bad" not in three.peft_config


def test_combination_spans_the_union_of_targets(three, ids):
    three.add_weighted_adapter(["a", "b"], [1.0, 1.0], "ab", combination_type="cat")
    assert sum("ab" in layer.adapters for _, layer in three.lora_layers()) == 14
    three.set_adapter(["a", "b"])
    stacked = _logits(three, ids)
    three.set_adapter("ab")
    torch.testing.assert_close(_logits(three, ids), stacked, atol=1e-5, rtol=1e-5)


def test_forward_to_attributes_of_the_model(three):
    assert three.config.model_type == "llama"
    assert three.get_base_model() is three.model


def test_mixed_batch_sees_weight_changes_and_trains(three):
    torch.manual_seed(3)
    ids = torch.randint(0, 128, (2, 5))
    names = ["a", "b"]
    before = _logits(three, ids, adapter_names=names)
    with torch.no_grad():
        three.model.model.layers[0].self_attn.q_proj.adapters["b"].lora_B.add_(0.5)  # the stacks must be rebuilt
    after = _logits(three, ids, adapter_names=names)
    assert torch.equal(after[0], before[0]) and not torch.allclose(after[1], before[1])
    three.set_adapter(["a", "b"])
    loss = three(input_ids=ids, adapter_names=names).logits.pow(2).mean()
    loss.backward()
    grads = {n for n, p in three.named_parameters() if p.grad is not None}
    assert any(".adapters.a." in n for n in grads) and any(".adapters.b." in n for n in grads)


def test_mixed_batch_needs_one_name_per_row(three, ids):
    with pytest.raises(ValueError, match="adapter_names has 2 entries but the batch has 3 rows"):
        three(input_ids=ids, adapter_names=["a", "b"])


def test_mixed_batch_refuses_dora_and_leaves_no_routing_behind(ids):
    model = get_lora_model(tiny_llama(), _random_adapter(target_modules=["q_proj"]), "plain")
    model.add_adapter("dora", _random_adapter(target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="do not support DoRA"):
        model(input_ids=ids, adapter_names=["plain", "dora", "plain"])
    assert all(layer.routing is None for _, layer in model.lora_layers())
    model.set_adapter("plain")
    torch.testing.assert_close(_logits(model, ids)[:1], _logits(model, ids[:1]))
