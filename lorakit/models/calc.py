"""Parameter arithmetic from a config alone: the model is built on the meta device (no weights, no memory).

``count_parameters("llama-2-7b", LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))`` answers what PEFT's
``print_trainable_parameters`` would print, per-target details, and the adapter file size, for models you do
not have on disk. The presets carry the public dimensions of well-known architectures.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.config import LoraConfig
from ..core.errors import InvalidValue, MissingDependency
from ..core.families import family_of, preset_classes
from ..core.inject import ModulesToSave, describe_targets, find_targets
from ..core.layers import LoraLinear, is_conv1d
from ..core.quant import head_names, in_head
from .embedded_models import build_model
from .model import LoraModel, get_lora_model

# Public architecture dimensions (from each model's published config.json).
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-2-7b": ("llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                 num_key_value_heads=32, intermediate_size=11008, vocab_size=32000)),
    "llama-2-13b": ("llama", dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                                  num_key_value_heads=40, intermediate_size=13824, vocab_size=32000)),
    "llama-2-70b": ("llama", dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                                  num_key_value_heads=8, intermediate_size=28672, vocab_size=32000)),
    "llama-3-8b": ("llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                 num_key_value_heads=8, intermediate_size=14336, vocab_size=128256)),
    "mistral-7b": ("mistral", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                   num_key_value_heads=8, intermediate_size=14336, vocab_size=32000)),
    "gpt2": ("gpt2", dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024)),
    "bert-base": ("bert", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                               intermediate_size=3072, vocab_size=30522, num_labels=2)),
}


def preset_model(name: str) -> torch.nn.Module:
    """A preset architecture built on the meta device (Llama/Mistral/GPT-2 with their LM head, BERT as a
    2-label sequence classifier)."""
    if name not in PRESETS:
        raise InvalidValue(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    try:
        import transformers
    except ImportError:
        raise MissingDependency("model presets need transformers: pip install 'lorakit[hf]'") from None
    family, dims = PRESETS[name]
    config_class, model_class = (getattr(transformers, n) for n in preset_classes(family))
    with torch.device("meta"):
        return model_class(config_class(**dims))


def meta_model(spec: str, trust_remote_code: bool = False) -> torch.nn.Module:
    """A model built on the meta device from a preset name, ``default``, ``minilm``, a model folder or a
    ``config.json`` (shapes without weights: no memory, no time)."""
    if spec in PRESETS:
        return preset_model(spec)
    if spec in ("default", "minilm") or Path(spec).exists():
        return build_model(spec, meta=True, trust_remote_code=trust_remote_code)
    raise InvalidValue(f"unknown model {spec!r}: use a preset ({', '.join(PRESETS)}), 'default', 'minilm', a model "
                       f"folder or a config.json")


def count_parameters(model: torch.nn.Module, config: LoraConfig) -> dict[str, Any]:
    """What ``config`` adds to ``model`` (best built on the meta device), counted as PEFT counts.
    ``model`` itself is not changed (a copy is wrapped).

    Returns:
        ``trainable`` and ``total`` (PEFT's two numbers, modules_to_save copies included), ``line`` (PEFT's
        printed line), ``targets`` (one row per module name suffix: type, weight shape, count, params each and in
        all), ``adapter_bytes`` for fp32 and bf16 files (tensor data; the header adds a few KiB).
    """
    rows = describe_targets(model, config)
    groups: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
    for row in rows:
        leaf = row["name"].rsplit(".", 1)[-1]
        key = (leaf, row["type"], tuple(row["shape"]), row["r"])
        group = groups.setdefault(key, {"module": leaf, "type": row["type"], "shape": row["shape"], "r": row["r"],
                                        "count": 0, "params_each": row["params"], "params": 0})
        group["count"] += 1
        group["params"] += row["params"]
    base_total = sum(p.numel() for p in model.parameters())
    lora = get_lora_model(copy.deepcopy(model), config)  # on the meta device the copy costs no memory
    trainable, total = lora.get_nb_trainable_parameters()
    saved = trainable  # what the adapter file holds: LoRA tensors, trained heads and biases
    return {
        "trainable": trainable,
        "total": total,
        "base_total": base_total,
        "lora_params": sum(row["params"] for row in rows),
        "modules_to_save": [name for name, _ in lora.saved_modules()],
        "line": f"trainable params: {trainable:,d} || all params: {total:,d} || "
                f"trainable%: {100 * trainable / total:.4f}",
        "targets": list(groups.values()),
        "adapter_bytes": {"fp32": 4 * saved, "bf16": 2 * saved},
    }


def four_bit_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes bitsandbytes stores for one 4-bit (NF4/FP4) weight of ``numel`` values.

    Half a byte per value, plus one scale per block of ``blocksize`` values: an fp32 absmax, or with double
    quantization one byte per block plus an fp32 scale per 256 blocks and one fp32 offset. (The lookup tables,
    a few hundred bytes per layer, are left out.)
    """
    blocks = math.ceil(numel / blocksize)
    scales = blocks + 4 * math.ceil(blocks / 256) + 4 if double_quant else 4 * blocks
    return math.ceil(numel / 2) + scales


