"""QLoRA on a 4-bit base (bitsandbytes NF4/FP4, on CPU): what quantize swaps and refuses, exactness of the wrapper,
merging, files, training, and PEFT reading our QLoRA adapters."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
import transformers
from conftest import tiny_llama as tiny_llama_32
from conftest import tiny_llama_64

import lorakit.core.quant
from lorakit import LoraConfig, adapter_state_dict, get_lora_model
from lorakit.core.layers import LoraLinear, is_4bit
from lorakit.core.quant import bitsandbytes, dense_weight, quantize, quantized_bytes
from lorakit.models.calc import four_bit_bytes
from lorakit.models.model import LoraModel
from lorakit.training.loop import train
from lorakit.training.options import TrainConfig
from lorakit.workflows.inference import evaluate_adapter

FAST = {"max_eval": 4, "max_new_tokens": 4, "progress": False, "warmup_steps": 1, "lr": 1e-2}


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


def _q_llama(seed: int = 0, **kwargs) -> torch.nn.Module:
    return quantize(tiny_llama_64(seed), "nf4", **kwargs)


def _randomize_b(model: LoraModel, seed: int = 1) -> None:
    """Give every lora_B non-zero values (as after training), so the update is not zero."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.lora_layers():
            for adapter in layer.adapters.values():
                adapter.lora_B.normal_(std=0.1)


def _linear_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def test_quantize_swaps_every_linear_but_the_head():
    model = _q_llama()
    swapped = [n for n, m in model.named_modules() if is_4bit(m)]
    plain = [n for n in _linear_names(model) if n not in swapped]
    assert len(swapped) == 2 * 7 and plain == ["lm_head"]
    assert type(model.model.embed_tokens) is torch.nn.Embedding
    state = model.model.layers[0].mlp.up_proj.weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # double quantization
    single = quantize(tiny_llama_64(), "fp4", double_quant=False)
    assert not single.model.layers[0].mlp.up_proj.weight.quant_state.nested


@pytest.mark.parametrize("double_quant", [True, False])
def test_4bit_bytes_are_about_a_quarter_of_bf16_and_as_calculated(double_quant):
    model = quantize(torch.nn.Sequential(torch.nn.Linear(576, 1536), torch.nn.Linear(1536, 576)), "nf4",
                     double_quant=double_quant)
    packed, bf16 = quantized_bytes(model)
    assert bf16 == 2 * 2 * 576 * 1536
    # 4 bits = 0.25×, plus the scales: 1 byte per 64 values with double quantization, else 4
    assert packed <= (0.26 if double_quant else 0.285) * bf16
    assert packed == pytest.approx(2 * four_bit_bytes(576 * 1536, double_quant=double_quant), rel=0.01)


def test_dequantized_weights_are_close_to_the_originals():
    torch.manual_seed(0)
    layer = torch.nn.Linear(576, 1536)
    w = layer.weight.detach().clone()
    d = dense_weight(quantize(torch.nn.Sequential(layer), "nf4")[0])
    assert d.shape == w.shape and d.dtype == torch.float32
    assert (d - w).norm() / w.norm() < 0.12  # NF4 rounding (~9%), not another matrix


def test_conv1d_layers_stay_in_full_precision_and_heads_inside_containers_too():
    with pytest.raises(ValueError, match="no nn.Linear layer to quantize besides its head"):
        quantize(tiny_gpt2(), "nf4")  # GPT-2: Conv1D layers and the head only
    torch.manual_seed(0)
    config = transformers.RobertaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                        intermediate_size=128, num_labels=3)
    model = quantize(transformers.RobertaForSequenceClassification(config), "nf4")
    assert is_4bit(model.roberta.encoder.layer[0].attention.self.query)
    assert not is_4bit(model.classifier.dense) and not is_4bit(model.classifier.out_proj)  # the head's layers


def test_zero_b_lora_on_4bit_base_is_the_4bit_base(ids):
    model = _q_llama()
    with torch.no_grad():
        base = model(ids).logits
    lora = get_lora_model(model, LoraConfig(r=4, target_modules="all-linear"))
    assert isinstance(lora.model.model.layers[0].self_attn.q_proj, LoraLinear)
    with torch.no_grad():
        assert torch.equal(lora(ids).logits, base)


