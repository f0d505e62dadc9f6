"""Target matching as PEFT does it, module swapping, and strict errors (raised before anything is wrapped)
where PEFT is silent."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert_cls, tiny_gpt2, tiny_llama

from lorakit import LoraConfig, find_targets, get_lora_model
from lorakit.core.layers import LoraLayer


def _names(model, **kwargs):
    return find_targets(model, LoraConfig(**kwargs))


def test_list_entries_match_full_names_or_dotted_suffixes():
    model = tiny_llama()
    assert _names(model, target_modules=["q_proj"]) == ["model.layers.0.self_attn.q_proj",
                                                         "model.layers.1.self_attn.q_proj"]
    assert _names(model, target_modules=["layers.1.self_attn.q_proj"]) == ["model.layers.1.self_attn.q_proj"]
    assert _names(model, target_modules=["model.layers.0.mlp.up_proj"]) == ["model.layers.0.mlp.up_proj"]


def test_a_string_is_a_full_match_regex():
    model = tiny_llama()
    assert _names(model, target_modules=r".*0\.self_attn\.(q|k)_proj") == ["model.layers.0.self_attn.q_proj",
                                                                            "model.layers.0.self_attn.k_proj"]
    with pytest.raises(ValueError, match="regex 'q_proj' matches no module name"):
        _names(model, target_modules="q_proj")  # full match: the bare leaf name is not the full name


def test_all_linear_leaves_out_the_output_head():
    names = _names(tiny_llama(), target_modules="all-linear")
    assert len(names) == 14 and "lm_head" not in names
    gpt2 = _names(tiny_gpt2(), target_modules="all-linear")
    assert gpt2 and all(n.rsplit(".", 1)[-1] in ("c_attn", "c_proj", "c_fc") for n in gpt2)
    bert = _names(tiny_bert_cls(), target_modules="all-linear", task_type="SEQ_CLS")
    assert "classifier" not in bert and "bert.pooler.dense" in bert


def test_exclude_modules_list_and_regex():
    model = tiny_llama()
    names = _names(model, target_modules="all-linear", exclude_modules=["down_proj", "o_proj"])
    assert len(names) == 10 and not any(n.endswith(("down_proj", "o_proj")) for n in names)
    names = _names(model, target_modules="all-linear", exclude_modules=r".*layers\.0\..*")
    assert len(names) == 7 and all(".layers.1." in n for n in names)


def test_layers_to_transform():
    model = tiny_llama()
    assert _names(model, target_modules=["q_proj"], layers_to_transform=1) == ["model.layers.1.self_attn.q_proj"]
    assert _names(model, target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="layers") == [
        "model.layers.0.self_attn.q_proj"]


def test_a_typo_names_itself_and_suggests_real_names():
    with pytest.raises(ValueError) as err:
        get_lora_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_prj", "gate"]))
    message = str(err.value)
    assert "target module 'v_prj' matches no module" in message and "'v_proj'" in message
    assert "target module 'gate' matches no module" in message and "'gate_proj'" in message
    assert "q_proj'" not in message.split("did you mean")[0]


def test_a_failed_injection_changes_nothing():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    with pytest.raises(ValueError):
        get_lora_model(model, LoraConfig(target_modules=["q_proj", "nope"]))
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unsupported_module_types_are_named():
    with pytest.raises(ValueError, match="target 'model.layers.0.self_attn' is a LlamaAttention; LoRA wraps Linear"):
        _names(tiny_llama(), target_modules=["layers.0.self_attn"])
    with pytest.raises(ValueError, match="is a LlamaRMSNorm"):
        _names(tiny_llama(), target_modules=["input_layernorm"])


def test_unknown_modules_to_save_is_an_error():
    with pytest.raises(ValueError, match="modules_to_save entry 'clasifier' matches no module"):
        get_lora_model(tiny_bert_cls(), LoraConfig(target_modules=["query"], modules_to_save=["clasifier"]))


def test_find_targets_changes_nothing_and_default_targets_follow_the_architecture():
    model = tiny_gpt2()
    assert _names(model) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert _names(tiny_llama()) == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]


def test_unknown_architecture_without_targets_says_what_to_do():
    with pytest.raises(ValueError, match="no default for model_type None; name the modules"):
        _names(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_plain_torch_modules_work_too():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    lora = get_lora_model(model, LoraConfig(r=2, target_modules=["0", "2"]))
    assert lora.get_nb_trainable_parameters() == (2 * (4 + 8) + 2 * (8 + 2), 58 + 24 + 20)
    assert lora(torch.randn(3, 4)).shape == (3, 2)


def test_a_second_adapter_reuses_the_lora_layers():
    lora = get_lora_model(tiny_llama(), LoraConfig(r=2, target_modules="all-linear"))
    lora.add_adapter("other", LoraConfig(r=4, target_modules="all-linear"))
    layers = list(lora.lora_layers())
    assert len(layers) == 14 and all(set(layer.adapters) == {"default", "other"} for _, layer in layers)


def test_a_layer_type_error_is_found_before_anything_is_wrapped():
    model = tiny_llama()
    types = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="lora_bias is supported for Linear, Conv1D and Conv1d/2d/3d layers; target "
                                         "'model.embed_tokens' is an Embedding"):
        get_lora_model(model, LoraConfig(target_modules=["q_proj", "embed_tokens"], lora_bias=True))
    assert [type(m) for m in model.modules()] == types
    with pytest.raises(ValueError, match="init_lora_weights='olora': lorakit loads adapters trained with"):
        get_lora_model(model, LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights="olora"))
    assert [type(m) for m in model.modules()] == types
    with pytest.raises(ValueError, match=r"token id\(s\) \[128\] out of range for 'model.embed_tokens', which has "
                                         r"128 rows \(token ids 0..127\)"):
        get_lora_model(model, LoraConfig(target_modules=["q_proj"], trainable_token_indices=[5, 128]))
    with pytest.raises(ValueError, match="'model.embed_tokens' gets LoRA and trainable tokens at once"):
        get_lora_model(model, LoraConfig(target_modules=["q_proj", "embed_tokens"], trainable_token_indices=[5]))
    with pytest.raises(ValueError, match="trainable_token_indices key 'embeddings' matches no module"):
        get_lora_model(model, LoraConfig(target_modules=["q_proj"], trainable_token_indices={"embeddings": [5]}))
    assert [type(m) for m in model.modules()] == types
    lora = get_lora_model(model, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="init_lora_weights='pissa' is supported for Linear and Conv1D"):
        lora.add_adapter("p", LoraConfig(target_modules=["v_proj", "embed_tokens"], init_lora_weights="pissa"))
    assert sorted(lora.peft_config) == ["default"]
    assert sum(1 for _ in lora.lora_layers()) == 2


def test_layers_to_transform_keeps_targets_named_in_full_as_peft_does(peft):
    kwargs = dict(target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[1])
    ours = [n for n, _ in get_lora_model(tiny_llama(), LoraConfig(**kwargs)).lora_layers()]
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kwargs))
    expected = [n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                if type(m).__name__ == "Linear" and hasattr(m, "lora_A")]
    assert ours == expected == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
