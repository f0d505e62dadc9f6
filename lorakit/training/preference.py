"""Preference-training losses: DPO (and its IPO, hinge, robust variants), ORPO, SimPO and KTO, on log-probs.

Every function here is pure tensor arithmetic, with TRL's formulas, defaults and metric names (trl 1.16:
``DPOTrainer``, ``KTOTrainer``, ``experimental.orpo.ORPOTrainer``, ``experimental.cpo.CPOTrainer``). The model
runs elsewhere: :func:`sequence_logps` turns a batch's logits into the summed log-probability of each answer, and a
loss takes those sums (the reference model's too, where the loss has one).

A loss returns a :class:`PreferenceLoss`: one loss per pair (per example for KTO), whose mean is TRL's loss for the
batch, and metrics that are *sums* over the pairs, so a trainer adds them over a step's micro-batches and divides
by the step's count, as it does the loss (:func:`mean_metrics` gives the values TRL logs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import InvalidType, InvalidValue
from .data import IGNORE
from .loss import CHUNK_ELEMENTS, plain_head

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


@dataclass
class PreferenceLoss:
    """What a preference loss returns for one batch.

    Attributes:
        losses: ``(n,)`` the loss of each pair (of each example for KTO), differentiable; ``losses.mean()`` is TRL's
            loss of the batch, and a step's loss is the sum over its micro-batches divided by its pairs.
        metrics: TRL's metrics (``rewards/chosen``, ``rewards/accuracies``, ``logps/chosen``, ...), each a *sum* over
            the pairs (examples), as plain floats. :func:`mean_metrics` turns a step's sums into TRL's logged values.
    """

    losses: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def loss(self) -> torch.Tensor:
        """The batch's loss, as TRL computes it: the mean over pairs (examples)."""
        return self.losses.mean()


# --------------------------------------------------------------------------------------------------------------
# Log-probabilities
# --------------------------------------------------------------------------------------------------------------