def test_gradients_reach_only_lora_weights_even_after_an_eval_pass(ids):
    lora = get_lora_model(_q_llama(), LoraConfig(r=4, target_modules="all-linear"))
    _randomize_b(lora)

    def grads() -> dict[str, torch.Tensor]:
        lora.zero_grad(set_to_none=True)
        lora.train()
        lora(ids).logits.square().mean().backward()
        return {n: p.grad.clone() for n, p in lora.named_parameters() if p.grad is not None}

    first = grads()
    expected = {n for n, p in lora.named_parameters() if ".adapters." in n}
    assert set(first) == expected and all(g.abs().sum() > 0 for g in first.values())
    assert not any(p.requires_grad for n, p in lora.named_parameters() if n not in expected)
    # bitsandbytes repacks 4-bit weights for a gradient-free kernel on the first eval-mode pass on CPUs with
    # AVX512-BF16; lorakit keeps the differentiable path, so training after an evaluation is unchanged.
    lora.eval()
    with torch.no_grad():
        lora(ids)
    again = grads()
    assert all(torch.equal(first[n], again[n]) for n in first)


def test_a_layer_bitsandbytes_repacked_for_inference_is_unpacked_and_trains(ids):
    """bitsandbytes' own path on AVX512-BF16 CPUs: a 4-bit layer it built repacks its weight in place on the first
    eval-mode pass without gradients, for a kernel without backward; LoraModel unpacks it again."""
    if not bitsandbytes().functional.has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit weights for its CPU inference kernel only on CPUs with AVX512-BF16; "
                    "this one has none, so there is nothing to undo")
    model = _q_llama()
    layer = model.model.layers[0].mlp.up_proj
    weight = dense_weight(layer)
    layer.support_avx512bf16_for_cpu = True  # what bitsandbytes sets on such CPUs when it builds the layer itself
    with torch.no_grad():
        model(ids)
    assert layer.weight.quant_state.packing_format_for_cpu  # repacked: really the case this test is about
    lora = get_lora_model(model, LoraConfig(r=4, target_modules="all-linear"))
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert not layer.support_avx512bf16_for_cpu
    base = lora.model.model.layers[0].mlp.up_proj.base
    unpacked = dense_weight(base)
    assert (unpacked - weight).norm() / weight.norm() < 1e-2  # the same weight (its scales went through bf16)
    x = torch.randn(2, 3, 64, requires_grad=True)
    base(x).sum().backward()  # the differentiable path: the gradient reaches the layer's input
    torch.testing.assert_close(x.grad, unpacked.sum(0).expand(2, 3, 64), atol=1e-4, rtol=1e-4)


