"""Adapter files (lorakit.files.io): PEFT's format both ways, base fingerprints, and the safety of loading and saving
(wrong bases, bad shapes, corrupt files, pickles, adapter names, atomic writes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import transformers
from conftest import random_lora, tiny_bert_cls, tiny_gpt2, tiny_llama, trained_lora
from safetensors import safe_open
from safetensors.torch import save_file

from lorakit import LoraConfig, LoraModel, adapter_state_dict, find_targets, get_lora_model, set_adapter_state_dict
from lorakit.files import io as lk_io

CASES = {
    "llama": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "llama-embed-dora": (tiny_llama, dict(r=4, target_modules=["embed_tokens", "q_proj"], use_dora=False)),
    "gpt2": (tiny_gpt2, dict(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "bert-seqcls": (tiny_bert_cls, dict(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", bias="lora_only")),
}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()],
            dict(getattr(model, "peft_config", {})))


def _unchanged(model, snap):
    state, types, configs = snap
    assert [type(m) for m in model.modules()] == types
    assert set(model.state_dict()) == set(state)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert dict(getattr(model, "peft_config", {})) == configs


@pytest.mark.parametrize("case", CASES)
def test_lorakit_save_loads_in_peft_with_the_same_logits(case, tmp_path, ids, peft):
    make, kwargs = CASES[case]
    ours = trained_lora(make, kwargs)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path)
    torch.testing.assert_close(_logits(theirs, ids), _logits(ours, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_peft_save_loads_in_lorakit_with_the_same_logits(case, tmp_path, ids, peft):
    make, kwargs = CASES[case]
    theirs = peft.get_peft_model(make(), peft.LoraConfig(init_lora_weights=False, **kwargs))
    if kwargs.get("task_type") == "SEQ_CLS":
        with torch.no_grad():
            theirs.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    theirs.save_pretrained(tmp_path)
    ours = LoraModel.from_pretrained(make(), tmp_path)
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), atol=1e-5, rtol=1e-5)
    assert ours.get_nb_trainable_parameters()[0] == 0  # loaded for inference, as PEFT does by default
    trainable = LoraModel.from_pretrained(make(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_file_layout_and_keys_are_peft_s(tmp_path):
    model = trained_lora(tiny_llama, dict(r=2, target_modules=["embed_tokens", "q_proj"]))
    model.add_adapter("second", LoraConfig(r=2, target_modules=["v_proj"], use_dora=True))
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "second"]
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight" in keys
    assert not any(".default." in k or "adapters" in k for k in keys)
    assert meta["format"] == "pt" and json.loads(meta[lk_io.FINGERPRINT_KEY])["architecture"] == "LlamaForCausalLM"
    with safe_open(str(tmp_path / "second" / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.model.layers.0.self_attn.v_proj.lora_magnitude_vector" in set(f.keys())
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["target_modules"] == ["embed_tokens", "q_proj"]


def test_save_then_load_gives_the_same_logits_for_every_adapter(tmp_path, ids):
    model = trained_lora(tiny_llama, dict(r=4, target_modules="all-linear"))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    loaded = LoraModel.from_pretrained(tiny_llama(), tmp_path)
    loaded.load_adapter(tmp_path / "other", "other")
    for name in ("default", "other"):
        model.set_adapter(name)
        loaded.set_adapter(name)
        assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_wrong_base_is_refused_and_force_loads_it(tmp_path, ids):
    trained_lora(tiny_llama, dict(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    other = tiny_llama(seed=99)
    snap = _snapshot(other)
    with pytest.raises(ValueError, match="trained on a different base model: same shapes, but the base weights "
                                         "differ"):
        LoraModel.from_pretrained(other, tmp_path)
    _unchanged(other, snap)
    assert LoraModel.from_pretrained(other, tmp_path, force=True).active_adapters == ["default"]


def test_fp32_bf16_and_merged_then_unmerged_copies_of_one_base_share_a_fingerprint(tmp_path, ids):
    model = trained_lora(tiny_llama, dict(r=4, target_modules="all-linear"))
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path / "fresh")  # from the untouched base
    for _ in range(3):
        model.merge_adapter()
        model.unmerge_adapter()  # leaves fp32 rounding residue in the base weights
    fresh = dict(tiny_llama().named_parameters())
    assert any(not torch.equal(p, fresh[n.replace(".base.", ".")]) for n, p in model.model.named_parameters()
               if ".base." in n), "merge/unmerge left no residue: the merged-then-unmerged copy would test nothing"
    model.save_pretrained(tmp_path / "cycled")
    bf16 = tiny_llama().to(torch.bfloat16)
    for folder in ("fresh", "cycled"):
        config, tensors, metadata = lk_io.read_adapter(tmp_path / folder)
        targets = find_targets(tiny_llama(), config)
        saved = json.loads(metadata[lk_io.FINGERPRINT_KEY])
        assert saved["architecture"] == "LlamaForCausalLM" and sorted(saved["digest"]) == sorted(targets)
        if folder == "fresh":  # what was saved is the fingerprint of the base it was saved from
            assert lk_io.fingerprint(tiny_llama(), targets) == saved
        assert lk_io.fingerprint(bf16, targets)["digest"] != saved["digest"]  # bf16 rounding shows in the digest,
        for copy in (tiny_llama(), bf16, model.model):  # yet all three copies are recognized as the saved base
            assert lk_io.check_fits(copy, config, tensors, metadata) == targets
        with pytest.raises(ValueError, match="different base model: same shapes, but the base weights differ"):
            lk_io.check_fits(tiny_llama(seed=99), config, tensors, metadata)  # while another checkpoint is not
        on_fp32 = LoraModel.from_pretrained(tiny_llama(), tmp_path / folder)
        torch.testing.assert_close(_logits(on_fp32, ids), expected, atol=1e-5, rtol=1e-5)
        on_bf16 = _logits(LoraModel.from_pretrained(tiny_llama().to(torch.bfloat16), tmp_path / folder), ids)
        assert on_bf16.dtype == torch.bfloat16
        torch.testing.assert_close(on_bf16.float(), expected, atol=1e-2, rtol=1e-2)  # bf16 base: ~3 digits
        model.load_adapter(tmp_path / folder, folder)  # onto the merged-then-unmerged copy itself
        model.set_adapter(folder)
        torch.testing.assert_close(_logits(model, ids), expected, atol=1e-5, rtol=1e-5)


def test_architecture_difference_is_named(tmp_path):
    trained_lora(tiny_gpt2, dict(r=4, target_modules=["c_attn"])).save_pretrained(tmp_path)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    with pytest.raises(ValueError, match="architecture 'GPT2LMHeadModel' vs this model's 'GPT2Model'"):
        LoraModel.from_pretrained(transformers.GPT2Model(config), tmp_path)


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
    model = trained_lora(tiny_llama, dict(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"r": 8}))
    target = tiny_llama()
    snap = _snapshot(target)
    with pytest.raises(ValueError, match=r"shape mismatch for 'model.layers.0.self_attn.q_proj.lora_A.weight': "
                                         r"the file has \[4, 32\], this model needs \[8, 32\]"):
        LoraModel.from_pretrained(target, tmp_path)
    _unchanged(target, snap)


def test_truncated_file_is_a_clear_error_and_changes_nothing(tmp_path, ids):
    trained_lora(tiny_llama, dict(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    model = get_lora_model(tiny_llama(), LoraConfig(r=2, target_modules=["v_proj"]))
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="adapter_model.safetensors' is truncated or corrupt"):
        model.load_adapter(tmp_path / "a", "new")
    _unchanged(model, snap)
    weights.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        model.load_adapter(tmp_path / "a", "new")
    _unchanged(model, snap)


def test_pickle_is_refused_unless_asked_for_and_then_weights_only(tmp_path, ids):
    source = trained_lora(tiny_llama, dict(r=4, target_modules=["q_proj"]))
    source.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    with safe_open(str(weights), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    weights.unlink()
    torch.save(tensors, tmp_path / "adapter_model.bin")
    target = tiny_llama()
    snap = _snapshot(target)
    with pytest.raises(ValueError, match="is a pickle file, which can run code when loaded; lorakit refuses it"):
        LoraModel.from_pretrained(target, tmp_path)
    _unchanged(target, snap)
    loaded = LoraModel.from_pretrained(target, tmp_path, allow_pickle=True)
    assert torch.equal(_logits(loaded, ids), _logits(source, ids))


def test_pickle_with_code_is_refused_even_when_allowed(tmp_path):
    trained_lora(tiny_llama, dict(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, tmp_path / "adapter_model.bin", _use_new_zipfile_serialization=True)
    with pytest.raises(ValueError, match="could not be read safely"):
        LoraModel.from_pretrained(tiny_llama(), tmp_path, allow_pickle=True)


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", "x.y"])
def test_bad_adapter_names_are_refused_on_load_and_save(tmp_path, name):
    model = trained_lora(tiny_llama, dict(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "ok")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="invalid adapter name"):
        model.load_adapter(tmp_path / "ok", name)
    _unchanged(model, snap)
    with pytest.raises(ValueError, match="invalid adapter name"):
        model.save_pretrained(tmp_path / "out", adapter_names=[name])
    assert not (tmp_path / "escape").exists()


def test_missing_folder_and_unknown_extra_tensor(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LoraModel.from_pretrained(tiny_llama(), tmp_path / "nope")
    trained_lora(tiny_llama, dict(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    with safe_open(str(weights), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match="'model.layers.0.mlp.up_proj.lora_A.weight' has no place in this model"):
        LoraModel.from_pretrained(tiny_llama(), tmp_path)


def test_save_is_atomic(tmp_path, monkeypatch):
    model = trained_lora(tiny_llama, dict(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()

    def broken(path, data):  # the disk fills up halfway through the weights
        with open(path, "wb") as f:
            f.write(data[:len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(lk_io.Path, "write_bytes", broken)
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_serve_safety_warning_for_full_embedding_or_head_weights(tmp_path):
    model = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.warns(UserWarning, match=r"carries full embedding/LM-head weights \(lm_head\): 0.0 MiB of its"):
        model.save_pretrained(tmp_path)
    quiet = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet.save_pretrained(tmp_path / "quiet")


def test_adapter_file_size_is_four_bytes_per_parameter_plus_a_small_header(tmp_path):
    # SmolLM2-135M's shapes (the adapter does not depend on the vocabulary, so a small one keeps this fast).
    config = transformers.LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                      num_key_value_heads=3, intermediate_size=1536, vocab_size=64)
    model = get_lora_model(transformers.LlamaForCausalLM(config), LoraConfig(r=8, target_modules="all-linear"))
    model.save_pretrained(tmp_path)
    params = model.get_nb_trainable_parameters()[0]
    assert params == 30 * 8 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))  # 2,442,240
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert 4 * params <= size <= 4 * params * 1.01


def test_saved_files_are_byte_identical_across_processes():
    """safetensors orders header metadata by a per-process hash seed; lorakit's files must not depend on it."""
    code = ("import sys, torch; from lorakit.files.io import safetensors_bytes; "
            "sys.stdout.buffer.write(safetensors_bytes({'w': torch.arange(4.)}, "
            "{'format': 'pt', 'lorakit_fingerprint': '{}', 'x': 'y'}))")
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout for _ in range(4)}
    assert len(outputs) == 1


