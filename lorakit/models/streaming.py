"""Loading a Hugging Face checkpoint one tensor at a time, optionally quantizing it to 4 bits on the way.

``from_pretrained`` followed by :func:`lorakit.core.quant.quantize` holds the whole model in full precision first: a
7B model costs 13-27 GiB at load time even when it ends up at ~4 GiB. :func:`load_checkpoint` instead builds the
model from ``config.json`` on the meta device (no memory), checks every tensor of the checkpoint against it from
the safetensors headers alone (so a bad checkpoint fails before anything is read, naming the file and the tensor),
and then fills the model in tensor by tensor. Each tensor is read with plain file reads into a buffer of its own
(not a memory mapping: touched pages of a mapping count in the resident size until the whole file is unmapped), and
a linear layer to quantize becomes bitsandbytes' ``Linear4bit`` right away, as :func:`lorakit.core.quant.quantize` would
make it, so its full-precision weight is freed before the next one is read. Peak memory is then the final model
plus about one tensor.

The safetensors format: 8 bytes (little-endian length ``n``), ``n`` bytes of JSON (``{name: {"dtype", "shape",
"data_offsets": [begin, end]}}``, offsets relative to the end of the header, and an optional ``__metadata__``),
then the data. A sharded checkpoint adds ``model.safetensors.index.json`` (``{"weight_map": {name: file}}``).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import FileProblem, InvalidValue, MissingFile
from ..core.process_memory import return_freed_memory
from .hf import load_pretrained, require_transformers

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER = 100 * 2**20  # safetensors itself refuses larger headers

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_LEGACY_NAME = re.compile(r"\.(gamma|beta)$")  # old LayerNorm names transformers renames while loading


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in a safetensors file: absolute byte offsets ``[begin, end)``."""

    name: str
    file: Path
    dtype: str  # safetensors' name: "BF16", "F32", ...
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


# -- reading headers -------------------------------------------------------------------------------------------


