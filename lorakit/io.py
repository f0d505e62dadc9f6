"""Adapter files in PEFT's format, both ways: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are PEFT's: ``base_model.model.<module path>.lora_A.weight`` / ``lora_B.weight`` (embeddings:
``lora_embedding_A`` / ``lora_embedding_B``; DoRA: ``lora_magnitude_vector``), the adapter name stripped,
``modules_to_save`` weights under the module's own path. A base-model fingerprint rides in the safetensors
header metadata, where PEFT ignores it.

Loading is three steps, which ``LoraModel.load_adapter`` / ``from_pretrained`` run in order: :func:`read_adapter`,
:func:`check_fits` (everything is checked before the model is touched, so a failed load leaves it exactly as it
was), :func:`copy_in`.
Saving writes each file to a temporary name and renames it, so a file on disk is never half-written.
"""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from .config import LoraConfig, check_adapter_name
from .inject import ModulesToSave, find_modules_to_save, find_targets
from .layers import LoraEmbedding, LoraLayer, is_4bit, lora_shapes
from .quant import dense_weight, weight_shape

if TYPE_CHECKING:
    from .model import LoraModel

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
FINGERPRINT_KEY = "lorakit_fingerprint"
_SAMPLE = 4  # sampled values per targeted weight in the fingerprint


# -- keys ------------------------------------------------------------------------------------------------


def _lora_keys(path: str, embedding: bool, use_dora: bool) -> dict[str, str]:
    """PEFT key → our attribute name on the adapter, for the LoRA layer at ``path``."""
    if embedding:
        keys = {f"{path}.lora_embedding_A": "lora_A", f"{path}.lora_embedding_B": "lora_B"}
    else:
        keys = {f"{path}.lora_A.weight": "lora_A", f"{path}.lora_B.weight": "lora_B"}
    if use_dora:
        keys[f"{path}.lora_magnitude_vector"] = "lora_magnitude_vector"
    return keys


