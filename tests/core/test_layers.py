"""Invariants of the LoRA layers on single modules: zero update, h = W0·x + (α/r)·B·A·x, merge/unmerge, init
schemes, dropout, dtypes, and the base's hooks."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import assert_rows_match_single_adapter_runs, tiny_gpt2, tiny_llama
from torch import nn

from lorakit import LoraConfig, get_lora_model, set_adapter_state_dict
from lorakit.core.fast_paths import base_accumulates
from lorakit.core.layers import (
    LoraConv1d,
    LoraConv2d,
    LoraConv3d,
    LoraEmbedding,
    LoraLinear,
    TrainableTokensLayer,
    wrap,
)

Conv1D = transformers.pytorch_utils.Conv1D


def _layer_and_input(kind: str):
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(16, 12), torch.randn(3, 5, 16)
    if kind == "conv1d":
        return Conv1D(12, 16), torch.randn(3, 5, 16)  # Conv1D(nf=out, nx=in): weight (16, 12)
    if kind == "embedding":
        return nn.Embedding(20, 12, padding_idx=0), torch.randint(0, 20, (3, 5))
    if kind == "nn.conv1d":
        return nn.Conv1d(4, 6, 3, stride=2, padding=1), torch.randn(2, 4, 9)
    if kind == "conv3d":
        return nn.Conv3d(3, 5, 3, stride=2, padding=1), torch.randn(2, 3, 5, 5, 5)
    return nn.Conv2d(4, 6, 3, stride=2, padding=1), torch.randn(2, 4, 9, 9)


KINDS = ["linear", "conv1d", "embedding", "conv2d", "nn.conv1d", "conv3d"]
CONVS = ("conv2d", "nn.conv1d", "conv3d")


@pytest.mark.parametrize("kind", KINDS)
def test_wrap_picks_the_right_class(kind):
    base, _ = _layer_and_input(kind)
    expected = {"linear": LoraLinear, "conv1d": LoraLinear, "embedding": LoraEmbedding, "conv2d": LoraConv2d,
                "nn.conv1d": LoraConv1d, "conv3d": LoraConv3d}[kind]
    layer = wrap(base)
    assert type(layer) is expected and layer.base is base
    assert not any(p.requires_grad for p in base.parameters())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("grad", [False, True])
def test_zero_b_gives_the_base_output_bit_for_bit(kind, grad):
    base, x = _layer_and_input(kind)
    expected = base(x).detach()
    layer = wrap(base)
    layer.add_adapter("a", r=4, lora_alpha=8)
    layer.set_active(["a"])
    with torch.set_grad_enabled(grad):
        got = layer(x)
    assert torch.equal(got, expected)


def _randomized(kind: str, dora: bool = False, lora_bias: bool = False):
    base, x = _layer_and_input(kind)
    layer = wrap(base)
    adapter = layer.add_adapter("a", r=4, lora_alpha=8, init_lora_weights=False, use_dora=dora, lora_bias=lora_bias)
    if lora_bias:
        with torch.no_grad():
            adapter.lora_B_bias.normal_()
    if dora:  # a magnitude away from ‖W0 + ΔW‖, as after training
        with torch.no_grad():
            adapter.lora_magnitude_vector.mul_(1.5)
    layer.set_active(["a"])
    return layer, x


@pytest.mark.parametrize("kind", KINDS)
def test_update_is_scaling_b_a_x(kind):
    layer, x = _randomized(kind)
    adapter = layer.adapters["a"]
    with torch.no_grad():
        delta = layer(x) - layer.base(x)
        if kind in ("linear", "conv1d"):
            expected = adapter.scaling * x @ adapter.lora_A.T @ adapter.lora_B.T
        elif kind == "embedding":
            expected = adapter.scaling * adapter.lora_A.T[x] @ adapter.lora_B.T
        else:
            expected = layer.conv(x, layer.delta_weight("a"), stride=2, padding=1)
    torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-5)
    assert delta.abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", ["lora", "dora", "lora_bias"])
def test_merge_equals_unmerged_and_unmerge_restores(kind, variant):
    if variant == "lora_bias" and kind == "embedding":
        with pytest.raises(ValueError, match="lora_bias is supported for Linear, Conv1D and Conv1d/2d/3d"):
            _randomized(kind, lora_bias=True)
        return
    layer, x = _randomized(kind, dora=variant == "dora", lora_bias=variant == "lora_bias")
    original = layer.base.weight.detach().clone()
    original_bias = None if getattr(layer.base, "bias", None) is None else layer.base.bias.detach().clone()
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert layer.merged_adapters == ["a"]
        merged = layer(x)
        layer.unmerge()
        after = layer(x)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.base.weight, original, atol=1e-6, rtol=0)
    if original_bias is not None:
        torch.testing.assert_close(layer.base.bias, original_bias, atol=1e-6, rtol=0)
    torch.testing.assert_close(after, unmerged, atol=1e-6, rtol=1e-6)
    assert layer.merged_adapters == []
    with torch.no_grad():
        assert (unmerged - layer.base(x)).abs().max() > 1e-3  # the update is not zero


def test_lora_bias_is_scaled_and_refused_in_a_merge_into_a_base_without_bias():
    torch.manual_seed(0)
    layer = wrap(nn.Linear(8, 6, bias=False))
    adapter = layer.add_adapter("a", r=2, lora_alpha=4, lora_bias=True)  # B = 0: only the bias acts
    layer.set_active(["a"])
    with torch.no_grad():
        adapter.lora_B_bias.normal_()
        x = torch.randn(3, 8)
        torch.testing.assert_close(layer(x) - layer.base(x), (adapter.scaling * adapter.lora_B_bias).expand(3, 6))
    weight = layer.base.weight.detach().clone()
    with pytest.raises(ValueError, match="has no bias to fold"):
        layer.merge()
    assert torch.equal(layer.base.weight, weight) and layer.merged_adapters == []


def test_trainable_tokens_replace_only_their_rows_and_merge_exactly():
    torch.manual_seed(0)
    base = nn.Embedding(20, 6)
    original = base.weight.detach().clone()
    layer = TrainableTokensLayer(base)
    rows = layer.add_tokens("a", [2, 7])
    layer.set_active(["a"])
    ids = torch.tensor([[2, 3, 7, 2]])
    with torch.no_grad():
        assert torch.equal(layer(ids), base(ids))  # starts from the rows as they are
        rows.trainable_tokens_delta.add_(1.0)
        out = layer(ids)
        assert torch.equal(out[0, 1], original[3]) and torch.equal(out[0, 0], original[2] + 1.0)
        layer.merge()
        assert torch.equal(layer(ids), out)
        layer.unmerge()
    assert torch.equal(base.weight, original)
    with pytest.raises(ValueError, match=r"out of range: this Embedding has 20 rows \(token ids 0..19\)"):
        layer.add_tokens("b", [19, 20])
    with pytest.raises(ValueError, match="holds trainable tokens"):
        layer.add_adapter("c", r=2, lora_alpha=4)


def test_merge_is_computed_in_fp32_for_a_bf16_weight():
    layer, x = _randomized("linear")
    layer.to(torch.bfloat16)
    expected = (layer.base.weight.float() + layer.delta_weight("a")).to(torch.bfloat16)
    layer.merge()
    assert layer.base.weight.dtype == torch.bfloat16
    assert torch.equal(layer.base.weight, expected)


def test_dropout_zero_is_the_identity_object():
    layer, x = _randomized("linear")
    layer.train()
    assert layer.adapters["a"].dropout(x) is x


def test_dropout_is_applied_in_training_only():
    base, x = _layer_and_input("linear")
    layer = wrap(base)
    layer.add_adapter("a", r=4, lora_alpha=8, lora_dropout=0.5, init_lora_weights=False)
    layer.set_active(["a"])
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x))
        layer.train()
        assert not torch.equal(layer(x), layer(x))


def test_inference_path_equals_training_path():
    layer, x = _randomized("linear")
    with torch.no_grad():
        fast = layer(x)
    slow = layer(x)
    torch.testing.assert_close(fast, slow.detach(), atol=1e-6, rtol=1e-6)
    assert slow.requires_grad


@pytest.mark.parametrize("bias", [True, False])
def test_inference_on_a_bare_linear_accumulates_the_base_onto_the_update_and_equals_the_module_path(bias):
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(16, 12, bias=bias))
    for name, r in (("a", 4), ("b", 2)):
        layer.add_adapter(name, r, lora_alpha=2 * r, init_lora_weights=False)
    layer.set_active(["a", "b"])
    x = torch.randn(3, 50, 16)  # 150 tokens: enough for the reordered path (decoding keeps the module path)
    with torch.no_grad():
        assert base_accumulates(layer, x) and not base_accumulates(layer, x[:, :1])
        reordered = layer(x)
        handle = layer.base.register_forward_hook(lambda *_: None)  # a hook: the base must run as a module
        assert not base_accumulates(layer, x)
        plain = layer(x)
        handle.remove()
    torch.testing.assert_close(reordered, plain, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(reordered, layer(x).detach(), atol=1e-6, rtol=1e-6)  # the training path
    with torch.no_grad(), layer.base.register_forward_pre_hook(lambda *_: None):
        assert not base_accumulates(layer, x)
    layer.adapters["b"].lora_magnitude_vector = nn.Parameter(torch.ones(12))  # DoRA computes a norm: plain path
    with torch.no_grad():
        assert not base_accumulates(layer, x)


def test_adapter_in_another_dtype_than_the_base():
    layer, x = _randomized("linear")
    layer.base.to(torch.bfloat16)
    with torch.no_grad():
        out = layer(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (3, 5, 12)


def test_gaussian_init_starts_at_zero_update():
    base, x = _layer_and_input("linear")
    layer = wrap(base)
    layer.add_adapter("a", r=4, lora_alpha=8, init_lora_weights="gaussian")
    assert torch.count_nonzero(layer.adapters["a"].lora_B) == 0
    assert layer.adapters["a"].lora_A.std().item() == pytest.approx(0.25, rel=0.3)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_pissa_keeps_the_output_and_moves_the_top_singular_directions_into_the_adapter(kind):
    base, x = _layer_and_input(kind)
    expected = base(x).detach()
    layer = wrap(base)
    adapter = layer.add_adapter("a", r=4, lora_alpha=8, init_lora_weights="pissa")
    layer.set_active(["a"])
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(adapter.lora_B) > 0


def test_pissa_refused_on_embeddings():
    base, _ = _layer_and_input("embedding")
    with pytest.raises(ValueError, match="init_lora_weights='pissa' is supported for Linear and Conv1D"):
        wrap(base).add_adapter("a", r=4, lora_alpha=8, init_lora_weights="pissa")


def test_two_active_adapters_add_up():
    base, x = _layer_and_input("linear")
    layer = wrap(base)
    for name in ("a", "b"):
        layer.add_adapter(name, r=2, lora_alpha=4, init_lora_weights=False)
    with torch.no_grad():
        deltas = {}
        for name in ("a", "b"):
            layer.set_active([name])
            deltas[name] = layer(x) - base(x)
        layer.set_active(["a", "b"])
        both = layer(x) - base(x)
    torch.testing.assert_close(both, deltas["a"] + deltas["b"], atol=1e-5, rtol=1e-5)


def test_rslora_scaling():
    layer = wrap(nn.Linear(4, 4))
    assert layer.add_adapter("a", r=16, lora_alpha=8, use_rslora=True).scaling == pytest.approx(2.0)
    assert layer.add_adapter("b", r=16, lora_alpha=8).scaling == pytest.approx(0.5)


def test_grouped_conv_is_refused():
    with pytest.raises(ValueError, match="groups=1, got groups=2"):
        wrap(nn.Conv2d(4, 4, 3, groups=2))


def test_hooks_on_the_base_layer_still_fire(ids):
    model = tiny_llama()
    calls = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
    lora = get_lora_model(model, LoraConfig(target_modules=["q_proj"]))
    with torch.no_grad():
        lora(input_ids=ids)
    assert calls == [1]


def test_bf16_base_with_fp32_adapter_rounds_once_like_peft(peft):
    config = dict(r=4, target_modules=["q_proj", "v_proj"])
    theirs = peft.get_peft_model(tiny_llama().to(torch.bfloat16), peft.LoraConfig(init_lora_weights=False, **config))
    ours = get_lora_model(tiny_llama().to(torch.bfloat16), LoraConfig(**config))
    set_adapter_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    layer_ours = ours.model.model.layers[0].self_attn.q_proj
    layer_theirs = theirs.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 5, 32).to(torch.bfloat16)
    with torch.no_grad():
        a, b = layer_ours(x), layer_theirs(x)
    assert a.dtype == b.dtype == torch.bfloat16
    assert (a != b).float().mean() < 0.02  # equal but for rare 1-ulp ties from a different GEMM order


def test_mixed_batch_rows_with_lora_bias_and_trainable_tokens_equal_their_single_adapter_runs():
    torch.manual_seed(0)
    model = get_lora_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], lora_bias=True,
                                                   init_lora_weights=False, fan_in_fan_out=True), "bias")
    model.add_adapter("tokens", LoraConfig(r=2, target_modules=["c_proj"], trainable_token_indices=[3, 5],
                                           fan_in_fan_out=True))
    with torch.no_grad():
        for _, layer in model.lora_layers():
            for adapter in layer.adapters.values():
                for p in adapter.parameters():
                    p.add_(0.5 * torch.randn_like(p))
    ids = torch.randint(0, 128, (3, 6))
    ids[:, 0] = 3
    assert_rows_match_single_adapter_runs(model, ids, ["tokens", "__base__", "bias"])


def test_tied_head_gets_the_embeddings_trainable_rows():
    model = get_lora_model(tiny_llama(tie=True), LoraConfig(target_modules=["q_proj"], trainable_token_indices=[4]))
    embed, head = model.model.model.embed_tokens, model.model.lm_head
    assert isinstance(embed, TrainableTokensLayer) and isinstance(head, TrainableTokensLayer)
    assert head.tied_to == [embed] and head.adapters is embed.adapters
    with torch.no_grad():
        embed.adapters["default"].trainable_tokens_delta.add_(1.0)
        hidden = torch.randn(1, 2, 32)
        expected = hidden @ embed._weight_with(["default"], embed.base.weight).T
        torch.testing.assert_close(head(hidden), expected)


@pytest.mark.parametrize("fast", [True, False])
def test_cpu_autocast_update_dtype_follows_the_measured_speed(fast):
    """Under CPU bf16 autocast the update runs in bf16 where this CPU's rank-r bf16 products are fast (no fp32
    copies of x and of the output), else in fp32; either way A and B keep fp32 gradients."""
    from lorakit.core.fast_paths import set_low_precision_updates

    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(16, 12, bias=False).to(torch.bfloat16))
    layer.add_adapter("a", r=4, lora_alpha=8)
    layer.set_active(["a"])
    set_low_precision_updates(layer, fast)
    adapter = layer.adapters["a"]
    with torch.no_grad():
        adapter.lora_B.normal_()
    x = torch.randn(3, 16).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    base = layer.base(x)
    if fast:  # as autocast computes it: bf16 products from bf16 copies of A and B
        xa = (adapter.lora_A.to(torch.bfloat16) @ x.t()).t()  # in the order the layer computes it
        expected = torch.addmm(base, xa, adapter.lora_B.to(torch.bfloat16).t(), alpha=2.0)
    else:  # fp32 products, the sum rounded once to bf16
        expected = (base.float() + 2.0 * (x.float() @ adapter.lora_A.t() @ adapter.lora_B.t())).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    out.float().sum().backward()
    assert adapter.lora_A.grad.dtype == adapter.lora_B.grad.dtype == torch.float32
    assert adapter.lora_B.grad.abs().sum() > 0


def test_a_layer_never_told_takes_the_fp32_update():
    layer = LoraLinear(nn.Linear(16, 12, bias=False).to(torch.bfloat16))
    assert layer.low_precision_updates is False


def test_the_rank_product_speed_is_measured_once_per_machine_and_cached(tmp_path):
    from lorakit.models.devices import low_precision_updates_fast, time_gemms

    timed = []

    def fake(seconds_by_dtype):
        def measure(shapes, dtype, device):
            timed.append(dtype)
            return seconds_by_dtype[dtype]
        return measure

    cpu = torch.device("cpu")
    fast = low_precision_updates_fast(cpu, cache=tmp_path / "a.json",
                                      measure=fake({torch.float32: 1.0, torch.bfloat16: 1.9}))
    assert fast and len(timed) == 4  # within twice fp32's time: fast; two rounds per dtype
    assert low_precision_updates_fast(cpu, cache=tmp_path / "a.json", measure=fake({})) and len(timed) == 4  # cached
    assert not low_precision_updates_fast(cpu, cache=tmp_path / "b.json",
                                          measure=fake({torch.float32: 1.0, torch.bfloat16: 2.1}))
    assert low_precision_updates_fast(torch.device("cuda"), cache=tmp_path / "c.json", measure=fake({}))
    from lorakit.models.devices import RANK_SHAPES

    assert 0 < time_gemms(RANK_SHAPES, torch.bfloat16, cpu, 0.001) < 1  # seconds, measured
