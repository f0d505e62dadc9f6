"""Losses of the trainer: a chunked linear + cross-entropy that never holds the whole batch's logits.

A causal LM's logits are the largest tensor of a training step: SmolLM2's vocabulary has 49,152 entries, so 4 × 256
tokens of fp32 logits take 200 MB, plus as much again for their gradient. The loss here takes the final hidden
states of only the positions that carry a target (the response tokens in supervised fine-tuning) and goes
through them in chunks: logits, log-sum-exp and the gradient of each chunk are computed in the forward pass and
the chunk's logits are freed at once, so at most one chunk of logits exists at a time and the backward pass is a
multiplication by the incoming scalar.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..core.families import family_of
from .data import IGNORE


@dataclass
class LossResult:
    """What a task's loss returns for one micro-batch.

    Attributes:
        sum: The summed loss (a scalar tensor that backward runs through).
        count: What the loss is averaged over: target tokens, examples or pairs (the loop divides the step's
            summed loss by the count of the whole step, over every micro-batch and process).
        metrics: The task's own numbers (rewards, KL, ...), each a *sum* over the same units as ``count``, so the
            loop reports them as it reports the loss: summed over the step, divided by the step's count.
    """

    sum: torch.Tensor
    count: torch.Tensor | int
    metrics: dict[str, float] = field(default_factory=dict)


CHUNK_ELEMENTS = 2**22  # logits per chunk (16 MB in fp32): 85 tokens of a 49k vocabulary. Chunks this small
# stay in the allocator's reused memory and near the cache: the head of a 135M model ran 1.3-1.6x faster than with
# 2^25 (2-core AMD EPYC, bf16), where every chunk was freshly mapped memory.


class _LinearCrossEntropy(torch.autograd.Function):
    """``sum_i CE(hidden_i · weightᵀ, target_i)``, chunked over tokens; gradients made in the forward pass."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                chunk: int) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]  # (c, H)
            t = targets[start:start + chunk]  # (c,)
            # (c, V) in fp32; under autocast the product runs in the autocast dtype
            logps = torch.log_softmax(h @ weight.t(), dim=-1, dtype=torch.float32)
            total -= logps.gather(1, t[:, None]).sum()
            if need_h or need_w:
                probs = logps.exp_()  # softmax, in the log-probs' memory
                probs[torch.arange(len(t), device=t.device), t] -= 1.0  # d CE / d logits
                if need_h:
                    grad_h[start:start + chunk] = probs.to(weight.dtype) @ weight  # (c, H)
                if need_w:
                    grad_w += probs.t() @ h.float()  # (V, H)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    """Sum of token cross-entropies of ``hidden @ weight.T`` against ``targets``, without full logits.

    Args:
        hidden: ``(N, H)`` final hidden states of the positions that carry a target.
        weight: ``(V, H)`` output embedding (the LM head's weight; it may require grad, e.g. when tied).
        targets: ``(N,)`` token ids (no ignored entries: select positions before calling).
        chunk: Tokens per chunk (default: about 2^22 logits per chunk).

    Returns:
        A scalar fp32 tensor: the summed loss (divide by the token count for the mean).
    """
    if chunk is None:
        chunk = max(1, CHUNK_ELEMENTS // weight.shape[0])
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)  # evaluation: no gradients to make
    for start in range(0, hidden.shape[0], chunk):
        logits = (hidden[start:start + chunk] @ weight.t()).float()  # (c, V)
        total += F.cross_entropy(logits, targets[start:start + chunk], reduction="sum")
    return total


def plain_head(model: nn.Module) -> nn.Linear | None:
    """The output layer if the logits are exactly ``hidden @ weight.T``: a family known to have a plain head (no
    softcapping or logit scaling: :mod:`lorakit.core.families`) and a plain layer."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    config = getattr(model, "config", None)
    if not family_of(getattr(config, "model_type", None)).plain_head:
        return None
    if type(head) is not nn.Linear or head.bias is not None:
        return None
    return head


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss and the number of target tokens of a batch from :mod:`lorakit.training.data`.

    ``batch["targets"]`` is already shifted per example. For Hugging Face causal LMs with a plain output layer the
    backbone's hidden states at the target positions go through :func:`linear_cross_entropy`; any other model's
    full logits go through ``F.cross_entropy``.
    """
    targets = batch["targets"]
    inputs = {k: v for k, v in batch.items() if k != "targets"}
    selected = targets != IGNORE  # (B, T)
    count = selected.sum()
    get_decoder = getattr(model, "get_decoder", None)
    head = plain_head(model)
    decoder = get_decoder() if callable(get_decoder) and head is not None else None
    if decoder is not None and decoder is not model:
        hidden = decoder(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
        return linear_cross_entropy(hidden[selected], head.weight, targets[selected]), count
    # A KV cache would hide packed-sequence boundaries from transformers' mask logic: none in training.
    extra = {"use_cache": False} if hasattr(model, "config") else {}
    logits = model(**inputs, **extra).logits  # (B, T, V)
    return F.cross_entropy(logits[selected].float(), targets[selected], reduction="sum"), count


def classification_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of a sequence classifier and the number of examples."""
    labels = batch["labels"]
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # (B, n_labels)
    return F.cross_entropy(logits.float(), labels, reduction="sum"), torch.tensor(labels.numel())
