"""Counts, outputs and trained parameters equal PEFT's for the same config, across architectures and options
(PEFT is a dev dependency, used only as a reference; the tests that need it skip without it)."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import tiny_bert_cls, tiny_conv, tiny_gpt2, tiny_llama

from lorakit import LoraConfig, get_lora_model, set_adapter_state_dict

CASES = [
    ("llama-qv", tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    ("llama-all-linear", tiny_llama, dict(r=4, lora_alpha=16, target_modules="all-linear")),
    ("llama-regex-rslora", tiny_llama, dict(r=4, lora_alpha=8, target_modules=r".*\.(k_proj|down_proj)",
                                            use_rslora=True)),
    ("llama-patterns", tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"],
                                        rank_pattern={"o_proj": 2}, alpha_pattern={"up_proj": 32})),
    ("llama-layers", tiny_llama, dict(r=2, target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
                                      layers_pattern="layers")),
    ("llama-embed", tiny_llama, dict(r=4, target_modules=["embed_tokens", "q_proj"])),
    ("llama-dora", tiny_llama, dict(r=4, target_modules=["q_proj", "v_proj", "gate_proj"], use_dora=True)),
    ("llama-exclude", tiny_llama, dict(r=4, target_modules="all-linear", exclude_modules=["down_proj"])),
    ("gpt2-conv1d", tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    ("gpt2-all-linear", tiny_gpt2, dict(r=2, target_modules="all-linear", fan_in_fan_out=True)),
    ("bert-seqcls", tiny_bert_cls, dict(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")),
    ("bert-seqcls-bias", tiny_bert_cls, dict(r=4, target_modules=["query", "value"], task_type="SEQ_CLS",
                                             bias="lora_only")),
    ("bert-all-linear", tiny_bert_cls, dict(r=4, target_modules="all-linear", task_type="SEQ_CLS", bias="all")),
    ("conv2d", tiny_conv, dict(r=2, target_modules=["conv1", "conv2"], modules_to_save=["head"])),
]


def _inputs(name: str) -> dict:
    torch.manual_seed(7)
    if name == "conv2d":
        return {"x": torch.randn(2, 3, 8, 8)}
    return {"input_ids": torch.randint(0, 128, (2, 11))}


def _out(model, inputs):
    out = model(**inputs)
    return out if torch.is_tensor(out) else out.logits


def _build(peft, make, kwargs):
    """The same random base twice; PEFT with a random (non-zero) update, ours with its values copied in."""
    peft_model = peft.get_peft_model(make(), peft.LoraConfig(init_lora_weights=False, **kwargs))
    ours = get_lora_model(make(), LoraConfig(**kwargs))
    set_adapter_state_dict(ours, peft.get_peft_model_state_dict(peft_model))
    return peft_model, ours


@pytest.mark.parametrize(("name", "make", "kwargs"), CASES, ids=[c[0] for c in CASES])
def test_counts_equal_peft(name, make, kwargs, peft):
    peft_model = peft.get_peft_model(make(), peft.LoraConfig(**kwargs))
    ours = get_lora_model(make(), LoraConfig(**kwargs))
    assert ours.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()


@pytest.mark.parametrize(("name", "make", "kwargs"), CASES, ids=[c[0] for c in CASES])
def test_forward_equals_peft_with_the_same_weights(name, make, kwargs, peft):
    peft_model, ours = _build(peft, make, kwargs)
    inputs = _inputs(name)
    with torch.no_grad():
        expected, got = _out(peft_model, inputs), _out(ours, inputs)
        base = _out(make(), inputs)
    assert not torch.allclose(expected, base, atol=1e-4), "the update must be non-zero for the test to mean anything"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_print_trainable_parameters_is_peft_line(capsys, peft):
    make, kwargs = tiny_bert_cls, dict(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    peft.get_peft_model(make(), peft.LoraConfig(**kwargs)).print_trainable_parameters()
    expected = capsys.readouterr().out
    get_lora_model(make(), LoraConfig(**kwargs)).print_trainable_parameters()
    assert capsys.readouterr().out == expected
    assert expected.startswith("trainable params: 1,123 || all params: 25,638 || trainable%: 4.3802")


def _meta_llama_7b():
    config = transformers.LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                      intermediate_size=11008, vocab_size=32000)
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config)


def test_llama_7b_on_meta_device_prints_the_papers_count(capsys):
    model = get_lora_model(_meta_llama_7b(), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    model.print_trainable_parameters()
    assert capsys.readouterr().out == "trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622\n"
    model = get_lora_model(_meta_llama_7b(), LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    assert model.get_nb_trainable_parameters()[0] == 16_777_216


def test_gradients_reach_only_what_peft_trains(peft):
    for make, kwargs in [(tiny_bert_cls, dict(r=4, target_modules=["query"], task_type="SEQ_CLS", bias="lora_only")),
                         (tiny_llama, dict(r=4, target_modules="all-linear", lora_dropout=0.1))]:
        peft_model = peft.get_peft_model(make(), peft.LoraConfig(**kwargs))
        ours = get_lora_model(make(), LoraConfig(**kwargs))
        ours.train()
        out = _out(ours, _inputs("x"))
        out.float().pow(2).mean().backward()
        with_grad = {n for n, p in ours.named_parameters() if p.grad is not None}
        trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
        assert with_grad == trainable
        peft_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        assert sum(p.numel() for n, p in ours.named_parameters() if n in with_grad) == peft_trainable


# -- PEFT files lorakit used to refuse: lora_bias, trainable tokens, DoRA on Embedding/Conv, Conv1d/Conv3d ---------


class _Convs(torch.nn.Module):
    """A Conv1d and a Conv3d model in one (PEFT wraps both kinds)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv1d(3, 6, 3, padding=1)
        self.c3 = torch.nn.Conv3d(2, 4, 3, stride=2, padding=1)
        self.head = torch.nn.Linear(10, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.c1(x[:, :24].reshape(-1, 3, 8))).mean(-1)  # (N, 6)
        b = torch.relu(self.c3(x[:, 24:].reshape(-1, 2, 4, 4, 4))).mean((2, 3, 4))  # (N, 4)
        return self.head(torch.cat([a, b], -1))


