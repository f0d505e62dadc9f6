"""Parameter and memory arithmetic (lorakit params / memory) from configs on the meta device, checked against
PEFT's counts and against what autograd really saves."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from lorakit import LoraConfig, get_lora_model
from lorakit.cli import main
from lorakit.models.calc import (
    PRESETS,
    count_parameters,
    estimate_memory,
    flop_counter,
    four_bit_bytes,
    preset_model,
    training_flops,
)
from lorakit.training.loss import causal_lm_loss


def test_llama_2_7b_preset_gives_the_papers_numbers(capsys):
    assert main(["params", "--model", "llama-2-7b", "--r", "8", "--target", "q_proj,v_proj"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622"
    assert "adapter file: 16.00 MiB in fp32, 8.00 MiB in bf16" in out
    result = count_parameters(preset_model("llama-2-7b"),
                              LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    assert result["trainable"] == 16_777_216
    assert [(row["module"], row["count"], row["params_each"]) for row in result["targets"]] == [
        ("q_proj", 32, 131072), ("k_proj", 32, 131072), ("v_proj", 32, 131072), ("o_proj", 32, 131072)]


@pytest.mark.parametrize(("preset", "kwargs"), [
    ("gpt2", dict(r=8, target_modules=["c_attn"], fan_in_fan_out=True)),
    ("gpt2", dict(r=4, target_modules="all-linear", fan_in_fan_out=True)),
    ("bert-base", dict(r=8, target_modules=["query", "value"], task_type="SEQ_CLS")),
    ("bert-base", dict(r=16, target_modules="all-linear", task_type="SEQ_CLS")),
    ("llama-3-8b", dict(r=8, target_modules="all-linear")),
    ("mistral-7b", dict(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
])
def test_counts_equal_peft_on_meta(preset, kwargs, peft):
    ours = count_parameters(preset_model(preset), LoraConfig(**kwargs))
    theirs = peft.get_peft_model(preset_model(preset), peft.LoraConfig(**kwargs))
    assert (ours["trainable"], ours["total"]) == theirs.get_nb_trainable_parameters()


def test_count_does_not_change_the_model_and_reports_the_head():
    model = preset_model("bert-base")
    result = count_parameters(model, LoraConfig(r=8, target_modules=["query", "value"], task_type="SEQ_CLS"))
    assert result["modules_to_save"] == ["classifier"]
    assert not any("Lora" in type(m).__name__ for m in model.modules())


def test_json_output(capsys):
    assert main(["params", "--model", "gpt2", "--target", "c_attn", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["targets"][0]["shape"] == [768, 2304] and result["lora_params"] == 12 * 8 * (768 + 2304)


def test_bad_input_is_one_clear_line(tmp_path, capsys):
    assert main(["params", "--model", "llama-2-8b"]) == 2
    assert "unknown model 'llama-2-8b': use a preset (llama-2-7b, " in capsys.readouterr().err
    assert main(["params", "--model", "llama-2-7b", "--r", "0"]) == 2
    assert "r must be a positive integer (r >= 1), got 0" in capsys.readouterr().err
    assert main(["params", "--model", "llama-2-7b", "--target", "q_prj"]) == 2
    assert "did you mean 'q_proj'" in capsys.readouterr().err
    (tmp_path / "config.json").write_text('{"hello": 1}')
    assert main(["params", "--model", str(tmp_path / "config.json")]) == 2
    assert "does not hold a Hugging Face model config" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown preset 'x'; presets: llama-2-7b"):
        preset_model("x")
    assert set(PRESETS) >= {"llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b", "mistral-7b", "gpt2",
                            "bert-base"}


# -- memory estimates ------------------------------------------------------------------------------------


def _saved_bytes(model, ids) -> int:
    """Bytes autograd keeps for the backward pass of the causal-LM loss (each storage once; parameters aside)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        causal_lm_loss(model, {"input_ids": ids, "targets": targets})
    return sum(seen.values())


@pytest.mark.parametrize(("method", "targets"), [("lora", "all-linear"), ("lora", ["q_proj", "v_proj"]),
                                                 ("full", None)])
def test_activation_estimate_matches_what_autograd_saves(method, targets):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=344)
    model = transformers.LlamaForCausalLM(config)
    lora = LoraConfig(r=8, target_modules=targets) if method == "lora" else None
    estimate = estimate_memory(model, method, batch=4, seq=64, dtype="fp32", lora=lora)
    if lora:
        model = get_lora_model(model, lora)
    else:
        model.requires_grad_(True)
    measured = _saved_bytes(model.train(), torch.randint(0, 256, (4, 64)))
    assert estimate.activations == pytest.approx(measured, rel=0.15)


