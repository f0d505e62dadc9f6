"""GGUF files for llama.cpp and Ollama: the merged model, or a LoRA adapter alone.

The files are what llama.cpp's own converters write (``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``):
tensor names from the ``gguf`` package's name map (``blk.N.attn_q.weight`` ...), the architecture's metadata keys,
and the rows of the query and key projections reordered for llama.cpp's rotary embedding (below). Matrices are
stored as F32, F16 or Q8_0; vectors (norms, biases) always as F32, as llama.cpp's converter does.

Q/K rows. Hugging Face's Llama rotates the two halves of each head, (x[i], x[i + d/2]); llama.cpp rotates adjacent
pairs, (x[2i], x[2i + 1]). Within each head, output row ``i + d/2·j`` (half j ∈ {0, 1}) of W_q and W_k therefore
moves to row ``2i + j``. A LoRA update B·A has the rows of B, so an adapter's ``lora_b`` moves the same way and its
``lora_a`` stays as it is.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..core.errors import InvalidValue, MissingDependency
from ..core.families import family_of, gguf_families
from .io import atomic_write

if TYPE_CHECKING:
    from ..models.model import LoraModel

QUANTS = ("f32", "f16", "q8_0")

# llama.cpp's names for the byte-level BPE pre-tokenizers lorakit recognizes in a tokenizer.json: GPT-2's regex
# alone, or split into single digits first (SmolLM's). Both list their regexes in llama.cpp's llama-vocab.cpp.
_PRE_TOKENIZERS = {("ByteLevel",): "gpt-2", ("Digits", "ByteLevel"): "smollm"}


def require_gguf():
    try:
        import gguf
    except ImportError:
        raise MissingDependency("writing GGUF files needs the gguf package: pip install 'lorakit[hf]'") from None
    return gguf


def check_architecture(model: torch.nn.Module) -> None:
    """Raise the ValueError :func:`write_gguf_model` would, for a model it cannot write (checked before merging)."""
    _Arch(model)


def check_quant(quant: str) -> str:
    """``quant`` if it is one of :data:`QUANTS`; a ValueError naming it otherwise."""
    if quant not in QUANTS:
        raise InvalidValue(f"unsupported GGUF quant {quant!r}; allowed: {', '.join(QUANTS)}")
    return quant


def permute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """The rows of a query or key projection (or its bias) in llama.cpp's order: within each of the ``n_head``
    heads, row ``i + d/2·j`` goes to ``2i + j`` (d: the head size). See the module docstring."""
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise InvalidValue(f"{rows} rows do not split into {n_head} heads of an even size")
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


# -- the model's shape --------------------------------------------------------------------------------------------


class _Arch:
    """What the writers need to know of a Hugging Face causal LM: its GGUF architecture and head counts."""

    def __init__(self, model: torch.nn.Module) -> None:
        gguf = require_gguf()
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if family_of(model_type).gguf is None:
            kind = f"model_type {model_type!r}" if model_type else type(model).__name__
            raise InvalidValue(f"GGUF export supports the {', '.join(gguf_families())} architectures "
                               f"(LlamaForCausalLM, MistralForCausalLM); this model is {kind} ({type(model).__name__})")
        if not hasattr(model, "lm_head"):
            raise InvalidValue(f"GGUF export writes causal language models (LlamaForCausalLM, MistralForCausalLM); "
                               f"{type(model).__name__} has no lm_head")
        self.config = config
        # Mistral is written as llama.cpp's own converter writes it: the llama architecture, which has no sliding
        # window, so the context is capped at the window, within which full attention is the same.
        window = getattr(config, "sliding_window", None)
        self.context_length = min(config.max_position_embeddings, window or config.max_position_embeddings)
        self.name = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
        self.n_head = config.num_attention_heads
        self.n_head_kv = getattr(config, "num_key_value_heads", None) or self.n_head
        self.n_layer = config.num_hidden_layers
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_head
        self.names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, self.n_layer)
        if getattr(config, "hidden_act", "silu") != "silu":
            raise InvalidValue(f"llama.cpp's llama architecture computes SiLU; this model uses {config.hidden_act!r}")
        rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
        self.rope = rope
        self.rope_theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        self.rope_type = rope.get("rope_type", rope.get("type", "default"))
        if self.rope_type not in ("default", "llama3") or rope.get("partial_rotary_factor", 1.0) != 1.0:
            # llama.cpp stores other scalings as keys that transformers' GGUF reader ignores, so such a file could
            # not be checked here; refused rather than written unchecked.
            raise InvalidValue(f"GGUF export supports plain and Llama 3 RoPE (rope_type 'default', 'llama3'); this "
                               f"model uses {rope}")

    def rope_freqs(self) -> torch.Tensor | None:
        """Llama 3's RoPE as llama.cpp takes it: a ``rope_freqs`` vector by which each rotary frequency of plain
        RoPE is divided (the ratio of plain to Llama-3 frequencies transformers computes); None for plain RoPE."""
        if self.rope_type != "llama3":
            return None
        rope, dim = self.rope, self.head_dim
        plain = 1.0 / self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,)
        original = rope["original_max_position_embeddings"]
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        wavelength = 2 * math.pi / plain
        smooth = (original / wavelength - low) / (high - low)  # 0 at the long end of the band, 1 at the short end
        ratio = torch.where(wavelength < original / high, torch.ones_like(plain),
                            torch.where(wavelength > original / low, torch.full_like(plain, factor),
                                        1 / ((1 - smooth) / factor + smooth)))
        return ratio.float()

    def tensor_name(self, key: str) -> str:
        """The GGUF name of a Hugging Face state-dict key (``model.layers.0.self_attn.q_proj.weight`` ->
        ``blk.0.attn_q.weight``)."""
        name = self.names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise InvalidValue(f"tensor {key!r} has no GGUF name in llama.cpp's {self.name} layout")
        return name

    def llama_cpp_rows(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (a weight, bias or lora_B of ``key``) with the rows in llama.cpp's order."""
        module = key.rsplit(".", 2)[-2] if key.endswith((".weight", ".bias")) else key.rsplit(".", 1)[-1]
        if module == "q_proj":
            return permute_rows(tensor, self.n_head)
        if module == "k_proj":
            return permute_rows(tensor, self.n_head_kv)
        return tensor