def _convs(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return _Convs().eval()


FORMATS = [
    ("lora-bias-gpt2", tiny_gpt2, dict(r=4, target_modules=["c_attn", "c_proj"], lora_bias=True, fan_in_fan_out=True)),
    ("lora-bias-conv", tiny_conv, dict(r=2, target_modules=["conv1", "conv2", "head"], lora_bias=True)),
    ("trainable-tokens", tiny_llama, dict(r=4, target_modules=["q_proj"], trainable_token_indices=[3, 5, 7])),
    ("trainable-tokens-tied", lambda: tiny_llama(tie=True), dict(r=4, target_modules=["q_proj"],
                                                                  trainable_token_indices=[3, 5, 7])),
    ("trainable-tokens-dict", tiny_llama, dict(r=4, target_modules=["q_proj"],
                                               trainable_token_indices={"embed_tokens": [3, 5], "lm_head": [1, 5]})),
    ("dora-embedding", tiny_llama, dict(r=4, target_modules=["embed_tokens", "q_proj"], use_dora=True)),
    ("dora-conv2d", tiny_conv, dict(r=2, target_modules=["conv1", "conv2"], use_dora=True)),
    ("conv1d-conv3d", _convs, dict(r=2, target_modules=["c1", "c3"])),
    ("dora-conv1d-conv3d", _convs, dict(r=2, target_modules=["c1", "c3"], use_dora=True)),
    ("orthogonal-init", tiny_llama, dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="orthogonal")),
    ("eva-init", tiny_llama, dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="eva")),
]


def _format_inputs(make) -> dict:
    torch.manual_seed(7)
    if make is tiny_conv:
        return {"x": torch.randn(2, 3, 8, 8)}
    if make is _convs:
        return {"x": torch.randn(2, 24 + 128)}
    ids = torch.randint(0, 128, (2, 11))
    ids[:, :4] = torch.tensor([3, 5, 7, 1])  # the trainable tokens occur
    return {"input_ids": ids}


def _trained_peft(peft, make, kwargs):
    """A PEFT model with every trainable tensor moved off its initial value, as if trained."""
    model = peft.get_peft_model(make(), peft.LoraConfig(**kwargs))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("name", "make", "kwargs"), FORMATS, ids=[c[0] for c in FORMATS])
