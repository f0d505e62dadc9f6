"""Singular values of adapter updates (lorakit.models.svd): inspect reports the rank an update really has; resize cuts it
by truncated SVD into a normal adapter that lorakit and PEFT load."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import tiny_llama

from lorakit import LoraConfig, LoraModel, get_lora_model
from lorakit.cli import main
from lorakit.models.svd import inspect_adapter, resize_adapter


def _adapter_of_rank(folder, k: int, r: int = 8, seed: int = 0, **config) -> LoraModel:
    """An r=8 adapter on every linear layer whose updates have rank exactly k (B's other columns are zero)."""
    lora = get_lora_model(tiny_llama(), LoraConfig(r=r, lora_alpha=16, target_modules="all-linear", **config))
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora.lora_layers():
            b = layer.adapters["default"].lora_B
            b.normal_()
            b[:, k:] = 0
    lora.save_pretrained(folder)
    return lora


def test_inspect_finds_the_rank_of_a_synthetic_adapter(tmp_path):
    _adapter_of_rank(tmp_path, k=3)
    info = inspect_adapter(tmp_path)
    assert info["r"] == 8 and len(info["modules"]) == 2 * 7
    assert {m.rank_99 for m in info["modules"]} == {3}
    assert all(m.singular_values[3] < 1e-9 * m.singular_values[0] for m in info["modules"])
    assert info["overall"]["rank_99"] == 3 and info["overall"]["kept"][2] == pytest.approx(1.0)


def test_singular_values_are_those_of_the_dense_update(tmp_path):
    lora = _adapter_of_rank(tmp_path, k=8, use_rslora=True)
    layer = lora.model.model.layers[1].mlp.down_proj
    dense = torch.linalg.svdvals(layer.delta_weight("default").double())[:8]
    found = next(m for m in inspect_adapter(tmp_path)["modules"] if m.name == "model.layers.1.mlp.down_proj")
    torch.testing.assert_close(torch.tensor(found.singular_values, dtype=torch.float64), dense, rtol=1e-6, atol=0)


def test_resize_to_full_rank_reproduces_the_logits(tmp_path):
    _adapter_of_rank(tmp_path / "a", k=8)
    report = resize_adapter(tmp_path / "a", 8, tmp_path / "b", model=tiny_llama())
    assert report["energy_kept"] == pytest.approx(1.0)
    assert report["max_abs_logit_diff"] <= 1e-5 * max(1.0, report["max_abs_logit"])


def test_resize_below_the_rank_used_costs_accuracy_and_at_it_does_not(tmp_path, ids):
    original = _adapter_of_rank(tmp_path / "a", k=3)
    exact = resize_adapter(tmp_path / "a", 3, tmp_path / "r3", model=tiny_llama())
    assert exact["max_abs_logit_diff"] <= 1e-5 * max(1.0, exact["max_abs_logit"])
    cut = resize_adapter(tmp_path / "a", 2, tmp_path / "r2", model=tiny_llama())
    assert cut["energy_kept"] < 0.99 and cut["max_abs_logit_diff"] > 1e-3
    config = json.loads((tmp_path / "r3" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (3, 3)
    loaded = LoraModel.from_pretrained(tiny_llama(), tmp_path / "r3")  # a normal adapter: loads, same outputs
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, original(ids).logits, atol=1e-5, rtol=1e-5)


def test_peft_reads_a_resized_adapter(tmp_path, ids, peft):
    original = _adapter_of_rank(tmp_path / "a", k=8)
    resize_adapter(tmp_path / "a", 8, tmp_path / "b")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "b").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, original(ids).logits, atol=1e-5, rtol=1e-5)


def test_cli_inspect_and_resize(tmp_path, capsys):
    _adapter_of_rank(tmp_path / "a", k=3)
    assert main(["inspect", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "rank 3 keeps 90% and rank 3 keeps 99% of this r=8 adapter's update" in out
    assert f"lorakit resize {tmp_path / 'a'} --r 3" in out
    assert main(["resize", str(tmp_path / "a"), "--rank", "3", "--output", str(tmp_path / "b"), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["energy_kept"] == pytest.approx(1.0)
    assert "does not say which base" in captured.err  # a bare adapter: no base to compare logits on


def test_layers_narrower_than_the_rank_are_resized_too(tmp_path, ids):
    def narrow_llama() -> torch.nn.Module:  # k_proj and v_proj have 8 outputs: fewer than r = 16
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1,
            intermediate_size=64))

    model = narrow_llama()
    lora = get_lora_model(model, LoraConfig(r=16, target_modules="all-linear"))
    with torch.no_grad():
        for _, layer in lora.lora_layers():
            layer.adapters["default"].lora_B.normal_()
    lora.save_pretrained(tmp_path / "a")
    assert {m.name.rsplit(".", 1)[-1]: len(m.singular_values) for m in inspect_adapter(tmp_path / "a")["modules"]
            }["k_proj"] == 8
    resize_adapter(tmp_path / "a", 16, tmp_path / "b")  # the full rank: exact, with 8 where a layer has 8
    config = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {r"model\.layers\.0\.self_attn\.k_proj": 8,
                                      r"model\.layers\.0\.self_attn\.v_proj": 8}
    loaded = LoraModel.from_pretrained(narrow_llama(), tmp_path / "b")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, lora(ids).logits, atol=1e-4, rtol=1e-4)


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    _adapter_of_rank(tmp_path / "a", k=3)
    with pytest.raises(ValueError, match="is the adapter itself"):
        resize_adapter(tmp_path / "a", 2, tmp_path / "a")
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        resize_adapter(tmp_path / "a", 0, tmp_path / "b")
    assert main(["inspect", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    _adapter_of_rank(tmp_path / "dora", k=3, use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        resize_adapter(tmp_path / "dora", 2, tmp_path / "c")


def test_inspect_lists_layers_in_model_order(tmp_path, capsys):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=12, num_attention_heads=2,
                                      intermediate_size=32)
    torch.manual_seed(0)
    lora = get_lora_model(transformers.LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj"],
                                                                            init_lora_weights=False))
    lora.save_pretrained(tmp_path)
    layers = [int(m.name.split(".")[2]) for m in inspect_adapter(tmp_path)["modules"]]
    assert layers == list(range(12))  # 0, 1, 2, ... 10, 11; not 0, 1, 10, 11, 2
    assert main(["inspect", str(tmp_path)]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:13]]
    assert rows == [f"model.layers.{i}.self_attn.q_proj" for i in range(12)]