def test_memory_parts_follow_the_method():
    model = preset_model("llama-2-7b")
    total = sum(p.numel() for p in model.parameters())
    full = estimate_memory(model, "full", 1, 512, dtype="bf16")
    assert (full.weights, full.gradients, full.optimizer_states) == (4 * total, 4 * total, 8 * total)
    lora = estimate_memory(model, "lora", 1, 512, dtype="bf16", lora=LoraConfig(r=8, target_modules=["q_proj",
                                                                                                     "v_proj"]))
    assert lora.trainable == 4_194_304 and lora.weights == 2 * total + 4 * lora.trainable
    assert lora.optimizer_states == 8 * lora.trainable
    qlora = estimate_memory(model, "qlora", 1, 512, dtype="bf16", lora=LoraConfig(r=8, target_modules=["q_proj",
                                                                                                       "v_proj"]))
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # every linear layer but the head
    assert qlora.weights == lora.weights - 2 * linear + 32 * (4 * four_bit_bytes(4096 * 4096)
                                                               + 3 * four_bit_bytes(4096 * 11008))
    assert qlora.total < lora.total < full.total
    sgd = estimate_memory(model, "full", 1, 512, optimizer="sgd")
    assert sgd.optimizer_states == 0
    checkpointed = estimate_memory(model, "lora", 1, 512, grad_checkpointing=True)
    assert checkpointed.activations < estimate_memory(model, "lora", 1, 512).activations / 5
    prompt = estimate_memory(model, "prompt", 1, 512, num_virtual_tokens=20)
    assert prompt.trainable == 20 * 4096 and prompt.gradients == 4 * 20 * 4096


def test_memory_cli_table_and_json(capsys):
    assert main(["memory", "--model", "llama-2-7b", "--batch", "1", "--seq", "512"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "full" in line and "qlora" in line)
    assert header.split() == ["full", "lora", "qlora", "prompt"]
    for part in ("weights", "gradients", "optimizer states", "activations", "LM-head logits", "total"):
        assert any(line.startswith(part) for line in out.splitlines()), part
    assert main(["memory", "--model", "gpt2", "--method", "lora", "--target", "c_attn", "--json"]) == 0
    [result] = json.loads(capsys.readouterr().out)
    assert result["method"] == "lora" and result["trainable"] == 12 * 8 * (768 + 2304)
    assert result["total"] == sum(result[k] for k in ("weights", "gradients", "optimizer_states", "activations",
                                                      "logits", "runtime"))


def test_memory_bad_input_is_one_clear_line(capsys):
    assert main(["memory", "--model", "llama-9b"]) == 2
    assert "unknown model 'llama-9b': use a preset" in capsys.readouterr().err
    assert main(["memory", "--model", "llama-2-7b", "--batch", "0"]) == 2
    assert "batch must be a positive integer, got 0" in capsys.readouterr().err
    assert main(["memory", "--model", "llama-2-7b", "--r", "0"]) == 2
    assert "r must be a positive integer" in capsys.readouterr().err
    assert main(["memory", "--model", "llama-2-7b", "--target", "q_prj"]) == 2
    assert "did you mean 'q_proj'" in capsys.readouterr().err
    assert main(["memory", "--model", "/no/such/config.json"]) == 2
    assert "unknown model '/no/such/config.json'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown method 'lora2'; methods: full, lora, qlora, prompt"):
        estimate_memory(preset_model("gpt2"), "lora2", 1, 8)


# -- FLOPs ------------------------------------------------------------------------------------------------

def _tiny_llama(tie: bool = False) -> torch.nn.Module:
    """hidden 32, 2 layers, 4 heads of 8 (2 key/value heads: k and v are 16 wide), MLP 64, vocabulary 128."""
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


# Weights of one layer of _tiny_llama: q 32·32, k 32·16, v 32·16, o 32·32, gate 32·64, up 32·64, down 64·32.
LAYER = 1024 + 512 + 512 + 1024 + 2048 + 2048 + 2048
HEAD = 32 * 128
ATTENTION_PER_PAIR = 2 * 2 * 4 * 8  # two products (q·kᵀ, p·v), a multiply-add each, 4 heads of 8, per layer


