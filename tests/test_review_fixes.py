"""Regression tests for bugs found in review: autocast, stale caches, partial injection, hooks, merged saves."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_rows_match_single_adapter_runs, tiny_llama

from lorakit import LoraConfig, LoraModel, get_lora_model, set_adapter_state_dict

peft = pytest.importorskip("peft")


def _random(r=4, **kwargs):
    return LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False, **kwargs)


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def _two():
    model = get_lora_model(tiny_llama(), _random(target_modules=["q_proj", "v_proj"]), "a")
    model.add_adapter("b", _random(target_modules="all-linear"))
    return model


@pytest.mark.parametrize("grad", [False, True])
def test_cpu_autocast_single_and_mixed(ids, grad):
    model = _two()
    expected = _logits(model, ids, adapter_names=["a", "b", "__base__"])
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(input_ids=ids, adapter_names=["a", "b", "__base__"]).logits
        single = model(input_ids=ids).logits
    torch.testing.assert_close(mixed.float(), expected, atol=0.1, rtol=0.05)
    torch.testing.assert_close(single.float()[:1], expected[:1], atol=0.1, rtol=0.05)


def test_mixed_batch_after_delete_and_reload_under_the_same_name(tmp_path, ids):
    model = _two()
    model.add_adapter("c", _random(target_modules=["k_proj"]))
    model.delete_adapter("c")  # leaves k_proj wrapped with no adapter
    model(input_ids=ids, adapter_names=["a", "b", "__base__"])
    other = get_lora_model(tiny_llama(), _random(target_modules="all-linear"), "b")
    with torch.no_grad():
        for p in other.parameters():
            if p.requires_grad:
                p.mul_(3.0)
    other.save_pretrained(tmp_path / "b2", adapter_names=["b"])
    model.delete_adapter("b")
    model.load_adapter(tmp_path / "b2" / "b", "b")
    mixed = _logits(model, ids, adapter_names=["b", "b", "b"])
    model.set_adapter("b")
    torch.testing.assert_close(mixed, _logits(model, ids), atol=1e-5, rtol=1e-5)


def test_a_layer_type_error_is_found_before_anything_is_wrapped(tmp_path):
    model = tiny_llama()
    types = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="use_dora is supported for Linear and Conv1D layers; target "
                                         "'model.embed_tokens' is a Embedding"):
        get_lora_model(model, LoraConfig(target_modules=["q_proj", "embed_tokens"], use_dora=True))
    assert [type(m) for m in model.modules()] == types
    lora = get_lora_model(model, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="init_lora_weights='pissa' is supported for Linear and Conv1D"):
        lora.add_adapter("p", LoraConfig(target_modules=["v_proj", "embed_tokens"], init_lora_weights="pissa"))
    assert sorted(lora.peft_config) == ["default"]
    assert sum(1 for _ in lora.lora_layers()) == 2


def test_hooks_on_the_base_layer_still_fire(ids):
    model = tiny_llama()
    calls = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
    lora = get_lora_model(model, LoraConfig(target_modules=["q_proj"]))
    _logits(lora, ids)
    assert calls == [1]


def test_layers_to_transform_keeps_targets_named_in_full_as_peft_does():
    kwargs = dict(target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[1])
    ours = [n for n, _ in get_lora_model(tiny_llama(), LoraConfig(**kwargs)).lora_layers()]
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kwargs))
    expected = [n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                if type(m).__name__ == "Linear" and hasattr(m, "lora_A")]
    assert ours == expected == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_state_dict_into_a_merged_adapter_is_refused(ids):
    model = _two()
    from lorakit import adapter_state_dict

    state = {k: v.clone() for k, v in adapter_state_dict(model, "a").items()}
    model.merge_adapter()
    with pytest.raises(ValueError, match="adapter 'a' is merged into the base weights; unmerge_adapter"):
        set_adapter_state_dict(model, state, "a")


def test_saving_while_merged_keeps_the_base_fingerprint(tmp_path, ids):
    model = _two()
    expected = _logits(model, ids)
    model.merge_adapter()
    model.save_pretrained(tmp_path)
    loaded = LoraModel.from_pretrained(tiny_llama(), tmp_path / "a", adapter_name="a")  # fresh, unmerged base
    torch.testing.assert_close(_logits(loaded, ids), expected, atol=1e-5, rtol=1e-5)


def test_pissa_adapters_are_refused_on_load(tmp_path):
    get_lora_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], init_lora_weights="pissa")).save_pretrained(
        tmp_path)
    with pytest.raises(ValueError, match="initialized with PiSSA"):
        LoraModel.from_pretrained(tiny_llama(), tmp_path)


def test_bf16_base_with_fp32_adapter_rounds_once_like_peft(ids):
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


def test_mixed_batch_routes_trained_heads_per_row():
    from conftest import tiny_bert_cls

    model = get_lora_model(tiny_bert_cls(), _random(target_modules=["query"], task_type="SEQ_CLS"), "a")
    model.add_adapter("b", _random(target_modules=["value"], task_type="SEQ_CLS"))
    with torch.no_grad():
        model.model.classifier.modules_to_save["a"].weight.add_(1.0)
        model.model.classifier.modules_to_save["b"].weight.sub_(1.0)
    torch.manual_seed(5)
    ids = torch.randint(0, 128, (4, 6))
    assert_rows_match_single_adapter_runs(model, ids, ["a", "__base__", "b", "a"])


def test_nested_disable_adapter_stays_disabled_until_the_outer_block_ends(ids):
    model = _two()
    with model.disable_adapter():
        base = _logits(model, ids)
        with model.disable_adapter():
            pass
        assert torch.equal(_logits(model, ids), base)
        assert torch.equal(_logits(model, ids, adapter_names=["a", "b", "a"]), base)  # disabled wins
    assert not torch.equal(_logits(model, ids), base)


def test_export_and_merge_and_unload_agree_with_merged_and_dora_adapters(tmp_path, ids):
    transformers = pytest.importorskip("transformers")
    model = get_lora_model(tiny_llama(), _random(target_modules=["q_proj", "v_proj"]), "a")
    model.add_adapter("d", _random(target_modules=["q_proj"], use_dora=True))
    model.merge_adapter(["a"])  # already merged: must not be folded in twice, nor when not asked for
    model.export_merged(tmp_path / "d_only", adapter_names=["d"])
    model.export_merged(tmp_path / "both", adapter_names=["a", "d"])
    model.unmerge_adapter()
    for folder, names in (("d_only", ["d"]), ("both", ["a", "d"])):
        exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / folder).eval()
        import copy

        reference = copy.deepcopy(model).merge_and_unload(names)
        torch.testing.assert_close(_logits(exported, ids), _logits(reference, ids), atol=1e-5, rtol=1e-5)


def test_merge_and_unload_keeps_the_head_of_the_adapters_it_merges():
    from conftest import tiny_bert_cls

    model = get_lora_model(tiny_bert_cls(), _random(target_modules=["query"], task_type="SEQ_CLS"), "a")
    model.add_adapter("b", _random(target_modules=["query"], task_type="SEQ_CLS"))
    head_b = model.model.classifier.modules_to_save["b"]
    plain = model.merge_and_unload(["b"])  # "a" is the active one
    assert plain.classifier is head_b
