"""add_weighted_adapter: linear, cat and svd combinations are the weighted sums of the updates they promise."""

from __future__ import annotations

import pytest
import torch


def _update(model, name, path="model.layers.0.self_attn.q_proj"):
    return model.model.get_submodule(path).delta_weight(name)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


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
