"""Adapter files in PEFT's format, both ways: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are PEFT's: ``base_model.model.<module path>.lora_A.weight`` / ``lora_B.weight`` (embeddings:
``lora_embedding_A`` / ``lora_embedding_B``; DoRA: ``lora_magnitude_vector``; ``lora_bias``: ``lora_B.bias``;
trainable tokens: ``token_adapter.trainable_tokens_delta``), the adapter name stripped,
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

from ..core.config import LoraConfig, changes_base, check_adapter_name
from ..core.errors import FileProblem, InvalidValue, MissingFile, write_failure
from ..core.inject import ModulesToSave, find_modules_to_save, find_targets, find_token_targets
from ..core.layers import LoraEmbedding, LoraLayer, TrainableTokensLayer, lora_shapes
from .fingerprint import compare_fingerprints, fingerprint

if TYPE_CHECKING:
    from ..models.model import LoraModel

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
FINGERPRINT_KEY = "lorakit_fingerprint"
# The init of an adapter that changed its base (PiSSA, OLoRA, ...). adapter_config.json says True, as PEFT asks
# (PEFT would run the decomposition again on load, on the residual base); the label rides here instead.
INIT_KEY = "lorakit_init"
TOKENS_KEY = "token_adapter.trainable_tokens_delta"  # PEFT's key of trainable tokens, after the module path


# -- keys ------------------------------------------------------------------------------------------------


def _lora_keys(path: str, embedding: bool, use_dora: bool, lora_bias: bool = False) -> dict[str, str]:
    """PEFT key → our attribute name on the adapter, for the LoRA layer at ``path``."""
    if embedding:
        keys = {f"{path}.lora_embedding_A": "lora_A", f"{path}.lora_embedding_B": "lora_B"}
    else:
        keys = {f"{path}.lora_A.weight": "lora_A", f"{path}.lora_B.weight": "lora_B"}
    if use_dora:
        keys[f"{path}.lora_magnitude_vector"] = "lora_magnitude_vector"
    if lora_bias:
        keys[f"{path}.lora_B.bias"] = "lora_B_bias"
    return keys


def _layer_keys(path: str, layer: LoraLayer, adapter_name: str) -> dict[str, str]:
    """PEFT key → attribute of adapter ``adapter_name`` on ``layer`` (a head tied to trainable tokens: none)."""
    if isinstance(layer, TrainableTokensLayer):
        return {} if layer.tied_to else {f"{path}.{TOKENS_KEY}": "trainable_tokens_delta"}
    adapter = layer.adapters[adapter_name]
    return _lora_keys(path, isinstance(layer, LoraEmbedding), adapter.use_dora, adapter.lora_B_bias is not None)


def adapter_state_dict(model: LoraModel, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's keys (without the ``base_model.model.`` prefix)."""
    config = model.peft_config[adapter_name]
    out: dict[str, torch.Tensor] = {}
    for path, layer in model.lora_layers():
        if adapter_name not in layer.adapters:
            continue
        adapter = layer.adapters[adapter_name]
        for key, attr in _layer_keys(path, layer, adapter_name).items():
            out[key] = getattr(adapter, attr)
        if isinstance(layer, TrainableTokensLayer):
            continue
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


def make_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create the folder ``path`` with its parents (nothing happens if it exists), or say in words why it cannot
    be: a file in its place or on its way, no permission, no space. ``what`` names it for the user (an option).

    Raises:
        ValueError: The folder cannot be created; the message names the path and what is in the way.
    """
    path = Path(path)
    for part in (path, *path.parents):
        if part.exists() and not part.is_dir():
            if part == path:
                raise InvalidValue(f"{what} {str(path)!r} is a file, not a folder; name a folder (it is created if "
                                   f"missing) or move the file away")
            raise InvalidValue(f"{what} {str(path)!r} cannot be created: {str(part)!r} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except PermissionError:
        raise InvalidValue(f"{what} {str(path)!r} cannot be created: permission denied (choose a folder you can "
                           f"write to)") from None
    except OSError as err:
        raise InvalidValue(f"{what} {str(path)!r} cannot be created: {err.strerror or err}") from None
    return path


def temporary_folder(parent: Path, prefix: str) -> Path:
    """A new empty folder in ``parent`` to write into before renaming it into place, with the permissions a plain
    ``mkdir`` gives (``tempfile`` makes private 0700 folders, which would stay private after the rename)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def atomic_write(path: Path, write: Any) -> None:
    """Write through ``write(tmp_path)`` into a temporary file next to ``path``, then rename it into place.

    The file gets the permissions a plain ``open`` gives (``tempfile`` makes private 0600 files)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as err:  # safetensors reports a failed write as its own error
        if os.path.exists(tmp):
            os.unlink(tmp)
        kept = f"the existing {path.name} is unchanged" if path.exists() else "nothing was written"
        raise FileProblem(f"could not write {path} ({write_failure(err)}); {kept}") from None
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_adapter_files(folder: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                        metadata: dict[str, str] | None = None) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into ``folder``, each atomically."""
    data = safetensors_bytes(tensors, metadata or {"format": "pt"})
    atomic_write(folder / WEIGHTS_NAME, lambda tmp: Path(tmp).write_bytes(data))
    atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))