# -- memory ----------------------------------------------------------------------------------------------

METHODS = ("full", "lora", "qlora", "prompt")
OPTIMIZERS = ("adamw", "sgd")
DTYPES = {"fp32": 4, "bf16": 2}
# Resident memory of a training process before any model: Python, PyTorch, transformers and a tokenizer,
# measured on the CPU this was written on (bench/memory.py prints it). On a GPU the CUDA context plays this part.
RUNTIME_BYTES = 360 * 2**20
CHUNK_LOGITS = 2**22  # logits per chunk of lorakit's chunked cross-entropy (see lorakit.training.loss)


@dataclass
class Dims:
    """What the memory of a transformer's training step depends on, from its config."""

    hidden: int
    kv_hidden: int  # keys/values width (grouped-query attention: less than hidden)
    intermediate: int
    layers: int
    heads: int
    vocab: int
    gated: bool  # a gated MLP (Llama's gate/up/down) or a plain one (GPT-2, BERT)

    @classmethod
    def of(cls, model: torch.nn.Module) -> Dims:
        config = getattr(model, "config", None)
        get = lambda *names, default=None: next((getattr(config, n) for n in names  # noqa: E731
                                                  if getattr(config, n, None) is not None), default)
        hidden = get("hidden_size", "n_embd", "d_model")
        if config is None or hidden is None:
            raise InvalidValue(f"memory estimates need a transformer with a Hugging Face config; "
                               f"{type(model).__name__} has none")
        heads = get("num_attention_heads", "n_head")
        kv_heads = get("num_key_value_heads", default=heads)
        return cls(hidden=hidden, kv_hidden=hidden * kv_heads // heads,
                   intermediate=get("intermediate_size", "n_inner", default=4 * hidden),
                   layers=get("num_hidden_layers", "n_layer"), heads=heads, vocab=get("vocab_size"),
                   gated=get("hidden_act", "activation_function", default="") in ("silu", "swiglu")
                   or family_of(getattr(config, "model_type", None)).gated_mlp)


@dataclass
class MemoryEstimate:
    """Peak memory of one training step, by part (bytes)."""

    method: str
    batch: int
    seq: int
    dtype: str
    optimizer: str
    grad_checkpointing: bool
    trainable: int
    weights: int
    gradients: int
    optimizer_states: int
    activations: int
    logits: int
    runtime: int
    adapter: str = ""  # lora/qlora: the adapter the estimate assumes, e.g. "r=8 on all-linear (210 modules)"
    reference: int = 0  # a frozen copy of the model (preference training with full fine-tuning)

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.optimizer_states + self.activations + self.logits
                + self.runtime + self.reference)

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total": self.total}


# Where a trained linear layer sits in a transformer layer, by the end of its name (most specific first).
_PLACES = (("attention output", ("o_proj", "out_proj", "attn.c_proj", "attention.output.dense")),
           ("mlp output", ("down_proj", "mlp.c_proj", "output.dense", "fc2")),
           ("attention input", ("q_proj", "k_proj", "v_proj", "c_attn", "query", "key", "value")),
           ("mlp input", ("gate_proj", "up_proj", "c_fc", "intermediate.dense", "fc1")))


def _place(name: str) -> str | None:
    return next((place for place, ends in _PLACES if any(name == e or name.endswith("." + e) for e in ends)), None)