def adapter_state_dict(model: LoraModel, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's keys (without the ``base_model.model.`` prefix)."""
    config = model.peft_config[adapter_name]
    out: dict[str, torch.Tensor] = {}
    for path, layer in model.lora_layers():
        if adapter_name not in layer.adapters:
            continue
        adapter = layer.adapters[adapter_name]
        for key, attr in _lora_keys(path, isinstance(layer, LoraEmbedding), adapter.use_dora).items():
            out[key] = getattr(adapter, attr)
        if config.bias != "none" and getattr(layer.base, "bias", None) is not None:
            out[f"{path}.base_layer.bias"] = layer.base.bias
    for path, module in model.saved_modules():
        if adapter_name in module.modules_to_save:
            for key, value in module.modules_to_save[adapter_name].state_dict().items():
                out[f"{path}.{key}"] = value
    if config.bias == "all":
        for name, param in model.model.named_parameters():
            if name.endswith(".bias") and not any(f".{p}." in name for p in ("base", "adapters", "modules_to_save",
                                                                              "original_module")):
                out[name] = param
    return out


# -- fingerprint -----------------------------------------------------------------------------------------


def fingerprint(model: nn.Module, targets: Sequence[str]) -> dict[str, Any]:
    """What identifies the base an adapter was trained on: architecture, targeted weight shapes, and a digest
    of the targeted weights (per weight: its L2 norm and a few fixed sampled values).

    The digest is compared at bf16 precision, not bit for bit, so the fp32 and bf16 copies of one base agree,
    and so does a base that went through merge/unmerge, while another checkpoint does not. 4-bit layers are
    digested from their dequantized weights and marked ``quantized``: those comparisons allow for 4-bit rounding.
    """
    shapes, digest, quantized = {}, {}, False
    for name in sorted(targets):
        module = model.get_submodule(name)
        base = module.base if isinstance(module, LoraLayer) else module
        if is_4bit(base):
            quantized = True
            shapes[name] = weight_shape(base)
            if base.weight.device.type == "meta":
                continue
            weight = dense_weight(base)
        else:
            weight = base.weight.detach()
            shapes[name] = list(weight.shape)
            if weight.device.type == "meta":
                continue
        flat = weight.reshape(-1).float()
        picks = flat[:: max(1, flat.numel() // _SAMPLE)][:_SAMPLE]
        digest[name] = [float(f"{v:.5g}") for v in [flat.norm().item(), *picks.tolist()]]
    found = {"architecture": type(model).__name__, "shapes": shapes, "digest": digest}
    return (found | {"quantized": True}) if quantized else found


def _compare_fingerprints(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    diffs = []
    if saved.get("architecture") != current["architecture"]:
        diffs.append(f"architecture {saved.get('architecture')!r} vs this model's {current['architecture']!r}")
    for name, shape in saved.get("shapes", {}).items():
        if current["shapes"].get(name) != shape:
            diffs.append(f"{name}: weight shape {shape} vs {current['shapes'].get(name)}")
    if diffs:
        return diffs
    pairs = [(name, values, current["digest"][name]) for name, values in saved.get("digest", {}).items()
             if len(current["digest"].get(name, ())) == len(values)]
    quantized = saved.get("quantized") or current.get("quantized")
    differ = _differ_quantized(pairs) if quantized else _differ(pairs, current["shapes"])
    if differ:
        diffs.append(f"same shapes, but the base weights differ ({differ}): another checkpoint")
    return diffs


def _differ(pairs: list[tuple[str, list[float], list[float]]], shapes: dict[str, list[int]]) -> str | None:
    """The first weight whose norm or sampled values differ by more than bf16-level rounding, if any (as
    "first at <name>")."""
    for name, saved, now in pairs:
        rms = saved[0] / math.sqrt(max(1, math.prod(shapes[name])))
        if any(abs(a - b) > 1e-2 * abs(a) + 1e-2 * rms for a, b in zip(saved, now)):
            return f"first at {name}"
    return None


def _differ_quantized(pairs: list[tuple[str, list[float], list[float]]]) -> str | None:
    """What differs by more than 4-bit rounding explains (a weight's name, or the sampled values), if anything.

    4-bit rounding moves single values by up to several times the weights' RMS, so values are not compared
    one by one: each norm must agree within 10% (rounding errors average out over a whole weight: ~0.5% on real
    layers, ~5% on tiny ones), and the
    sampled values of all weights together within 50% relative L2 error (NF4's is ~10% on real layers, up to
    ~30% on tiny ones; an unrelated checkpoint's is ~140%).
    """
    for name, saved, now in pairs:
        if abs(saved[0] - now[0]) > 0.1 * abs(saved[0]):
            return f"first at {name}"
    squared_error = sum((x - y) ** 2 for _, (_, *a), (_, *b) in pairs for x, y in zip(a, b))
    squared_norm = sum(x * x for _, (_, *a), _ in pairs for x in a)
    if pairs and squared_error > 0.5 ** 2 * squared_norm:
        return "the sampled values of all targeted weights"
    return None


# -- saving ----------------------------------------------------------------------------------------------


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file's bytes, the same for the same tensors and metadata in every process.

    The safetensors writer orders the header's metadata by a hash seeded per process, so two saves of one adapter
    could differ in their first bytes. The header is rewritten with sorted keys (the tensor data and the offsets
    that point into it do not move) and padded with spaces to 8 bytes, as the format asks.
    """
    raw = save(tensors, metadata=metadata)
    size = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8:8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + raw[8 + size:]


@functools.cache
def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def temporary_folder(parent: Path, prefix: str) -> Path:
    """A new empty folder in ``parent`` to write into before renaming it into place, with the permissions a plain
    ``mkdir`` gives (``tempfile`` makes private 0700 folders, which would stay private after the rename)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def _atomic_write(path: Path, write: Any) -> None:
    """Write through ``write(tmp_path)`` into a temporary file next to ``path``, then rename it into place.

    The file gets the permissions a plain ``open`` gives (``tempfile`` makes private 0600 files)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        kept = f"the existing {path.name} is unchanged" if path.exists() else "nothing was written"
        raise OSError(f"could not write {path} ({err.strerror or err}); {kept}") from None
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_adapter_files(folder: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                        metadata: dict[str, str] | None = None) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into ``folder``, each atomically."""
    data = safetensors_bytes(tensors, metadata or {"format": "pt"})
    _atomic_write(folder / WEIGHTS_NAME, lambda tmp: Path(tmp).write_bytes(data))
    _atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))


def save_adapters(model: LoraModel, save_directory: str | os.PathLike, adapter_names: Sequence[str] | None = None,
                  base_model_name_or_path: str | None = None) -> list[Path]:
    """Save adapters as PEFT does: ``default`` in ``save_directory``, any other name in ``save_directory/<name>``.

    Returns:
        The folders written.
    """
    names = list(model.peft_config) if adapter_names is None else list(adapter_names)
    written = []
    for name in names:
        check_adapter_name(name)
        if name not in model.peft_config:
            raise ValueError(f"unknown adapter {name!r}; adapters: {sorted(model.peft_config)}")
        folder = Path(save_directory) if name == "default" else Path(save_directory) / name
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {PREFIX + k: v.detach().to("cpu").contiguous() for k, v in adapter_state_dict(model, name).items()}
        _warn_if_not_serve_safe(model, name, tensors)
        targets = [path for path, layer in model.lora_layers() if name in layer.adapters]
        metadata = {"format": "pt", FINGERPRINT_KEY: json.dumps(_unmerged_fingerprint(model, targets))}
        config = model.peft_config[name].to_dict()
        config["target_modules"] = json_targets(config["target_modules"])
        if base_model_name_or_path is not None:
            config["base_model_name_or_path"] = base_model_name_or_path
        elif config.get("base_model_name_or_path") is None:
            config["base_model_name_or_path"] = getattr(getattr(model.model, "config", None), "_name_or_path", None)
        write_adapter_files(folder, config, _untie(tensors), metadata)
        written.append(folder)
    return written


def _unmerged_fingerprint(model: LoraModel, targets: list[str]) -> dict[str, Any]:
    """The fingerprint of the base weights with no update folded in (merged adapters are taken out meanwhile)."""
    with model.unmerged():
        return fingerprint(model.model, targets)


def json_targets(targets: Any) -> Any:
    return sorted(targets) if isinstance(targets, (list, set, tuple)) else targets


def _untie(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory; give each its own storage."""
    seen: set[int] = set()
    out = {}
    for key, value in tensors.items():
        ptr = value.untyped_storage().data_ptr()
        out[key] = value.clone() if ptr in seen else value
        seen.add(ptr)
    return out


def _warn_if_not_serve_safe(model: LoraModel, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Most multi-LoRA servers (vLLM, LoRAX) reject adapters that carry full embedding or LM-head weights."""
    get_output = getattr(model.model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    heavy = []
    for path, module in model.saved_modules():
        if name not in module.modules_to_save:
            continue
        original = module.original_module
        if isinstance(original, nn.Embedding) or head is module or head is original:
            heavy.append((path, sum(p.numel() * p.element_size() for p in original.parameters())))
    if heavy:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        extra = sum(size for _, size in heavy)
        listed = ", ".join(path for path, _ in heavy)
        warnings.warn(
            f"adapter {name!r} carries full embedding/LM-head weights ({listed}): {extra / 2**20:.1f} MiB of its "
            f"{total / 2**20:.1f} MiB file. Most multi-LoRA servers (vLLM, LoRAX) reject such adapters; "
            f"drop them from modules_to_save to serve it.",
            stacklevel=3,
        )


# -- loading ---------------------------------------------------------------------------------------------


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold one object, with an error naming the file for every way it can be damaged."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(path)!r} is not valid JSON: {err}") from None
    except RecursionError:
        raise ValueError(f"{str(path)!r} nests too deeply to be a config") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} holds a JSON {type(data).__name__}, not an object of settings")
    return data


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """The ``adapter_config.json`` of an adapter folder as a dict (any PEFT type), with clear errors."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no {CONFIG_NAME}")
    return read_json_object(path)


def is_prompt_adapter(folder: str | os.PathLike) -> bool:
    """Whether an adapter folder holds a prompt (PEFT's ``PROMPT_TUNING``) rather than LoRA weights."""
    return read_adapter_config(Path(folder)).get("peft_type") == "PROMPT_TUNING"


def read_adapter(path: str | os.PathLike, allow_pickle: bool = False
                 ) -> tuple[LoraConfig, dict[str, torch.Tensor], dict[str, str]]:
    """Read an adapter folder: its config, its tensors (prefix stripped) and the safetensors metadata.

    Raises:
        FileNotFoundError: No folder or no ``adapter_config.json`` / weights file in it.
        ValueError: A corrupt or truncated file, a pickle file without ``allow_pickle=True``, a bad config.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {str(folder)!r} does not exist")
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{str(config_file)!r} not found: not an adapter folder")
    settings = read_json_object(config_file)
    try:
        config = LoraConfig.from_dict(settings)
    except (ValueError, TypeError) as err:  # a setting lorakit lacks, or of the wrong type, e.g. "r": [8]
        raise ValueError(f"{str(config_file)!r}: {err}") from None
    weights = folder / WEIGHTS_NAME
    metadata: dict[str, str] = {}
    if weights.is_file():
        try:
            with safe_open(str(weights), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{str(weights)!r} is truncated or corrupt: {err}") from None
    elif (folder / PICKLE_NAME).is_file():
        if not allow_pickle:
            raise ValueError(
                f"{str(folder / PICKLE_NAME)!r} is a pickle file, which can run code when loaded; lorakit refuses it "
                f"unless you pass allow_pickle=True (it is then read with torch.load(weights_only=True)), or convert "
                f"it to {WEIGHTS_NAME}"
            )
        try:
            tensors = torch.load(folder / PICKLE_NAME, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
            raise ValueError(f"{str(folder / PICKLE_NAME)!r} could not be read safely: {err}") from None
    else:
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {str(folder)!r}")
    check_finite(tensors, folder)
    return config, _normalize_keys(tensors), metadata


def check_finite(tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Refuse NaN or ±inf weights: they would load silently and make every output NaN (empty generated text)."""
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{str(folder)!r}: {key!r} is a {type(value).__name__}, not a tensor")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(f"{str(folder)!r}: tensor {key!r} holds {bad} NaN or infinite value(s); "
                             f"the adapter is damaged (was it saved after training diverged?)")


def _normalize_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the ``base_model.model.`` prefix. With ``bias="all"`` PEFT also writes the biases of its
    ``modules_to_save`` wrapper: ``x.modules_to_save.bias`` is the trained copy's (``x.bias``), and
    ``x.original_module.bias`` the frozen original's, which an adapter does not carry."""
    out = {}
    for key, value in tensors.items():
        key = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if ".original_module." in key:
            continue
        out[key.replace(".modules_to_save.", ".")] = value
    return out


def _plan(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Check that ``tensors`` fit ``model`` under ``config``, without changing the model. Returns the targets."""
    targets = find_targets(model, config)
    required: dict[str, tuple[int, ...]] = {}
    for name in targets:
        module = model.get_submodule(name)
        base = module.base if isinstance(module, LoraLayer) else module
        a_shape, b_shape = lora_shapes(base, config.rank_for(name))
        shapes = {"lora_A": a_shape, "lora_B": b_shape, "lora_magnitude_vector": (b_shape[0],)}
        for key, attr in _lora_keys(name, isinstance(base, nn.Embedding), config.use_dora).items():
            required[key] = shapes[attr]
    for name in find_modules_to_save(model, config):
        module = model.get_submodule(name)
        source = module.original_module if isinstance(module, ModulesToSave) else module
        for key, value in source.state_dict().items():
            required[f"{name}.{key}"] = tuple(value.shape)
    missing = [k for k in required if k not in tensors]
    if missing:
        raise ValueError(f"the adapter file lacks {len(missing)} tensor(s) this model needs under its config, "
                         f"e.g. {missing[:3]}")
    for key, shape in required.items():
        if tuple(tensors[key].shape) != tuple(shape):
            raise ValueError(f"shape mismatch for {key!r}: the file has {list(tensors[key].shape)}, "
                             f"this model needs {list(shape)}")
    for key in tensors.keys() - required.keys():
        value, current = tensors[key], _base_param(model, key)
        if key.endswith("bias") and current is not None:
            if current.shape != value.shape:
                raise ValueError(f"shape mismatch for {key!r}: the file has {list(value.shape)}, "
                                 f"this model needs {list(current.shape)}")
            continue
        if key.endswith(".base_layer.weight") and current is not None:  # PEFT saves a targeted base embedding
            if current.shape == value.shape and torch.equal(current.detach().cpu(), value.to(current.dtype)):
                continue
            raise ValueError(f"adapter tensor {key!r} would replace a base weight with other values (a resized "
                             f"vocabulary?); lorakit does not load base weights from adapter files")
        raise ValueError(f"adapter tensor {key!r} has no place in this model "
                         f"(the config targets {config.target_modules!r})")
    return targets


def _base_param(model: nn.Module, key: str) -> torch.Tensor | None:
    """The model parameter a PEFT key names: ``x.base_layer.bias`` is our ``x.base.bias``, or plain ``x.bias``."""
    params = dict(model.named_parameters())
    for candidate in (key.replace(".base_layer.", ".base."), key.replace(".base_layer.", ".")):
        if candidate in params:
            return params[candidate]
    return None


def check_fits(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
               force: bool = False) -> list[str]:
    """Check that an adapter read by :func:`read_adapter` belongs on ``model`` (its fingerprint, unless ``force``)
    and fits it (every tensor's place and shape), without changing the model.

    Returns:
        The names of the modules the adapter targets.
    """
    if config.init_lora_weights == "pissa":
        raise ValueError("this adapter was initialized with PiSSA, so it only makes sense on its residual base "
                         "(the base minus its initial top-r part); lorakit cannot load it onto a plain base")
    if FINGERPRINT_KEY in metadata:
        try:
            saved = json.loads(metadata[FINGERPRINT_KEY])
        except json.JSONDecodeError:
            raise ValueError(f"the adapter's {FINGERPRINT_KEY} metadata is not valid JSON") from None
        diffs = _compare_fingerprints(saved, fingerprint(model, find_targets(model, config)))
        if diffs and not force:
            raise ValueError("this adapter was trained on a different base model: " + "; ".join(diffs[:5])
                             + ". Pass force=True to load it anyway (the shapes must still fit).")
    return _plan(model, config, tensors)


def copy_in(model: LoraModel, adapter_name: str, targets: list[str], tensors: dict[str, torch.Tensor]) -> None:
    """Copy checked tensors (see :func:`check_fits`) into the existing adapter ``adapter_name``."""
    with torch.no_grad():
        for path in targets:
            layer = model.model.get_submodule(path)
            adapter = layer.adapters[adapter_name]
            for key, attr in _lora_keys(path, isinstance(layer, LoraEmbedding), adapter.use_dora).items():
                getattr(adapter, attr).copy_(tensors[key])
        for path, module in model.saved_modules():
            if adapter_name in module.modules_to_save:
                state = {k[len(path) + 1:]: v for k, v in tensors.items() if k.startswith(path + ".")}
                module.modules_to_save[adapter_name].load_state_dict(state)
        saved_prefixes = tuple(p + "." for p, _ in model.saved_modules())
        for key, value in tensors.items():
            if key.endswith("bias") and not key.startswith(saved_prefixes) and ".lora_" not in key:
                target = _base_param(model.model, key)
                if target is not None:
                    target.copy_(value)


def set_adapter_state_dict(model: LoraModel, state_dict: dict[str, torch.Tensor],
                           adapter_name: str = "default") -> None:
    """Copy PEFT-format tensors (as ``get_peft_model_state_dict`` or ``adapter_state_dict`` give them, with or
    without the ``base_model.model.`` prefix) into the existing adapter ``adapter_name``. Checked first:
    on error nothing changes."""
    if adapter_name not in model.peft_config:
        raise ValueError(f"unknown adapter {adapter_name!r}; adapters: {sorted(model.peft_config)}")
    if any(adapter_name in layer.merged_adapters for _, layer in model.lora_layers()):
        raise ValueError(f"adapter {adapter_name!r} is merged into the base weights; unmerge_adapter() first")
    tensors = _normalize_keys(state_dict)
    targets = _plan(model.model, model.peft_config[adapter_name], tensors)
    copy_in(model, adapter_name, targets, tensors)
