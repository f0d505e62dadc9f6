"""Counts, outputs and trained parameters equal PEFT's for the same config, across architectures and options
(PEFT is a dev dependency, used only as a reference; the tests that need it skip without it)."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import tiny_bert_cls, tiny_conv, tiny_gpt2, tiny_llama

from lorakit import LoraConfig, get_lora_model, set_adapter_state_dict

CASES = [
    ("llama-qv", tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    ("llama-all-linear", tiny_llama, dict(r=4, lora_alpha=16, target_modules="all-linear")),
    ("llama-regex-rslora", tiny_llama, dict(r=4, lora_alpha=8, target_modules=r".*\.(k_proj|down_proj)",
                                            use_rslora=True)),
    ("llama-patterns", tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"],
                                        rank_pattern={"o_proj": 2}, alpha_pattern={"up_proj": 32})),
    ("llama-layers", tiny_llama, dict(r=2, target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
                                      layers_pattern="layers")),
    ("llama-embed", tiny_llama, dict(r=4, target_modules=["embed_tokens", "q_proj"])),
    ("llama-dora", tiny_llama, dict(r=4, target_modules=["q_proj", "v_proj", "gate_proj"], use_dora=True)),
    ("llama-exclude", tiny_llama, dict(r=4, target_modules="all-linear", exclude_modules=["down_proj"])),
    ("gpt2-conv1d", tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    ("gpt2-all-linear", tiny_gpt2, dict(r=2, target_modules="all-linear", fan_in_fan_out=True)),
    ("bert-seqcls", tiny_bert_cls, dict(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")),
    ("bert-seqcls-bias", tiny_bert_cls, dict(r=4, target_modules=["query", "value"], task_type="SEQ_CLS",
                                             bias="lora_only")),
    ("bert-all-linear", tiny_bert_cls, dict(r=4, target_modules="all-linear", task_type="SEQ_CLS", bias="all")),
    ("conv2d", tiny_conv, dict(r=2, target_modules=["conv1", "conv2"], modules_to_save=["head"])),
]


def _inputs(name: str) -> dict:
    torch.manual_seed(7)
    if name == "conv2d":
        return {"x": torch.randn(2, 3, 8, 8)}
    return {"input_ids": torch.randint(0, 128, (2, 11))}


def _out(model, inputs):
    out = model(**inputs)
    return out if torch.is_tensor(out) else out.logits


def _build(peft, make, kwargs):
    """The same random base twice; PEFT with a random (non-zero) update, ours with its values copied in."""
    peft_model = peft.get_peft_model(make(), peft.LoraConfig(init_lora_weights=False, **kwargs))
    ours = get_lora_model(make(), LoraConfig(**kwargs))
    set_adapter_state_dict(ours, peft.get_peft_model_state_dict(peft_model))
    return peft_model, ours


@pytest.mark.parametrize(("name", "make", "kwargs"), CASES, ids=[c[0] for c in CASES])
def test_counts_equal_peft(name, make, kwargs, peft):
    peft_model = peft.get_peft_model(make(), peft.LoraConfig(**kwargs))
    ours = get_lora_model(make(), LoraConfig(**kwargs))
    assert ours.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()


@pytest.mark.parametrize(("name", "make", "kwargs"), CASES, ids=[c[0] for c in CASES])
def test_forward_equals_peft_with_the_same_weights(name, make, kwargs, peft):
    peft_model, ours = _build(peft, make, kwargs)
    inputs = _inputs(name)
    with torch.no_grad():
        expected, got = _out(peft_model, inputs), _out(ours, inputs)
        base = _out(make(), inputs)
    assert not torch.allclose(expected, base, atol=1e-4), "the update must be non-zero for the test to mean anything"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_print_trainable_parameters_is_peft_line(capsys, peft):
    make, kwargs = tiny_bert_cls, dict(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    peft.get_peft_model(make(), peft.LoraConfig(**kwargs)).print_trainable_parameters()
    expected = capsys.readouterr().out
    get_lora_model(make(), LoraConfig(**kwargs)).print_trainable_parameters()
    assert capsys.readouterr().out == expected
    assert expected.startswith("trainable params: 1,123 || all params: 25,638 || trainable%: 4.3802")


def _meta_llama_7b():
    config = transformers.LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                      intermediate_size=11008, vocab_size=32000)
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config)


def test_llama_7b_on_meta_device_prints_the_papers_count(capsys):
    model = get_lora_model(_meta_llama_7b(), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    model.print_trainable_parameters()
    assert capsys.readouterr().out == "trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622\n"
    model = get_lora_model(_meta_llama_7b(), LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    assert model.get_nb_trainable_parameters()[0] == 16_777_216


def test_gradients_reach_only_what_peft_trains(peft):
    for make, kwargs in [(tiny_bert_cls, dict(r=4, target_modules=["query"], task_type="SEQ_CLS", bias="lora_only")),
                         (tiny_llama, dict(r=4, target_modules="all-linear", lora_dropout=0.1))]:
        peft_model = peft.get_peft_model(make(), peft.LoraConfig(**kwargs))
        ours = get_lora_model(make(), LoraConfig(**kwargs))
        ours.train()
        out = _out(ours, _inputs("x"))
        out.float().pow(2).mean().backward()
        with_grad = {n for n, p in ours.named_parameters() if p.grad is not None}
        trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
        assert with_grad == trainable
        peft_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        assert sum(p.numel() for n, p in ours.named_parameters() if n in with_grad) == peft_trainable
