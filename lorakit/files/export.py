"""Exporting a merged model: a plain Hugging Face folder, or one GGUF file for llama.cpp and Ollama, with the
adapters folded into the weights (or, as GGUF, a LoRA adapter alone)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError

from ..core.errors import FileProblem, InvalidType, InvalidValue, write_failure
from ..core.layers import LoraLayer, is_4bit
from ..core.quant import dense_weight
from .io import make_folder, temporary_folder

if TYPE_CHECKING:
    from ..models.model import LoraModel


def merged_state_dict(model: LoraModel, adapter_names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """The state dict of the plain model (original module names) with adapters ``adapter_names`` (default: the
    active ones) folded into the weights and their trained heads in place of the originals. The model is unchanged.
    """
    names = model.active_adapters if adapter_names is None else list(adapter_names)
    layers = dict(model.lora_layers())
    saved = dict(model.saved_modules())
    # 4-bit layers (bitsandbytes) are written dense: their packed bytes and scales are not a plain model's.
    quantized = {name: module for name, module in model.model.named_modules() if is_4bit(module)}
    out = {}
    for key, value in model.model.state_dict().items():
        if any(key.startswith(f"{q}.weight.") for q in quantized):  # a 4-bit weight's scales and lookup tables
            continue
        owner, _, leaf = key.rpartition(".base.")
        if owner in layers:  # a LoRA layer's base: back under the layer's own name
            if leaf == "weight":
                value = _merged_weight(layers[owner], names)
            elif leaf == "bias":  # adapters with lora_bias fold their bias into the base's
                value = layers[owner].merged_bias(names)
            out[f"{owner}.{leaf}"] = value
        elif (module := quantized.get(key.removesuffix(".weight"))) is not None and key.endswith(".weight"):
            out[key] = _dense(module, dense_weight(module))
        elif not any(key.startswith(p + ".") for p in (*layers, *saved)):  # adapters and heads come below
            out[key] = value
    for owner, module in saved.items():
        head = next((module.modules_to_save[n] for n in names if n in module.modules_to_save), module.original_module)
        for k, v in head.state_dict().items():
            out[f"{owner}.{k}"] = v
    return out


def _merged_weight(layer: LoraLayer, names: Sequence[str]) -> torch.Tensor:
    if not is_4bit(layer.base):
        return layer.merged_weight(names)
    return _dense(layer.base, layer.merged_weight(names, base=dense_weight(layer.base), dtype=torch.float32))


def _dense(module: torch.nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """A 4-bit layer's dense (merged) weight in the dtype the layer computes in."""
    return weight.to(module.compute_dtype or torch.float32)


FORMATS = ("hf", "gguf")


def export_merged(model: LoraModel, save_directory: str | os.PathLike, tokenizer: Any = None,
                  adapter_names: Sequence[str] | None = None, *, format: str = "hf", quant: str | None = None) -> Path:
    """Save the model with adapters ``adapter_names`` (default: the active ones) folded in; the LoraModel is not
    changed. Files are written under a temporary name and renamed into place.

    Args:
        model: The LoraModel.
        save_directory: ``format="hf"``: the folder to write. ``format="gguf"``: the ``.gguf`` file, or a folder to
            write ``model-<quant>.gguf`` in.
        tokenizer: Saved with the model. For GGUF: a Hugging Face byte-level BPE tokenizer, or the path of a
            ``.gguf`` file whose tokenizer is copied (e.g. :func:`lorakit.models.embedded_models.smollm2_gguf` for the
            default model); None writes weights only (enough for transformers, not for llama.cpp).
        adapter_names: The adapters to fold in (default: the active ones).
        format: ``hf`` (default): a Hugging Face folder that ``AutoModel*.from_pretrained(folder)`` loads.
            ``gguf``: one GGUF file for llama.cpp and Ollama (Llama and Mistral architectures), which
            ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)`` loads too.
        quant: GGUF only: ``f16`` (default), ``q8_0`` (8-bit blocks of 32 with an fp16 scale) or ``f32``.

    Returns:
        The folder (``hf``) or the file (``gguf``) written.

    Raises:
        ValueError: An unknown format or quant, or (GGUF) an architecture or tokenizer it cannot write.
    """
    if format not in FORMATS:
        raise InvalidValue(f"unknown export format {format!r}; allowed: {', '.join(FORMATS)}")
    if format == "gguf":
        return _export_gguf(model, save_directory, tokenizer, adapter_names, "f16" if quant is None else quant)
    if quant is not None:
        raise InvalidValue(f"quant={quant!r} applies to format='gguf' only; a Hugging Face folder keeps the model's "
                           f"dtype")
    if not hasattr(model.model, "save_pretrained"):
        raise InvalidType(f"export_merged needs a Hugging Face model; {type(model.model).__name__} has no "
                          f"save_pretrained (use merge_and_unload() and save the result yourself)")
    folder = Path(save_directory)
    if folder.exists() and not folder.is_dir():  # said before the merge, not after it
        raise InvalidValue(f"export folder {str(folder)!r} is a file, not a folder; name a folder (it is replaced "
                           f"if it exists) or move the file away")
    make_folder(folder.parent, "export folder's parent")
    state = _merged_tensors(model, adapter_names)
    tmp = temporary_folder(folder.parent, f".{folder.name}.")
    try:
        model.model.save_pretrained(tmp, state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except (OSError, SafetensorError) as err:  # safetensors reports a failed write as its own error
        kept = f"the existing {folder} is unchanged" if folder.exists() else "nothing was written"
        raise FileProblem(f"could not write the merged model to {folder} ({write_failure(err)}); {kept}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _merged_tensors(model: LoraModel, adapter_names: Sequence[str] | None) -> dict[str, torch.Tensor]:
    with model.unmerged():  # adapters already merged would be folded in twice, or when not asked for
        return {k: v.detach().contiguous() for k, v in merged_state_dict(model, adapter_names).items()}


def _export_gguf(model: LoraModel, save_to: str | os.PathLike, tokenizer: Any,
                 adapter_names: Sequence[str] | None, quant: str) -> Path:
    from .gguf_export import check_architecture, check_quant, write_gguf_model

    check_quant(quant)  # before the merge: a typo or an architecture GGUF export lacks answers at once
    check_architecture(model.model)
    path = Path(save_to)
    if path.suffix != ".gguf":
        path = make_folder(path, "GGUF export folder") / f"model-{quant}.gguf"
    else:
        make_folder(path.parent, "GGUF file's folder")
    return write_gguf_model(model.model, _merged_tensors(model, adapter_names), path, tokenizer, quant)