def save_adapters(model: LoraModel, save_directory: str | os.PathLike, adapter_names: Sequence[str] | None = None,
                  base_model_name_or_path: str | None = None,
                  path_initial_model_for_weight_conversion: str | os.PathLike | None = None) -> list[Path]:
    """Save adapters as PEFT does: ``default`` in ``save_directory``, any other name in ``save_directory/<name>``.

    An adapter whose initialization changed the base (PiSSA, OLoRA, CorDA) is written with
    ``init_lora_weights: true`` in its config, as PEFT asks (PEFT would otherwise decompose the residual base again
    when loading it); its real label and the fingerprint of the residual base ride in the safetensors metadata.

    Args:
        path_initial_model_for_weight_conversion: The folder of the adapter as it was right after its PiSSA
            (OLoRA, CorDA) initialization, before training. The trained adapter is then written as an ordinary
            LoRA adapter for the *original* base, as PEFT's option of the same name does: ΔW = s·B·A − s·B₀·A₀,
            so A' = [A; A₀], B' = [B, −B₀], of rank 2r, with α doubled (×√2 with rsLoRA) to keep the scaling.

    Returns:
        The folders written.
    """
    names = list(model.peft_config) if adapter_names is None else list(adapter_names)
    written = []
    for name in names:
        check_adapter_name(name)
        if name not in model.peft_config:
            raise InvalidValue(f"unknown adapter {name!r}; adapters: {sorted(model.peft_config)}")
        folder = make_folder(Path(save_directory) if name == "default" else Path(save_directory) / name,
                             "adapter folder")
        tensors = {PREFIX + k: v.detach().to("cpu").contiguous() for k, v in adapter_state_dict(model, name).items()}
        _warn_if_not_serve_safe(model, name, tensors)
        targets = [path for path, layer in model.lora_layers() if name in layer.adapters]
        fingerprint_now = _unmerged_fingerprint(model, targets)
        config = model.peft_config[name].to_dict()
        metadata = {"format": "pt"}
        if path_initial_model_for_weight_conversion is not None:
            config, tensors = _convert_to_lora(model.peft_config[name], config, tensors,
                                               Path(path_initial_model_for_weight_conversion))
            # For the original base, whose fingerprint this model cannot give: the file is checked by shape.
        else:
            metadata[FINGERPRINT_KEY] = json.dumps(fingerprint_now)
            if changes_base(config["init_lora_weights"]):
                metadata[INIT_KEY] = config["init_lora_weights"]
                config["init_lora_weights"] = True
        config["target_modules"] = json_targets(config["target_modules"])
        if base_model_name_or_path is not None:
            config["base_model_name_or_path"] = base_model_name_or_path
        elif config.get("base_model_name_or_path") is None:
            config["base_model_name_or_path"] = getattr(getattr(model.model, "config", None), "_name_or_path", None)
        write_adapter_files(folder, config, _untie(tensors), metadata)
        written.append(folder)
    return written


