"""Mixed batches: each row of one forward or generate call uses its own adapter (or the base) and equals a run of
that row alone; errors, weight changes, training, autocast and heads."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_rows_match_single_adapter_runs, random_lora, tiny_bert_cls, tiny_llama

from lorakit import get_lora_model


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def _two():
    model = get_lora_model(tiny_llama(), random_lora(target_modules=["q_proj", "v_proj"]), "a")
    model.add_adapter("b", random_lora(target_modules="all-linear"))
    return model


@pytest.mark.parametrize("with_base_row", [False, True])
@pytest.mark.parametrize("tokens", [7, 1], ids=["prefill", "decode"])
def test_mixed_batch_rows_equal_single_adapter_runs(three, with_base_row, tokens):
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (5, tokens))
    assert_rows_match_single_adapter_runs(three, ids, ["a", "b", "c", "__base__" if with_base_row else "a", "b"])


def test_mixed_batch_generate_matches_per_row_generate(three):
    torch.manual_seed(2)
    ids = torch.randint(1, 128, (3, 5))
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mixed = three.generate(input_ids=ids, adapter_names=["a", "__base__", "b"], **kwargs)
        three.set_adapter("a")
        row0 = three.generate(input_ids=ids[:1], **kwargs)
        with three.disable_adapter():
            row1 = three.generate(input_ids=ids[1:2], **kwargs)
        three.set_adapter("b")
        row2 = three.generate(input_ids=ids[2:], **kwargs)
    assert torch.equal(mixed, torch.cat([row0, row1, row2]))


def test_mixed_batch_errors(three, ids):
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['x'\]"):
        three(input_ids=ids, adapter_names=["a", "x", "b"])
    three.merge_adapter()
    with pytest.raises(ValueError, match="mixed batches need unmerged adapters"):
        three(input_ids=ids, adapter_names=["a", "a", "b"])


def test_mixed_batch_needs_one_name_per_row(three, ids):
    with pytest.raises(ValueError, match="adapter_names has 2 entries but the batch has 3 rows"):
        three(input_ids=ids, adapter_names=["a", "b"])


def test_mixed_batch_sees_weight_changes_and_trains(three):
    torch.manual_seed(3)
    ids = torch.randint(0, 128, (2, 5))
    names = ["a", "b"]
    before = _logits(three, ids, adapter_names=names)
    with torch.no_grad():
        three.model.model.layers[0].self_attn.q_proj.adapters["b"].lora_B.add_(0.5)  # the stacks must be rebuilt
    after = _logits(three, ids, adapter_names=names)
    assert torch.equal(after[0], before[0]) and not torch.allclose(after[1], before[1])
    three.set_adapter(["a", "b"])
    loss = three(input_ids=ids, adapter_names=names).logits.pow(2).mean()
    loss.backward()
    grads = {n for n, p in three.named_parameters() if p.grad is not None}
    assert any(".adapters.a." in n for n in grads) and any(".adapters.b." in n for n in grads)


def test_mixed_batch_refuses_dora_and_leaves_no_routing_behind(ids):
    model = get_lora_model(tiny_llama(), random_lora(target_modules=["q_proj"]), "plain")
    model.add_adapter("dora", random_lora(target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="do not support DoRA"):
        model(input_ids=ids, adapter_names=["plain", "dora", "plain"])
    assert all(layer.routing is None for _, layer in model.lora_layers())
    model.set_adapter("plain")
    torch.testing.assert_close(_logits(model, ids)[:1], _logits(model, ids[:1]))


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
    model.add_adapter("c", random_lora(target_modules=["k_proj"]))
    model.delete_adapter("c")  # leaves k_proj wrapped with no adapter
    model(input_ids=ids, adapter_names=["a", "b", "__base__"])
    other = get_lora_model(tiny_llama(), random_lora(target_modules="all-linear"), "b")
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


def test_mixed_batch_routes_trained_heads_per_row():
    model = get_lora_model(tiny_bert_cls(), random_lora(target_modules=["query"], task_type="SEQ_CLS"), "a")
    model.add_adapter("b", random_lora(target_modules=["value"], task_type="SEQ_CLS"))
    with torch.no_grad():
        model.model.classifier.modules_to_save["a"].weight.add_(1.0)
        model.model.classifier.modules_to_save["b"].weight.sub_(1.0)
    torch.manual_seed(5)
    ids = torch.randint(0, 128, (4, 6))
    assert_rows_match_single_adapter_runs(model, ids, ["a", "__base__", "b", "a"])
