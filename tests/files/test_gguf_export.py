"""GGUF export (lorakit/gguf_export.py, export_merged(format="gguf"), `lorakit export --gguf`): the merged model
loads back in transformers with the merged model's logits, in llama.cpp's layout (names, keys, Q/K row order) as
checked against the embedded SmolLM2 file that llama.cpp's converter wrote; the adapter alone rebuilds the merge."""

from __future__ import annotations

import contextlib
import io

import gguf
import numpy as np
import pytest
import torch
import transformers
from conftest import random_lora, tiny_gpt2, tiny_llama

from lorakit import get_lora_model
from lorakit.cli import main
from lorakit.files.export import export_merged, merged_state_dict
from lorakit.files.gguf_export import dequantized, permute_rows, write_gguf_adapter
from lorakit.models.embedded_models import default_model_dir, smollm2_gguf

Q8_0 = gguf.GGMLQuantizationType.Q8_0


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _load(path):
    with contextlib.redirect_stderr(io.StringIO()):  # transformers' GGUF progress bar
        return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                 dtype=torch.float32).eval()


def _rounded(model, state, round_weight):
    """A copy of the plain model holding ``state`` with every matrix passed through ``round_weight``: the weights
    exactly as the GGUF file stores them (vectors are stored as F32)."""
    plain = tiny_llama()
    plain.load_state_dict({k: round_weight(v) if v.dim() > 1 else v for k, v in state.items()})
    return plain.eval()


def _q8_0(weight):
    data = weight.float().numpy()
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(data, Q8_0), Q8_0).reshape(data.shape))


@pytest.fixture
def lora():
    return get_lora_model(tiny_llama(), random_lora(target_modules="all-linear"))


@pytest.fixture
def probe():
    torch.manual_seed(100)
    return torch.randint(0, 128, (3, 16))


def test_f16_file_loads_with_the_merged_logits(lora, probe, tmp_path):
    expected = _logits(lora, probe)
    path = export_merged(lora, tmp_path, format="gguf", quant="f16")
    assert path == tmp_path / "model-f16.gguf"
    got = _logits(_load(path), probe)
    # Exact up to fp32 summation order: the file holds the merged weights rounded to the nearest fp16, no more.
    state = merged_state_dict(lora)
    torch.testing.assert_close(got, _logits(_rounded(lora, state, lambda w: w.half().float()), probe),
                               atol=1e-5, rtol=1e-5)
    # Against the fp32 merged model: each weight moves by at most 2^-11 of itself (fp16's unit roundoff); through
    # the network the logits moved by 3.5e-4 of the largest logit (seed 0; 3.1e-4..4.1e-4 over seeds 0-7).
    assert (got - expected).abs().max() <= 7e-4 * expected.abs().max()
    assert torch.equal(_logits(lora, probe), expected)  # the LoraModel is unchanged


def test_q8_0_file_loads_within_the_q8_0_bound(lora, probe, tmp_path):
    expected = _logits(lora, probe)
    path = export_merged(lora, tmp_path / "tiny.gguf", format="gguf", quant="q8_0")
    assert path == tmp_path / "tiny.gguf" and path.stat().st_size < 0.6 * export_merged(
        lora, tmp_path / "f16.gguf", format="gguf").stat().st_size
    got = _logits(_load(path), probe)
    state = merged_state_dict(lora)
    torch.testing.assert_close(got, _logits(_rounded(lora, state, _q8_0), probe), atol=1e-5, rtol=1e-5)
    # Q8_0: blocks of 32 weights, d = max|w| / 127 stored in fp16, q = round(w / d). Per weight
    # |q·fp16(d) - w| <= d/2 + 127·d·2^-11 = 0.562·d = 0.00443·max|w| of its block. Checked on the file itself:
    tensors = dequantized(path)
    weight = state["model.layers.1.self_attn.k_proj.weight"]
    stored = torch.from_numpy(tensors["blk.1.attn_k.weight"])
    reference = permute_rows(weight, 2)
    block_max = reference.abs().reshape(-1, 32).amax(dim=1, keepdim=True)
    assert ((stored - reference).abs().reshape(-1, 32) <= 0.00443 * block_max + 1e-12).all()
    # Through the network the logits moved by 1.04e-2 of the largest logit (seed 0; 0.79e-2..1.07e-2 over seeds
    # 0-7).
    assert (got - expected).abs().max() <= 1.5e-2 * expected.abs().max()


