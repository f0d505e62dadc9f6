"""A LoraModel in Hugging Face's Trainer and TRL's SFTTrainer (lorakit.models.hf_compat): only the adapters train,
saves are PEFT adapter files that lorakit and PEFT load with the trained model's logits, gradient checkpointing
gives the run without it, and a resumed run ends where the uninterrupted one does."""

from __future__ import annotations

import os

import datasets
import pytest
import torch
import transformers
import trl

import lorakit
from lorakit.models.hf_compat import Trainer, restore_adapters

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "adapter_model.bin")
SEQ = 12


def base_model(folder: str) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def lora_model(folder: str, seed: int = 0) -> lorakit.LoraModel:
    torch.manual_seed(seed)  # A's random init
    return lorakit.get_lora_model(base_model(folder), lorakit.LoraConfig(r=4, lora_alpha=8,
                                                                         target_modules=["q_proj", "v_proj"]))


def token_data(rows: int = 16) -> datasets.Dataset:
    """Token rows (half padded) with an extra column the model does not take, which Trainer must drop."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 1000, (rows, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[::2, -3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(),
                                       "labels": labels.tolist(), "note": ["unused"] * rows})


def training_args(out, **kwargs) -> transformers.TrainingArguments:
    settings = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                    logging_steps=1, save_steps=3, report_to="none", use_cpu=True, seed=0, lr_scheduler_type="linear",
                    disable_tqdm=True)
    return transformers.TrainingArguments(**{**settings, **kwargs})


def adapter_tensors(model: lorakit.LoraModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lorakit.adapter_state_dict(model, "default").items()}


def lora_param_names(model: lorakit.LoraModel) -> set[str]:
    """The parameters of the LoRA adapters, found by type (the layers' ``adapters``)."""
    ids = {id(p) for _, layer in model.lora_layers() for p in layer.adapters.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def frozen_snapshot(model: lorakit.LoraModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def assert_only_adapters_trained(model, frozen_before, lora_before, trainable_before) -> None:
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable_before == lora_param_names(model)
    frozen_after = frozen_snapshot(model)
    assert frozen_after.keys() == frozen_before.keys()
    changed = [n for n in frozen_before if not torch.equal(frozen_before[n], frozen_after[n])]
    assert not changed, f"frozen base tensors changed: {changed}"
    lora_after = adapter_tensors(model)
    unchanged = [k for k in lora_before if torch.equal(lora_before[k], lora_after[k])]
    assert not unchanged, f"LoRA tensors that did not train: {unchanged}"


def assert_adapter_folder(folder) -> None:
    """PEFT's two adapter files and no model weights."""
    names = set(os.listdir(folder))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names, names
    assert not names & set(WEIGHT_FILES), names


def assert_loads_with_same_logits(trained: lorakit.LoraModel, folder, base_folder: str, peft) -> None:
    probe = torch.randint(0, 1000, (2, SEQ), generator=torch.Generator().manual_seed(3))
    trained.eval()
    with torch.no_grad():
        expected = trained(input_ids=probe).logits
        ours = lorakit.LoraModel.from_pretrained(base_model(base_folder), folder).eval()
        assert torch.equal(ours(input_ids=probe).logits, expected)
        theirs = peft.PeftModel.from_pretrained(base_model(base_folder), str(folder)).eval()
        torch.testing.assert_close(theirs(input_ids=probe).logits, expected, atol=1e-6, rtol=1e-6)


def test_trainer_trains_only_adapters_and_saves_peft_adapter_files(tmp_path, tiny_llama_dir, peft):
    model = lora_model(tiny_llama_dir)
    trainable, frozen, lora = ({n for n, p in model.named_parameters() if p.requires_grad}, frozen_snapshot(model),
                               adapter_tensors(model))
    data = token_data()
    trainer = Trainer(model=model, args=training_args(tmp_path / "run", eval_strategy="steps", eval_steps=6),
                      train_dataset=data, eval_dataset=data.select(range(4)))
    assert trainer.label_names == ["labels"]  # read from the wrapped Llama's forward, as for a PeftModel
    trainer.train()
    assert_only_adapters_trained(model, frozen, lora, trainable)
    assert any("eval_loss" in entry for entry in trainer.state.log_history)

    for checkpoint in ("checkpoint-3", "checkpoint-6"):
        assert_adapter_folder(tmp_path / "run" / checkpoint)
    trainer.save_model(str(tmp_path / "final"))
    assert_adapter_folder(tmp_path / "final")
    assert_loads_with_same_logits(model, tmp_path / "final", tiny_llama_dir, peft)
    # The last checkpoint is the trained model too.
    assert_loads_with_same_logits(model, tmp_path / "run" / "checkpoint-6", tiny_llama_dir, peft)

    # load_best_model_at_end: Trainer calls _load_best_model with the best checkpoint, here the earlier one.
    final = adapter_tensors(model)
    trainer.state.best_model_checkpoint = str(tmp_path / "run" / "checkpoint-3")
    trainer._load_best_model()
    saved = lorakit.LoraModel.from_pretrained(base_model(tiny_llama_dir), tmp_path / "run" / "checkpoint-3")
    best, now = adapter_tensors(saved), adapter_tensors(model)
    assert all(torch.equal(now[k], best[k]) and not torch.equal(now[k], final[k]) for k in best)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable  # still trains


class StepRecorder(transformers.TrainerCallback):
    """The LoRA gradients before each optimizer step."""

    def __init__(self, model: lorakit.LoraModel) -> None:
        self.model, self.grads = model, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        names = lora_param_names(self.model)
        self.grads.append({n: p.grad.detach().clone() for n, p in self.model.named_parameters() if n in names})


def checkpointed_run(folder, tiny_llama_dir: str, on: bool) -> tuple[lorakit.LoraModel, list, list, int]:
    model = lora_model(tiny_llama_dir)
    recorder = StepRecorder(model)
    calls = []  # a LoRA layer runs once per step, twice with checkpointing (its decoder layer is recomputed)
    model.get_base_model().model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
    trainer = Trainer(model=model, args=training_args(folder, max_steps=3, save_strategy="no",
                                                      gradient_checkpointing=on),
                      train_dataset=token_data(), callbacks=[recorder])
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return model, losses, recorder.grads, len(calls)


def test_gradient_checkpointing_gives_the_same_run(tmp_path, tiny_llama_dir):
    plain, plain_losses, plain_grads, plain_calls = checkpointed_run(tmp_path / "a", tiny_llama_dir, on=False)
    ckpt, ckpt_losses, ckpt_grads, ckpt_calls = checkpointed_run(tmp_path / "b", tiny_llama_dir, on=True)
    assert (plain_calls, ckpt_calls) == (3, 6)  # checkpointing was on, and only in the second run
    assert len(ckpt_losses) == len(plain_losses) == 3
    torch.testing.assert_close(ckpt_losses, plain_losses, atol=1e-6, rtol=1e-6)
    for step, (g_plain, g_ckpt) in enumerate(zip(plain_grads, ckpt_grads)):
        assert g_plain.keys() == g_ckpt.keys() == lora_param_names(ckpt)
        for name in g_plain:
            torch.testing.assert_close(g_ckpt[name], g_plain[name], atol=1e-6, rtol=1e-5, msg=f"step {step} {name}")
    nonzero = {n for step in ckpt_grads for n, g in step.items() if g.abs().sum() > 0}
    assert nonzero == lora_param_names(ckpt)  # every A and B got a gradient through the checkpointed layers
    for key, value in adapter_tensors(plain).items():
        torch.testing.assert_close(adapter_tensors(ckpt)[key], value, atol=1e-6, rtol=1e-5)


class StopAt(transformers.TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_from_checkpoint_ends_like_the_uninterrupted_run(tmp_path, tiny_llama_dir):
    data = token_data()
    whole = lora_model(tiny_llama_dir)
    Trainer(model=whole, args=training_args(tmp_path / "whole"), train_dataset=data).train()

    cut = lora_model(tiny_llama_dir)
    Trainer(model=cut, args=training_args(tmp_path / "cut"), train_dataset=data, callbacks=[StopAt(3)]).train()
    assert sorted(os.listdir(tmp_path / "cut")) == ["checkpoint-3"]
    assert_adapter_folder(tmp_path / "cut" / "checkpoint-3")

    resumed = lora_model(tiny_llama_dir, seed=1)  # another A: only the checkpoint can make it match
    assert not torch.equal(adapter_tensors(resumed)["model.layers.0.self_attn.q_proj.lora_A.weight"],
                           adapter_tensors(whole)["model.layers.0.self_attn.q_proj.lora_A.weight"])
    trainer = Trainer(model=resumed, args=training_args(tmp_path / "cut"), train_dataset=data)
    trainer.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-3"))
    assert trainer.state.global_step == 6
    expected = adapter_tensors(whole)
    got = adapter_tensors(resumed)
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert {n for n, p in resumed.named_parameters() if p.requires_grad} == lora_param_names(resumed)


def test_sft_trainer_trains_only_adapters_and_saves_peft_adapter_files(tmp_path, tiny_llama_dir, smollm2_tokenizer,
                                                                       peft):
    from lorakit.models.hf_compat import SFTTrainer

    model = lora_model(tiny_llama_dir)
    trainable, frozen, lora = ({n for n, p in model.named_parameters() if p.requires_grad}, frozen_snapshot(model),
                               adapter_tensors(model))
    texts = ["The cat sat on the mat.", "A dog ran in the park.", "Rain fell all day long.", "We ate bread and jam."]
    data = datasets.Dataset.from_dict({"text": texts * 2})
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=4, per_device_train_batch_size=2,
                         learning_rate=1e-2, max_length=32, save_steps=2, logging_steps=1, report_to="none",
                         use_cpu=True, bf16=False, gradient_checkpointing=True, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=smollm2_tokenizer)
    trainer.train()
    assert_only_adapters_trained(model, frozen, lora, trainable)
    for checkpoint in ("checkpoint-2", "checkpoint-4"):
        assert_adapter_folder(tmp_path / "sft" / checkpoint)
    trainer.save_model(str(tmp_path / "final"))
    assert_adapter_folder(tmp_path / "final")
    assert_loads_with_same_logits(model, tmp_path / "final", tiny_llama_dir, peft)


def test_sft_trainer_refuses_an_adapter_on_the_output_head(tiny_llama_dir):
    from lorakit.models.hf_compat import SFTTrainer

    model = lorakit.get_lora_model(base_model(tiny_llama_dir), lorakit.LoraConfig(target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="lm_head.weight directly"):
        SFTTrainer(model=model, train_dataset=None)


def test_restore_adapters_checks_before_copying(tmp_path, tiny_llama_dir):
    saved = lora_model(tiny_llama_dir, seed=2)
    saved.add_adapter("other", lorakit.LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False))
    saved.save_pretrained(tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt" / "other")) == ["adapter_config.json", "adapter_model.safetensors"]

    target = lora_model(tiny_llama_dir, seed=3)
    target.add_adapter("other", lorakit.LoraConfig(r=2, target_modules=["k_proj"]))
    assert restore_adapters(target, tmp_path / "ckpt") == ["default", "other"]
    for name in ("default", "other"):
        want, got = lorakit.adapter_state_dict(saved, name), lorakit.adapter_state_dict(target, name)
        assert all(torch.equal(got[k], want[k]) for k in want)

    wrong = lorakit.get_lora_model(base_model(tiny_llama_dir), lorakit.LoraConfig(r=8, target_modules=["q_proj",
                                                                                                         "v_proj"]))
    before = adapter_tensors(wrong)
    with pytest.raises(ValueError, match=r"another config.*'r': \(8, 4\)"):
        restore_adapters(wrong, tmp_path / "ckpt")
    assert all(torch.equal(before[k], v) for k, v in adapter_tensors(wrong).items())
    target.merge_adapter(["default"])
    with pytest.raises(ValueError, match="merged"):
        restore_adapters(target, tmp_path / "ckpt")
    missing = lora_model(tiny_llama_dir)
    missing.add_adapter("absent", lorakit.LoraConfig(r=2, target_modules=["k_proj"]))
    with pytest.raises(FileNotFoundError, match="absent"):
        restore_adapters(missing, tmp_path / "ckpt")


def test_save_pretrained_takes_peft_and_trainer_keywords(tmp_path, tiny_llama_dir):
    model = lora_model(tiny_llama_dir)
    model.save_pretrained(tmp_path / "rank1", is_main_process=False)
    assert not (tmp_path / "rank1").exists()
    model.save_pretrained(tmp_path / "sel", selected_adapters=["default"], safe_serialization=True)
    assert_adapter_folder(tmp_path / "sel")
    with pytest.raises(ValueError, match="pickle"):
        model.save_pretrained(tmp_path / "x", safe_serialization=False)
    with pytest.raises(ValueError, match="state_dict"):
        model.save_pretrained(tmp_path / "x", state_dict=model.state_dict())
    assert not (tmp_path / "x").exists()
