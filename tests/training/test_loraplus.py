"""LoRA+: the optimizer's parameter groups are PEFT's create_loraplus_optimizer's for the same model, and a training
run with --loraplus-lr-ratio moves B that many times farther than A's learning rate would."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import tiny_bert_cls, tiny_gpt2, tiny_llama
from safetensors.torch import load_file

from lorakit import LoraConfig, get_lora_model, set_adapter_state_dict
from lorakit.training.loop import train
from lorakit.training.loraplus import create_loraplus_optimizer, loraplus_param_groups
from lorakit.training.options import TrainConfig

CASES = {
    "llama-embed": (tiny_llama, {"target_modules": ["embed_tokens", "q_proj", "v_proj"]}),
    "llama-dora": (tiny_llama, {"target_modules": ["q_proj", "up_proj"], "use_dora": True}),
    "bert-head-biases": (tiny_bert_cls, {"target_modules": ["query", "value"], "task_type": "SEQ_CLS", "bias": "all"}),
    "gpt2-layernorm": (tiny_gpt2, {"target_modules": ["c_attn"], "fan_in_fan_out": True, "bias": "lora_only",
                                   "modules_to_save": ["ln_f"]}),
    "llama-lora-bias": (tiny_llama, {"target_modules": ["q_proj", "v_proj"], "lora_bias": True}),
    "llama-trainable-tokens": (tiny_llama, {"target_modules": ["q_proj"], "trainable_token_indices": [1, 5, 9]}),
}


def _random_base(make):
    """``make()`` with every weight random, so that each trainable tensor has values no other one has."""
    model = make()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def _groups(optimizer):
    """Each group as (lr, weight_decay, the multiset of its tensors, known by shape and values)."""
    def key(p):
        return tuple(p.shape), round(p.detach().double().sum().item(), 6), round(p.detach().double().norm().item(), 6)

    return [(g["lr"], g["weight_decay"], Counter(key(p) for p in g["params"])) for g in optimizer.param_groups]


@pytest.mark.parametrize("case", list(CASES))
def test_param_groups_equal_peft(case, peft):
    from peft.optimizers import create_loraplus_optimizer as peft_loraplus

    make, kwargs = CASES[case]
    theirs = peft.get_peft_model(_random_base(make), peft.LoraConfig(init_lora_weights=False, **kwargs))
    ours = get_lora_model(_random_base(make), LoraConfig(**kwargs))
    set_adapter_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    options = {"lr": 3e-4, "loraplus_lr_ratio": 16, "loraplus_weight_decay": 0.1}
    expected = _groups(peft_loraplus(theirs, torch.optim.AdamW, **options))
    got = _groups(create_loraplus_optimizer(ours, torch.optim.AdamW, **options))
    assert got == expected
    assert sum(len(g[2]) for g in got) == sum(p.requires_grad for p in ours.parameters())
    assert [g[0] for g in got] == [3e-4, 1e-6, 3e-4 * 16, 3e-4 * 16] and [g[1] for g in got] == [0.1, 0.1, 0.1, 0.0]


def test_bad_ratio_is_refused_by_name():
    model = get_lora_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    for bad in (0, -2.0, None):
        with pytest.raises(ValueError, match=f"loraplus_lr_ratio must be a positive number .*got {bad!r}"):
            loraplus_param_groups(model, 1e-3, bad)
    for bad in (None, 0, "1e-3", True):
        with pytest.raises(ValueError, match=f"lr must be a positive number, got {bad!r}"):
            loraplus_param_groups(model, bad, 16)
    for option in ("loraplus_lr_embedding", "loraplus_weight_decay"):
        for bad in (None, -1.0):
            with pytest.raises(ValueError, match=f"{option} must be a number >= 0.*got {bad!r}"):
                loraplus_param_groups(model, 1e-3, 16, **{option: bad})
    with pytest.raises(ValueError, match=r"loraplus_lr_ratio=-1.0 must be positive"):
        TrainConfig(loraplus_lr_ratio=-1)
    with pytest.raises(ValueError, match="--loraplus-lr-ratio .* needs --method lora \\(got --method full\\)"):
        TrainConfig(loraplus_lr_ratio=16, method="full")


def test_training_step_moves_b_ratio_times_farther(tiny_llama_dir, tmp_path):
    """After one AdamW step from B = 0 only B moves (A's gradient is zero), by lr·m̂/(√v̂+ε): the same direction
    in both runs, so B under LoRA+ is exactly ratio × B without it. At the second step A moves too, by Adam's
    lr·m̂/(√v̂+ε), whose largest entry is ≈ 0.744·lr whatever the gradient's scale: A keeps the plain lr."""
    options = {"model": tiny_llama_dir, "max_eval": 2, "max_new_tokens": 2, "progress": False,
               "warmup_steps": 0, "lr": 1e-3, "precision": "fp32", "schedule": "constant"}
    runs = {}
    for steps, ratio in ((1, None), (1, 16), (2, None), (2, 16)):
        out = tmp_path / f"{steps}-{ratio}"
        train(output_dir=str(out), steps=steps, loraplus_lr_ratio=ratio, **options)
        runs[steps, ratio] = load_file(str(out / "adapter_model.safetensors"))
    plain, plus = runs[1, None], runs[1, 16]
    b_keys = [k for k in plain if "lora_B" in k]
    a_keys = [k for k in plain if "lora_A" in k]
    assert b_keys and a_keys and plain.keys() == plus.keys()
    for key in plain:
        expected = 16 * plain[key] if key in b_keys else plain[key]
        torch.testing.assert_close(plus[key], expected, rtol=1e-5, atol=1e-8)
    assert any(plain[k].abs().max() > 0 for k in b_keys)
    for ratio in (None, 16):  # A = its initial value (runs[1, ·]) + the second step's update
        moved = max((runs[2, ratio][k] - plain[k]).abs().max().item() for k in a_keys)
        assert moved == pytest.approx(0.744 * 1e-3, rel=0.02), ratio  # not 16 × that