def test_flops_of_full_training_equal_a_hand_count():
    # Two causal rows of 5 and 3 tokens: 15 + 6 (query, key) pairs; the head runs on 6 target positions.
    flops = training_flops(_tiny_llama(), [5, 3], head_rows=6)
    forward = 2 * 8 * 2 * LAYER + 2 * 6 * HEAD + 2 * ATTENTION_PER_PAIR * 21
    assert flops.forward == forward
    assert flops.backward == 2 * forward  # every weight trains: input and weight gradients of every product
    assert flops.total == 3 * forward
    # Not causal (an encoder): every token sees the whole row, 25 + 9 pairs.
    assert training_flops(_tiny_llama(), [5, 3], head_rows=6, causal=False).forward == \
        forward + 2 * ATTENTION_PER_PAIR * (34 - 21)


def test_flops_of_lora_count_the_update_and_only_its_weight_gradients():
    model = get_lora_model(_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    flops = training_flops(model, [5, 3], head_rows=6)
    base = 2 * 8 * 2 * LAYER + 2 * 6 * HEAD  # frozen products: forward, and again for the input gradients
    attention = 2 * ATTENTION_PER_PAIR * 21
    lora = 8 * 2 * (2 * 4 * (32 + 32) + 2 * 4 * (32 + 16))  # x·Aᵀ then ·Bᵀ on q (32→32) and v (32→16), 2 layers
    assert flops.forward == base + attention + lora
    assert flops.backward == base + 2 * attention + 2 * lora  # A and B train: their weight gradients too
    # A merged adapter is in the base weight: no update products left.
    model.merge_adapter()
    assert training_flops(model, [5, 3], head_rows=6).forward == base + attention


def test_flops_equal_what_torch_counts_in_a_real_step():
    """torch's FlopCounterMode on a real forward and backward of a LoRA model, its products outside attention
    (the head on every token): equal to ours less attention, less the input gradients autograd skips because the
    first layer's q, k, v read the frozen embeddings (no gradient is wanted there)."""
    from torch.utils.flop_counter import FlopCounterMode

    base = _tiny_llama()
    base.config._attn_implementation = "sdpa"  # one attention op, told apart below
    model = get_lora_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.train()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counted:
        model(input_ids=ids).logits.sum().backward()
    counter = flop_counter(model)
    ours = counter.step([8, 8])
    attention = 3 * counter.pair_forward * 2 * 36  # forward and twice that backward, 36 pairs per causal row
    skipped = 16 * 2 * (32 * 32 + 32 * 16 + 32 * 16) + 16 * 2 * (4 * 32) * 2  # layer 0: q, k, v and the two A's
    products = sum(n for op, n in counted.get_flop_counts()["Global"].items() if "scaled_dot_product" not in str(op))
    assert products == ours.total - attention - skipped


def test_flop_counter_refuses_a_model_without_a_transformer_config():
    with pytest.raises(ValueError, match="Sequential gives no hidden size"):
        flop_counter(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="lengths must be a non-empty list"):
        flop_counter(_tiny_llama()).step([])


def test_flops_count_a_saved_head_once_and_see_causal_attention_in_any_decoder():
    plain = training_flops(_tiny_llama(tie=True), [5, 3], head_rows=6)
    assert plain == training_flops(_tiny_llama(), [5, 3], head_rows=6)  # a tied head is still one product
    config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], trainable_token_indices=[1, 2])
    model = get_lora_model(_tiny_llama(), config)
    counted = training_flops(model, [5, 3], head_rows=6)
    lora = 8 * 2 * 2 * 4 * (32 + 32)  # q in 2 layers: x·Aᵀ then ·Bᵀ
    # The trained copy of the head runs (weight gradients too), the frozen original does not; the trainable
    # tokens are a lookup (no products).
    assert counted.forward == plain.forward + lora
    assert counted.backward == plain.backward - 2 * 8 * 2 * LAYER + 2 * lora  # frozen layers: no weight gradients
    # A decoder with another head (sequence classification) still has causal attention.
    seq_cls = transformers.LlamaForSequenceClassification(_tiny_llama().config)
    assert flop_counter(seq_cls).causal and not flop_counter(
        transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                       intermediate_size=64))).causal


def test_flops_refuse_encoder_decoders_and_bad_rows():
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=4,
                                                                       d_kv=8, vocab_size=128))
    with pytest.raises(ValueError, match="T5ForConditionalGeneration is an encoder-decoder"):
        flop_counter(t5)
    with pytest.raises(ValueError, match="head_rows must lie between 0 and the 8 tokens, got 9"):
        flop_counter(_tiny_llama()).step([5, 3], head_rows=9)