def test_peft_file_loads_and_saves_back_with_the_same_logits(name, make, kwargs, peft, tmp_path):
    from lorakit import LoraModel

    peft_model = _trained_peft(peft, make, kwargs)
    inputs = _format_inputs(make)
    with torch.no_grad():
        expected, base = _out(peft_model, inputs), _out(make(), inputs)
    assert not torch.allclose(expected, base, atol=1e-4), "the update must be non-zero for the test to mean anything"
    peft_model.save_pretrained(tmp_path / "peft")

    ours = LoraModel.from_pretrained(make(), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(_out(ours, inputs), expected, atol=1e-5, rtol=1e-5)
        ours.merge_adapter()  # merged equals unmerged, and unmerge restores the weights
        torch.testing.assert_close(_out(ours, inputs), expected, atol=1e-5, rtol=1e-5)
        ours.unmerge_adapter()
        with ours.disable_adapter():
            torch.testing.assert_close(_out(ours, inputs), base, atol=1e-6, rtol=1e-6)

    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(make(), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(_out(back, inputs), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("init", ["olora", "pissa"])
def test_base_changing_peft_adapter_loads_onto_its_residual_base_and_is_refused_on_a_plain_one(init, peft, tmp_path):
    from lorakit import LoraModel

    make, kwargs = tiny_llama, dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
    peft_model = _trained_peft(peft, make, kwargs)
    inputs = _format_inputs(make)
    with torch.no_grad():
        expected = _out(peft_model, inputs)
    peft_model.save_pretrained(tmp_path / "peft")
    residual_state = {k.replace(".base_layer", ""): v.clone() for k, v in peft_model.get_base_model().state_dict().items()
                      if "lora_" not in k}

    def residual():
        model = make()
        model.load_state_dict(residual_state)
        return model

    with pytest.raises(ValueError, match=f"initialized with '{init}'.*no fingerprint.*force=True"):
        LoraModel.from_pretrained(make(), tmp_path / "peft")
    ours = LoraModel.from_pretrained(residual(), tmp_path / "peft", force=True)
    with torch.no_grad():
        torch.testing.assert_close(_out(ours, inputs), expected, atol=1e-5, rtol=1e-5)

    # lorakit's copy carries the residual's fingerprint: a plain base is refused, the residual accepted, and PEFT
    # reads it (its config says init_lora_weights=True, so PEFT does not decompose the residual again).
    ours.save_pretrained(tmp_path / "ours")
    with pytest.raises(ValueError, match="not that residual"):
        LoraModel.from_pretrained(make(), tmp_path / "ours")
    again = LoraModel.from_pretrained(residual(), tmp_path / "ours")
    assert again.peft_config["default"].init_lora_weights == init
    back = peft.PeftModel.from_pretrained(residual(), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(_out(again, inputs), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_out(back, inputs), expected, atol=1e-5, rtol=1e-5)


def test_pissa_conversion_equals_peft_and_gives_the_same_logits_on_the_original_base(peft, tmp_path):
    from lorakit import LoraModel

    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    ours = get_lora_model(tiny_llama(), LoraConfig(**kwargs))
    ours.save_pretrained(tmp_path / "init")  # right after the initialization, before training
    torch.manual_seed(1)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    inputs = _format_inputs(tiny_llama)
    with torch.no_grad():
        trained = _out(ours, inputs)
    ours.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "init")

    converted = LoraModel.from_pretrained(tiny_llama(), tmp_path / "lora")  # the ORIGINAL base
    config = converted.peft_config["default"]
    assert (config.r, config.lora_alpha, config.init_lora_weights) == (8, 16, True)
    peft_converted = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(_out(converted, inputs), trained, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_out(peft_converted, inputs), trained, atol=1e-5, rtol=1e-5)


def test_lorakit_pissa_adapter_loads_back_onto_its_residual_base(tmp_path):
    from lorakit import LoraModel

    ours = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    inputs = _format_inputs(tiny_llama)
    with torch.no_grad():
        expected = _out(ours, inputs)
    ours.save_pretrained(tmp_path / "pissa")
    residual = ours.unload()
    with pytest.raises(ValueError, match="not that residual"):
        LoraModel.from_pretrained(tiny_llama(), tmp_path / "pissa")
    loaded = LoraModel.from_pretrained(residual, tmp_path / "pissa")
    with torch.no_grad():
        torch.testing.assert_close(_out(loaded, inputs), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("name", "make", "kwargs"), FORMATS, ids=[c[0] for c in FORMATS])
def test_counts_of_the_newer_options_equal_peft(name, make, kwargs, peft):
    peft_model = peft.get_peft_model(make(), peft.LoraConfig(**kwargs))
    init = kwargs.get("init_lora_weights", True)
    config = LoraConfig(**{**kwargs, "init_lora_weights": init if init in (True, False, "gaussian", "pissa") else True})
    assert get_lora_model(make(), config).get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()