def token_logps(logits: torch.Tensor, targets: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """``log p(targets[b, t])`` under ``logits[b, t]``, in fp32; 0 where the target is :data:`IGNORE`.

    ``targets`` are next-token targets already shifted, as :mod:`lorakit.training.data` makes them (``targets[b, t]``
    is the token that should follow position ``t``). Only the positions with a target are scored, a chunk of
    positions at a time: ``logit[target] - logsumexp(logits)``. No log-softmax of the whole vocabulary is made: the
    only copy is each chunk's fp32 logits, which autograd keeps for the backward pass when gradients are on (one
    fp32 copy of the *scored* logits in all; none is kept without gradients).

    Args:
        logits: ``(B, T, V)`` the model's logits, any float dtype.
        targets: ``(B, T)`` token ids or :data:`IGNORE`.
        chunk: Positions per chunk (default: about 2^22 logits per chunk).

    Returns:
        ``(B, T)`` float32 log-probabilities.
    """
    if logits.shape[:-1] != targets.shape:
        raise InvalidValue(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree: logits are "
                           f"(batch, seq, vocab) and targets (batch, seq)")
    selected = targets != IGNORE  # (B, T)
    flat = logits.reshape(-1, logits.shape[-1])  # (B*T, V), a view of contiguous logits
    positions = selected.flatten().nonzero().squeeze(1)  # (N,) the scored positions
    picked_targets = targets.flatten()[positions]  # (N,)
    chunk = chunk or max(1, CHUNK_ELEMENTS // logits.shape[-1])
    pieces = []
    for start in range(0, len(positions), chunk):
        part = flat.index_select(0, positions[start:start + chunk]).float()  # (c, V), one chunk's copy only
        target = picked_targets[start:start + chunk, None]  # (c, 1)
        pieces.append(part.gather(1, target).squeeze(1) - torch.logsumexp(part, dim=-1))  # (c,)
    values = torch.cat(pieces) if pieces else flat.new_zeros(0, dtype=torch.float32)  # (N,)
    out = torch.zeros(targets.shape, dtype=torch.float32, device=logits.device)  # (B, T)
    return out.masked_scatter(selected, values)


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor, chunk: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed log-probability of each row's targets, and how many targets each row has.

    Args:
        logits: ``(B, T, V)`` the model's logits.
        targets: ``(B, T)`` shifted next-token targets, :data:`IGNORE` where a token takes no part (the prompt,
            padding): the answer tokens of a preference pair.
        chunk: Positions per chunk (see :func:`token_logps`).

    Returns:
        ``(logps, counts)``: ``(B,)`` float32 sums of log-probabilities and ``(B,)`` long token counts (for the
        length-normalised losses: IPO, ORPO, SimPO).
    """
    logps = token_logps(logits, targets, chunk).sum(dim=1)  # (B,)
    return logps, (targets != IGNORE).sum(dim=1)


class _LinearLogProbs(torch.autograd.Function):
    """``log softmax(hidden_i · weightᵀ)[target_i]`` for each row i, chunked; the gradient with respect to ``hidden``
    is made in the forward pass, so no chunk's logits outlive it. The second output, each row's mean logit (TRL's
    ``logits/*`` metrics), takes no gradient.

    For a frozen head (LoRA: the output embedding does not train) the gradient of row i's log-prob with respect to
    its hidden state is ``(onehot_i - softmax_i) · weight``: an ``(N, H)`` tensor, where autograd would keep the
    ``(N, V)`` logits. The backward pass scales each row by its incoming gradient.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        grad_h = torch.empty_like(hidden)  # (N, H)
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # (N,)
        means = torch.empty_like(out)  # (N,)
        for start in range(0, hidden.shape[0], chunk):
            logits = hidden[start:start + chunk] @ weight.t()  # (c, V), in the autocast dtype under autocast
            t = targets[start:start + chunk]  # (c,)
            means[start:start + chunk] = logits.mean(dim=-1, dtype=torch.float32)
            logps = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # (c, V)
            out[start:start + chunk] = logps.gather(1, t[:, None]).squeeze(1)
            probs = logps.exp_().neg_()  # -softmax, in the log-probs' memory
            probs[torch.arange(len(t), device=t.device), t] += 1.0  # d logp / d logits
            grad_h[start:start + chunk] = probs.to(weight.dtype) @ weight  # (c, H)
        ctx.save_for_backward(grad_h)
        ctx.mark_non_differentiable(means)
        return out, means

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, grad_means: torch.Tensor):  # type: ignore[override]
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_out[:, None].to(grad_h.dtype), None, None, None


def linear_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p(target_i)`` of the logits ``hidden @ weight.T``, row by row, in fp32, without full logits; and each
    row's mean logit.

    Args:
        hidden: ``(N, H)`` final hidden states of the scored positions.
        weight: ``(V, H)`` the output embedding. When it requires a gradient (full fine-tuning) the chunks go
            through autograd, which keeps each chunk's logits; a frozen head keeps only an ``(N, H)`` gradient.
        targets: ``(N,)`` token ids.
        chunk: Rows per chunk (default: about 2^22 logits per chunk).

    Returns:
        ``(logps, mean_logits)``: ``(N,)`` float32 each; the mean logits are detached.
    """
    chunk = chunk or max(1, CHUNK_ELEMENTS // weight.shape[0])
    if torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad:
        return _LinearLogProbs.apply(hidden, weight, targets, chunk)
    logps, means = [], []
    for start in range(0, hidden.shape[0], chunk):
        logits = hidden[start:start + chunk] @ weight.t()  # (c, V)
        t = targets[start:start + chunk, None]  # (c, 1)
        logps.append(torch.log_softmax(logits, dim=-1, dtype=torch.float32).gather(1, t).squeeze(1))
        means.append(logits.detach().mean(dim=-1, dtype=torch.float32))
    if not logps:
        return (hidden.new_zeros(0, dtype=torch.float32),) * 2
    return torch.cat(logps), torch.cat(means)


def model_token_logps(model: nn.Module, inputs: dict[str, torch.Tensor], targets: torch.Tensor,
                      mean_logits: bool = False) -> Any:
    """The model's log-probability of each target token of a batch, in fp32; 0 where the target is IGNORE.

    A Hugging Face causal LM with a plain output layer runs its backbone and scores only the target positions
    (:func:`linear_token_logps`); any other model's full logits are scored by :func:`token_logps`.

    Args:
        model: A causal LM (a :class:`~lorakit.models.model.LoraModel` or a plain one).
        inputs: ``input_ids`` and ``attention_mask`` ``(B, T)``.
        targets: ``(B, T)`` shifted next-token targets or IGNORE.
        mean_logits: Also return each scored position's mean logit over the vocabulary (detached, 0 elsewhere).

    Returns:
        ``(B, T)`` float32 log-probabilities; with ``mean_logits``, ``(logps, mean_logits)``.
    """
    head = plain_head(model)
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) and head is not None else None
    selected = targets != IGNORE  # (B, T)
    if decoder is None or decoder is model:
        logits = model(**inputs, use_cache=False).logits  # (B, T, V)
        logps = token_logps(logits, targets)
        if not mean_logits:
            return logps
        return logps, logits.detach().float().mean(dim=-1) * selected
    hidden = decoder(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
    values, means = linear_token_logps(hidden[selected], head.weight, targets[selected])  # (N,) each
    zeros = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
    logps = zeros.masked_scatter(selected, values)
    return (logps, zeros.masked_scatter(selected, means)) if mean_logits else logps


def model_position_logps(model: nn.Module, inputs: dict[str, torch.Tensor], positions: torch.Tensor,
                         targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's log-probability of ``targets[i]`` after position ``positions[i]`` of the flattened batch, in fp32,
    and the mean logit there (detached). A position may be scored more than once (a shared prompt's last token
    predicts the first token of each answer).

    Args:
        model: A causal LM; a Hugging Face one with a plain output layer scores only the given positions
            (:func:`linear_token_logps`), any other forms its full logits.
        inputs: What the model reads (ids, and position ids and/or an attention mask).
        positions: ``(N,)`` indices into the flattened ``(B*T)`` positions.
        targets: ``(N,)`` token ids.
    """
    head = plain_head(model)
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) and head is not None else None
    if decoder is not None and decoder is not model:
        hidden = decoder(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
        return linear_token_logps(hidden.flatten(0, 1).index_select(0, positions), head.weight, targets)
    logits = model(**inputs, use_cache=False).logits  # (B, T, V)
    picked = logits.flatten(0, 1).index_select(0, positions).float()  # (N, V)
    logps = picked.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(picked, dim=-1)
    return logps, picked.detach().mean(dim=-1)


# --------------------------------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------------------------------


def _check_pairs(**tensors: torch.Tensor | None) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1 or any(len(s) != 1 for s in shapes.values()):
        raise InvalidValue(f"the per-pair tensors must all be (n,): got {shapes}")


def _check_beta(beta: float) -> None:
    if not beta > 0 or not math.isfinite(beta):
        raise InvalidValue(f"beta must be a positive number, got {beta!r}")


def _sums(**values: torch.Tensor) -> dict[str, float]:
    """Each tensor's sum as a float, read from the device at once (one synchronisation, not one per metric)."""
    sums = torch.stack([v.detach().float().sum() for v in values.values()]).tolist()
    return {name.replace("__", "/"): value for name, value in zip(values, sums)}


def _reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
                    rejected_logps: torch.Tensor, **more: torch.Tensor) -> dict[str, float]:
    """TRL's reward metrics of a paired loss (and ``more``), summed over the pairs."""
    return _sums(rewards__chosen=chosen_rewards, rewards__rejected=rejected_rewards,
                 rewards__accuracies=chosen_rewards > rejected_rewards,
                 rewards__margins=chosen_rewards - rejected_rewards, logps__chosen=chosen_logps,
                 logps__rejected=rejected_logps, **more)


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, *, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, chosen_tokens: torch.Tensor | None = None,
             rejected_tokens: torch.Tensor | None = None) -> PreferenceLoss:
    """Direct Preference Optimization and its variants, by TRL's ``loss_type`` name.

    With the log-ratios ``ρc = πc - refc`` and ``ρr = πr - refr`` (summed answer log-probs of the policy and the
    reference) and ``Δ = ρc - ρr``:

    - ``sigmoid``: ``-(1-ε)·log σ(βΔ) - ε·log σ(-βΔ)``; ε = ``label_smoothing`` > 0 is conservative DPO (cDPO), as
      TRL's CPO/ORPO-era ``sigmoid``. (trl 1.16's DPOTrainer ignores ``label_smoothing`` here: ε = 0 is TRL's.)
    - ``ipo``: ``(ρc/nc - ρr/nr - 1/(2β))²``, the log-ratios averaged over the answer tokens (TRL's normalisation;
      needs ``chosen_tokens`` and ``rejected_tokens``).
    - ``hinge``: ``max(0, 1 - βΔ)`` (SLiC).
    - ``robust``: ``(-(1-ε)·log σ(βΔ) + ε·log σ(-βΔ)) / (1-2ε)``, unbiased under labels flipped with
      probability ε (0 ≤ ε < 0.5).

    Args:
        chosen_logps: ``(n,)`` the policy's summed log-probs of the chosen answers (differentiable).
        rejected_logps: ``(n,)`` the same for the rejected answers.
        ref_chosen_logps: ``(n,)`` the reference model's, for the chosen answers (no gradient needed).
        ref_rejected_logps: ``(n,)`` the reference model's, for the rejected answers.
        beta: β, how far the policy may move from the reference (τ of IPO).
        loss_type: One of ``sigmoid``, ``ipo``, ``hinge``, ``robust``.
        label_smoothing: ε of ``sigmoid`` (cDPO) and ``robust``.
        chosen_tokens: ``(n,)`` answer token counts, for ``ipo``.
        rejected_tokens: ``(n,)`` answer token counts, for ``ipo``.

    Returns:
        The per-pair losses and, summed over pairs, ``rewards/chosen`` (β·ρc), ``rewards/rejected`` (β·ρr),
        ``rewards/accuracies`` (pairs with ρc > ρr), ``rewards/margins``, ``logps/chosen``, ``logps/rejected``.
    """
    _check_pairs(chosen_logps=chosen_logps, rejected_logps=rejected_logps, ref_chosen_logps=ref_chosen_logps,
                 ref_rejected_logps=ref_rejected_logps, chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens)
    _check_beta(beta)
    if loss_type not in DPO_LOSS_TYPES:
        raise InvalidValue(f"loss_type {loss_type!r} is not a DPO loss; allowed: {', '.join(DPO_LOSS_TYPES)}")
    if not 0.0 <= label_smoothing < (0.5 if loss_type == "robust" else 1.0):
        limit = "0.5 (robust DPO)" if loss_type == "robust" else "1"
        raise InvalidValue(f"label_smoothing must be in [0, {limit}), got {label_smoothing!r}")
    chosen_ratio = chosen_logps - ref_chosen_logps  # (n,)
    rejected_ratio = rejected_logps - ref_rejected_logps  # (n,)
    delta = chosen_ratio - rejected_ratio  # (n,)
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    else:  # ipo: TRL averages the summed log-ratios over the answer tokens, so β is comparable across lengths
        if chosen_tokens is None or rejected_tokens is None:
            raise InvalidValue("loss_type 'ipo' needs chosen_tokens and rejected_tokens (the answers' token counts)")
        ipo_delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (ipo_delta - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * chosen_ratio.detach()  # (n,)
    rejected_rewards = beta * rejected_ratio.detach()  # (n,)
    return PreferenceLoss(losses, _reward_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps))


# --------------------------------------------------------------------------------------------------------------
# Without a reference: ORPO, SimPO
# --------------------------------------------------------------------------------------------------------------


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, without cancellation (two forms, switched at ``-ln 2``)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _shared_nll(nll: torch.Tensor | None, nll_tokens: torch.Tensor | int | None, n: int,
                like: torch.Tensor) -> torch.Tensor:
    """The NLL term of each pair: the batch's NLL is a mean over its tokens (TRL's cross-entropy), shared out
    so that the mean over the ``n`` pairs is that token mean."""
    if nll is None:
        return like.new_zeros(n)
    if nll_tokens is None:
        raise InvalidValue("nll needs nll_tokens: the number of tokens the NLL is summed over, in the whole batch")
    return nll.float() * (n / torch.as_tensor(nll_tokens, dtype=torch.float32, device=like.device).clamp(min=1))


def orpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, chosen_tokens: torch.Tensor,
              rejected_tokens: torch.Tensor, chosen_nll: torch.Tensor, nll_tokens: torch.Tensor | int, *,
              beta: float = 0.1) -> PreferenceLoss:
    """Odds Ratio Preference Optimization: supervised NLL of the chosen answer plus a log-odds-ratio term.

    With the length-normalised log-probs ``ac = πc/nc`` and ``ar = πr/nr`` (mean log-prob per answer token) and
    ``log odds(y) = a - log(1 - exp(a))``:

        ``loss = NLL - β · log σ(log odds(yc) - log odds(yr))``

    where NLL is the mean negative log-likelihood over the batch's NLL tokens. TRL (``ORPOTrainer``) takes it over
    the chosen rows' prompt *and* answer tokens; the caller decides which tokens ``chosen_nll`` sums over.

    Args:
        chosen_logps: ``(n,)`` summed answer log-probs of the chosen answers (differentiable).
        rejected_logps: ``(n,)`` the same for the rejected answers.
        chosen_tokens: ``(n,)`` answer token counts of the chosen answers.
        rejected_tokens: ``(n,)`` answer token counts of the rejected answers.
        chosen_nll: ``(n,)`` summed negative log-likelihood of each chosen row over its NLL tokens.
        nll_tokens: The number of NLL tokens in the whole batch (the cross-entropy's denominator).
        beta: λ of the paper, the weight of the odds-ratio term.

    Returns:
        The per-pair losses (the NLL shared out by tokens, so their mean is TRL's loss) and, summed over pairs,
        ``rewards/*`` (β·a), ``logps/chosen`` and ``logps/rejected`` (the mean log-probs a), ``nll_loss``,
        ``log_odds_ratio`` (log σ of the log odds ratio) and ``log_odds_chosen`` (the log odds ratio).
    """
    _check_pairs(chosen_logps=chosen_logps, rejected_logps=rejected_logps, chosen_tokens=chosen_tokens,
                 rejected_tokens=rejected_tokens, chosen_nll=chosen_nll)
    _check_beta(beta)
    chosen_mean = chosen_logps.float() / chosen_tokens.clamp(min=1)  # (n,) a_c
    rejected_mean = rejected_logps.float() / rejected_tokens.clamp(min=1)  # (n,) a_r
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))  # (n,)
    ratio = F.logsigmoid(log_odds)  # (n,)
    nll = _shared_nll(chosen_nll, nll_tokens, len(chosen_logps), chosen_mean)  # (n,)
    losses = nll - beta * ratio
    metrics = _reward_metrics(beta * chosen_mean.detach(), beta * rejected_mean.detach(), chosen_mean, rejected_mean,
                              nll_loss=nll, log_odds_ratio=ratio, log_odds_chosen=log_odds)
    return PreferenceLoss(losses, metrics)


def simpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, chosen_tokens: torch.Tensor,
               rejected_tokens: torch.Tensor, *, beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0,
               chosen_nll: torch.Tensor | None = None, nll_tokens: torch.Tensor | int | None = None,
               cpo_alpha: float = 0.0) -> PreferenceLoss:
    """Simple Preference Optimization (TRL's ``CPOTrainer`` with ``loss_type="simpo"``): no reference model.

    With the length-normalised log-probs ``ac = πc/nc``, ``ar = πr/nr`` and the target margin γ
    (``simpo_gamma``, TRL's default 0.5):

        ``loss = -(1-ε)·log σ(β(ac - ar) - γ) - ε·log σ(-(β(ac - ar) - γ)) + α·NLL``

    α = ``cpo_alpha`` = 0 is SimPO; α > 0 adds CPO's behaviour-cloning NLL of the chosen answers (CPO-SimPO; TRL's
    CPOConfig defaults to α = 1, which is not plain SimPO).

    Args:
        chosen_logps: ``(n,)`` summed answer log-probs of the chosen answers (differentiable).
        rejected_logps: ``(n,)`` the same for the rejected answers.
        chosen_tokens: ``(n,)`` answer token counts of the chosen answers.
        rejected_tokens: ``(n,)`` answer token counts of the rejected answers.
        beta: β, the reward scale (the SimPO paper's 2.0).
        gamma: γ, the target reward margin (TRL's ``simpo_gamma``).
        label_smoothing: ε, as in conservative DPO.
        chosen_nll: ``(n,)`` summed NLL of each chosen answer, for ``cpo_alpha`` > 0.
        nll_tokens: The number of tokens ``chosen_nll`` sums over in the whole batch.
        cpo_alpha: α, the weight of the NLL term.

    Returns:
        The per-pair losses and, summed over pairs, ``rewards/*`` (β·a), ``logps/chosen``, ``logps/rejected`` (the
        mean log-probs a) and ``nll_loss``.
    """
    _check_pairs(chosen_logps=chosen_logps, rejected_logps=rejected_logps, chosen_tokens=chosen_tokens,
                 rejected_tokens=rejected_tokens, chosen_nll=chosen_nll)
    _check_beta(beta)
    if not 0.0 <= label_smoothing < 1.0:
        raise InvalidValue(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    if cpo_alpha < 0:
        raise InvalidValue(f"cpo_alpha must be >= 0, got {cpo_alpha!r}")
    if cpo_alpha > 0 and chosen_nll is None:
        raise InvalidValue(f"cpo_alpha={cpo_alpha} weighs an NLL term: pass chosen_nll and nll_tokens")
    chosen_mean = chosen_logps / chosen_tokens.clamp(min=1)  # (n,) a_c
    rejected_mean = rejected_logps / rejected_tokens.clamp(min=1)  # (n,) a_r
    logits = chosen_mean - rejected_mean - gamma / beta  # (n,)
    losses = (-(1 - label_smoothing) * F.logsigmoid(beta * logits)
              - label_smoothing * F.logsigmoid(-beta * logits))
    nll = _shared_nll(chosen_nll if cpo_alpha > 0 else None, nll_tokens, len(chosen_logps), chosen_mean)  # (n,)
    losses = losses + cpo_alpha * nll
    metrics = _reward_metrics(beta * chosen_mean.detach(), beta * rejected_mean.detach(), chosen_mean, rejected_mean,
                              nll_loss=nll)
    return PreferenceLoss(losses, metrics)


# --------------------------------------------------------------------------------------------------------------
# KTO
# --------------------------------------------------------------------------------------------------------------


def kto_kl(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z: the batch's mean log-ratio on *mismatched* (prompt, completion) pairs, detached and
    clamped at 0, as TRL computes it (with several processes TRL averages the per-process means before clamping).

    Args:
        kl_logps: ``(n,)`` the policy's summed completion log-probs of the mismatched pairs.
        ref_kl_logps: ``(n,)`` the reference model's.

    Returns:
        A scalar float32 tensor.
    """
    _check_pairs(kl_logps=kl_logps, ref_kl_logps=ref_kl_logps)
    return (kl_logps - ref_kl_logps).float().mean().detach().clamp(min=0)


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor | float, *,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> PreferenceLoss:
    """Kahneman-Tversky Optimization on unpaired examples, each labelled desirable or not.

    With the log-ratio ``ρ = π - ref`` of each completion and the reference point z (:func:`kto_kl`):

        desirable: ``λD · (1 - σ(β(ρ - z)))``        undesirable: ``λU · (1 - σ(β(z - ρ)))``

    Args:
        logps: ``(n,)`` the policy's summed completion log-probs (differentiable).
        ref_logps: ``(n,)`` the reference model's.
        desirable: ``(n,)`` bool, True for a desirable (chosen) completion.
        kl: z, from :func:`kto_kl` (0 to leave the reference point out).
        beta: β.
        desirable_weight: λD.
        undesirable_weight: λU.

    Returns:
        The per-example losses and, summed over examples, ``kl`` (z per example), ``rewards/chosen`` and
        ``logps/chosen`` over the desirable examples, ``rewards/rejected`` and ``logps/rejected`` over the
        undesirable ones, and their counts ``count/chosen`` and ``count/rejected`` (TRL averages each over its own
        examples; :func:`mean_metrics` does, and makes ``rewards/margins``).
    """
    _check_pairs(logps=logps, ref_logps=ref_logps, desirable=desirable)
    _check_beta(beta)
    if desirable.dtype != torch.bool:
        raise InvalidType(f"desirable must be a bool tensor, got {desirable.dtype}")
    kl = torch.as_tensor(kl, dtype=torch.float32, device=logps.device).detach()
    ratio = logps - ref_logps  # (n,)
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))  # (n,)
    rewards = beta * ratio.detach()  # (n,)
    metrics = _sums(kl=kl.expand(len(logps)), rewards__chosen=rewards[desirable], logps__chosen=logps[desirable],
                    rewards__rejected=rewards[~desirable], logps__rejected=logps[~desirable],
                    count__chosen=desirable, count__rejected=~desirable)
    return PreferenceLoss(losses, metrics)


def mean_metrics(sums: Mapping[str, float], count: float) -> dict[str, float]:
    """The values TRL logs, from metrics summed over a step's micro-batches and the step's pair (example) count.

    Paired losses: every sum divided by ``count``. KTO (sums with ``count/chosen``): the chosen metrics divided by
    the desirable examples, the rejected by the undesirable ones, ``rewards/margins`` their difference (each only
    when there were such examples, as TRL), ``kl`` by ``count``.
    """
    if "count/chosen" not in sums:
        return {name: value / count for name, value in sums.items()}
    chosen, rejected = sums["count/chosen"], sums["count/rejected"]
    out = {"kl": sums["kl"] / count}
    for side, n in (("chosen", chosen), ("rejected", rejected)):
        if n > 0:
            out[f"rewards/{side}"] = sums[f"rewards/{side}"] / n
            out[f"logps/{side}"] = sums[f"logps/{side}"] / n
    if chosen > 0 and rejected > 0:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out
