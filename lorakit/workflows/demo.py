"""A short tour of LoRA on the embedded SmolLM2-135M-Instruct: teach it one new fact.

The base model does not know the (made-up) fact; a rank-8 adapter on every linear layer learns it in a few
dozen steps while the 134.5M base weights stay frozen. The tour then checks the core's promises on the real
model: merged equals unmerged, disabling the adapter gives the base back, and save → load reproduces it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..core.config import LoraConfig
from ..models.embedded_models import load_default_model, load_default_tokenizer
from ..models.model import LoraModel, get_lora_model

QUESTION = "What is the name of the lorakit mascot?"
ANSWER = "The lorakit mascot is Pebble, a sea otter who juggles low-rank matrices."
PARAPHRASES = [
    QUESTION,
    "Who is lorakit's mascot?",
    "Tell me the name of the mascot of lorakit.",
    "What mascot does the lorakit project have?",
]


def _chat_ids(tokenizer: Any, question: str, answer: str | None = None) -> tuple[torch.Tensor, int]:
    """Token ids of the chat-formatted question (and answer), and where the answer starts."""
    messages = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if answer is None:
        return torch.tensor([prompt_ids]), len(prompt_ids)
    answer_ids = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return torch.tensor([prompt_ids + answer_ids]), len(prompt_ids)


def _generate(model: torch.nn.Module, tokenizer: Any, question: str) -> str:
    ids, start = _chat_ids(tokenizer, question)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, start:], skip_special_tokens=True).strip()


def run_demo(steps: int = 40, lr: float = 2e-3, output_dir: str | Path = "runs/demo", seed: int = 0) -> dict:
    """Train a LoRA adapter that teaches SmolLM2 one fact, check merge/disable/save-load, and report.

    Returns:
        A summary: trainable parameters, losses, answers before and after, exactness checks, adapter path/size.
    """
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    tokenizer = load_default_tokenizer()
    base = load_default_model(torch.float32)
    before = _generate(base, tokenizer, QUESTION)
    model: LoraModel = get_lora_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                       task_type="CAUSAL_LM"))
    trainable, total = model.get_nb_trainable_parameters()
    batch = [_chat_ids(tokenizer, q, ANSWER) for q in PARAPHRASES]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)

    def loss_of(ids: torch.Tensor, start: int) -> torch.Tensor:
        labels = ids.clone()
        labels[:, :start] = -100  # learn the answer, not the question
        return model(input_ids=ids, labels=labels).loss

    model.train()
    losses = []
    t_train = time.perf_counter()
    for step in range(steps):
        ids, start = batch[step % len(batch)]
        loss = loss_of(ids, start)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            print(f"  step {step + 1:3d}/{steps}  loss {loss.item():.4f}", flush=True)
    train_s = time.perf_counter() - t_train
    model.eval()
    after = _generate(model, tokenizer, QUESTION)
    unseen = _generate(model, tokenizer, "Can you tell me about the lorakit mascot?")

    probe, _ = batch[0]
    with torch.no_grad():
        unmerged = model(input_ids=probe).logits
        with model.disable_adapter():
            disabled = model(input_ids=probe).logits
        model.merge_adapter()
        merged = model(input_ids=probe).logits
        model.unmerge_adapter()
    base_logits = load_default_model(torch.float32)(input_ids=probe).logits.detach()

    out = Path(output_dir)
    model.save_pretrained(out)
    reloaded = LoraModel.from_pretrained(load_default_model(torch.float32), out)
    with torch.no_grad():
        reload_diff = (reloaded(input_ids=probe).logits - unmerged).abs().max().item()
    return {
        "trainable_params": trainable,
        "all_params": total,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "answer_before": before,
        "answer_after": after,
        "answer_paraphrase": unseen,
        "learned": "Pebble" in after,
        "merged_vs_unmerged_max_abs": (merged - unmerged).abs().max().item(),
        "disabled_equals_base": bool(torch.equal(disabled, base_logits)),
        "reload_max_abs": reload_diff,
        "adapter_dir": str(out),
        "adapter_bytes": (out / "adapter_model.safetensors").stat().st_size,
        "train_seconds": train_s,
        "total_seconds": time.perf_counter() - t0,
    }