def _linear_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or is_conv1d(m)]


def _saved_per_token(d: Dims, trained: list[str], full: bool, lora_r: int) -> int:
    """Values one transformer layer keeps for the backward pass, per token.

    Counted op by op for a pre-norm decoder layer (Llama's; GPT-2 and BERT differ in details): the inputs of both
    norms; the attention kernel's query, keys, values and output (a fused kernel: no seq × seq matrix); the MLP's
    activation input and the operands of its gating product. A linear layer's input is kept only when its weight
    trains (a frozen weight needs no input to pass the gradient back), and each LoRA layer keeps its r-wide x·Aᵀ.
    """
    h, kv, i = d.hidden, d.kv_hidden, d.intermediate
    saved = 2 * h  # the inputs of the two norms
    saved += h + 2 * kv + h + d.heads  # attention: q, k, v, output, log-sum-exp per head
    saved += 3 * i if d.gated else 2 * i  # gate output, its activation, up output (plain MLP: fc output, activation)
    if full:
        saved += 2 * h  # the normalized inputs, now that the norms' weights train
    widths = {"attention input": h, "attention output": h, "mlp input": h, "mlp output": i}
    places = {_place(name) for name in trained} - {None}
    saved += sum(widths[p] for p in places)
    saved += lora_r * len(trained) // max(1, d.layers)  # x·Aᵀ of each LoRA layer
    return saved


def estimate_memory(model: torch.nn.Module, method: str, batch: int, seq: int, dtype: str = "bf16",
                    grad_checkpointing: bool = False, optimizer: str = "adamw", lora: LoraConfig | None = None,
                    num_virtual_tokens: int = 20, runtime: int = RUNTIME_BYTES, base_dtype: str | None = None,
                    double_quant: bool = True) -> MemoryEstimate:
    """Peak memory of one training step of ``model`` (best built on the meta device) as lorakit trains it.

    Weights: full fine-tuning keeps fp32 masters; LoRA, QLoRA and prompt tuning keep the frozen base in ``base_dtype``
    (QLoRA's linear layers, all but the head, in 4 bits) and their trainable parameters in fp32, with fp32
    gradients and optimizer states (AdamW: two per parameter; SGD without momentum: none). Activations: see
    :func:`_saved_per_token`, in ``dtype``, for ``batch × seq`` tokens (plus the virtual tokens of prompt
    tuning); with gradient checkpointing only each layer's input is kept, plus one layer recomputed. Logits:
    lorakit's chunked loss holds one chunk of logits and its gradient at a time, in fp32.

    Args:
        method: ``full``, ``lora``, ``qlora`` or ``prompt``.
        lora: The adapter for ``lora``/``qlora`` (default: r=8 on all linear layers).
        runtime: Bytes the process takes before the model (Python and the libraries).
        base_dtype: The frozen base's weights when they differ from the activations' ``dtype`` (a bf16 checkpoint
            trained in fp32 keeps its bf16 base); default: ``dtype``. Full fine-tuning keeps fp32 masters either way.
        double_quant: QLoRA's block scales quantized too (:func:`four_bit_bytes`).
    """
    if method not in METHODS:
        raise InvalidValue(f"unknown method {method!r}; methods: {', '.join(METHODS)}")
    if optimizer not in OPTIMIZERS:
        raise InvalidValue(f"unknown optimizer {optimizer!r}; optimizers: {', '.join(OPTIMIZERS)}")
    for name, value in (("dtype", dtype), ("base_dtype", base_dtype or dtype)):
        if value not in DTYPES:
            raise InvalidValue(f"unknown {name} {value!r}; dtypes: {', '.join(DTYPES)}")
    for name, value in (("batch", batch), ("seq", seq)):
        if not isinstance(value, int) or value < 1:
            raise InvalidValue(f"{name} must be a positive integer, got {value!r}")
    d, size, base_size = Dims.of(model), DTYPES[dtype], DTYPES[base_dtype or dtype]
    params = {n: p.numel() for n, p in model.named_parameters()}
    total = sum(params.values())
    tokens = batch * seq
    lora_r, adapter = 0, ""
    if method in ("lora", "qlora"):
        lora = lora or LoraConfig(r=8, target_modules="all-linear")
        result = count_parameters(model, lora)
        trainable, trained, lora_r = result["trainable"], find_targets(model, lora), lora.r
        spec = lora.target_modules if isinstance(lora.target_modules, str) else ",".join(sorted(lora.target_modules))
        adapter = f"r={lora.r} on {spec} ({len(trained)} modules)"
        weights = base_size * total + 4 * trainable
        if method == "qlora":  # every nn.Linear but the head in 4 bits, as lorakit.core.quant.quantize does
            heads = head_names(model)
            four_bit = [m.weight.numel() for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and not in_head(n, heads)]
            weights += sum(four_bit_bytes(n, double_quant=double_quant) for n in four_bit) - base_size * sum(four_bit)
    elif method == "prompt":
        trainable, trained = num_virtual_tokens * d.hidden, []
        weights = base_size * total + 4 * trainable
        tokens = batch * (seq + num_virtual_tokens)
    else:
        trainable, trained = total, _linear_names(model)
        weights = 4 * total
    per_layer = _saved_per_token(d, trained, method == "full", lora_r)
    if grad_checkpointing:
        activations = tokens * size * (d.hidden * d.layers + per_layer)
    else:
        activations = tokens * size * per_layer * d.layers
    activations += tokens * size * 2 * d.hidden  # the final norm; the loss keeps the hidden states it reads
    logits = 2 * 4 * min(tokens * d.vocab, CHUNK_LOGITS) if d.vocab else 0
    states = {"adamw": 2, "sgd": 0}[optimizer]
    return MemoryEstimate(method=method, batch=batch, seq=seq, dtype=dtype, optimizer=optimizer,
                          grad_checkpointing=grad_checkpointing, trainable=trainable, weights=weights,
                          gradients=4 * trainable, optimizer_states=4 * states * trainable,
                          activations=activations, logits=logits, runtime=runtime, adapter=adapter)


