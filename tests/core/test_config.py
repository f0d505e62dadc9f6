"""LoraConfig: PEFT's defaults, validation that names the bad value and the allowed range, per-module rank and alpha
patterns, and the dict round trip with PEFT's fields."""

from __future__ import annotations

import pytest

from lorakit import LoraConfig


def test_defaults_are_peft_defaults():
    config = LoraConfig()
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (8, 8, 0.0, "none")
    assert config.init_lora_weights is True and config.use_rslora is False and config.use_dora is False


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "r must be a positive integer (r >= 1), got 0"),
        ({"r": -3}, "got -3"),
        ({"r": 2.5}, "got 2.5"),
        ({"lora_alpha": 0}, "lora_alpha must be a finite number > 0, got 0"),
        ({"lora_alpha": -1.0}, "got -1.0"),
        ({"lora_dropout": 1.0}, "lora_dropout must be in [0, 1), got 1.0"),
        ({"lora_dropout": -0.1}, "got -0.1"),
        ({"bias": "some"}, "bias must be one of 'none', 'all', 'lora_only'; got 'some'"),
        ({"task_type": "CAUSAL"}, "task_type must be one of CAUSAL_LM, SEQ_CLS, SEQ_2_SEQ_LM, QUESTION_ANS, TOKEN_CLS, "
                                  "FEATURE_EXTRACTION or None; got 'CAUSAL'"),
        ({"target_modules": "q_proj("}, "target_modules 'q_proj(' is not a valid regular expression"),
        ({"exclude_modules": "[a-"}, "exclude_modules '[a-' is not a valid regular expression"),
        ({"rank_pattern": {"(": 4}}, "rank_pattern key '(' is not a valid regular expression"),
        ({"rank_pattern": {"q": 0}}, "rank_pattern['q'] must be a positive integer, got 0"),
        ({"alpha_pattern": {"q": -2}}, "alpha_pattern['q'] must be a finite number > 0, got -2"),
        ({"layers_pattern": "la(yers"}, "layers_pattern 'la(yers' is not a valid regular expression"),
        ({"init_lora_weights": "svd"}, "init_lora_weights must be one of True, False, 'gaussian', 'pissa' (or, for a "
                                       "trained adapter being loaded, one of PEFT's labels olora, orthogonal"),
        ({"init_lora_weights": 1}, "init_lora_weights must be one of"),
        ({"lora_bias": True, "use_dora": True}, "lora_bias=True does not work with use_dora=True"),
        ({"trainable_token_indices": [3, -1]}, "trainable_token_indices must be a non-empty list of token ids "
                                               "(integers >= 0), got [3, -1]"),
        ({"trainable_token_indices": {"embed_tokens": [2, 2]}}, "lists a token id twice"),
        ({"target_modules": []}, "target_modules is an empty list"),
        ({"target_modules": ".*q", "layers_to_transform": [0]}, "layers_to_transform only works with a list"),
    ],
)
def test_bad_values_raise_with_the_value_and_the_allowed_range(kwargs, message):
    with pytest.raises(ValueError) as err:
        LoraConfig(**kwargs)
    assert message in str(err.value)


def test_all_linear_is_not_taken_for_a_regex():
    assert LoraConfig(target_modules="all-linear").target_modules == "all-linear"


def test_rank_and_alpha_patterns_match_module_name_suffixes():
    config = LoraConfig(r=8, lora_alpha=16, rank_pattern={"v_proj": 4, r"layers\.0\.self_attn\.q_proj": 2},
                        alpha_pattern={"q_proj": 3})
    assert config.rank_for("model.layers.1.self_attn.v_proj") == 4
    assert config.rank_for("model.layers.0.self_attn.q_proj") == 2
    assert config.rank_for("model.layers.1.self_attn.q_proj") == 8
    assert config.alpha_for("model.layers.1.self_attn.q_proj") == 3
    assert config.alpha_for("model.layers.1.self_attn.k_proj") == 16


def test_dict_round_trip_and_peft_fields():
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    data = config.to_dict()
    assert data["peft_type"] == "LORA" and data["r"] == 4 and data["task_type"] == "CAUSAL_LM"
    assert LoraConfig.from_dict(data) == config


def test_from_dict_ignores_peft_bookkeeping_and_refuses_unsupported_features():
    data = LoraConfig(target_modules=["q"]).to_dict() | {"peft_version": "0.21", "megatron_config": None,
                                                         "loftq_config": {}, "lora_bias": False}
    assert LoraConfig.from_dict(data).target_modules == ["q"]
    with pytest.raises(ValueError, match="layer_replication"):
        LoraConfig.from_dict(data | {"layer_replication": [[0, 2]]})
    with pytest.raises(ValueError, match="peft_type 'IA3'"):
        LoraConfig.from_dict(data | {"peft_type": "IA3"})