def test_save_load_round_trip_gives_identical_logits(ids, tmp_path):
    lora = get_lora_model(_q_llama(), LoraConfig(r=4, target_modules="all-linear"))
    _randomize_b(lora)
    with torch.no_grad():
        before = lora(ids).logits
    lora.save_pretrained(tmp_path)
    loaded = LoraModel.from_pretrained(_q_llama(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)


def test_qlora_adapter_loads_on_the_full_precision_base_but_not_on_another(ids, tmp_path):
    lora = get_lora_model(_q_llama(), LoraConfig(r=4, target_modules="all-linear"))
    _randomize_b(lora)
    lora.save_pretrained(tmp_path)
    on_fp = LoraModel.from_pretrained(tiny_llama_64(), tmp_path)
    saved, loaded = adapter_state_dict(lora, "default"), adapter_state_dict(on_fp, "default")
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    with pytest.raises(ValueError, match="different base model"):
        LoraModel.from_pretrained(tiny_llama_64(seed=7), tmp_path)
    with pytest.raises(ValueError, match="different base model"):
        LoraModel.from_pretrained(_q_llama(seed=7), tmp_path)
    # and an adapter trained on the full-precision base loads onto its 4-bit copy
    fp = get_lora_model(tiny_llama_64(), LoraConfig(r=4, target_modules="all-linear"))
    fp.save_pretrained(tmp_path / "fp")
    LoraModel.from_pretrained(_q_llama(), tmp_path / "fp")


def test_merge_to_dense_equals_unmerged(ids):
    lora = get_lora_model(_q_llama(compute_dtype=torch.float32), LoraConfig(r=4, target_modules="all-linear"))
    _randomize_b(lora)
    with torch.no_grad():
        before = lora(ids).logits
    merged = lora.merge_and_unload()
    assert not any(is_4bit(m) for m in merged.modules()) and not any(".adapters." in n for n, _ in
                                                                       merged.named_parameters())
    assert all(type(merged.get_submodule(n)) is torch.nn.Linear for n in _linear_names(tiny_llama_64()))
    with torch.no_grad():
        after = merged(ids).logits
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()
    report = merged.lorakit_merge_report
    assert not report.requantized and report.max_abs_logit_diff <= 1e-4 * report.max_abs_logit


def test_merge_with_requantize_stays_4bit_and_reports_the_error(ids):
    lora = get_lora_model(_q_llama(compute_dtype=torch.float32), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    _randomize_b(lora)
    with torch.no_grad():
        before = lora(ids).logits
    untouched = lora.model.model.layers[0].mlp.up_proj
    merged = lora.merge_and_unload(requantize=True)
    assert merged.model.layers[0].mlp.up_proj is untouched
    assert all(is_4bit(merged.get_submodule(n)) for n in _linear_names(tiny_llama_64()) if n != "lm_head")
    report = merged.lorakit_merge_report
    assert report.requantized and 0 < report.mean_abs_logit_diff <= report.max_abs_logit_diff
    assert report.max_abs_logit_diff < report.max_abs_logit  # rounding error, not a broken model
    with torch.no_grad():
        after = merged(ids).logits
    assert 0 < (after - before).abs().max() < 0.5 * before.abs().max()


def test_merge_adapter_in_place_and_dora_on_a_4bit_base_are_refused(ids):
    # the embedding is a full-precision layer: it must not be merged before the 4-bit ones refuse
    lora = get_lora_model(_q_llama(), LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    _randomize_b(lora)
    with pytest.raises(ValueError, match="merge_and_unload"):
        lora.merge_adapter()
    assert not any(layer.merged_adapters for _, layer in lora.lora_layers())
    with pytest.raises(ValueError, match="4-bit"):
        get_lora_model(_q_llama(), LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    with pytest.raises(ValueError, match="requantize"):
        get_lora_model(tiny_llama_64(), LoraConfig(r=4)).merge_and_unload(requantize=True)
    lora.disable_adapter_layers()  # disabled means the base: merging would bring the adapter back
    with pytest.raises(ValueError, match="while the adapter layers are disabled"):
        lora.merge_and_unload()
    assert all(is_4bit(lora.model.get_submodule(n)) for n in ("model.layers.0.self_attn.q_proj.base",))


def _state(model: torch.nn.Module) -> tuple[dict[str, type], dict[str, torch.Tensor]]:
    return {n: type(m) for n, m in model.named_modules()}, {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: torch.nn.Module, before: tuple[dict[str, type], dict[str, torch.Tensor]]) -> None:
    types, state = before
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_layer_rounded_badly_is_refused_and_the_model_kept(monkeypatch):
    """The refusal itself, on every CPU: one layer's quantized weight is made bad on purpose."""
    model = tiny_llama_64()
    bad = model.model.layers[0].self_attn.v_proj
    real = lorakit.core.quant.linear_4bit

    def mis_rounding(bnb, weight, *args):  # as if bitsandbytes had rounded v_proj of layer 0 to the wrong values
        return real(bnb, weight.flip(-1) if weight.data_ptr() == bad.weight.data_ptr() else weight, *args)

    monkeypatch.setattr(lorakit.core.quant, "linear_4bit", mis_rounding)
    before = _state(model)
    with pytest.raises(ValueError, match=r"bitsandbytes rounded model\.layers\.0\.self_attn\.v_proj "
                                         r"\(shape \[32, 64\]\) "
                                         r"with a relative error of 1\d\d% \(4-bit rounding gives ~10%\); leave it "
                                         r"in full precision with skip=\['model\.layers\.0\.self_attn\.v_proj'\]"):
        quantize(model, "nf4")
    _assert_unchanged(model, before)  # not even the layers quantized before v_proj were swapped in
    quantize(model, "nf4", skip=["model.layers.0.self_attn.v_proj"])  # what the message says to do works
    assert model.model.layers[0].self_attn.v_proj is bad and is_4bit(model.model.layers[0].self_attn.q_proj)


def test_a_layer_bitsandbytes_mis_rounds_is_refused_and_the_model_kept():
    """The real case: bitsandbytes' CPU quantizer mis-rounds some layers with 32 inputs, on some CPUs only."""
    model = tiny_llama_32()
    before = _state(model)
    try:
        quantize(model, "nf4")
    except ValueError as err:
        assert re.search(r"relative error of \d+%.*skip=", str(err)), err
    else:
        pytest.skip(f"bitsandbytes rounds a 32-input layer correctly on this CPU (torch's CPU capability "
                    f"{torch.backends.cpu.get_cpu_capability()}, bitsandbytes {bitsandbytes().__version__}); "
                    f"test_a_layer_rounded_badly_is_refused_and_the_model_kept covers the refusal")
    _assert_unchanged(model, before)


def test_bad_input_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match=r"'int3'.*nf4, fp4"):
        quantize(tiny_llama_64(), "int3")
    lora = get_lora_model(tiny_llama_64(), LoraConfig(r=4))
    with pytest.raises(ValueError, match="before adding LoRA"):
        quantize(lora.model)
    with pytest.raises(ValueError, match="quantize='int3' is not allowed; choose one of nf4, fp4"):
        TrainConfig(quantize="int3")
    with pytest.raises(ValueError, match="needs --method lora"):
        TrainConfig(quantize="nf4", method="full")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(ImportError, match="pip install 'bitsandbytes"):
        quantize(tiny_llama_64(), "nf4")


def test_cli_rejects_an_unknown_scheme():
    done = subprocess.run([sys.executable, "-m", "lorakit", "train", "--quantize", "int3"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "invalid choice: 'int3'" in done.stderr and "nf4" in done.stderr


def test_qlora_training_run_saves_a_normal_adapter_and_evaluates_on_4bit(llama64_dir, tmp_path):
    result = train(model=llama64_dir, steps=6, quantize="nf4", output_dir=str(tmp_path), **FAST)
    assert result["quantize"] == "nf4" and result["last_loss"] < result["first_loss"]
    base = sum(p.numel() for p in tiny_llama_from(llama64_dir).parameters())
    assert result["all_params"] - result["trainable_params"] == base  # 4-bit weights counted as PEFT counts them
    config = TrainConfig.from_yaml(tmp_path / "train_config.yaml")
    assert config.quantize == "nf4"
    again = evaluate_adapter(tmp_path, config)  # rebuilds the 4-bit base from the saved config
    assert again["loss"] == pytest.approx(result["after"]["loss"], rel=1e-5)
    LoraModel.from_pretrained(tiny_llama_from(llama64_dir), tmp_path)  # and loads on the fp32 base


def tiny_llama_from(folder: str) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def test_peft_reads_our_qlora_adapter_on_the_same_4bit_base(ids, tmp_path, peft):
    lora = get_lora_model(_q_llama(), LoraConfig(r=4, target_modules="all-linear"))
    _randomize_b(lora)
    lora.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(_q_llama(), tmp_path, is_trainable=True).eval()
    with torch.no_grad():  # equal up to the order of the update's products (lorakit computes A·xᵀ, PEFT x·Aᵀ)
        torch.testing.assert_close(lora(ids).logits, theirs(ids).logits, rtol=1e-6, atol=1e-6)
    assert theirs.get_nb_trainable_parameters() == lora.get_nb_trainable_parameters()