# -- writing ------------------------------------------------------------------------------------------------------


def _gguf_type(quant: str):
    gguf = require_gguf()
    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "q8_0": gguf.GGMLQuantizationType.Q8_0}[quant]


def _add_tensor(writer: Any, name: str, tensor: torch.Tensor, quant: str) -> None:
    """Store a tensor as llama.cpp's converter does: vectors and non-weights F32, matrices in ``quant``; a matrix
    whose rows do not split into Q8_0's blocks of 32 falls back to F16."""
    gguf = require_gguf()
    data = tensor.detach().to(torch.float32).cpu().numpy()
    qtype = _gguf_type(quant) if data.ndim > 1 and name.endswith((".weight", ".lora_a", ".lora_b")) else \
        gguf.GGMLQuantizationType.F32
    try:
        packed = gguf.quants.quantize(data, qtype)
    except gguf.QuantError:
        qtype = gguf.GGMLQuantizationType.F16
        packed = gguf.quants.quantize(data, qtype)
    writer.add_tensor(name, packed, raw_dtype=qtype)


def _write(writer: Any, path: Path) -> Path:
    """Write the file under a temporary name in its folder, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        try:
            writer.write_header_to_file(Path(tmp))
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    atomic_write(path, write)
    return path


def _model_name(config: Any) -> str:
    name = str(getattr(config, "_name_or_path", "") or "").rstrip("/")
    return name.rsplit("/", 1)[-1] or "model"


def write_gguf_model(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     tokenizer: Any = None, quant: str = "f16") -> Path:
    """Write a Hugging Face causal LM's weights ``state`` (its ``state_dict()`` keys, e.g. with adapters merged in)
    as one GGUF file for llama.cpp.

    Args:
        model: The plain model the state belongs to (for its config).
        state: Its weights by state-dict key.
        path: The ``.gguf`` file to write (replaced if it exists).
        tokenizer: The tokenizer to describe in the file: a Hugging Face tokenizer (byte-level BPE), the path of a
            GGUF file whose ``tokenizer.*`` keys are copied, or None (weights only: llama.cpp needs a tokenizer,
            transformers does not).
        quant: ``f16`` (default), ``q8_0`` or ``f32``.
    """
    gguf = require_gguf()
    check_quant(quant)
    arch = _Arch(model)
    config = arch.config
    writer = gguf.GGUFWriter(None, arch.name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(_model_name(config))
    writer.add_block_count(arch.n_layer)
    writer.add_context_length(arch.context_length)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(arch.n_head)
    writer.add_head_count_kv(arch.n_head_kv)
    writer.add_rope_freq_base(arch.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(arch.head_dim)
    writer.add_value_length(arch.head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(arch.head_dim)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if tokenizer is not None:
        _add_tokenizer(writer, tokenizer, config.vocab_size)

    embed = state.get("model.embed_tokens.weight")
    for key, tensor in state.items():
        if key == "lm_head.weight" and embed is not None and getattr(config, "tie_word_embeddings", False) \
                and torch.equal(tensor, embed):
            continue  # tied: llama.cpp reads the output projection from token_embd when output.weight is absent
        if key.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from the metadata
        _add_tensor(writer, arch.tensor_name(key), arch.llama_cpp_rows(key, tensor), quant)
    freqs = arch.rope_freqs()
    if freqs is not None:
        _add_tensor(writer, gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", freqs, quant)
    return _write(writer, Path(path))


def write_gguf_adapter(model: LoraModel, path: str | os.PathLike, adapter_name: str | None = None,
                       quant: str = "f32") -> Path:
    """Write one LoRA adapter alone as a llama.cpp LoRA adapter (``llama-cli -m base.gguf --lora FILE``).

    Tensors ``<gguf name>.lora_a`` (r × in) and ``.lora_b`` (out × r, Q/K rows reordered as the base's), with
    ``adapter.lora.alpha``: llama.cpp scales each update by alpha / r (r read from the tensor). An adapter whose
    scaling is not alpha / r with one alpha for every module (rsLoRA, ``rank_pattern``, ``alpha_pattern``) has its
    scaling folded into ``lora_b`` and alpha 0, which llama.cpp reads as scale 1.

    Args:
        model: The LoraModel holding the adapter (its base must be a Llama causal LM).
        path: The ``.gguf`` file to write.
        adapter_name: Which adapter (default: the one active adapter).
        quant: ``f32`` (default, as llama.cpp's converter), ``f16`` or ``q8_0``.

    Raises:
        ValueError: The adapter uses what llama.cpp's LoRA format cannot hold (DoRA, lora_bias, embedding or
            convolution layers, trained heads or tokens), or the base is not supported.
    """
    gguf = require_gguf()
    check_quant(quant)
    from ..core.layers import LoraLinear

    name = _one_adapter(model, adapter_name)
    arch = _Arch(model.model)
    modules = []
    for owner, layer in model.lora_layers():
        if name not in layer.adapters:
            continue
        adapter = layer.adapters[name]
        if not isinstance(layer, LoraLinear) or layer.fan_in_fan_out:
            raise InvalidValue(f"{owner}: llama.cpp LoRA adapters hold linear layers only, not {type(layer).__name__}")
        if adapter.use_dora or adapter.lora_B_bias is not None:
            kind = "DoRA" if adapter.use_dora else "lora_bias"
            raise InvalidValue(f"{owner}: adapter {name!r} uses {kind}, which llama.cpp LoRA adapters cannot hold; "
                               f"export the merged model instead")
        if owner == "lm_head" and getattr(arch.config, "tie_word_embeddings", False):
            raise InvalidValue(f"{owner}: adapter {name!r} changes the output projection, which this model ties to "
                               f"the embedding (no output.weight in its GGUF for llama.cpp to apply it to); export the "
                               f"merged model instead")
        modules.append((owner, adapter))
    heads = [owner for owner, module in model.saved_modules() if name in module.modules_to_save]
    if heads:
        raise InvalidValue(f"adapter {name!r} trains {', '.join(heads)} in full, which llama.cpp LoRA adapters cannot "
                           f"hold; export the merged model instead")
    if not modules:
        raise InvalidValue(f"adapter {name!r} has no LoRA layers")
    alphas = {adapter.lora_alpha for _, adapter in modules}
    plain = len(alphas) == 1 and all(math.isclose(a.scaling, a.lora_alpha / a.r, rel_tol=1e-12) for _, a in modules)
    alpha = float(next(iter(alphas))) if plain else 0.0

    writer = gguf.GGUFWriter(None, arch.name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(_model_name(arch.config))
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for owner, adapter in modules:
        key = f"{owner}.weight"
        lora_b = adapter.lora_B.detach().float()  # (out, r)
        if not plain:
            lora_b = lora_b * adapter.scaling
        tensor = arch.tensor_name(key)
        _add_tensor(writer, f"{tensor}.lora_a", adapter.lora_A.detach().float(), quant)  # (r, in)
        _add_tensor(writer, f"{tensor}.lora_b", arch.llama_cpp_rows(key, lora_b), quant)
    return _write(writer, Path(path))


def _one_adapter(model: LoraModel, adapter_name: str | None) -> str:
    if adapter_name is not None:
        if adapter_name not in model.peft_config:
            raise InvalidValue(f"no adapter {adapter_name!r}; the model has {sorted(model.peft_config)}")
        return adapter_name
    active = model.active_adapters
    if len(active) != 1:
        raise InvalidValue(f"a GGUF adapter file holds one adapter; {len(active)} are active ({active}): pass "
                           f"adapter_name")
    return active[0]


# -- tokenizer metadata -------------------------------------------------------------------------------------------


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    if isinstance(tokenizer, (str, os.PathLike)):
        _copy_tokenizer(writer, Path(tokenizer), vocab_size)
    else:
        _describe_tokenizer(writer, tokenizer, vocab_size)


def _copy_tokenizer(writer: Any, source: Path, vocab_size: int) -> None:
    """Copy the ``tokenizer.*`` keys of another GGUF file (e.g. the one the base model came from)."""
    gguf = require_gguf()
    if source.suffix != ".gguf" or not source.is_file():
        raise InvalidValue(f"tokenizer {str(source)!r} is not a .gguf file; pass a Hugging Face tokenizer, a .gguf "
                           f"file to copy the tokenizer from, or None")
    reader = gguf.GGUFReader(source)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise InvalidValue(f"{source} holds no tokenizer (tokenizer.ggml.tokens)")
    if len(tokens.data) != vocab_size:
        raise InvalidValue(f"the tokenizer in {source} has {len(tokens.data)} tokens; the model's vocabulary has "
                           f"{vocab_size}")
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)


def _describe_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """Write a Hugging Face byte-level BPE tokenizer (GPT-2, SmolLM, Llama 3 style) as llama.cpp's ``gpt2`` model:
    tokens by id, their types, the merges, the pre-tokenizer's name, special ids, BOS/EOS flags, chat template."""
    gguf = require_gguf()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise InvalidValue(f"GGUF export describes fast (tokenizers) tokenizers only; got {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise InvalidValue(f"GGUF export describes byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3) only; this one is "
                           f"{model.get('type')} with decoder {(spec.get('decoder') or {}).get('type')}; pass a .gguf "
                           f"file to copy the tokenizer from, or tokenizer=None")
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    vocab = tokenizer.get_vocab()  # token -> id, added tokens included
    by_id = {i: t for t, i in vocab.items()}
    if len(by_id) > vocab_size:
        raise InvalidValue(f"the tokenizer has {len(by_id)} tokens; the model's vocabulary has {vocab_size}")
    added = {token.content: token for token in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:  # rows the model has beyond the tokenizer (padding to a multiple): llama.cpp's filler
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL if token not in added else
                         gguf.TokenType.CONTROL if added[token].special else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or ()]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for attribute, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                           ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, attribute, None)
        if token_id is not None:
            add(token_id)
    # Whether encoding adds BOS/EOS is what the tokenizer does, not a flag every tokenizer keeps: ask it.
    ids = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id])
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