def test_layout_matches_llama_cpps_own_file(lora, tmp_path):
    """Names, metadata keys and the Q/K row order of the embedded SmolLM2 GGUF, which llama.cpp's converter wrote."""
    original = gguf.GGUFReader(smollm2_gguf())
    path = export_merged(lora, tmp_path, format="gguf")
    ours = gguf.GGUFReader(path)
    wanted = {k for k in original.fields if k.startswith("llama.") or k in (
        "general.architecture", "general.type", "general.file_type", "general.quantization_version")}
    assert wanted <= set(ours.fields)
    assert ours.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16
    # Block 0 and the tensors outside blocks: the same names (SmolLM2 ties its head: no output.weight; ours does not).
    def names(reader):
        return {t.name for t in reader.tensors if not t.name.startswith("blk.") or t.name.startswith("blk.0.")}
    assert names(ours) == names(original) | {"output.weight"}
    types = {t.name: t.tensor_type for t in ours.tensors}
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    # SmolLM2's Hugging Face weights (transformers' reading of that file) reordered by permute_rows are the file's
    # own Q and K rows, bit for bit: the same convention as llama.cpp's converter.
    from safetensors import safe_open

    hf = default_model_dir()
    config = transformers.AutoConfig.from_pretrained(hf)
    stored = {t.name: t for t in original.tensors if t.name in ("blk.3.attn_q.weight", "blk.3.attn_k.weight")}
    with safe_open(str(hf / "model.safetensors"), "pt") as f:
        for proj, n_head, name in (("q_proj", config.num_attention_heads, "blk.3.attn_q.weight"),
                                   ("k_proj", config.num_key_value_heads, "blk.3.attn_k.weight")):
            weight = f.get_tensor(f"model.layers.3.self_attn.{proj}.weight")
            t = stored[name]
            data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(weight.shape)
            assert torch.equal(permute_rows(weight, n_head), torch.from_numpy(np.ascontiguousarray(data)))
            assert not torch.equal(weight, torch.from_numpy(np.ascontiguousarray(data)))  # the order does matter


def test_tied_embeddings_write_no_output_tensor_and_reload_tied(probe, tmp_path):
    model = get_lora_model(tiny_llama(tie=True), random_lora(target_modules=["q_proj", "k_proj", "v_proj"]))
    path = export_merged(model, tmp_path, format="gguf", quant="f32")
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(path).tensors}
    back = _load(path)
    assert back.config.tie_word_embeddings
    torch.testing.assert_close(_logits(back, probe), _logits(model, probe), atol=1e-5, rtol=1e-5)


def test_llama3_rope_is_written_as_llama_cpps_rope_freqs(tmp_path):
    """Llama 3.x RoPE: llama.cpp divides each plain rotary frequency by rope_freqs[i], which must give the
    frequencies transformers computes. (transformers' GGUF reader drops rope_freqs, so the file reloads with plain
    RoPE: the weights are compared instead of the logits.)"""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, intermediate_size=64, max_position_embeddings=1024,
                                      rope_parameters=rope)
    torch.manual_seed(0)
    model = get_lora_model(transformers.LlamaForCausalLM(config).eval(), random_lora(target_modules=["q_proj"]))
    path = export_merged(model, tmp_path, format="gguf", quant="f32")
    freqs = torch.from_numpy(dequantized(path)["rope_freqs.weight"])  # (head_dim / 2,)
    plain = 1.0 / 500000.0 ** (torch.arange(0, 32, 2, dtype=torch.float32) / 32)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    torch.testing.assert_close(plain / freqs, expected, rtol=1e-6, atol=0)
    assert freqs.min() == 1.0 and freqs.max() == 32.0  # both ends of the band are in this head size
    back = _load(path).state_dict()
    for key, value in merged_state_dict(model).items():
        torch.testing.assert_close(back[key], value, rtol=0, atol=0)


