"""What the adapter layers of a model hold: PEFT's ``get_layer_status`` and ``get_model_status``.

One :class:`TunerLayerStatus` per wrapped module (LoRA layers and ``modules_to_save`` copies), and a
:class:`TunerModelStatus` that sums them up, with PEFT's field names. Where layers disagree (some enabled, some not;
an adapter trainable on some layers only) the model-level value is ``"irregular"``: the model is in a state that
the model-level methods never leave it in.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from torch import nn

from .errors import InvalidValue
from .inject import ModulesToSave
from .layers import LoraLayer, is_4bit

if TYPE_CHECKING:
    from ..models.model import LoraModel

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    """One wrapped module.

    Attributes:
        name: Its module name within the ``LoraModel`` (``model.model.layers.0.self_attn.q_proj``, as PEFT's).
        module_type: The wrapper's class, e.g. ``LoraLinear`` or ``ModulesToSave``.
        enabled: False while ``disable_adapter_layers()`` (or ``disable_adapter()``) is in effect.
        active_adapters: The active adapters this module has.
        merged_adapters: The adapters folded into its base weight.
        requires_grad: For each adapter, whether its parameters train (``"irregular"`` if only some do).
        available_adapters: Every adapter this module has, sorted.
        devices: For each adapter, the device types of its parameters.
        quantization_backend: ``"bnb 4bit"`` for a LoRA layer on a bitsandbytes 4-bit base, else None (PEFT's
            names; lorakit quantizes with bitsandbytes 4-bit only).
    """

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None = None


@dataclass
class TunerModelStatus:
    """The whole model: each field is the layers' common value, or ``"irregular"`` where they differ.

    Attributes:
        base_model_type: The wrapped model's class, e.g. ``LlamaForCausalLM``.
        adapter_model_type: ``LoraModel``.
        peft_types: ``{adapter name: "LORA"}``.
        trainable_params: Parameters with ``requires_grad``.
        total_params: All parameters (counted as ``get_nb_trainable_parameters`` counts them).
        num_adapter_layers: The number of wrapped modules.
        enabled: True, False or ``"irregular"``.
        active_adapters: The active adapters, or ``"irregular"`` if modules disagree.
        merged_adapters: The adapters merged on every module that has them, or ``"irregular"`` if an adapter is
            merged on some of its modules only.
        requires_grad: For each adapter, True or False on all its modules, else ``"irregular"``.
        available_adapters: Every adapter on any module, sorted.
        devices: For each adapter, the device types of its parameters across modules.
        quantization_backend: The layers' common backend (``"bnb 4bit"`` or None), or ``"irregular"``.
    """

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Irregular = None


def _agreement(values: Iterable[bool | Irregular]) -> bool | Irregular:
    values = list(values)
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def _layer_status(name: str, module: LoraLayer | ModulesToSave) -> TunerLayerStatus:
    if isinstance(module, LoraLayer):
        by_adapter: dict[str, nn.Module] = dict(module.adapters.items())
        merged = list(module.merged_adapters)
    else:
        by_adapter, merged = dict(module.modules_to_save.items()), []
    return TunerLayerStatus(
        name=name,
        module_type=type(module).__name__,
        enabled=not module.disabled,
        active_adapters=list(module.active_adapters),
        merged_adapters=merged,
        requires_grad={n: _agreement(p.requires_grad for p in m.parameters()) for n, m in by_adapter.items()},
        available_adapters=sorted(by_adapter),
        devices={n: sorted({p.device.type for p in m.parameters()}) for n, m in by_adapter.items()},
        quantization_backend="bnb 4bit" if isinstance(module, LoraLayer) and is_4bit(module.base) else None,
    )


def get_layer_status(model: LoraModel) -> list[TunerLayerStatus]:
    """The status of every LoRA layer and ``modules_to_save`` copy of ``model``, in module order.

    Raises:
        ValueError: ``model`` has no adapter layer (PEFT's error).
    """
    wrapped = {id(m) for _, m in model.lora_layers()} | {id(m) for _, m in model.saved_modules()}
    status = [_layer_status(name, module) for name, module in model.named_modules() if id(module) in wrapped]
    if not status:
        raise InvalidValue("no adapter layers found in the model (unload() or merge_and_unload() took them out); "
                           "there is no adapter status to report")
    return status


def get_model_status(model: LoraModel) -> TunerModelStatus:
    """The status of ``model`` as a whole (see :class:`TunerModelStatus`)."""
    layers = get_layer_status(model)
    enabled = {s.enabled for s in layers}
    # A layer lists the active adapters it has; the model is regular when each lists exactly those.
    active = model.active_adapters
    regular = all(s.active_adapters == [n for n in active if n in s.available_adapters] for s in layers)
    # An adapter merged on one LoRA layer but present and unmerged on another is a half-merged model. (Trained
    # heads are never merged, so unlike PEFT they do not make every merge look half done.)
    lora = [layer for _, layer in model.lora_layers()]
    merged_anywhere = set().union(*(layer.merged_adapters for layer in lora))
    half_merged = any(merged_anywhere & (set(layer.adapters) - set(layer.merged_adapters)) for layer in lora)
    requires_grad: dict[str, list[bool | Irregular]] = collections.defaultdict(list)
    devices: dict[str, set[str]] = collections.defaultdict(set)
    for s in layers:
        for name, value in s.requires_grad.items():
            requires_grad[name].append(value)
        for name, types in s.devices.items():
            devices[name].update(types)
    backends = {s.quantization_backend for s in layers}
    trainable, total = model.get_nb_trainable_parameters()
    return TunerModelStatus(
        base_model_type=type(model.get_base_model()).__name__,
        adapter_model_type=type(model).__name__,
        peft_types={name: "LORA" for name in model.peft_config},
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=enabled.pop() if len(enabled) == 1 else "irregular",
        active_adapters=active if regular else "irregular",
        merged_adapters="irregular" if half_merged else sorted(merged_anywhere),
        requires_grad={name: _agreement(values) for name, values in requires_grad.items()},
        available_adapters=sorted(set().union(*(s.available_adapters for s in layers))),
        devices={name: sorted(types) for name, types in devices.items()},
        quantization_backend=backends.pop() if len(backends) == 1 else "irregular",
    )
