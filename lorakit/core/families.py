"""What lorakit knows of each model family, keyed by the Hugging Face ``model_type``: one table.

Everything that depends on a model's family reads it here:

- ``default_targets``: what ``target_modules=None`` wraps (PEFT's defaults);
- ``plain_head``: the logits are exactly ``lm_head(final hidden state)``, so the trainer's loss may compute them
  from the hidden states in chunks (families with softcapping or logit scaling — Gemma-2, Granite, Cohere — take
  the full-logits path, which is always right, only bigger);
- ``gguf``: ``lorakit export --gguf`` writes it (the GGUF architecture name);
- ``gated_mlp``: its MLP has a gate (SiLU-gated: three matrices), for the memory estimate;
- ``preset_classes``: the transformers config and model class names of ``lorakit params``' presets.

A family missing from the table still wraps, trains and saves: it only gets no default targets (name them), the
full-logits loss, no GGUF export and the memory estimate's reading of its config.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidValue


@dataclass(frozen=True)
class Family:
    """One model family (a Hugging Face ``model_type``) and what lorakit does with it."""

    model_type: str
    default_targets: tuple[str, ...] | None = None
    plain_head: bool = False
    gguf: str | None = None
    gated_mlp: bool = False
    preset_classes: tuple[str, str] | None = None  # (config class, model class) in transformers


_QV = ("q_proj", "v_proj")
FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", _QV, plain_head=True, gguf="llama", gated_mlp=True,
           preset_classes=("LlamaConfig", "LlamaForCausalLM")),
    Family("mistral", _QV, plain_head=True, gguf="llama", gated_mlp=True,
           preset_classes=("MistralConfig", "MistralForCausalLM")),
    Family("mixtral", _QV, plain_head=True),
    Family("qwen2", _QV, plain_head=True, gated_mlp=True),
    Family("qwen2_moe", plain_head=True),
    Family("qwen3", _QV, plain_head=True, gated_mlp=True),
    Family("qwen3_moe", plain_head=True),
    Family("gemma", _QV, gated_mlp=True),
    Family("gemma2", _QV),
    Family("phi3", plain_head=True),
    Family("olmo", plain_head=True),
    Family("olmo2", plain_head=True),
    Family("starcoder2", plain_head=True),
    Family("smollm3", plain_head=True),
    Family("opt", _QV),
    Family("gpt2", ("c_attn",), preset_classes=("GPT2Config", "GPT2LMHeadModel")),
    Family("gpt_neox", ("query_key_value",)),
    Family("bert", ("query", "value"), preset_classes=("BertConfig", "BertForSequenceClassification")),
    Family("roberta", ("query", "value")),
    Family("distilbert", ("q_lin", "v_lin")),
    Family("t5", ("q", "v")),
    Family("mt5", ("q", "v")),
    Family("bart", _QV),
)}


def family_of(model_type: str | None) -> Family:
    """The family of ``model_type``; an unknown one (or None) gets a family with nothing known."""
    return FAMILIES.get(model_type or "", Family(model_type or ""))


def with_default_targets() -> list[str]:
    """The families whose ``target_modules=None`` has a default."""
    return [name for name, f in FAMILIES.items() if f.default_targets]


def gguf_families() -> list[str]:
    """The families ``lorakit export --gguf`` writes."""
    return [name for name, f in FAMILIES.items() if f.gguf]


def preset_classes(model_type: str) -> tuple[str, str]:
    """The transformers (config, model) class names of a preset's family."""
    classes = family_of(model_type).preset_classes
    if classes is None:
        raise InvalidValue(f"no preset classes for model_type {model_type!r}; presets use "
                           f"{', '.join(n for n, f in FAMILIES.items() if f.preset_classes)}")
    return classes