# -- FLOPs -----------------------------------------------------------------------------------------------

@dataclass
class StepFlops:
    """The useful floating-point operations of one training step (a multiply-add counts 2), by pass."""

    forward: int
    backward: int

    @property
    def total(self) -> int:
        return self.forward + self.backward


def _attention_dims(model: torch.nn.Module) -> tuple[int, int, int]:
    """(layers, heads, head width) of a Hugging Face transformer's attention."""
    config = getattr(model, "config", None)

    def get(*names: str) -> int | None:
        return next((getattr(config, n) for n in names if isinstance(getattr(config, n, None), int)), None)

    hidden, heads, layers = get("hidden_size", "n_embd", "d_model"), get("num_attention_heads", "n_head"), get(
        "num_hidden_layers", "n_layer")
    if hidden is None or heads is None or layers is None:
        raise InvalidValue(f"FLOP counts need a transformer with a Hugging Face config; {type(model).__name__} "
                           f"gives no hidden size, head count and layer count")
    if getattr(config, "is_encoder_decoder", False):
        raise InvalidValue(f"FLOP counts cover decoder-only and encoder-only transformers; {type(model).__name__} "
                           f"is an encoder-decoder (two stacks and cross-attention are not counted)")
    return layers, heads, get("head_dim") or hidden // heads


