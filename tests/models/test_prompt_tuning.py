"""Prompt tuning: virtual tokens in front of a frozen model; PEFT's file format; training through the trainer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import tiny_llama

from lorakit.models.prompt_tuning import PromptTuningModel
from lorakit.training.loop import train
from lorakit.training.loss import causal_lm_loss
from lorakit.training.options import TrainConfig
from lorakit.workflows.inference import evaluate_adapter

FAST = {"max_eval": 4, "max_new_tokens": 4, "progress": False, "warmup_steps": 1, "lr": 0.3}


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(seed))
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "targets": targets}


def test_prompt_sits_in_front_and_outputs_line_up_with_the_real_tokens():
    model = tiny_llama()
    tuned = PromptTuningModel(tiny_llama(), 5)
    batch = _batch()
    with torch.no_grad():
        logits = tuned(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        embeds = torch.cat([tuned.prompt.unsqueeze(0).expand(3, -1, -1),
                            model.get_input_embeddings()(batch["input_ids"])], dim=1)
        reference = model(inputs_embeds=embeds).logits[:, 5:]
    assert logits.shape == (3, 9, 128) and torch.equal(logits, reference)


def test_only_the_prompt_trains_and_the_chunked_loss_equals_the_full_one():
    tuned = PromptTuningModel(tiny_llama(), 5)
    batch = _batch()
    total, count = causal_lm_loss(tuned, batch)  # the chunked path, through the prompt decoder
    logits = tuned(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    selected = batch["targets"] != -100
    reference = F.cross_entropy(logits[selected], batch["targets"][selected], reduction="sum")
    assert total.item() == pytest.approx(reference.item(), rel=1e-5) and count == selected.sum()
    total.backward()
    assert [n for n, p in tuned.named_parameters() if p.requires_grad] == ["prompt"]
    assert tuned.prompt.grad is not None and tuned.prompt.grad.abs().sum() > 0


def test_labels_skip_the_virtual_tokens_as_in_peft(tmp_path, peft):
    tuned = PromptTuningModel(tiny_llama(), 5)
    tuned.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    batch = _batch()
    with torch.no_grad():
        ours = tuned(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["input_ids"]).loss
        reference = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           labels=batch["input_ids"]).loss
    assert ours.item() == pytest.approx(reference.item(), rel=1e-6)


def test_training_the_prompt_lowers_the_loss():
    tuned = PromptTuningModel(tiny_llama(), 5)
    optimizer = torch.optim.Adam([tuned.prompt], lr=0.1)
    batch = _batch()
    losses = []
    for _ in range(20):
        total, count = causal_lm_loss(tuned, batch)
        (total / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append((total / count).item())
    assert losses[-1] < 0.995 * losses[0]  # a random tiny model barely reacts to its context; it still learns


def test_generate_returns_the_input_then_greedy_tokens():
    tuned = PromptTuningModel(tiny_llama(), 5).eval()
    batch = _batch()
    out = tuned.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=4,
                         do_sample=False)
    assert torch.equal(out[:, :9], batch["input_ids"]) and out.shape == (3, 13)
    with torch.no_grad():  # each new token is the argmax of a full forward pass over what came before
        logits = tuned(out[:, :-1], attention_mask=torch.ones_like(out[:, :-1])).logits
    assert torch.equal(logits.argmax(-1)[:, 8:], out[:, 9:])


def test_save_load_round_trip_and_peft_reads_it(tmp_path, peft):
    tuned = PromptTuningModel(tiny_llama(), 5, seed=3)
    tuned.save_pretrained(tmp_path)
    loaded = PromptTuningModel.from_pretrained(tiny_llama(), tmp_path)
    batch = _batch()
    with torch.no_grad():
        ours = tuned(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert torch.equal(loaded(batch["input_ids"], attention_mask=batch["attention_mask"]).logits, ours)
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
        peft_logits = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(peft_logits[:, 5:], ours)  # PEFT keeps the virtual positions in its logits
    assert not loaded.prompt.requires_grad  # loaded for inference, as PEFT does


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer, got 0"):
        PromptTuningModel(tiny_llama(), 0)
    with pytest.raises(ValueError, match="packed rows"):
        PromptTuningModel(tiny_llama(), 2)(torch.zeros(1, 4, dtype=torch.long), position_ids=torch.zeros(1, 4))
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        PromptTuningModel.from_pretrained(tiny_llama(), tmp_path)
    with pytest.raises(ValueError, match="not seq_cls"):
        TrainConfig(method="prompt", task="seq_cls", data="x.tsv")
    with pytest.raises(ValueError, match="needs --method lora"):
        TrainConfig(method="prompt", quantize="nf4")


def test_prompt_tuning_through_the_trainer(tiny_llama_dir, tmp_path):
    result = train(model=tiny_llama_dir, steps=6, method="prompt", num_virtual_tokens=4, output_dir=str(tmp_path),
                   **FAST)
    assert result["method"] == "prompt" and result["trainable_params"] == 4 * 32  # the prompt (32 wide)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    start = PromptTuningModel(base, 4, seed=0).prompt  # the trainer's initialization (seed 0)
    trained = PromptTuningModel.from_pretrained(base, tmp_path).prompt
    assert not torch.allclose(trained, start)
    assert result["adapter_bytes"] == (tmp_path / "adapter_model.safetensors").stat().st_size < 4096
    again = evaluate_adapter(tmp_path, TrainConfig.from_yaml(tmp_path / "train_config.yaml"))
    assert again["loss"] == pytest.approx(result["after"]["loss"], rel=1e-5)