def test_bad_quant_and_unsupported_architecture(lora, tmp_path):
    with pytest.raises(ValueError, match=r"unsupported GGUF quant 'q4_k'; allowed: f32, f16, q8_0"):
        export_merged(lora, tmp_path, format="gguf", quant="q4_k")
    with pytest.raises(ValueError, match=r"unknown export format 'onnx'; allowed: hf, gguf"):
        export_merged(lora, tmp_path, format="onnx")
    with pytest.raises(ValueError, match=r"quant='q8_0' applies to format='gguf' only"):
        export_merged(lora, tmp_path, quant="q8_0")
    gpt2 = get_lora_model(tiny_gpt2(), random_lora(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match=r"supports the llama, mistral architectures .*this model is model_type 'gpt2'"):
        export_merged(gpt2, tmp_path, format="gguf")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_hf_tokenizer_is_described_as_llama_cpp_wrote_it(tiny_llama_dir, smollm2_tokenizer, tmp_path):
    """SmolLM2's tokenizer from a Hugging Face folder gives the original file's tokens, types, merges, special ids,
    BOS flag and chat template, and transformers reads it back to the same token ids."""
    model = get_lora_model(transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(),
                           random_lora(target_modules=["q_proj"]))
    path = export_merged(model, tmp_path, smollm2_tokenizer, format="gguf")
    ours, original = gguf.GGUFReader(path), gguf.GGUFReader(smollm2_gguf())
    for key in ("model", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "unknown_token_id",
                "padding_token_id", "add_bos_token"):
        key = f"tokenizer.ggml.{key}"
        assert ours.fields[key].contents() == original.fields[key].contents(), key
    assert ours.fields["tokenizer.chat_template"].contents() == original.fields["tokenizer.chat_template"].contents()
    # transformers' GGUF conversion of SmolLM2 kept GPT-2's plain pre-tokenizer, so that is what is described
    assert ours.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    with contextlib.redirect_stderr(io.StringIO()):
        back = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in ["Hello world 12345!", "<|im_start|>user\nhi<|im_end|>", "  tabs\tand ünïcödé"]:
        assert back(text)["input_ids"] == smollm2_tokenizer(text)["input_ids"]


def test_cli_exports_a_saved_adapter(tiny_llama_dir, tmp_path, capsys):
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    model = get_lora_model(base, random_lora(target_modules="all-linear"))
    model.save_pretrained(tmp_path / "adapter", base_model_name_or_path=tiny_llama_dir)
    ids = torch.randint(0, base.config.vocab_size, (2, 12))
    assert main(["export", str(tmp_path / "adapter"), "--gguf", "--quant", "f32", "--output", str(tmp_path)]) == 0
    path = tmp_path / "adapter-merged-f32.gguf"
    assert f"wrote {path}" in capsys.readouterr().out
    torch.testing.assert_close(_logits(_load(path), ids), _logits(model, ids), atol=1e-5, rtol=1e-5)
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert main(["export", str(tmp_path / "adapter"), "--gguf", "--quant", "q4"]) == 2
    assert "unsupported GGUF quant 'q4'; allowed: f32, f16, q8_0" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "adapter"), "--gguf", "--adapter-only", "--output", str(tmp_path)]) == 0
    updates, alpha = _lora_update(tmp_path / "adapter-lora-f32.gguf")
    assert alpha == 8.0 and len(updates) == 7 * 2


def _lora_update(path):
    """llama.cpp's reading of a LoRA adapter file: per base tensor, scale·lora_b·lora_a, with scale = alpha / r
    (r from the tensor) when alpha is non-zero, else 1 (llama-adapter.h, get_scale)."""
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    alpha = reader.fields["adapter.lora.alpha"].contents()
    tensors = dequantized(path)
    updates = {}
    for name in tensors:
        if name.endswith(".lora_a"):
            base = name.removesuffix(".lora_a")
            a, b = tensors[name], tensors[f"{base}.lora_b"]  # (r, in), (out, r)
            updates[base] = (alpha / b.shape[1] if alpha else 1.0) * (b.astype(np.float64) @ a)
    return updates, alpha


@pytest.mark.parametrize("rslora", [False, True])
def test_adapter_alone_rebuilds_the_merged_file(rslora, tmp_path):
    """base file + llama.cpp's update from the adapter file = the merged file (whose logits are checked above),
    tensor by tensor, Q/K permutation included (tiny_llama has 4 query heads and 2 key/value heads)."""
    config = random_lora(target_modules=["q_proj", "k_proj", "v_proj", "down_proj"], use_rslora=rslora)
    model = get_lora_model(tiny_llama(), config)
    adapter = write_gguf_adapter(model, tmp_path / "lora.gguf")
    merged = dequantized(export_merged(model, tmp_path / "merged.gguf", format="gguf", quant="f32"))
    base = dequantized(export_merged(model, tmp_path / "base.gguf", adapter_names=[], format="gguf", quant="f32"))
    updates, alpha = _lora_update(adapter)
    assert alpha == (0.0 if rslora else 8.0)  # rsLoRA's alpha/sqrt(r) is folded into lora_b, alpha 0 means scale 1
    assert len(updates) == 2 * 4
    for name, update in updates.items():
        np.testing.assert_allclose(base[name] + update, merged[name], rtol=0, atol=1e-6)
    assert all(np.array_equal(base[n], merged[n]) for n in merged if n not in updates)
    names = {t.name: t for t in gguf.GGUFReader(adapter).tensors}
    a, b = names["blk.0.attn_k.weight.lora_a"], names["blk.0.attn_k.weight.lora_b"]
    # ggml lists dimensions innermost first: lora_a (in, r), lora_b (r, out), as llama.cpp's loader checks them
    assert [int(d) for d in a.shape] == [32, 4] and [int(d) for d in b.shape] == [4, 16]


def test_adapter_alone_refuses_what_llama_cpp_cannot_hold(tmp_path):
    model = get_lora_model(tiny_llama(), random_lora(target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match=r"uses DoRA, which llama.cpp LoRA adapters cannot hold"):
        write_gguf_adapter(model, tmp_path / "dora.gguf")
    with pytest.raises(ValueError, match=r"unsupported GGUF quant 'q5'"):
        write_gguf_adapter(model, tmp_path / "dora.gguf", quant="q5")
    assert not list(tmp_path.iterdir())