def _pre_tokenizer_name(pre_tokenizer: Mapping[str, Any] | None) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer that lorakit recognizes."""
    steps = (pre_tokenizer or {}).get("pretokenizers") if (pre_tokenizer or {}).get("type") == "Sequence" else \
        [pre_tokenizer] if pre_tokenizer else []
    kinds = tuple(step.get("type") for step in steps)
    plain = all(step.get("use_regex", True) and not step.get("add_prefix_space", False)
                for step in steps if step.get("type") == "ByteLevel") and \
        all(step.get("individual_digits") for step in steps if step.get("type") == "Digits")
    if kinds in _PRE_TOKENIZERS and plain:
        return _PRE_TOKENIZERS[kinds]
    shown = re.sub(r"\s+", " ", json.dumps(pre_tokenizer))[:200]
    raise InvalidValue(f"GGUF export knows llama.cpp's name for the pre-tokenizers "
                       f"{', '.join(_PRE_TOKENIZERS.values())} only, not {shown}; pass a .gguf file to copy the "
                       f"tokenizer from, or tokenizer=None")


def dequantized(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file as float32, in the file's own (llama.cpp) layout, by GGUF name."""
    gguf = require_gguf()
    return {t.name: np.array(gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)]))
            for t in gguf.GGUFReader(path).tensors}  # copies: the reader's arrays are read-only views of the file