@dataclass
class FlopCounter:
    """A model's useful FLOPs as rates: per token, per output-head row and per attention (query, key) pair.

    Built once by :func:`flop_counter`; :meth:`step` gives one step's FLOPs from its rows' lengths.
    """

    token_forward: int  # every linear layer but the head, its LoRA adapters included
    token_backward: int
    head_forward: int  # the output head (LM head or classifier), per row it runs on
    head_backward: int
    pair_forward: int  # attention, all layers, per (query, key) pair; the backward pass is twice this
    causal: bool

    def step(self, lengths: list[int], head_rows: int | None = None) -> StepFlops:
        """FLOPs of a forward and backward pass over sequences of ``lengths`` tokens (no padding), the head running
        on ``head_rows`` rows (default: every token)."""
        if not lengths or any(not isinstance(s, int) or s < 0 for s in lengths):
            raise InvalidValue(f"lengths must be a non-empty list of token counts ≥ 0, got {lengths!r}")
        tokens = sum(lengths)
        head_rows = tokens if head_rows is None else head_rows
        if not 0 <= head_rows <= tokens:
            raise InvalidValue(f"head_rows must lie between 0 and the {tokens} tokens, got {head_rows}")
        pairs = sum(s * (s + 1) // 2 if self.causal else s * s for s in lengths)
        return StepFlops(
            forward=tokens * self.token_forward + head_rows * self.head_forward + pairs * self.pair_forward,
            backward=tokens * self.token_backward + head_rows * self.head_backward + 2 * pairs * self.pair_forward)


def _running_modules(module: torch.nn.Module, prefix: str = ""):
    """``named_modules()`` less what does not run: of a ``modules_to_save`` wrapper, only its current copy."""
    yield prefix, module
    if isinstance(module, ModulesToSave):
        yield from _running_modules(module.current(), prefix + ".current")
        return
    for name, child in module.named_children():
        yield from _running_modules(child, f"{prefix}.{name}" if prefix else name)


def flop_counter(model: torch.nn.Module, causal: bool | None = None) -> FlopCounter:
    """The useful FLOPs of training ``model``, counted from its architecture (matrix products only: norms,
    activations and the softmax are left out, as MFU conventions do; so is work that is not useful, such as
    gradient checkpointing's recomputation and padding).

    - forward: ``2·in·out`` per row per linear layer, plus ``2·r·(in + out)`` per unmerged LoRA adapter on it;
      attention ``4·heads·head_dim`` per (query, key) pair in each layer: ``s(s+1)/2`` pairs in a causal sequence
      of ``s`` tokens, ``s²`` otherwise;
    - backward: the input gradients of every product (as much again as the forward), plus the weight gradients
      of the products whose weights train (LoRA's A and B; every weight in full fine-tuning), ``2·in·out`` each.

    Every linear layer runs on every token except the output head (the LM head or a classifier), which runs on
    the rows given to :meth:`FlopCounter.step`: the positions with a target (the useful logits) or one per
    example for a classifier. Not counted: embedding and convolution adapters, trainable tokens, the virtual
    tokens of prompt tuning. Small known overcounts: the first layer's input gradients (autograd skips them when
    the embeddings are frozen) and a BERT pooler's product, counted per token.

    Args:
        model: A Hugging Face decoder-only or encoder-only transformer, bare or with LoRA adapters (a meta-device
            model works).
        causal: Causal attention; default: the model's attention modules say so (``is_causal``), as in every
            decoder-only model.

    Raises:
        ValueError: The model has no transformer config, or is an encoder-decoder.
    """
    inner = model.model if isinstance(model, LoraModel) else model
    layers, n_heads, head_dim = _attention_dims(inner)
    heads = head_names(inner)
    rates = {True: [0, 0], False: [0, 0]}  # in the head?: [forward, backward] per row
    for name, module in _running_modules(inner):
        if isinstance(module, LoraLinear):
            for adapter_name in module._unmerged_active():
                adapter = module.adapters[adapter_name]
                flops = 2 * adapter.r * (module.in_features + module.out_features)
                rate = rates[in_head(name, heads)]
                rate[0] += flops
                rate[1] += flops * (2 if adapter.lora_A.requires_grad else 1)
        elif isinstance(module, torch.nn.Linear) or is_conv1d(module):
            # (a quantized Linear4bit's weight is packed: its logical shape is in the features)
            flops = 2 * (module.in_features * module.out_features if isinstance(module, torch.nn.Linear)
                         else module.weight.numel())
            rate = rates[in_head(name, heads)]
            rate[0] += flops
            rate[1] += flops * (2 if module.weight.requires_grad else 1)
    if causal is None:
        causal = any(getattr(m, "is_causal", False) is True for m in inner.modules())
    return FlopCounter(token_forward=rates[False][0], token_backward=rates[False][1], head_forward=rates[True][0],
                       head_backward=rates[True][1], pair_forward=4 * layers * n_heads * head_dim, causal=causal)


def training_flops(model: torch.nn.Module, lengths: list[int], head_rows: int | None = None,
                   causal: bool | None = None) -> StepFlops:
    """Useful FLOPs of one forward and backward pass of ``model`` over sequences of ``lengths`` tokens, the output
    head running on ``head_rows`` rows (default: every token). See :func:`flop_counter` for what is counted."""
    return flop_counter(model, causal).step(lengths, head_rows)
