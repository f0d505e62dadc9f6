"""add_weighted_adapter: linear, cat and svd combinations are the weighted sums of the updates they promise; every
combination type (TIES, DARE, magnitude pruning and their _svd variants) gives PEFT's logits on the same adapters;
bad arguments are refused by name."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_conv, tiny_gpt2, tiny_llama

from lorakit import LoraConfig, get_lora_model, set_adapter_state_dict


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
    with pytest.raises(ValueError, match="combination_type must be one of linear, cat, svd, ties, .*; got 'tie'"):
        three.add_weighted_adapter(["a", "c"], [1, 1], "bad", combination_type="tie")
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


# -- parity with PEFT ---------------------------------------------------------------------------------------------

DETERMINISTIC = ["linear", "cat", "svd", "ties", "ties_svd", "magnitude_prune", "magnitude_prune_svd"]
RANDOM = ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"]
ARCHS = {
    # t1 and t2 overlap on some layers only; the embedding, GPT-2's Conv1D (fan_in_fan_out) and Conv2d are covered
    "llama-embed": (tiny_llama, {"t1": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "v_proj"]),
                                 "t2": dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "q_proj", "o_proj"])}),
    "gpt2-conv1d": (tiny_gpt2, {"t1": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
                                "t2": dict(r=4, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True)}),
    "conv2d": (tiny_conv, {"t1": dict(r=2, target_modules=["conv1", "conv2"]),
                           "t2": dict(r=2, lora_alpha=4, target_modules=["conv1", "conv2"])}),
}
SEED = 11


def _pair(peft, arch):
    """The same two trained-looking adapters t1 and t2, in PEFT and in lorakit."""
    make, specs = ARCHS[arch]
    theirs = ours = None
    for name, kwargs in specs.items():
        if theirs is None:
            theirs = peft.get_peft_model(make(), peft.LoraConfig(init_lora_weights=False, **kwargs), adapter_name=name)
            ours = get_lora_model(make(), LoraConfig(**kwargs), name)
        else:
            theirs.add_adapter(name, peft.LoraConfig(init_lora_weights=False, **kwargs))
            ours.add_adapter(name, LoraConfig(**kwargs))
        set_adapter_state_dict(ours, peft.get_peft_model_state_dict(theirs, adapter_name=name), name)
    return theirs, ours


def _out(model, arch):
    torch.manual_seed(5)
    inputs = {"x": torch.randn(2, 3, 8, 8)} if arch == "conv2d" else {"input_ids": torch.randint(0, 128, (2, 9))}
    with torch.no_grad():
        out = model(**inputs)
    return out if torch.is_tensor(out) else out.logits


def _combined(model, arch, name="m", adapters=("t1", "t2"), weights=(0.7, -0.4), **kwargs):
    model.add_weighted_adapter(list(adapters), list(weights), name, **kwargs)
    model.set_adapter(name)
    return _out(model, arch)


def _peft_reseeded(monkeypatch, peft):
    """Make PEFT's add_weighted_adapter reseed right after it created the new adapter (whose random init draws
    from the generator; lorakit's creation draws nothing), so both draw DARE's masks from the same state."""
    lora_model = peft.tuners.lora.model
    created = lora_model._freeze_adapter

    def then_reseed(model, adapter_name):
        created(model, adapter_name)
        torch.manual_seed(SEED)

    monkeypatch.setattr(lora_model, "_freeze_adapter", then_reseed)


@pytest.mark.parametrize("combination_type", DETERMINISTIC + RANDOM)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_combination_equals_peft(arch, combination_type, peft, monkeypatch):
    theirs, ours = _pair(peft, arch)
    _peft_reseeded(monkeypatch, peft)
    kwargs = dict(combination_type=combination_type, density=0.5)
    expected = _combined(theirs, arch, **kwargs)
    torch.manual_seed(SEED)
    got = _combined(ours, arch, **kwargs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    ours.set_adapter("t1")
    assert not torch.allclose(got, _out(ours, arch), atol=1e-4), "the combination must differ from adapter t1"


@pytest.mark.parametrize("combination_type", ["ties", "dare_ties", "ties_svd"])
def test_frequency_sign_election_equals_peft_and_differs_from_total(combination_type, peft, monkeypatch):
    theirs, ours = _pair(peft, "llama-embed")
    _peft_reseeded(monkeypatch, peft)
    kwargs = dict(combination_type=combination_type, density=0.5, majority_sign_method="frequency")
    expected = _combined(theirs, "llama-embed", **kwargs)
    torch.manual_seed(SEED)
    got = _combined(ours, "llama-embed", **kwargs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.manual_seed(SEED)
    total = _combined(ours, "llama-embed", "total", combination_type=combination_type, density=0.5)
    assert not torch.allclose(got, total, atol=1e-4)


@pytest.mark.parametrize("combination_type", ["linear", "ties", "magnitude_prune"])
def test_factor_types_with_rank_pattern_equal_peft(combination_type, peft):
    """v_proj has rank 2 in both adapters (rank_pattern), the others 4: the rank-2 layers are merged at rank 2 and
    zero-padded to the new adapter's rank 4, which is PEFT's update."""
    specs = {"t1": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}),
             "t2": dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})}
    theirs = ours = None
    for name, kwargs in specs.items():
        if theirs is None:
            theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(init_lora_weights=False, **kwargs), name)
            ours = get_lora_model(tiny_llama(), LoraConfig(**kwargs), name)
        else:
            theirs.add_adapter(name, peft.LoraConfig(init_lora_weights=False, **kwargs))
            ours.add_adapter(name, LoraConfig(**kwargs))
        set_adapter_state_dict(ours, peft.get_peft_model_state_dict(theirs, adapter_name=name), name)
    kwargs = dict(combination_type=combination_type, density=0.5)
    got = _combined(ours, "llama", **kwargs)
    torch.testing.assert_close(got, _combined(theirs, "llama", **kwargs), atol=1e-5, rtol=1e-5)
    assert ours.model.get_submodule("model.layers.0.self_attn.v_proj").adapters["m"].lora_A.shape[0] == 4


def test_factor_types_refuse_ranks_that_differ_on_a_layer(three):
    three.add_adapter("d", LoraConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}))
    with pytest.raises(ValueError, match=r"needs adapters of equal rank on each layer, but on "
                                         r"model.layers.0.self_attn.v_proj the ranks are \{'a': 4, 'd': 2\}"):
        three.add_weighted_adapter(["a", "d"], [1.0, 1.0], "bad", combination_type="linear")
    assert "bad" not in three.peft_config
    three.add_weighted_adapter(["a", "d"], [1.0, 1.0], "ok", combination_type="cat")  # cat and svd do not care


def test_two_trained_heads_on_one_module_are_refused_as_in_peft(three):
    three.add_adapter("h1", LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    three.add_adapter("h2", LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match=r"own trained heads \(modules_to_save\) on the same module\(s\) \['lm_head'\]"):
        three.add_weighted_adapter(["h1", "h2"], [1.0, 1.0], "bad", combination_type="cat")
    assert "bad" not in three.peft_config
    three.add_weighted_adapter(["h1", "a"], [1.0, 1.0], "one_head", combination_type="cat")
    head = three.model.lm_head.modules_to_save
    torch.testing.assert_close(head["one_head"].weight, head["h1"].weight)


def test_pruning_changes_the_result_and_density_one_does_not(peft):
    _, ours = _pair(peft, "gpt2-conv1d")
    linear = _combined(ours, "gpt2-conv1d", "lin", combination_type="linear")
    assert not torch.allclose(_combined(ours, "gpt2-conv1d", "mp", combination_type="magnitude_prune",
                                        density=0.3), linear, atol=1e-4)
    torch.testing.assert_close(_combined(ours, "gpt2-conv1d", "mp1", combination_type="magnitude_prune",
                                         density=1.0), linear)
    torch.testing.assert_close(_combined(ours, "gpt2-conv1d", "dl1", combination_type="dare_linear",
                                         density=1.0), linear)


def test_magnitude_prune_keeps_the_largest_entries(three):
    three.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mp", combination_type="magnitude_prune", density=0.25)
    layer = three.model.get_submodule("model.layers.1.mlp.up_proj")  # only b is here
    kept, source = layer.adapters["mp"].lora_A, layer.adapters["b"].lora_A
    scale = layer.adapters["b"].scaling ** 0.5
    k = int(0.25 * source.numel())
    threshold = source.abs().flatten().topk(k).values[-1]
    torch.testing.assert_close(kept, torch.where(source.abs() >= threshold, source * scale, 0.0))


def test_dare_is_fixed_by_the_seed_and_keeps_the_mean(three):
    def combined(name, seed):
        torch.manual_seed(seed)
        three.add_weighted_adapter(["a", "b"], [1.0, 1.0], name, combination_type="dare_linear_svd", density=0.5,
                                   svd_rank=8)
        return _update(three, name)

    assert torch.equal(combined("s1", 1), combined("s1b", 1))
    assert not torch.allclose(combined("s2", 2), combined("s1c", 1))
    # E[mask / density] = 1: averaged over many seeds the DARE sum approaches the plain sum.
    torch.manual_seed(0)
    delta = 8 * _update(three, "a")
    mean = torch.stack([_dare_once(delta) for _ in range(400)]).mean(0)
    assert (mean - delta).abs().mean() < 0.1 * delta.abs().mean()


def _dare_once(delta):
    from lorakit.core.combine import _merge_tensors

    return _merge_tensors([delta], torch.ones(1), "dare_linear", density=0.5)


def test_svd_clamp_equals_peft(peft):
    theirs, ours = _pair(peft, "llama-embed")
    kwargs = dict(combination_type="ties_svd", density=0.7, svd_rank=3, svd_clamp=0.9)
    torch.testing.assert_close(_combined(ours, "llama-embed", **kwargs), _combined(theirs, "llama-embed", **kwargs),
                               atol=1e-5, rtol=1e-5)


def test_one_adapter_is_scaled_not_pruned_as_in_peft(peft):
    theirs, ours = _pair(peft, "gpt2-conv1d")
    kwargs = dict(adapters=["t1"], weights=[1.5], combination_type="ties", density=0.2)
    got = _combined(ours, "gpt2-conv1d", **kwargs)
    torch.testing.assert_close(got, _combined(theirs, "gpt2-conv1d", **kwargs), atol=1e-5, rtol=1e-5)
    kwargs.pop("density")  # not needed: nothing is pruned
    torch.testing.assert_close(_combined(ours, "gpt2-conv1d", "no_density", **kwargs), got)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(combination_type="ties"), r"combination_type='ties' needs a density in \(0, 1\]"),
    (dict(combination_type="dare_linear", density=0.0), r"density must be in \(0, 1\] .*; got 0.0"),
    (dict(combination_type="dare_ties_svd", density=1.5), r"density must be in \(0, 1\] .*; got 1.5"),
    (dict(combination_type="magnitude_prune", density=-0.2), r"density must be in \(0, 1\] .*; got -0.2"),
    (dict(combination_type="ties", density=0.5, majority_sign_method="majority"),
     r"majority_sign_method must be one of total, frequency; got 'majority'"),
    (dict(combination_type="dare_link", density=0.5),
     r"combination_type must be one of .*dare_linear.*; got 'dare_link'"),
    (dict(combination_type="ties_svd", density=0.5, svd_clamp=2), r"svd_clamp must be a quantile in \(0, 1\]; got 2"),
    (dict(combination_type="ties", density=0.5, adapters=["a", "c"]),
     r"combination_type='ties' needs adapters of equal rank, got ranks \[4, 2\]"),
    (dict(combination_type="svd", svd_rank=0), r"svd_rank must be a positive integer or None .*; got 0"),
    (dict(combination_type="cat", svd_rank=-2), r"svd_rank must be a positive integer or None .*; got -2"),
    (dict(combination_type="svd", svd_rank=2.5), r"svd_rank must be a positive integer or None .*; got 2.5"),
    (dict(adapters=[]), r"adapters is empty"),
    (dict(adapters=["a", "z"]), r"unknown adapter\(s\) \['z'\]"),
])
def test_bad_arguments_are_refused_by_name(three, kwargs, message):
    adapters = kwargs.pop("adapters", ["a", "b"])
    with pytest.raises(ValueError, match=message):
        three.add_weighted_adapter(adapters, [1.0] * len(adapters), "bad", **kwargs)
    assert "bad" not in three.peft_config


def test_adapters_as_one_string_are_refused():
    model = get_lora_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]), "ab")
    with pytest.raises(TypeError, match=r"adapters must be a list of adapter names, got the string 'ab'"):
        model.add_weighted_adapter("ab", [1.0, 1.0], "bad")


@pytest.mark.parametrize(("extra", "message"), [
    ({"lora_bias": True}, r"adapter\(s\) \['d'\] have a bias on B \(lora_bias\), which add_weighted_adapter cannot "
                          r"combine"),
    ({"trainable_token_indices": {"embed_tokens": [1, 2]}}, r"adapter\(s\) \['d'\] have trainable tokens"),
])
def test_adapters_whose_extras_do_not_combine_are_refused(three, extra, message):
    three.add_adapter("d", LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **extra))
    with pytest.raises(ValueError, match=message):
        three.add_weighted_adapter(["a", "d"], [1.0, 1.0], "bad")
    assert "bad" not in three.peft_config
