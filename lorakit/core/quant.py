"""A 4-bit base for QLoRA: bitsandbytes' ``Linear4bit`` (NF4 or FP4, optional double quantization).

:func:`quantize` swaps a model's linear layers (all but the output head) for ``Linear4bit`` in place; LoRA then
wraps those layers unchanged (``LoraLinear`` calls ``self.base(x)``), with fp32 adapters. Everything else here
reads or rebuilds 4-bit layers: their dense weight, a dense or re-quantized layer with a merged update, and
:func:`merge_4bit`, which folds adapters into a 4-bit model (``LoraModel.merge_and_unload`` reports what that did
to the logits with :class:`MergeReport`).

bitsandbytes is imported only when a function needs it (``pip install 'lorakit[qlora]'``).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .config import SEQ_CLS_HEAD_NAMES
from .errors import InvalidValue, MissingDependency
from .inject import set_submodule
from .layers import LoraLayer, is_4bit
from .process_memory import return_freed_memory

SCHEMES = ("nf4", "fp4")


def bitsandbytes() -> ModuleType:
    """Import bitsandbytes, or say what to install."""
    try:
        # bitsandbytes logs a warning at import when it cannot fetch an optional CPU kernel from the Hub;
        # lorakit does not use that kernel (see keep_autograd_path), so the warning would only mislead.
        quiet = logging.getLogger("bitsandbytes")
        level, quiet.level = quiet.level, logging.ERROR
        try:
            import bitsandbytes as bnb
        finally:
            quiet.setLevel(level)
    except ImportError as err:
        raise MissingDependency("4-bit quantization needs bitsandbytes: pip install 'bitsandbytes>=0.46' "
                                "(or pip install -e '.[qlora]')") from err
    return bnb


def check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise InvalidValue(f"unknown quantization scheme {scheme!r}; lorakit supports {', '.join(SCHEMES)}")


def head_names(model: nn.Module) -> set[str]:
    """The module names of the output head(s), which stay in full precision (their outputs are the logits)."""
    heads = []
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if output is not None:
        heads.append(output)
    heads += [m for n in SEQ_CLS_HEAD_NAMES if isinstance(m := getattr(model, n, None), nn.Module)]
    return {name for name, module in model.named_modules() if any(module is h for h in heads)}


def in_head(name: str, heads: set[str]) -> bool:
    """``name`` is a head or lies inside one (a classifier made of several layers)."""
    return any(name == h or name.startswith(h + ".") for h in heads)


def quantize(model: nn.Module, scheme: str = "nf4", double_quant: bool = True,
             compute_dtype: torch.dtype | None = None, skip: Sequence[str] = ()) -> nn.Module:
    """Replace every linear layer of ``model`` except the output head by a bitsandbytes ``Linear4bit``, in place.

    Embeddings stay as they are, and so do GPT-2's ``Conv1D`` layers (their (in, out) weights are not what
    ``Linear4bit`` holds). Quantize the base before adding adapters. Each layer's rounding error is checked, and
    the memory of the full-precision weights is given back afterwards.

    Args:
        scheme: ``"nf4"`` (the QLoRA paper's NormalFloat4) or ``"fp4"``.
        double_quant: Also quantize the per-block scales (saves ~0.4 bits per weight).
        compute_dtype: The dtype the layers compute in (weights are dequantized to it). Default: each layer's
            own dtype before quantization, so a bf16 model computes in bf16 and an fp32 one in fp32.
        skip: Names (full or last part) of further modules to leave in full precision.

    Returns:
        The same ``model``.

    Raises:
        ValueError: An unknown ``scheme``, a model that already has LoRA layers or no linear layer to quantize,
            or a layer that bitsandbytes rounds far worse than 4 bits should (the model is then unchanged).
        ImportError: bitsandbytes is not installed.
    """
    check_scheme(scheme)
    if any(isinstance(m, LoraLayer) for m in model.modules()):
        raise InvalidValue("quantize the base model before adding LoRA adapters (this model already has LoRA layers)")
    bnb = bitsandbytes()
    new: dict[str, nn.Module] = {}  # built first, swapped in at the end: an error leaves the model as it was
    for name in quantize_targets(model, skip):
        module = model.get_submodule(name)
        new[name] = quantized_linear(bnb, name, module.weight.detach(), module.bias, scheme, double_quant,
                                     compute_dtype).train(module.training)
    if not new and not any(is_4bit(m) for m in model.modules()):
        raise InvalidValue(f"{type(model).__name__} has no nn.Linear layer to quantize besides its head "
                           f"(GPT-2's Conv1D layers stay in full precision)")
    for name, layer in new.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    _release_full_precision(model)
    return model


def quantize_targets(model: nn.Module, skip: Sequence[str] = ()) -> list[str]:
    """The names of the layers :func:`quantize` turns into 4-bit ones: every ``nn.Linear`` (not yet 4-bit) outside
    the output head(s) and ``skip`` (names, full or last part). Works on a model built on the meta device."""
    heads = head_names(model)
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not is_4bit(module) and not in_head(name, heads)
            and name not in skip and name.rsplit(".", 1)[-1] not in skip]


def quantized_linear(bnb: ModuleType, name: str, weight: torch.Tensor, bias: torch.Tensor | None, scheme: str,
                     double_quant: bool, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """The ``Linear4bit`` that :func:`quantize` puts in place of the linear layer ``name`` with ``weight`` (out, in)
    and ``bias``: it computes in ``compute_dtype`` (default: the weight's dtype), and its rounding error is checked.

    Raises:
        ValueError: bitsandbytes rounded the weight far worse than 4 bits should.
    """
    dtype = compute_dtype or (weight.dtype if weight.is_floating_point() else torch.float32)
    layer = linear_4bit(bnb, weight, bias, scheme, double_quant, dtype)
    _check_rounding(name, weight, layer)
    return layer


def _release_full_precision(model: nn.Module) -> None:
    """Give the memory of the replaced full-precision weights back to the operating system.

    Without this a quantized model keeps costing what the full one did: weights loaded from a memory-mapped
    file stay resident as long as any tensor (an embedding, a norm) still points into the mapping, and memory
    freed on the heap stays with the process. So the tensors that remain get storage of their own, and glibc is
    asked to return free memory (measured on SmolLM2-135M: RSS 1148 → 608 MiB from an fp32 load).
    """
    done: set[int] = set()
    for module in model.modules():
        if is_4bit(module):
            continue
        for tensors in (module._parameters, module._buffers):
            for tensor in tensors.values():
                if tensor is not None and id(tensor) not in done and tensor.device.type == "cpu":
                    done.add(id(tensor))
                    tensor.data = tensor.data.clone()
    gc.collect()
    return_freed_memory()


def _check_rounding(name: str, weight: torch.Tensor, layer: nn.Module) -> None:
    """Refuse a layer that bitsandbytes rounded far worse than 4 bits should (its CPU quantizer does so for some
    narrow layers, e.g. 32 or 96 inputs): NF4 and FP4 keep the relative L2 error near 0.1.

    The layer is dequantized once, in the weight's dtype, and compared in fp32 a block of rows at a time: whole
    fp32 copies of a large layer (a 70B model's 28672 × 8192) would cost several GiB on top of the model while it
    streams in (:mod:`lorakit.models.streaming`)."""
    _unpack(layer)
    state = layer.weight.quant_state
    dense = bitsandbytes().functional.dequantize_4bit(layer.weight.data, state).reshape(state.shape)  # weight's dtype
    rows = max(1, 2**22 // max(1, weight.shape[1]))  # 16 MiB of fp32 per block
    squared_error = squared_norm = 0.0
    for i in range(0, weight.shape[0], rows):
        w = weight[i:i + rows].float()  # (rows, in)
        squared_error += (dense[i:i + rows].float() - w).pow(2).sum().item()
        squared_norm += w.pow(2).sum().item()
    error = (squared_error ** 0.5) / max(squared_norm ** 0.5, 1e-30)
    if error > 0.2:
        raise InvalidValue(f"bitsandbytes rounded {name} (shape {list(weight.shape)}) with a relative error of "
                           f"{error:.0%} (4-bit rounding gives ~10%); leave it in full precision with "
                           f"skip=[{name!r}]")


def linear_4bit(bnb: ModuleType, weight: torch.Tensor, bias: torch.Tensor | None, scheme: str, double_quant: bool,
                compute_dtype: torch.dtype) -> nn.Module:
    """A ``Linear4bit`` holding ``weight`` (out, in) quantized (on the weight's device), and ``bias`` as is."""
    out_features, in_features = weight.shape
    # Built on the meta device: no throwaway random init of a full-size fp32 weight.
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=compute_dtype,
                              compress_statistics=double_quant, quant_type=scheme, device="meta")
    layer.weight = bnb.nn.Params4bit(weight.contiguous(), requires_grad=False, compress_statistics=double_quant,
                                     quant_type=scheme, module=layer)._quantize(weight.device)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    layer.support_avx512bf16_for_cpu = False  # see keep_autograd_path
    return layer


def keep_autograd_path(model: nn.Module) -> None:
    """Keep every ``Linear4bit`` of ``model`` on bitsandbytes' differentiable path.

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place the first time the layer runs in
    eval mode without gradients, and from then on computes it with a kernel that has no backward: a training
    step after an evaluation would silently get no gradient through the frozen layers. lorakit turns the
    repacking off (and undoes it where it already happened); the differentiable path is as fast from ~50 tokens
    on.
    """
    for module in model.modules():
        if not is_4bit(module):
            continue
        module.support_avx512bf16_for_cpu = False
        _unpack(module)


def _unpack(module: nn.Module) -> None:
    state = module.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(module.weight.data,
                                                                                               state)
        module.quant_state = module.weight.quant_state


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The dequantized weight of a ``Linear4bit`` as a new fp32 (out, in) tensor."""
    bnb = bitsandbytes()
    _unpack(module)
    weight = module.weight
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float().reshape(weight.quant_state.shape)


def weight_shape(module: nn.Module) -> list[int]:
    """The logical (out, in) shape of a 4-bit layer's weight (its storage is packed bytes)."""
    return list(module.weight.quant_state.shape)


def quantized_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the 4-bit layers, including their scales; the same weights' bytes in bf16)."""
    packed = bf16 = 0
    seen: set[int] = set()  # lookup tables may be shared between layers: count each once
    for module in model.modules():
        if is_4bit(module):
            state = module.weight.quant_state
            for t in [module.weight.data, *_state_tensors(state)]:
                if t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    packed += t.numel() * t.element_size()
            bf16 += 2 * state.shape[0] * state.shape[1]
    return packed, bf16


def _state_tensors(state: Any) -> list[torch.Tensor]:
    tensors = [state.absmax, state.code]
    if state.nested:
        tensors += [state.state2.absmax, state.state2.code, state.offset]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def dense_linear(module: nn.Module, weight: torch.Tensor, dtype: torch.dtype | None = None) -> nn.Linear:
    """An ``nn.Linear`` with ``weight`` (out, in) and the bias of the 4-bit ``module``, in ``dtype`` (default:
    the layer's compute dtype)."""
    dtype = dtype or module.compute_dtype or torch.float32
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=module.bias is not None, device="meta", dtype=dtype)
    layer.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if module.bias is not None:
        layer.bias = nn.Parameter(module.bias.detach().to(dtype).clone(), requires_grad=False)
    return layer.train(module.training)


def requantized_linear(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A ``Linear4bit`` like ``module`` (scheme, double quantization, compute dtype) holding ``weight``."""
    state = module.weight.quant_state
    layer = linear_4bit(bitsandbytes(), weight, module.bias, state.quant_type, bool(state.nested),
                        module.compute_dtype or torch.float32)
    return layer.train(module.training)


# -- merging into a 4-bit base ---------------------------------------------------------------------------


@dataclass
class MergeReport:
    """How far the merged model's logits are from the unmerged 4-bit model's on a probe batch."""

    requantized: bool
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    max_abs_logit: float

    @classmethod
    def of(cls, before: torch.Tensor, after: torch.Tensor, requantized: bool) -> MergeReport:
        """The report for the logits ``before`` and ``after`` merging."""
        diff = (after - before).abs()
        return cls(requantized, diff.max().item(), diff.mean().item(), before.abs().max().item())

    def __str__(self) -> str:
        how = "re-quantized to 4 bits" if self.requantized else "dense"
        return (f"merged ({how}): logits differ from the unmerged model by max {self.max_abs_logit_diff:.3g}, "
                f"mean {self.mean_abs_logit_diff:.3g} (largest logit {self.max_abs_logit:.3g})")


def default_probe(model: nn.Module, device: torch.device) -> dict[str, torch.Tensor] | None:
    """Two rows of 16 fixed pseudo-random token ids for a Hugging Face model with a vocabulary, else None."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int) or vocab <= 0:
        return None
    generator = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, vocab, (2, 16), generator=generator).to(device)}


def logits(model: nn.Module, probe: Any) -> torch.Tensor:
    """The model's fp32 logits on ``probe`` (input ids or a dict of inputs), in eval mode, without gradients."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(**probe) if isinstance(probe, dict) else model(probe)
    finally:
        model.train(training)
    out = getattr(out, "logits", out)
    return out.float()


def merge_4bit(model: nn.Module, layers: Sequence[tuple[str, LoraLayer]], adapter_names: Sequence[str],
               requantize: bool = False, dtype: torch.dtype | None = None) -> None:
    """Fold ``adapter_names`` into the LoRA ``layers`` of ``model``, whose base has 4-bit layers.

    Each 4-bit layer with an adapter is dequantized and the update added in fp32. By default every 4-bit
    layer (with an adapter or not) becomes a dense ``nn.Linear`` in ``dtype`` (default: its compute dtype):
    the result equals the unmerged model up to float rounding. With ``requantize=True`` the merged layers are
    quantized again (same scheme) and the others stay as they are: a 4-bit model again, but rounding the merged
    weights to 4 bits changes the outputs. Every replacement is built before any is put in, so an error leaves
    the model as it was.
    """
    replaced: dict[str, nn.Module] = {}
    for name, layer in layers:
        if is_4bit(layer.base):
            merged = layer.merged_weight(adapter_names, base=dense_weight(layer.base), dtype=torch.float32)
            replaced[name] = (requantized_linear(layer.base, merged) if requantize
                              else dense_linear(layer.base, merged, dtype))
    if not requantize:
        wrapped = {id(layer.base) for _, layer in layers}
        for name, module in model.named_modules():
            if is_4bit(module) and id(module) not in wrapped:
                replaced[name] = dense_linear(module, dense_weight(module), dtype)
    for name, layer in layers:
        if name in replaced:
            layer.base = replaced.pop(name)
        else:
            layer.merge(adapter_names)
    for name, module in replaced.items():
        set_submodule(model, name, module)