def _two():
    model = get_lora_model(tiny_llama(), random_lora(target_modules=["q_proj", "v_proj"]), "a")
    model.add_adapter("b", random_lora(target_modules="all-linear"))
    return model


def test_state_dict_into_a_merged_adapter_is_refused():
    model = _two()
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


def test_pissa_adapter_is_refused_on_a_plain_base_and_loads_on_its_residual(tmp_path, ids):
    model = get_lora_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], init_lora_weights="pissa"))
    model.save_pretrained(tmp_path)
    expected = _logits(model, ids)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True  # as PEFT asks: PEFT would decompose the residual again otherwise
    plain = tiny_llama()
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(ValueError, match="initialized with 'pissa'.*not that residual"):
        LoraModel.from_pretrained(plain, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in plain.state_dict().items())
    residual = model.unload()
    residual_weights = {k: v.clone() for k, v in residual.state_dict().items()}
    loaded = LoraModel.from_pretrained(residual, tmp_path)
    torch.testing.assert_close(_logits(loaded, ids), expected, atol=1e-5, rtol=1e-5)
    assert loaded.peft_config["default"].init_lora_weights == "pissa"
    # loading does not run the decomposition again on the residual base
    assert all(torch.equal(v, residual_weights[k]) for k, v in loaded.unload().state_dict().items())


def test_a_failed_write_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    import errno

    model = trained_lora(tiny_llama, dict(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()

    def disk_full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lk_io.Path, "write_bytes", disk_full)
    with pytest.raises(OSError, match=r"could not write .*adapter_model.safetensors \(the disk is full: no space left "
                                      r"on the device\); the existing adapter_model.safetensors is unchanged"):
        model.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_saved_files_get_the_usual_permissions(tmp_path):
    import os
    import stat

    mask = os.umask(0o022)
    try:
        model = trained_lora(tiny_llama, dict(r=4, target_modules=["q_proj"]))
        model.save_pretrained(tmp_path)
        model.export_merged(tmp_path / "merged")
    finally:
        os.umask(mask)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name  # not tempfile's private 0600
    assert stat.S_IMODE((tmp_path / "merged").stat().st_mode) == 0o755  # not tempfile's private 0700