def _convert_to_lora(lora_config: LoraConfig, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                     initial: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's PiSSA → LoRA conversion of one adapter's config and tensors (see :func:`save_adapters`)."""
    if lora_config.use_rslora and (lora_config.rank_pattern or lora_config.alpha_pattern):
        raise InvalidValue("path_initial_model_for_weight_conversion does not work with use_rslora together with "
                           "rank_pattern or alpha_pattern (the doubled rank would change the scaling; PEFT refuses it "
                           "too)")
    if lora_config.use_dora:
        raise InvalidValue("path_initial_model_for_weight_conversion cannot convert a DoRA adapter: its magnitude "
                           "vector is not a difference of two low-rank updates")
    init_config, init_tensors, _ = read_adapter(initial)
    init_tensors = {PREFIX + k: v for k, v in init_tensors.items()}
    if (init_config.r, init_config.rank_pattern) != (lora_config.r, lora_config.rank_pattern):
        raise InvalidValue(f"{str(initial)!r} holds an adapter of rank {init_config.r}, this one has rank "
                           f"{lora_config.r}: it is not this adapter's initial state")
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        is_a = key.endswith((".lora_A.weight", ".lora_embedding_A"))
        is_b = key.endswith((".lora_B.weight", ".lora_embedding_B"))
        if not (is_a or is_b):
            out[key] = value
            continue
        if key not in init_tensors or init_tensors[key].shape != value.shape:
            raise InvalidValue(f"{str(initial)!r} lacks {key!r} (or has it in another shape): it is not this "
                               f"adapter's initial state")
        start = init_tensors[key].to(value.dtype)
        # B·A − B₀·A₀ = [B, −B₀]·[A; A₀]: A stacks along the rank (dim 0), B along its rank (dim 1).
        out[key] = torch.cat([value, start], dim=0) if is_a else torch.cat([value, -start], dim=1)
    config = dict(config, init_lora_weights=True, r=2 * config["r"])
    config["lora_alpha"] = config["lora_alpha"] * (2 ** 0.5 if config["use_rslora"] else 2)
    config["rank_pattern"] = {k: 2 * v for k, v in config["rank_pattern"].items()}
    config["alpha_pattern"] = {k: 2 * v for k, v in config["alpha_pattern"].items()}
    return config, out


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
        raise InvalidValue(f"{str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise InvalidValue(f"{str(path)!r} is not valid JSON: {err}") from None
    except RecursionError:
        raise InvalidValue(f"{str(path)!r} nests too deeply to be a config") from None
    if not isinstance(data, dict):
        raise InvalidValue(f"{str(path)!r} holds a JSON {type(data).__name__}, not an object of settings")
    bad = _non_finite(data)
    if bad is not None:
        field, value = bad
        raise InvalidValue(f"{str(path)!r}: {field} is {value}; every number in it must be finite")
    return data


def _non_finite(value: Any, where: str = "") -> tuple[str, float] | None:
    """The first NaN or ±Infinity in a parsed JSON value (Python's json reads them), with its dotted path."""
    if isinstance(value, float) and not math.isfinite(value):
        return where or "the value", value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _non_finite(item, f"{where}.{key}" if where and isinstance(key, str) else
                            f"{where}[{key}]" if where else str(key))
        if found is not None:
            return found
    return None


def inside(folder: str | os.PathLike, name: str, allow_symlinks: bool = False) -> Path:
    """``folder / name``, refused when it is a symbolic link that leads out of ``folder``: an adapter folder is
    read as a unit (a server's adapter root, a downloaded folder), and a link out of it would read any file the
    process can. Links that stay inside the folder are followed; ``allow_symlinks`` follows any link.

    Raises:
        ValueError: The file is a link to a path outside ``folder``.
    """
    path = Path(folder) / name
    if allow_symlinks or not path.is_symlink():
        return path
    target, root = path.resolve(), Path(folder).resolve()
    if target != root and root not in target.parents:
        raise InvalidValue(f"{str(path)!r} is a symbolic link to {str(target)!r}, outside the adapter folder; lorakit "
                           f"does not follow links out of an adapter folder (copy the file in, or pass "
                           f"allow_symlinks=True from Python)")
    return path


def read_adapter_config(folder: Path, allow_symlinks: bool = False) -> dict[str, Any]:
    """The ``adapter_config.json`` of an adapter folder as a dict (any PEFT type), with clear errors."""
    path = inside(folder, CONFIG_NAME, allow_symlinks)
    if not path.is_file():
        raise MissingFile(f"{str(folder)!r} has no {CONFIG_NAME}")
    return read_json_object(path)


def is_prompt_adapter(folder: str | os.PathLike) -> bool:
    """Whether an adapter folder holds a prompt (PEFT's ``PROMPT_TUNING``) rather than LoRA weights."""
    return read_adapter_config(Path(folder)).get("peft_type") == "PROMPT_TUNING"


def read_adapter(path: str | os.PathLike, allow_pickle: bool = False, allow_symlinks: bool = False
                 ) -> tuple[LoraConfig, dict[str, torch.Tensor], dict[str, str]]:
    """Read an adapter folder: its config, its tensors (prefix stripped) and the safetensors metadata.

    Args:
        allow_symlinks: Follow symbolic links that lead out of the folder (refused by default: see :func:`inside`).

    Raises:
        FileNotFoundError: No folder or no ``adapter_config.json`` / weights file in it.
        ValueError: A corrupt or truncated file, a pickle file without ``allow_pickle=True``, a bad config, a
            tensor that is not floating point or not finite, a link out of the folder.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise MissingFile(f"adapter folder {str(folder)!r} does not exist")
    config_file = inside(folder, CONFIG_NAME, allow_symlinks)
    if not config_file.is_file():
        raise MissingFile(f"{str(config_file)!r} not found: not an adapter folder")
    settings = read_json_object(config_file)
    try:
        config = LoraConfig.from_dict(settings)
    except (ValueError, TypeError) as err:  # a setting lorakit lacks, or of the wrong type, e.g. "r": [8]
        raise InvalidValue(f"{str(config_file)!r}: {err}") from None
    weights = inside(folder, WEIGHTS_NAME, allow_symlinks)
    pickled = inside(folder, PICKLE_NAME, allow_symlinks)
    metadata: dict[str, str] = {}
    if weights.is_file():
        try:
            with safe_open(str(weights), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            raise InvalidValue(f"{str(weights)!r} is truncated or corrupt: {err}") from None
    elif pickled.is_file():
        if not allow_pickle:
            raise InvalidValue(
              f"{str(pickled)!r} is a pickle file, which can run code when loaded; lorakit refuses it "
              f"unless you pass allow_pickle=True (it is then read with torch.load(weights_only=True)), or convert "
              f"it to {WEIGHTS_NAME}"
          )
        try:
            tensors = torch.load(pickled, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
            raise InvalidValue(f"{str(pickled)!r} could not be read safely: {err}") from None
    else:
        raise MissingFile(f"no {WEIGHTS_NAME} in {str(folder)!r}")
    check_finite(tensors, folder)
    label = metadata.get(INIT_KEY)
    if config.init_lora_weights is True and isinstance(label, str) and changes_base(label):
        config.init_lora_weights = label  # what the adapter really is; the config says True for PEFT's sake
    return config, _normalize_keys(tensors), metadata


def check_finite(tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Refuse NaN or ±inf weights: they would load silently and make every output NaN (empty generated text)."""
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise InvalidValue(f"{str(folder)!r}: {key!r} is a {type(value).__name__}, not a tensor")
        if not value.is_floating_point():  # cast silently, integers would load as some other adapter than saved
            raise InvalidValue(f"{str(folder)!r}: tensor {key!r} has dtype {str(value.dtype).removeprefix('torch.')}; "
                               f"adapter weights are floating point (float32, float16 or bfloat16)")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise InvalidValue(f"{str(folder)!r}: tensor {key!r} holds {bad} NaN or infinite value(s); "
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
        conv = len(b_shape) > 2  # PEFT stores a convolution's magnitude as (1, out, 1…)
        magnitude = (1, b_shape[0], *b_shape[2:]) if conv else (b_shape[0],)
        shapes = {"lora_A": a_shape, "lora_B": b_shape, "lora_magnitude_vector": magnitude,
                  "lora_B_bias": (b_shape[0],)}
        for key, attr in _lora_keys(name, isinstance(base, nn.Embedding), config.use_dora, config.lora_bias).items():
            required[key] = shapes[attr]
    for name, (indices, _) in find_token_targets(model, config, targets).items():
        module = model.get_submodule(name)
        base = module.base if isinstance(module, LoraLayer) else module
        required[f"{name}.{TOKENS_KEY}"] = (len(indices), base.weight.shape[1])
    for name in find_modules_to_save(model, config):
        module = model.get_submodule(name)
        source = module.original_module if isinstance(module, ModulesToSave) else module
        for key, value in source.state_dict().items():
            required[f"{name}.{key}"] = tuple(value.shape)
    missing = [k for k in required if k not in tensors]
    if missing:
        raise InvalidValue(f"the adapter file lacks {len(missing)} tensor(s) this model needs under its config, "
                           f"e.g. {missing[:3]}")
    for key, shape in required.items():
        if tuple(tensors[key].shape) != tuple(shape):
            raise InvalidValue(f"shape mismatch for {key!r}: the file has {list(tensors[key].shape)}, "
                               f"this model needs {list(shape)}")
    for key in tensors.keys() - required.keys():
        value, current = tensors[key], _base_param(model, key)
        if key.endswith("bias") and current is not None:
            if current.shape != value.shape:
                raise InvalidValue(f"shape mismatch for {key!r}: the file has {list(value.shape)}, "
                                   f"this model needs {list(current.shape)}")
            continue
        if key.endswith(".base_layer.weight") and current is not None:  # PEFT saves a targeted base embedding
            if current.shape == value.shape and torch.equal(current.detach().cpu(), value.to(current.dtype)):
                continue
            raise InvalidValue(f"adapter tensor {key!r} would replace a base weight with other values (a resized "
                               f"vocabulary?); lorakit does not load base weights from adapter files")
        raise InvalidValue(f"adapter tensor {key!r} has no place in this model "
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
    init = config.init_lora_weights
    residual = (f"this adapter was initialized with {init!r}, which moved part of each targeted base weight into "
                f"the adapter: it only fits the residual base that initialization left")
    if changes_base(init) and FINGERPRINT_KEY not in metadata and not force:
        raise InvalidValue(f"{residual}, and the file carries no fingerprint of that base (a PEFT file), so lorakit "
                           f"cannot tell a residual base from a plain one. If this model is the residual base, pass "
                           f"force=True; for the original base, convert the adapter to plain LoRA "
                           f"(save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    if FINGERPRINT_KEY in metadata:
        try:
            saved = json.loads(metadata[FINGERPRINT_KEY])
        except json.JSONDecodeError:
            raise InvalidValue(f"the adapter's {FINGERPRINT_KEY} metadata is not valid JSON") from None
        diffs = compare_fingerprints(saved, fingerprint(model, adapter_modules(model, config)))
        if diffs and not force:
            if changes_base(init):
                raise InvalidValue(f"{residual}, and this model's base weights are not that residual (a plain base?): "
                                   + "; ".join(diffs[:5]) + ". Load it onto the residual base, or convert it to plain "
                                   "LoRA for the original base (save_pretrained(..., "
                                   "path_initial_model_for_weight_conversion=...)).")
            raise InvalidValue("this adapter was trained on a different base model: " + "; ".join(diffs[:5])
                               + ". Pass force=True to load it anyway (the shapes must still fit).")
    return _plan(model, config, tensors)


def adapter_modules(model: nn.Module, config: LoraConfig) -> list[str]:
    """Every module an adapter of ``config`` lives on: its LoRA targets, the layers with trainable tokens and the
    output heads tied to them (what the fingerprint covers)."""
    targets = find_targets(model, config)
    tokens = find_token_targets(model, config, targets)
    return targets + list(tokens) + [head for _, heads in tokens.values() for head in heads]


def copy_in(model: LoraModel, adapter_name: str, targets: list[str], tensors: dict[str, torch.Tensor]) -> None:
    """Copy checked tensors (see :func:`check_fits`) into the existing adapter ``adapter_name``."""
    with torch.no_grad():
        for path, layer in model.lora_layers():
            if adapter_name in layer.adapters:
                adapter = layer.adapters[adapter_name]
                for key, attr in _layer_keys(path, layer, adapter_name).items():
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
        raise InvalidValue(f"unknown adapter {adapter_name!r}; adapters: {sorted(model.peft_config)}")
    if any(adapter_name in layer.merged_adapters for _, layer in model.lora_layers()):
        raise InvalidValue(f"adapter {adapter_name!r} is merged into the base weights; unmerge_adapter() first")
    tensors = _normalize_keys(state_dict)
    targets = _plan(model.model, model.peft_config[adapter_name], tensors)
    copy_in(model, adapter_name, targets, tensors)