def has_safetensors(folder: Path) -> bool:
    """``folder`` holds ``model.safetensors`` or ``model.safetensors.index.json``."""
    return folder.is_dir() and ((folder / INDEX_FILE).is_file() or (folder / SINGLE_FILE).is_file())


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors of one safetensors file, from its header; their offsets are checked against the file's size.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The header is damaged, or a tensor's bytes do not fit its dtype and shape or lie past the end.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InvalidValue(f"{path}: not a safetensors file ({size} bytes, shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise InvalidValue(f"{path}: not a safetensors file (its header length {n} exceeds the file's {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as err:
            raise InvalidValue(f"{path}: the safetensors header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise InvalidValue(f"{path}: the safetensors header is not a JSON object")
    data_start, entries = 8 + n, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            if not all(isinstance(d, int) and d >= 0 for d in (*shape, begin, end)):
                raise TypeError
        except (TypeError, KeyError, ValueError):
            raise InvalidValue(f"{path}: tensor {name!r} has a damaged header entry: {info!r}") from None
        entry = TensorEntry(name, path, dtype, shape, data_start + begin, data_start + end)
        if dtype in DTYPES:
            expected = entry.numel * torch.empty(0, dtype=DTYPES[dtype]).element_size()
            if end - begin != expected:
                raise InvalidValue(f"{path}: tensor {name!r} ({dtype}, shape {list(shape)}) should take {expected} "
                                   f"bytes but its offsets span {end - begin}")
        if entry.end > size or begin > end:
            raise InvalidValue(f"{path}: tensor {name!r} lies at bytes {entry.begin}-{entry.end}, past the end of the "
                               f"file ({size} bytes; truncated?)")
        entries[name] = entry
    return entries


def checkpoint_tensors(folder: Path) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint in ``folder`` (one ``model.safetensors``, or an index and its shards), from the
    headers alone.

    Raises:
        FileNotFoundError: No safetensors weights, or a shard the index names is missing (named with a tensor it
            should hold).
        ValueError: A damaged index or header, or a tensor the index places in a shard that lacks it.
    """
    index_path = folder / INDEX_FILE
    if not index_path.is_file():
        if not (folder / SINGLE_FILE).is_file():
            raise MissingFile(f"{folder} holds neither {SINGLE_FILE} nor {INDEX_FILE}")
        return read_header(folder / SINGLE_FILE)
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise InvalidValue(f"{index_path}: not a safetensors index (it needs a \"weight_map\" of tensor name → "
                           f"shard file)") from None
    by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, []).append(name)
    entries: dict[str, TensorEntry] = {}
    for file, names in by_file.items():
        path = folder / file
        if Path(file).is_absolute() or ".." in Path(file).parts:
            raise InvalidValue(f"{index_path}: shard {file!r} (holding {names[0]!r}) lies outside {folder}")
        if not path.is_file():
            more = f" and {len(names) - 1} more tensors" if len(names) > 1 else ""
            raise MissingFile(f"{index_path} names the shard {file}, which is missing from {folder} (it should "
                              f"hold {names[0]!r}{more})")
        header = read_header(path)
        for name in names:
            if name not in header:
                raise InvalidValue(f"{index_path} places tensor {name!r} in {path}, which does not hold it")
            entries[name] = header[name]
    return entries


# -- matching the checkpoint to the model ----------------------------------------------------------------------


@dataclass
class LoadPlan:
    """What :func:`load_checkpoint` reads into each of the model's tensors, and what it builds otherwise."""

    sources: dict[str, TensorEntry]  # model tensor name → checkpoint tensor
    initialized: list[str]  # allowed to be missing: transformers' init makes them (a new head)
    tied: dict[str, str]  # target → source, tied after loading


def model_config(source: Path, trust_remote_code: bool = False, **overrides: Any) -> Any:
    """The transformers config of the model folder ``source``, with a clear error for an architecture this
    transformers does not know.

    Raises:
        ValueError: No readable ``config.json``, or an unknown ``model_type``.
    """
    transformers = require_transformers()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    file = source / "config.json" if source.is_dir() else source
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InvalidValue(f"{file}: not a readable model config ({err})") from None
    if not isinstance(values, dict):
        raise InvalidValue(f"{file}: not a model config (a JSON object)")
    model_type = values.get("model_type")
    if model_type not in CONFIG_MAPPING and not (trust_remote_code and values.get("auto_map")):
        archs = values.get("architectures") or []
        hint = (" It ships its own code (auto_map): pass --trust-remote-code (trust_remote_code=True) if you trust it."
                if values.get("auto_map") else
                f" Upgrade transformers (pip install -U transformers) if {archs[0] if archs else 'it'} is newer.")
        raise InvalidValue(f"{file}: unknown architecture {', '.join(archs) or '(none named)'} (model_type "
                           f"{model_type!r}); transformers {transformers.__version__} does not know it.{hint}")
    return transformers.AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code, **overrides)


def meta_model(auto: Any, config: Any, dtype: torch.dtype | None = None, trust_remote_code: bool = False) -> nn.Module:
    """The model ``auto`` builds from ``config`` on the meta device: its modules and shapes, no memory.

    Raises:
        ValueError: ``auto`` has no class for this architecture.
    """
    has_class = type(config) in auto._model_mapping or (trust_remote_code and auto.__name__ in
                                                        (getattr(config, "auto_map", None) or {}))
    if not has_class:
        raise InvalidValue(f"{type(config).__name__} ({config.model_type}) has no {auto.__name__} class in "
                           f"transformers; this task cannot use that model")
    kwargs = {"dtype": dtype} if dtype is not None else {}
    with torch.device("meta"):
        return auto.from_config(config, trust_remote_code=trust_remote_code, **kwargs)


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by name (what a checkpoint holds); a tied tensor appears under each of its
    names (:func:`plan_load` treats the tied names)."""
    return dict(model.state_dict(keep_vars=True))


def plan_load(model: nn.Module, tensors: dict[str, TensorEntry], folder: Path,
              supplied: Sequence[str] = ()) -> LoadPlan:
    """Match the checkpoint's tensors to the model's and check them: names, shapes, dtypes.

    A checkpoint of the bare model (``layers.0...``) loads into a model with a head (``model.layers.0...``) and the
    other way round, as transformers does it. Missing may be: tied weights (tied to their source), and weights under
    the module names in ``supplied`` (a new head, initialised as transformers does).

    Raises:
        ValueError: A model tensor the checkpoint lacks, or one whose shape or dtype does not fit (the message names
            the file and the tensor).
    """
    wanted = _model_tensors(model)
    prefix = getattr(model, "base_model_prefix", "")

    def lookup(key: str) -> TensorEntry | None:
        if key in tensors:
            return tensors[key]
        if prefix and key.startswith(prefix + "."):  # the checkpoint is of the bare model
            return tensors.get(key[len(prefix) + 1:])
        if prefix:  # the checkpoint has the head's wrapper, the model is the bare one
            return tensors.get(f"{prefix}.{key}")
        return None

    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    sources: dict[str, TensorEntry] = {}
    initialized, missing = [], []
    ignore = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or []]
    allowed = set(supplied)
    for key, tensor in wanted.items():
        entry = lookup(key)
        if key in tied:
            source = tied[key]
            if lookup(source) is None and entry is not None:  # only the target was saved: load it into the source
                sources[source] = entry
            continue
        if entry is None:
            if key in sources:  # filled from its tied target above
                continue
            if allowed & set(key.split(".")) or any(p.search(key) for p in ignore):
                initialized.append(key)
            else:
                missing.append(key)
            continue
        _check_entry(key, tensor, entry)
        sources[key] = entry
    missing = [k for k in missing if k not in sources]
    if missing:
        where = folder / INDEX_FILE if (folder / INDEX_FILE).is_file() else folder / SINGLE_FILE
        shown = ", ".join(repr(k) for k in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise InvalidValue(f"{where} lacks {len(missing)} tensor(s) of {type(model).__name__}: {shown}")
    return LoadPlan(sources, initialized, tied)


def _check_entry(key: str, tensor: torch.Tensor, entry: TensorEntry) -> None:
    if list(entry.shape) != list(tensor.shape):
        raise InvalidValue(f"{entry.file}: tensor {entry.name!r} has shape {list(entry.shape)}, but "
                           f"{key} of the model has shape {list(tensor.shape)} (a checkpoint of another model size?)")
    allowed = FLOAT_DTYPES if tensor.is_floating_point() else tuple(
        k for k, v in DTYPES.items() if not v.is_floating_point)
    if entry.dtype not in allowed:
        raise InvalidValue(f"{entry.file}: tensor {entry.name!r} is stored as {entry.dtype}, which lorakit cannot load "
                           f"into {key} (allowed: {', '.join(allowed)}; pre-quantized checkpoints are not supported)")


def checkpoint_dtype(folder: Path, tensors: dict[str, TensorEntry] | None = None) -> torch.dtype | None:
    """The dtype the checkpoint in ``folder`` is stored in, as transformers' ``dtype="auto"`` reads it: the config's
    ``dtype`` (``torch_dtype``), else the first floating-point tensor's; None without safetensors weights."""
    if not has_safetensors(folder):
        return None
    try:
        values = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        values = {}
    named = (values.get("dtype") or values.get("torch_dtype")) if isinstance(values, dict) else None
    if isinstance(named, str) and isinstance(getattr(torch, named, None), torch.dtype):
        return getattr(torch, named)
    try:
        tensors = tensors if tensors is not None else checkpoint_tensors(folder)
    except (OSError, ValueError):
        return None  # the loading itself says what is wrong
    return next((DTYPES[e.dtype] for e in tensors.values() if e.dtype in FLOAT_DTYPES), None)


# -- materializing ---------------------------------------------------------------------------------------------


class _Reader:
    """Reads tensors with plain file reads into fresh buffers, one open file per shard. The pages read stay in the
    kernel's page cache (reclaimable, and not resident in this process), so loading the same checkpoint again is
    fast; a memory mapping would make them count in the process's resident size instead."""

    def __init__(self) -> None:
        self.files: dict[Path, Any] = {}

    def read(self, entry: TensorEntry) -> torch.Tensor:
        f = self.files.get(entry.file)
        if f is None:
            f = self.files[entry.file] = open(entry.file, "rb", buffering=0)
        nbytes = entry.end - entry.begin
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buffer.numpy()) if nbytes else memoryview(b"")
        f.seek(entry.begin)
        done = 0
        while done < nbytes:
            got = f.readinto(view[done:])
            if not got:
                raise FileProblem(f"{entry.file}: tensor {entry.name!r} ends past the end of the file (truncated while "
                                  f"loading?)")
            done += got
        return buffer.view(DTYPES[entry.dtype]).reshape(entry.shape)

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()


def _set(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if name in module._parameters:
        old = module._parameters[name]
        module._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else False)
    else:
        module._buffers[name] = value


def _fp32_names(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """The module-name patterns transformers keeps in fp32 for ``dtype`` (``_keep_in_fp32_modules``)."""
    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    return list(plan)


def _target_dtype(key: str, tensor: torch.Tensor, dtype: torch.dtype, fp32: Iterable[str]) -> torch.dtype:
    if not tensor.is_floating_point():
        return tensor.dtype
    if any(re.search(rf"(^|\.){re.escape(p)}(\.|$)", key) for p in fp32):
        return torch.float32
    return dtype


def load_checkpoint(auto: Any, source: Path, *, dtype: torch.dtype | None = None, quantize: str | None = None,
                    double_quant: bool = True, compute_dtype: torch.dtype | None = None, skip: Sequence[str] = (),
                    trust_remote_code: bool = False, supplied: Sequence[str] = (), **overrides: Any) -> nn.Module:
    """The model in the folder ``source`` as transformers' ``auto`` class builds it, loaded tensor by tensor from its
    safetensors weights, its linear layers quantized to 4 bits on the way with ``quantize``.

    The result equals ``auto.from_pretrained(source, dtype=dtype)`` (followed by
    ``quant.quantize(model, quantize, double_quant, compute_dtype, skip)``), in eval mode, without ever holding
    the full-precision model: everything is checked from the file headers first, then each tensor is read, cast
    and (for a layer to quantize) quantized before the next one. Architectures whose checkpoints transformers
    converts while loading (fused experts, renamed weights) and folders without safetensors weights are loaded by
    ``from_pretrained`` (and then quantized).

    Args:
        auto: A transformers Auto class (``AutoModelForCausalLM``...).
        source: The model folder.
        dtype: The dtype of the floating-point weights; default: the checkpoint's (bf16 stays bf16).
        quantize: ``"nf4"`` or ``"fp4"`` to quantize the linear layers (all but the head), else None.
        double_quant, compute_dtype, skip: As for :func:`lorakit.core.quant.quantize`.
        trust_remote_code: Run the folder's own model code.
        supplied: Module names whose weights may be missing (a head an adapter or the training supplies); they
            start from transformers' initialisation.
        **overrides: Config values to change (``num_labels``).

    Raises:
        FileNotFoundError: A shard is missing.
        ValueError: Unknown architecture; a damaged header or index; a model tensor the checkpoint lacks, or with
            the wrong shape or dtype (each names the file and the tensor); a layer bitsandbytes rounds badly.
        ImportError: transformers (or, with ``quantize``, bitsandbytes) is not installed.
    """
    from ..core import quant

    if quantize is not None:
        quant.check_scheme(quantize)
    config = model_config(source, trust_remote_code, **overrides)
    if not has_safetensors(source):
        return _load_whole(auto, source, dtype, quantize, double_quant, compute_dtype, skip, trust_remote_code,
                           supplied, overrides)
    tensors = checkpoint_tensors(source)
    dtype = dtype or checkpoint_dtype(source, tensors) or torch.float32
    model = meta_model(auto, config, dtype, trust_remote_code)
    if _converted_while_loading(model, tensors):
        return _load_whole(auto, source, dtype, quantize, double_quant, compute_dtype, skip, trust_remote_code,
                           supplied, overrides)
    plan = plan_load(model, tensors, source, supplied)
    bnb = quant.bitsandbytes() if quantize else None
    every_target = quant.quantize_targets(model, skip) if quantize else []
    if quantize and not every_target:
        raise InvalidValue(f"{type(model).__name__} has no nn.Linear layer to quantize besides its head "
                           f"(GPT-2's Conv1D layers stay in full precision)")
    # A layer to quantize whose weight the checkpoint lacks (a new head) is quantized after its initialisation.
    targets = [name for name in every_target if f"{name}.weight" in plan.sources]
    fp32 = _fp32_names(model, dtype)
    wanted = _model_tensors(model)
    reader = _Reader()
    try:
        with torch.no_grad():
            for name in targets:  # each linear layer: read, quantize, free the full-precision weight
                layer = model.get_submodule(name)
                weight = reader.read(plan.sources[f"{name}.weight"]).to(dtype)
                bias = (reader.read(plan.sources[f"{name}.bias"]).to(dtype) if layer.bias is not None else None)
                _set_module(model, name, quant.quantized_linear(bnb, name, weight, bias, quantize, double_quant,
                                                                compute_dtype))
                del weight, bias
                # The full-precision weight and the quantizer's temporaries were freed on the heap; without giving
                # them back, fragments pile up (measured on a 113M model: peak 770 MiB against 555 MiB with this).
                return_freed_memory()
            quantized = set(targets)
            for key, entry in plan.sources.items():
                if key.rpartition(".")[0] in quantized:
                    continue
                value = reader.read(entry)
                cast = value.to(_target_dtype(key, wanted.get(key, value), dtype, fp32))
                _set(model, key, cast)
                if cast is not value:  # the file's copy is garbage now
                    del value
                    return_freed_memory()
            _build_the_rest(model, plan, dtype)
            for name in every_target:
                if name not in quantized:
                    layer = model.get_submodule(name)
                    _set_module(model, name, quant.quantized_linear(bnb, name, layer.weight.detach(), layer.bias,
                                                                    quantize, double_quant, compute_dtype))
    finally:
        reader.close()
    model.tie_weights()
    _generation_config(model, source)
    model.config.dtype = dtype
    return_freed_memory()  # buffers freed on the heap (small tensors) go back to the system
    return model.eval()


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _converted_while_loading(model: nn.Module, tensors: dict[str, TensorEntry]) -> bool:
    """transformers renames or reshapes this checkpoint's tensors while loading (its conversion mappings, old
    LayerNorm names): leave those to it."""
    from transformers.conversion_mapping import extract_weight_conversions_for_model
    from transformers.modeling_utils import PreTrainedModel

    if any(isinstance(m, PreTrainedModel) and extract_weight_conversions_for_model(m) for m in model.modules()):
        return True
    return any(_LEGACY_NAME.search(name) for name in tensors)


def _build_the_rest(model: nn.Module, plan: LoadPlan, dtype: torch.dtype) -> None:
    """Give the tensors no checkpoint holds real memory and transformers' own initial values: non-persistent
    buffers (rotary frequencies, position ids), computed as at construction, and allowed missing weights (a new
    head), initialised as ``from_pretrained`` initialises them."""
    loaded = {id(t) for k, t in _model_tensors(model).items() if k in plan.sources}
    modules: dict[str, nn.Module] = {}
    sentinels: list[tuple[str, torch.Tensor]] = []
    for key in plan.initialized:
        module_name, _, name = key.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        old = getattr(module, name)
        _set(model, key, torch.empty(old.shape, dtype=dtype if old.is_floating_point() else old.dtype))
        modules[module_name] = module
    for module_name, module in model.named_modules():
        for name in module._non_persistent_buffers_set:
            old = module._buffers.get(name)
            if old is None or old.device.type != "meta":
                continue
            # NaN marks a float buffer transformers' init must fill; any left means it did not know how.
            fresh = torch.full(old.shape, float("nan"), dtype=old.dtype) if old.is_floating_point() else \
                torch.zeros(old.shape, dtype=old.dtype)
            module._buffers[name] = fresh
            modules[module_name] = module
            if fresh.is_floating_point():
                sentinels.append((f"{module_name}.{name}", fresh))
    for module in modules.values():
        for tensor in [*module._parameters.values(), *module._buffers.values()]:
            if tensor is not None and id(tensor) in loaded:
                tensor._is_hf_initialized = True  # transformers' init leaves these as loaded
        model._init_weights(module)
    for key, tensor in sentinels:
        buffer = model.get_buffer(key)
        if buffer.is_floating_point() and torch.isnan(buffer).any():
            raise InvalidValue(f"transformers' initialisation did not compute the buffer {key} of "
                               f"{type(model).__name__}; load this model without --quantize")
    left = [k for k, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    tied = set(plan.tied)
    left = [k for k in left if k not in tied]
    if left:
        raise InvalidValue(f"no checkpoint tensor or initialisation for {', '.join(left[:5])} of "
                           f"{type(model).__name__}")


def _generation_config(model: nn.Module, source: Path) -> None:
    """The generation settings from ``generation_config.json`` (end-of-turn tokens...), as ``from_pretrained``
    reads them."""
    if (source / "generation_config.json").is_file() and getattr(model, "can_generate", lambda: False)():
        transformers = require_transformers()
        model.generation_config = transformers.GenerationConfig.from_pretrained(str(source))


def _load_whole(auto: Any, source: Path, dtype: torch.dtype | None, quantize: str | None, double_quant: bool,
                compute_dtype: torch.dtype | None, skip: Sequence[str], trust_remote_code: bool,
                supplied: Sequence[str], overrides: dict[str, Any]) -> nn.Module:
    """``from_pretrained`` then :func:`lorakit.core.quant.quantize`: for what the streamed loader leaves to
    transformers."""
    from ..core import quant

    model = load_pretrained(auto, source, dtype=dtype or "auto", trust_remote_code=trust_remote_code,
                            supplied=supplied, **overrides).eval()
    if quantize:
        quant.quantize(model, quantize, double_quant=double_quant, compute_dtype=compute_dtype, skip=skip)
    return model
