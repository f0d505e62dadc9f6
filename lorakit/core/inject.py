"""Target matching and module swapping.

Matching follows PEFT exactly: a list entry matches a module whose full name equals it or ends with
``"." + entry``; a string is a regular expression full-matched against the full name; ``"all-linear"`` is
every Linear/Conv1D layer except the output head. Beyond PEFT, every listed target must match something:
a typo is an error with the closest real names, not an adapter that silently trains nothing.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from .config import ALL_LINEAR, INIT_CHOICES, QA_HEAD_NAMES, SEQ_CLS_HEAD_NAMES, LoraConfig
from .errors import InvalidType, InvalidValue
from .families import family_of
from .layers import (
    SUPPORTED_TYPES,
    LoraLayer,
    LoraLinear,
    TrainableTokensLayer,
    is_4bit,
    is_conv1d,
    lora_shapes,
    wrap,
)


class ModulesToSave(nn.Module):
    """A module trained in full: the frozen original plus one trainable copy per adapter.

    The forward uses the copy of the first active adapter that has one, else the original (so disabling
    the adapters gives the base model back).
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        for p in original.parameters():
            p.requires_grad_(False)
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False
        # Set only during a mixed batch: (slot of each row, adapter name of each slot from 1).
        self.routing: tuple[torch.Tensor, list[str]] | None = None

    def add_adapter(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_active(self, names: Iterable[str]) -> None:
        self.active_adapters = [n for n in names if n in self.modules_to_save]

    def current(self) -> nn.Module:
        if not self.disabled and self.active_adapters:
            return self.modules_to_save[self.active_adapters[0]]
        return self.original_module

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.routing is None or self.disabled:
            return self.current()(x, *args, **kwargs)
        # Mixed batch: each row goes through its adapter's copy (the original for "__base__" rows). Heads are
        # called once per adapter present on the rows that use it.
        index, names = self.routing
        out = self.original_module(x, *args, **kwargs)
        for slot, name in enumerate(names, start=1):
            rows = (index == slot).nonzero().squeeze(1)
            if name in self.modules_to_save and rows.numel():
                out = out.index_copy(0, rows, self.modules_to_save[name](x.index_select(0, rows), *args, **kwargs))
        return out


def _matches_list(name: str, entries: Iterable[str]) -> str | None:
    """The first entry that ``name`` equals or ends with (after a dot), else None."""
    for entry in entries:
        if name == entry or name.endswith("." + entry):
            return entry
    return None


def _layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match:
                break
    return int(match.group("idx")) if match else None


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, LoraLinear)) or is_conv1d(module)


def _head_names(model: nn.Module, config: LoraConfig) -> set[str]:
    """The output head(s) that ``all-linear`` leaves alone (PEFT's convention)."""
    heads: list[nn.Module] = []
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if output is not None:
        heads.append(output)
    else:
        heads += [getattr(model, n) for n in _task_heads(config) if isinstance(getattr(model, n, None), nn.Module)]
    return {name for name, module in model.named_modules() if any(module is h for h in heads)}


def _task_heads(config: LoraConfig) -> tuple[str, ...]:
    """The heads PEFT trains in full for the config's task type (and writes into ``modules_to_save``)."""
    return {"SEQ_CLS": SEQ_CLS_HEAD_NAMES, "TOKEN_CLS": SEQ_CLS_HEAD_NAMES,
            "QUESTION_ANS": QA_HEAD_NAMES}.get(config.task_type or "", ())


def modules_to_save_names(config: LoraConfig) -> list[str]:
    """The modules trained in full: ``modules_to_save`` plus the task's head (SEQ_CLS, TOKEN_CLS, QUESTION_ANS)."""
    names = list(config.modules_to_save or [])
    names += [n for n in _task_heads(config) if n not in names]
    return names


def _default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = family_of(model_type).default_targets
    if targets is None:
        raise InvalidValue(
          f"target_modules is None and lorakit has no default for model_type {model_type!r}; "
          f"name the modules (for example target_modules=['q_proj', 'v_proj']) or use 'all-linear'"
      )
    return list(targets)


