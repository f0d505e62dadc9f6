"""The table of model families: every entry has what its users need, and it agrees with PEFT and transformers."""

from __future__ import annotations

import pytest
import transformers

from lorakit.core.families import FAMILIES, family_of, gguf_families, preset_classes
from lorakit.models.calc import PRESETS


def test_default_targets_are_peft_s_where_peft_has_one():
    peft_utils = pytest.importorskip("peft.utils.constants")
    mapping = peft_utils.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    compared = [name for name, f in FAMILIES.items() if f.default_targets is not None and name in mapping]
    assert len(compared) >= 15  # distilbert's (q_lin, v_lin) is older PEFT's: PEFT 0.21 dropped it
    for name in compared:
        assert list(FAMILIES[name].default_targets) == list(mapping[name]), name


def test_every_family_is_a_transformers_model_type():
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    assert not set(FAMILIES) - set(CONFIG_MAPPING_NAMES), set(FAMILIES) - set(CONFIG_MAPPING_NAMES)


def test_presets_resolve_to_transformers_classes():
    for family, _ in PRESETS.values():
        config_class, model_class = (getattr(transformers, n) for n in preset_classes(family))
        assert config_class.model_type == family and model_class.config_class is config_class
    with pytest.raises(ValueError, match="no preset classes for model_type 'opt'"):
        preset_classes("opt")


def test_gguf_families_have_a_gguf_architecture():
    gguf = pytest.importorskip("gguf")
    assert gguf_families() == ["llama", "mistral"]
    assert all(FAMILIES[f].gguf in gguf.MODEL_ARCH_NAMES.values() for f in gguf_families())


def test_an_unknown_family_knows_nothing_and_target_modules_none_says_so():
    unknown = family_of("not_a_model")
    assert unknown.default_targets is None and not unknown.plain_head and unknown.gguf is None
    assert family_of(None).model_type == ""
    from conftest import tiny_llama

    from lorakit import LoraConfig, get_lora_model

    model = tiny_llama()
    model.config.model_type = "not_a_model"
    with pytest.raises(ValueError, match="no default for model_type 'not_a_model'"):
        get_lora_model(model, LoraConfig(target_modules=None))
