"""LoraConfig: what to adapt and how, with PEFT's field names and meanings.

A config is validated when it is built, so a bad value fails at the line that wrote it, not deep inside
injection. ``to_dict`` / ``from_dict`` read and write PEFT's ``adapter_config.json``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidType, InvalidValue

BIAS_CHOICES = ("none", "all", "lora_only")
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "QUESTION_ANS", "TOKEN_CLS", "FEATURE_EXTRACTION")
INIT_CHOICES = (True, False, "gaussian", "pissa")
# Initializations PEFT has and lorakit does not implement. A trained adapter that records one loads (once trained,
# the init no longer matters), but a new adapter cannot be initialized with it.
PEFT_ONLY_INITS = ("olora", "orthogonal", "eva", "corda", "loftq", "mica", "lora_ga")
# Initializations that move part of the base weight into the adapter: the adapter needs the residual base they left.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
ALL_LINEAR = "all-linear"

# Heads that PEFT makes trainable (and saves) for sequence and token classification; DistilBERT-style heads have a
# randomly initialised pre_classifier too (PEFT 0.22 and later train and save it with the classifier).
SEQ_CLS_HEAD_NAMES = ("classifier", "score", "pre_classifier")
QA_HEAD_NAMES = ("qa_outputs",)  # and for extractive question answering
BASE_ROW = "__base__"  # the adapter name that selects "no adapter" for a row of a mixed batch

# Keys PEFT writes into adapter_config.json that carry no meaning for a plain LoRA adapter.
_PEFT_BOOKKEEPING = {
    "peft_type", "peft_version", "auto_mapping", "revision", "inference_mode", "megatron_core",
    "qalora_group_size", "base_model_name_or_path",
    # Settings of initializations lorakit does not run: they shaped the adapter before training, not its use.
    "eva_config", "corda_config", "loftq_config", "lora_ga_config",
}


def _check_regex(what: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise InvalidValue(f"{what} {pattern!r} is not a valid regular expression: {err}") from None


@dataclass
class LoraConfig:
    """Configuration of one LoRA adapter; field names and meanings follow PEFT's ``LoraConfig``.

    Args:
        r: Rank of the update ``B·A``; a positive integer.
        lora_alpha: The α in the scaling ``α/r`` (``α/√r`` with ``use_rslora``); > 0.
        target_modules: Which modules to wrap. A list matches a module whose full name equals an entry or
            ends with ``"." + entry``; a string is a regular expression full-matched against the full name;
            ``"all-linear"`` takes every Linear/Conv1D layer except the output head. ``None`` uses the
            architecture's default (``q_proj, v_proj`` for Llama, ``c_attn`` for GPT-2, ...).
        exclude_modules: Modules never wrapped, matched like ``target_modules``.
        lora_dropout: Dropout probability on the adapter's input, in [0, 1).
        bias: Which biases train: ``"none"``, ``"all"`` or ``"lora_only"`` (those of wrapped layers).
        task_type: ``CAUSAL_LM``, ``SEQ_CLS``, ``SEQ_2_SEQ_LM``, ``QUESTION_ANS``, ``TOKEN_CLS``,
            ``FEATURE_EXTRACTION`` or None. ``SEQ_CLS`` and ``TOKEN_CLS`` make the classification head
            (``classifier`` / ``score``) trainable and saved, ``QUESTION_ANS`` the span head (``qa_outputs``).
        modules_to_save: Modules trained in full and saved with the adapter (each adapter gets its own copy).
        init_lora_weights: ``True`` (Kaiming-uniform A, zero B: the update starts at zero), ``"gaussian"``
            (normal A with std 1/r, zero B), ``"pissa"`` (A, B from the top-r SVD of the base weight, which
            keeps the residual) or ``False`` (random A and B, a non-zero update; for tests). The labels of PEFT's
            other initializations (``olora``, ``orthogonal``, ``eva``, ``corda``, ``loftq``, ``mica``, ``lora_ga``,
            ``pissa_niter_<n>``) are accepted in configs of trained adapters being loaded, not for new adapters.
        use_rslora: Scale by ``α/√r`` instead of ``α/r`` (rank-stabilized LoRA).
        use_dora: Weight-decomposed LoRA: a trainable per-output magnitude times the normalized weight.
            Supported on Linear, Conv1D, Embedding and Conv1d/2d/3d layers.
        layers_to_transform: Only wrap modules in these layer indices (list targets only).
        layers_pattern: Name of the module list holding the layers (``"layers"``, ``"h"``), to find the index.
        rank_pattern: Per-module rank overrides, ``{regex: r}``, matched against the end of the module name.
        alpha_pattern: Per-module α overrides, ``{regex: alpha}``.
        fan_in_fan_out: The base weight is stored (in, out), as GPT-2's Conv1D does. Set automatically for Conv1D.
        lora_bias: B gets a trainable bias (PEFT's ``lora_bias``), added as ``scaling·b``; merging adds it to the
            base layer's bias, so the base layer must have one. Not with DoRA or on embeddings.
        trainable_token_indices: Rows of embedding layers trained in full, the rest frozen (PEFT's trainable
            tokens). A list of token ids applies to the input embedding; ``{module name: [ids]}`` names the layers
            (Embedding or Linear, matched like ``target_modules`` list entries).
        base_model_name_or_path: Recorded in ``adapter_config.json`` for whoever loads the adapter.
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_dropout: float = 0.0
    bias: str = "none"
    task_type: str | None = None
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    use_rslora: bool = False
    use_dora: bool = False
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    lora_bias: bool = False
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        self._validate()

    def _validate(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise InvalidValue(f"r must be a positive integer (r >= 1), got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) \
                or not 0 < self.lora_alpha < math.inf:
            raise InvalidValue(f"lora_alpha must be a finite number > 0, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise InvalidValue(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in BIAS_CHOICES:
            raise InvalidValue(f"bias must be one of {', '.join(map(repr, BIAS_CHOICES))}; got {self.bias!r}")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise InvalidValue(f"task_type must be one of {', '.join(TASK_TYPES)} or None; got {self.task_type!r}")
        if not is_known_init(self.init_lora_weights):
            raise InvalidValue(
              f"init_lora_weights must be one of True, False, 'gaussian', 'pissa' (or, for a trained adapter being "
              f"loaded, one of PEFT's labels {', '.join(PEFT_ONLY_INITS)}, 'pissa_niter_<n>'); "
              f"got {self.init_lora_weights!r}"
          )
        if not isinstance(self.lora_bias, bool):
            raise InvalidType(f"lora_bias must be True or False, got {self.lora_bias!r}")
        if self.lora_bias and self.use_dora:
            raise InvalidValue("lora_bias=True does not work with use_dora=True (PEFT refuses it too); drop one")
        _check_token_indices(self.trainable_token_indices)
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                if value.lower() != ALL_LINEAR or name == "exclude_modules":
                    _check_regex(name, value)
            elif value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise InvalidValue(f"{name} must be a list of module names, a regex string or None; got {value!r}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise InvalidValue("target_modules is an empty list: name at least one module, or use 'all-linear'")
        if self.layers_to_transform is not None:
            if isinstance(self.target_modules, str):
                raise InvalidValue(
                  "layers_to_transform only works with a list of target_modules, "
                  f"not with the string {self.target_modules!r}"
              )
            indices = [self.layers_to_transform] if isinstance(self.layers_to_transform, int) else self.layers_to_transform
            if not all(isinstance(i, int) and i >= 0 for i in indices):
                raise InvalidValue(f"layers_to_transform must be non-negative layer indices, got {self.layers_to_transform!r}")
        if self.layers_pattern is not None:
            for pattern in [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern:
                _check_regex("layers_pattern", pattern)
        for key, rank in self.rank_pattern.items():
            _check_regex("rank_pattern key", key)
            if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                raise InvalidValue(f"rank_pattern[{key!r}] must be a positive integer, got {rank!r}")
        for key, alpha in self.alpha_pattern.items():
            _check_regex("alpha_pattern key", key)
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
                raise InvalidValue(f"alpha_pattern[{key!r}] must be a finite number > 0, got {alpha!r}")

    # -- per-module values -------------------------------------------------------------------------------

    def rank_for(self, module_name: str) -> int:
        """The rank used for ``module_name``: the first matching ``rank_pattern`` entry, else ``r``."""
        return self._pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        """The α used for ``module_name``: the first matching ``alpha_pattern`` entry, else ``lora_alpha``."""
        return self._pattern_value(self.alpha_pattern, module_name, self.lora_alpha)

    @staticmethod
    def _pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
        for key, value in patterns.items():
            if re.match(rf"(.*\.)?({key})$", module_name):
                return value
        return default

    # -- PEFT's adapter_config.json ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The config as PEFT writes it in ``adapter_config.json`` (``peft_type: "LORA"`` included)."""
        out = dataclasses.asdict(self)
        out["peft_type"] = "LORA"
        out["inference_mode"] = True
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """Build a config from an ``adapter_config.json`` written by lorakit or PEFT.

        Raises:
            ValueError: The file is not a LoRA config, or uses a PEFT feature lorakit does not implement.
        """
        peft_type = data.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise InvalidValue(f"adapter_config.json has peft_type {peft_type!r}; lorakit reads only 'LORA' adapters")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        unsupported = {
            k: v
            for k, v in data.items()
            if k not in names and k not in _PEFT_BOOKKEEPING and v not in (None, False, {}, [], "")
        }
        if unsupported:
            listed = ", ".join(f"{k}={v!r}" for k, v in sorted(unsupported.items()))
            raise InvalidValue(f"adapter_config.json uses PEFT options lorakit does not support: {listed}")
        return cls(**kwargs)


def is_known_init(init: Any) -> bool:
    """Whether ``init`` is an ``init_lora_weights`` value lorakit implements or a PEFT label it can load."""
    if isinstance(init, bool):
        return True
    if not isinstance(init, str):
        return False
    return init in INIT_CHOICES or init in PEFT_ONLY_INITS or re.fullmatch(r"pissa_niter_\d+", init) is not None


def changes_base(init: Any) -> bool:
    """Whether the initialization ``init`` changed the base weights (the adapter then needs that residual base)."""
    return isinstance(init, str) and init.split("_niter_")[0] in BASE_CHANGING_INITS


def _check_token_indices(value: Any) -> None:
    if value is None:
        return
    groups = value.items() if isinstance(value, dict) else [(None, value)]
    for name, indices in groups:
        where = "trainable_token_indices" if name is None else f"trainable_token_indices[{name!r}]"
        if name is not None and (not isinstance(name, str) or not name):
            raise InvalidValue(f"trainable_token_indices keys must be module names, got {name!r}")
        if not isinstance(indices, list) or not indices or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
            raise InvalidValue(f"{where} must be a non-empty list of token ids (integers >= 0), got {indices!r}")
        if len(set(indices)) != len(indices):
            raise InvalidValue(f"{where} lists a token id twice: {indices!r}")


def parse_targets(value: str | None) -> list[str] | str | None:
    """A command-line target spec: ``q_proj,v_proj`` → a list; ``all-linear`` or a regex (anything with regex
    characters) stays a string; None stays None."""
    if value is None:
        return None
    if value == ALL_LINEAR or any(c in value for c in "*()[]|^$\\"):
        return value
    return [v.strip() for v in value.split(",") if v.strip()]


def check_adapter_name(name: str) -> None:
    """Adapter names become folder names: refuse anything that could leave the save directory."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or ".." in name or "\x00" in name or name == BASE_ROW or "." in name:
        raise InvalidValue(
          f"invalid adapter name {name!r}: use a non-empty name without '/', '\\\\', '.' or '..' "
          f"(and not {BASE_ROW!r})"
      )