def _suggest(missing: str, names: list[str]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names if n})
    close = difflib.get_close_matches(missing, leaves, n=3, cutoff=0.5)
    close += [n for n in difflib.get_close_matches(missing, names, n=3, cutoff=0.6) if n not in close]
    if close:
        return "did you mean " + ", ".join(map(repr, close[:4])) + "?"
    return "module names end with: " + ", ".join(map(repr, leaves[:12])) + (" ..." if len(leaves) > 12 else "")


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """The full names of the modules ``config`` would wrap in ``model``, in model order. Changes nothing.

    Raises:
        ValueError: A listed target, a regex or ``all-linear`` matches nothing (the message names it and
            suggests the closest real module names), or a match is a module type LoRA cannot wrap.
    """
    named = list(_plain_modules(model))
    names = [n for n, _ in named]
    keep_full = modules_to_save_names(config)

    targets = config.target_modules if config.target_modules is not None else _default_targets(model)
    all_linear = isinstance(targets, str) and targets.lower() == ALL_LINEAR
    if all_linear:
        heads = _head_names(model, config)
        selected = [n for n, m in named if _is_linear(m) and n not in heads]
        if not selected:
            raise InvalidValue("target_modules='all-linear' matched no Linear or Conv1D layer in this model")
    elif isinstance(targets, str):
        selected = [n for n in names if re.fullmatch(targets, n)]
        if not selected:
            raise InvalidValue(f"target_modules regex {targets!r} matches no module name; {_suggest(targets, names)}")
    else:
        selected = [n for n in names if _matches_list(n, targets)]
        missing = [t for t in targets if not any(_matches_list(n, [t]) for n in names)]
        if missing:
            raise InvalidValue(
              "; ".join(f"target module {t!r} matches no module in the model ({_suggest(t, names)})" for t in missing)
          )
        if config.layers_to_transform is not None:
            wanted = config.layers_to_transform
            wanted = {wanted} if isinstance(wanted, int) else set(wanted)
            # As in PEFT, a target given by its full name is taken whatever its layer.
            selected = [n for n in selected if n in targets or _layer_index(n, config.layers_pattern) in wanted]
            if not selected:
                raise InvalidValue(
                  f"layers_to_transform={config.layers_to_transform!r} (layers_pattern={config.layers_pattern!r}) "
                  f"leaves none of the targets {targets!r}"
              )

    excl = config.exclude_modules
    if isinstance(excl, str):
        selected = [n for n in selected if not re.fullmatch(excl, n)]
    elif excl:
        selected = [n for n in selected if not _matches_list(n, excl)]
    # Never put LoRA inside a module that is trained in full (PEFT's rule).
    selected = [n for n in selected if not any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", n) for m in keep_full)]
    if not selected:
        raise InvalidValue(f"exclude_modules={excl!r} / modules_to_save removed every target of {targets!r}")

    modules = dict(named)
    for name in selected:
        _check_wrappable(name, modules[name], config)
    return selected


def _check_wrappable(name: str, module: nn.Module, config: LoraConfig) -> None:
    """Everything that would make wrapping ``module`` fail, checked before anything is changed."""
    base = module.base if isinstance(module, LoraLayer) else module
    if not isinstance(module, LoraLayer) and not _wrappable(module):
        raise InvalidValue(f"target {name!r} is a {type(module).__name__}; LoRA wraps {SUPPORTED_TYPES} layers "
                           f"(name the linear layers inside it instead)")
    if isinstance(module, TrainableTokensLayer):
        raise InvalidType(f"target {name!r} holds trainable tokens (trainable_token_indices); PEFT does not put LoRA "
                           f"on such a layer, and neither does lorakit")
    linear = _is_linear(base)
    if config.lora_bias and isinstance(base, nn.Embedding):
        raise InvalidValue(f"lora_bias is supported for Linear, Conv1D and Conv1d/2d/3d layers; target {name!r} is an "
                           f"Embedding (PEFT refuses it too)")
    if config.init_lora_weights == "pissa" and not linear:
        raise InvalidValue(f"init_lora_weights='pissa' is supported for Linear and Conv1D layers; target {name!r} is "
                           f"a {type(base).__name__}")
    if is_4bit(base) and (config.use_dora or config.init_lora_weights == "pissa"):
        what = "use_dora" if config.use_dora else "init_lora_weights='pissa'"
        raise InvalidValue(f"{what} needs the base weight in full precision; target {name!r} is a 4-bit "
                           f"{type(base).__name__} (lorakit supports plain LoRA on 4-bit layers)")
    if isinstance(base, _CONVS) and base.groups != 1:
        raise InvalidValue(f"LoRA on {type(base).__name__} needs groups=1; target {name!r} has groups={base.groups}")


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _wrappable(module: nn.Module) -> bool:
    return _is_linear(module) or isinstance(module, (nn.Embedding, *_CONVS))


def _plain_modules(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``named_modules()`` without the root and without what lies inside lorakit's own wrappers."""
    for name, child in module.named_children():
        full = f"{prefix}.{name}" if prefix else name
        yield full, child
        if not isinstance(child, (LoraLayer, ModulesToSave)):
            yield from _plain_modules(child, full)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in the place of the submodule called ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject(model: nn.Module, config: LoraConfig, adapter_name: str, init_weights: bool = True) -> list[str]:
    """Add adapter ``adapter_name`` to every module ``config`` targets, wrapping plain modules in place.

    Also wraps the modules trained in full (``modules_to_save``, the SEQ_CLS head) and the embeddings with
    trainable tokens. Returns the names of the modules that received LoRA. On error nothing has been changed.

    Args:
        init_weights: Initialize the adapter as ``config.init_lora_weights`` says. False: leave A and B zero and
            the base untouched, for an adapter whose trained values are copied in next (loading); a trained
            adapter's initialization no longer matters, and one that changed the base must not change it again.
    """
    init = config.init_lora_weights if init_weights else None
    if init is not None and not isinstance(init, bool) and init not in INIT_CHOICES:
        raise InvalidValue(f"init_lora_weights={init!r}: lorakit loads adapters trained with this PEFT initialization "
                           f"but cannot initialize new ones with it; use True, False, 'gaussian' or 'pissa'")
    selected = find_targets(model, config)
    save_full = find_modules_to_save(model, config)
    tokens = find_token_targets(model, config, selected)
    for name in selected:
        module = model.get_submodule(name)
        layer = module if isinstance(module, LoraLayer) else wrap(module)
        assert layer is not None  # find_targets checked the type
        layer.add_adapter(
            adapter_name,
            r=config.rank_for(name),
            lora_alpha=config.alpha_for(name),
            lora_dropout=config.lora_dropout,
            use_rslora=config.use_rslora,
            use_dora=config.use_dora,
            init_lora_weights=init,
            lora_bias=config.lora_bias,
        )
        if layer is not module:
            set_submodule(model, name, layer)
    for name, (indices, tied) in tokens.items():
        module = model.get_submodule(name)
        layer = module if isinstance(module, TrainableTokensLayer) else TrainableTokensLayer(module)
        layer.add_tokens(adapter_name, indices)
        if layer is not module:
            set_submodule(model, name, layer)
        for head in tied:
            if not isinstance(model.get_submodule(head), TrainableTokensLayer):
                set_submodule(model, head, TrainableTokensLayer(model.get_submodule(head), tied_to=layer))
    for name in save_full:
        module = model.get_submodule(name)
        wrapper = module if isinstance(module, ModulesToSave) else ModulesToSave(module)
        wrapper.add_adapter(adapter_name)
        if wrapper is not module:
            set_submodule(model, name, wrapper)
    return selected


def find_token_targets(model: nn.Module, config: LoraConfig, lora_targets: Iterable[str] = ()
                       ) -> dict[str, tuple[list[int], list[str]]]:
    """The layers whose rows ``config.trainable_token_indices`` trains: module name → (token ids, names of output
    heads tied to it, which get the same rows). Changes nothing.

    Raises:
        ValueError: A name matches no module or several, a layer of the wrong type or one that also gets LoRA,
            a token id outside the layer's rows, or tied layers given different ids.
    """
    wanted = config.trainable_token_indices
    if wanted is None:
        return {}
    names = [n for n, _ in _plain_modules(model)]
    get_input = getattr(model, "get_input_embeddings", None)
    embedding = get_input() if callable(get_input) else None
    embedding_name = next((n for n, m in model.named_modules() if embedding is not None and m is embedding), None)
    if isinstance(wanted, dict):
        keys = wanted
    elif embedding_name is not None:
        keys = {embedding_name: wanted}
    elif any(_matches_list(n, ["embed_tokens"]) for n in names):
        keys = {"embed_tokens": wanted}
    else:
        raise InvalidValue("trainable_token_indices is a list, but this model has no input embedding "
                           "(get_input_embeddings) and no 'embed_tokens'; give {module name: [token ids]}")
    found: dict[str, list[int]] = {}
    for key, indices in keys.items():
        matches = [n for n in names if _matches_list(n, [key])]
        if len(matches) != 1:
            what = "no module" if not matches else f"{len(matches)} modules ({', '.join(matches[:4])})"
            raise InvalidValue(f"trainable_token_indices key {key!r} matches {what}; name exactly one Embedding or "
                               f"Linear layer" + (f" ({_suggest(key, names)})" if not matches else ""))
        found[matches[0]] = list(indices)
    tied_heads = _heads_tied_to(model, embedding)
    out: dict[str, tuple[list[int], list[str]]] = {}
    lora_targets = set(lora_targets)
    for name, indices in found.items():
        module = model.get_submodule(name)
        base = module.base if isinstance(module, LoraLayer) else module
        if name in lora_targets or isinstance(module, LoraLayer) and not isinstance(module, TrainableTokensLayer):
            raise InvalidValue(f"{name!r} gets LoRA and trainable tokens at once; PEFT refuses that, and so does "
                               f"lorakit: train its rows with trainable_token_indices or target it with LoRA")
        if not isinstance(base, (nn.Embedding, nn.Linear)):
            raise InvalidType(f"trainable_token_indices names {name!r}, a {type(base).__name__}; trainable tokens "
                               f"work on Embedding and Linear layers")
        rows = base.weight.shape[0]
        bad = [i for i in indices if i >= rows]
        if bad:
            raise InvalidValue(f"trainable_token_indices has token id(s) {bad} out of range for {name!r}, which has "
                               f"{rows} rows (token ids 0..{rows - 1})")
        if name in tied_heads and embedding_name in found:
            if found[embedding_name] != indices:
                raise InvalidValue(f"{name!r} shares its weight with {embedding_name!r} (tied embeddings), but "
                                   f"trainable_token_indices gives them different token ids; give the same ids")
            continue  # its rows come with the embedding's
        heads = [h for h, of in tied_heads.items() if of == name]
        out[name] = (list(indices), heads)
    return out


def _heads_tied_to(model: nn.Module, embedding: nn.Module | None) -> dict[str, str]:
    """Output heads whose weight is the input embedding's (tied embeddings): head name → embedding name."""
    if embedding is None:
        return {}
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    if head is None:
        return {}
    head_base = head.base if isinstance(head, LoraLayer) else head
    embedding_base = embedding.base if isinstance(embedding, LoraLayer) else embedding
    if getattr(head_base, "weight", None) is not embedding_base.weight:
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    return {names[id(head)]: names[id(embedding)]}


def find_modules_to_save(model: nn.Module, config: LoraConfig) -> list[str]:
    """The modules ``config`` trains in full (``modules_to_save``, the SEQ_CLS head), outermost matches only."""
    wanted = modules_to_save_names(config)
    if not wanted:
        return []
    names = [n for n, _ in _plain_modules(model)]
    found = [n for n in names if _matches_list(n, wanted)]
    # The task heads' names ('classifier', 'score', 'qa_outputs') are a convention that PEFT also writes into saved
    # configs; every other name must exist.
    optional = _task_heads(config)
    missing = [m for m in config.modules_to_save or [] if m not in optional
               and not any(_matches_list(n, [m]) for n in names)]
    if missing:
        raise InvalidValue(
          "; ".join(f"modules_to_save entry {m!r} matches no module ({_suggest(m, names)})" for m in missing)
      )
    # Keep the outermost match only (a head's own sub-layers are inside its copy already).
    return [n for n in found if not any(n.startswith(o + ".") for o in found if o != n)]


def describe_targets(model: nn.Module, config: LoraConfig) -> list[dict]:
    """What ``config`` would do to ``model``, one row per wrapped module, without changing it.

    Each row has ``name``, ``type``, ``shape`` (of the base weight), ``r`` and ``params`` (LoRA parameters).
    Works on a model built on the meta device.
    """
    rows = []
    for name in find_targets(model, config):
        module = model.get_submodule(name)
        base = module.base if isinstance(module, LoraLayer) else module
        r = config.rank_for(name)
        a_shape, b_shape = lora_shapes(base, r)
        params = math.prod(a_shape) + math.prod(b_shape) + b_shape[0] * (config.use_dora + config.lora_bias)
        rows.append({"name": name, "type": type(base).__name__, "shape": list(base.weight.shape), "r": r,
                     "params": params})
    return rows
