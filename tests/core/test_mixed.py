"""Mixed batches: each row of one forward or generate call uses its own adapter (or the base) and equals a run of
that row alone; errors, weight changes, training, autocast and heads."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_rows_match_single_adapter_runs, random_lora, tiny_bert_cls, tiny_llama

from lorakit import LoraConfig, get_lora_model, set_adapter_state_dict


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


# -- beam search and several sequences per row ------------------------------------------------------------------

def _own_generate(model, ids, name, **kwargs):
    """Row(s) ``ids`` generated with adapter ``name`` alone (``__base__``: adapters disabled)."""
    if name == "__base__":
        with model.disable_adapter():
            return model.generate(input_ids=ids, **kwargs)
    model.set_adapter(name)
    return model.generate(input_ids=ids, **kwargs)


@pytest.mark.parametrize("extra", [dict(num_beams=3), dict(num_beams=3, num_return_sequences=2),
                                   dict(do_sample=True, num_return_sequences=2)],
                         ids=["beams", "beams-2-sequences", "sampled-2-sequences"])
def test_mixed_batch_generate_with_copies_per_row_equals_each_rows_own_run(three, extra):
    torch.manual_seed(2)
    ids = torch.randint(1, 128, (3, 5))
    names = ["a", "__base__", "b"]
    kwargs = dict(max_new_tokens=4, pad_token_id=0, **extra)
    if extra.get("do_sample"):
        kwargs["top_k"] = 1  # sampling from one token: deterministic, yet the sampling path (rows copied) runs
    with torch.no_grad():
        mixed = three.generate(input_ids=ids, adapter_names=names, **kwargs)
        own = torch.cat([_own_generate(three, ids[i: i + 1], name, **kwargs) for i, name in enumerate(names)])
    assert mixed.shape[0] == 3 * extra.get("num_return_sequences", 1)
    assert torch.equal(mixed, own)


def test_mixed_batch_beam_search_equals_peft(peft):
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(init_lora_weights=False, target_modules=["q_proj"]),
                                 adapter_name="one")
    theirs.add_adapter("two", peft.LoraConfig(init_lora_weights=False, target_modules=["embed_tokens", "v_proj"]))
    theirs.eval()  # PEFT refuses adapter_names in training mode
    ours = get_lora_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]), "one")
    ours.add_adapter("two", LoraConfig(target_modules=["embed_tokens", "v_proj"]))
    for name in ("one", "two"):
        set_adapter_state_dict(ours, peft.get_peft_model_state_dict(theirs, adapter_name=name), name)
    torch.manual_seed(4)
    ids = torch.randint(1, 128, (3, 6))
    kwargs = dict(input_ids=ids, adapter_names=["two", "one", "__base__"], num_beams=2, max_new_tokens=5,
                  pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.generate(**kwargs), theirs.generate(**kwargs))


def test_beam_search_expands_names_from_the_generation_config(three):
    from transformers import GenerationConfig

    torch.manual_seed(2)
    ids = torch.randint(1, 128, (2, 5))
    config = GenerationConfig(num_beams=2, max_new_tokens=3, pad_token_id=0)
    with torch.no_grad():
        mixed = three.generate(input_ids=ids, adapter_names=["b", "a"], generation_config=config)
        own = torch.cat([_own_generate(three, ids[i: i + 1], n, generation_config=config)
                         for i, n in enumerate(["b", "a"])])
    assert torch.equal(mixed, own)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_wrong_number_of_names_is_a_clear_error_with_an_adapted_embedding(num_beams):
    model = get_lora_model(tiny_llama(), random_lora(target_modules=["embed_tokens", "q_proj"]), "a")
    ids = torch.randint(1, 128, (3, 6))
    with pytest.raises(ValueError, match="adapter_names has 2 entries but the batch has 3 rows"):
        model.generate(input_ids=ids, adapter_names=["a", "__base__"], num_beams=num_beams, max_new_tokens=2,
                       pad_token_id=0)
    with pytest.raises(ValueError, match="adapter_names has 4 entries but the batch has 3 rows"):
        model(ids, adapter_names=["a"] * 4)
    assert all(layer.routing is None for _, layer in model.lora_layers())


def test_beam_search_with_dora_is_a_clear_error():
    model = get_lora_model(tiny_llama(), random_lora(target_modules=["q_proj"]), "plain")
    model.add_adapter("dora", random_lora(target_modules=["v_proj"], use_dora=True))
    ids = torch.randint(1, 128, (2, 4))
    with pytest.raises(ValueError, match=r"do not support DoRA adapters; \['dora'\] use DoRA"):
        model.generate(input_ids=ids, adapter_names=["plain", "dora"], num_beams=2, max_new_tokens=2, pad_token_id=0)


def test_encoder_decoder_beam_search_routes_the_encoder_per_input_row():
    import transformers  # a dev dependency: a missing one is an error, not a skip
    torch.manual_seed(0)
    config = transformers.BartConfig(vocab_size=128, d_model=32, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1,
                                     bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    model = get_lora_model(transformers.BartForConditionalGeneration(config).eval(),
                           random_lora(target_modules=["q_proj", "v_proj", "fc1"]), "a")
    model.add_adapter("b", random_lora(target_modules=["k_proj", "fc2"]))
    torch.manual_seed(3)
    ids = torch.randint(3, 128, (3, 7))
    names = ["b", "a", "__base__"]
    kwargs = dict(num_beams=2, max_new_tokens=4, min_new_tokens=4)
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, adapter_names=names, **kwargs)
        own = torch.cat([_own_generate(model, ids[i: i + 1], n, **kwargs) for i, n in enumerate(names)])
    assert torch.equal(mixed, own)


def test_encoder_adapter_names_are_checked(three, ids):
    with pytest.raises(ValueError, match="this model has no encoder"), three.mixed_batch(["a", "a"], encoder_adapter_names=["a"]):
        pass
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['z'\]"), three.mixed_batch(["a"], encoder_adapter_names=["z"]):
        pass
    assert all(layer.routing is None for _, layer in three.lora_layers())


def test_encoder_adapter_names_must_repeat_into_adapter_names():
    import transformers  # a dev dependency: a missing one is an error, not a skip
    config = transformers.BartConfig(vocab_size=128, d_model=32, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_position_embeddings=64)
    model = get_lora_model(transformers.BartForConditionalGeneration(config), random_lora(target_modules=["q_proj"]),
                           "a")
    for encoder in (["a", "__base__", "a"], ["__base__", "a"], []):
        with pytest.raises(ValueError, match="encoder_adapter_names .* must be adapter_names"), \
                model.mixed_batch(["a", "a", "__base__", "__base__"], encoder_adapter_names=encoder):
            pass
    with model.mixed_batch(["a", "a", "__base__", "__base__"], encoder_adapter_names=["a", "__base__"]):
        pass


def test_num_beams_of_any_integer_type_is_accepted_and_others_refused(three):
    np = pytest.importorskip("numpy")
    ids = torch.randint(1, 128, (2, 4))
    kwargs = dict(input_ids=ids, adapter_names=["a", "b"], max_new_tokens=2, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(three.generate(num_beams=np.int64(2), **kwargs), three.generate(num_beams=2, **kwargs))
    for bad in (2.0, True, 0, "2"):
        with pytest.raises(ValueError, match=f"num_beams must be a positive integer, got {bad!r}"):
            three.generate(num_beams=bad, **kwargs)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("names, tokens, per_row", [
    (["a", "b", "__base__"], 4, True),  # no more rows than adapters + 1: one stack entry per row
    (["a", "b", "a", "c", "__base__", "b"], 1, False),  # more rows, one token each: all A's, then all B's
    (["a", "b", "a", "c", "__base__", "b"], 4, False),  # more rows, several tokens: each row gathers its entry
], ids=["per-row", "decode", "prefill"])
def test_each_stack_layout_gives_each_rows_own_output_and_gradients(three, names, tokens, per_row):
    torch.manual_seed(4)
    ids = torch.randint(0, 128, (len(names), tokens))
    with three.mixed_batch(names):
        assert three.model.model.layers[0].self_attn.q_proj.routing.per_row is per_row
    assert_rows_match_single_adapter_runs(three, ids, names)

    def row_loss(logits: torch.Tensor) -> torch.Tensor:
        return logits.pow(2).mean()

    three.set_requires_grad(["a", "b", "c"])
    mixed = three(input_ids=ids, adapter_names=names).logits
    sum(row_loss(mixed[i]) for i in range(len(names))).backward()
    got = _grads(three)
    three.zero_grad(set_to_none=True)
    for i, name in enumerate(names):
        if name == "__base__":
            continue
        three.set_adapter(name)
        three.set_requires_grad(["a", "b", "c"])
        row_loss(three(input_ids=ids[i: i + 1]).logits[0]).backward()
    expected = _grads(three)
    assert got.keys() == expected.keys() and got
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-4)
