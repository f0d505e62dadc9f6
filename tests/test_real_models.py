"""A few checks on the real embedded models (SmolLM2-135M-Instruct, all-MiniLM-L6-v2): counts, merging and files
against PEFT, 4-bit quality, and a short training run."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from lorakit import LoraConfig, LoraModel, get_lora_model, train
from lorakit.core.quant import quantize, quantized_bytes
from lorakit.models import embedded_models as pretrained


@pytest.fixture(scope="module")
def smollm2():
    try:
        return pretrained.load_default_model(torch.float32)
    except FileNotFoundError as err:
        pytest.fail(f"the README's set-up installs the embedded model: {err}")


@pytest.fixture(scope="module")
def minilm_cls():
    torch.manual_seed(0)
    return transformers.AutoModelForSequenceClassification.from_pretrained(str(pretrained.minilm_dir()),
                                                                           num_labels=2).eval()


def test_smollm2_counts_zero_update_and_merge(smollm2, tmp_path, peft):
    config = dict(r=8, lora_alpha=16, target_modules="all-linear")
    ours = get_lora_model(copy.deepcopy(smollm2), LoraConfig(**config))
    theirs = peft.get_peft_model(copy.deepcopy(smollm2), peft.LoraConfig(**config))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters() == (2_442_240, 136_957_248)
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = smollm2(input_ids=ids).logits
        assert torch.equal(ours(input_ids=ids).logits, base)  # B = 0: the base model, bit for bit
        for p in (p for p in ours.parameters() if p.requires_grad):
            p.normal_(0, 0.02)
        unmerged = ours(input_ids=ids).logits
        ours.merge_adapter()
        merged = ours(input_ids=ids).logits
    assert not torch.allclose(unmerged, base, atol=1e-2)
    assert (merged - unmerged).abs().max() <= 1e-5 * unmerged.abs().max()
    ours.unmerge_adapter()
    ours.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(smollm2), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, unmerged, atol=1e-4, rtol=1e-5)


def test_smollm2_in_nf4_is_a_quarter_of_bf16_and_keeps_its_predictions(smollm2):
    model = quantize(copy.deepcopy(smollm2), "nf4", double_quant=True)
    packed, bf16 = quantized_bytes(model)
    assert bf16 == 2 * 106_168_320  # every linear layer but the (tied) head: 30 layers × 7
    assert packed <= 0.3 * bf16
    ids = pretrained.load_default_tokenizer()("The capital of France is Paris. The capital of Italy is",
                                              return_tensors="pt")["input_ids"]
    with torch.no_grad():
        full, four_bit = smollm2(input_ids=ids).logits[0], model(input_ids=ids).logits[0]
    agree = (full.argmax(-1) == four_bit.argmax(-1)).float().mean().item()
    assert agree >= 0.7, f"top-1 predictions of the 4-bit model agree on {agree:.0%} of positions"


def test_minilm_sequence_classification_round_trip_with_peft(minilm_cls, tmp_path, peft):
    config = dict(r=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    ours = get_lora_model(copy.deepcopy(minilm_cls), LoraConfig(**config))
    theirs = peft.get_peft_model(copy.deepcopy(minilm_cls), peft.LoraConfig(**config))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    with torch.no_grad():
        for p in (p for p in ours.parameters() if p.requires_grad):
            p.normal_(0, 0.05)
    ours.save_pretrained(tmp_path)
    ids = torch.randint(1000, 20000, (3, 12), generator=torch.Generator().manual_seed(1))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(minilm_cls), tmp_path)
    back = LoraModel.from_pretrained(copy.deepcopy(minilm_cls), tmp_path)
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(back(input_ids=ids).logits, expected)


def test_lorakit_train_on_the_embedded_default(tmp_path):
    """The main job, shortened: the real model and the built-in task, a few steps, every output written."""
    result = train(steps=3, max_eval=4, max_new_tokens=40, output_dir=str(tmp_path), progress=False)
    assert result["before"]["exact_match"] == 0.0  # the base model does not produce the exact JSON
    # The held-out loss, not the first and last step's: those are on different batches, and three warmup steps move
    # the weights too little to outweigh that (in bf16, the AMX CPUs' default, the last step's loss came out higher).
    assert result["after"]["loss"] < result["before"]["loss"]
    assert result["trainable_params"] == 2_442_240 and result["precision"] in ("fp32", "bf16")
    reloaded = LoraModel.from_pretrained(pretrained.load_default_model(), tmp_path)
    assert sum(1 for _ in reloaded.lora_layers()) == 210
