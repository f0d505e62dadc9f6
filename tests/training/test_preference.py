"""Preference losses equal TRL's own code: loss, rewards, metrics and gradients, on given log-probs and on a tiny
Llama with a lorakit LoRA.

How TRL is called: trl 1.16 has no free loss functions for DPO and KTO; the loss is written inside
``DPOTrainer._compute_loss`` / ``KTOTrainer._compute_loss``, which run the model themselves. So each test builds a
*bare trainer*: ``object.__new__(DPOTrainer)`` (no ``__init__``: no model loading, no datasets, no Accelerate set-up)
with exactly the attributes that method reads set by hand, an identity ``accelerator`` (one process), and calls TRL's
unmodified method. Its model is either a stand-in that returns given per-token log-probs (the loss is then a
function of those, and we differentiate with respect to them) or the tiny Llama patched with TRL's own fused head
(``add_fused_lm_head``), as DPOTrainer patches its model. ORPO and CPO (SimPO) are called the same way
(``get_batch_loss_metrics`` on a bare ``ORPOTrainer`` / ``CPOTrainer``), and their free-standing
``odds_ratio_loss`` / ``cpo_loss`` methods for the tensor-level checks.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from conftest import random_lora, tiny_llama

from lorakit import get_lora_model
from lorakit.training.data import IGNORE
from lorakit.training.preference import (
    dpo_loss,
    kto_kl,
    kto_loss,
    mean_metrics,
    orpo_loss,
    sequence_logps,
    simpo_loss,
    token_logps,
)

trl = pytest.importorskip("trl", reason="TRL is the reference these losses are compared with (pip install trl)")
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer  # noqa: E402
from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference, KTOTrainer  # noqa: E402
from trl.trainer.utils import FusedCausalLMOutput, add_fused_lm_head  # noqa: E402

TOL = {"atol": 1e-5, "rtol": 1e-5}
CPU = torch.device("cpu")


class _OneProcess:
    """Accelerate's gathers on one process: the identity."""

    device = CPU

    @staticmethod
    def gather(tensor):
        return tensor

    gather_for_metrics = gather

    @staticmethod
    def unwrap_model(model):
        return model


def _bare(cls, **attrs):
    """A TRL trainer without ``__init__``: only the attributes its loss method reads, set by hand."""
    trainer = object.__new__(cls)
    common = dict(accelerator=_OneProcess(), args=SimpleNamespace(gradient_checkpointing_kwargs=None),
                  aux_loss_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                  _total_train_tokens=0, _tp_size=1)
    for name, value in {**common, **attrs}.items():
        setattr(trainer, name, value)
    return trainer


def _trl_metrics(trainer) -> dict[str, float]:
    return {name: values[-1] for name, values in trainer._metrics["train"].items()}


class _GivenLogps(torch.nn.Module):
    """A stand-in model for TRL's fused head: returns given per-token log-probs of the scored positions."""

    is_gradient_checkpointing = False

    def __init__(self, by_input: dict[int, torch.Tensor]):
        super().__init__()
        self.by_input = by_input  # input_ids.data_ptr() -> (B, T-1) log-probs

    def forward(self, input_ids, labels, **_):
        mask = labels[:, 1:] != IGNORE
        logps = self.by_input[input_ids.data_ptr()] * mask
        zeros = torch.zeros_like(logps)
        return FusedCausalLMOutput(log_probs=logps, entropy=zeros, mean_logits=zeros, is_top1=mask & False)


def _pairs(n: int, seed: int = 0) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(0, 128, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    return [{"prompt_ids": ids(2, 5), "chosen_ids": ids(1, 6), "rejected_ids": ids(1, 6)} for _ in range(n)]


def _shifted(input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """lorakit's next-token targets of a TRL batch: ``input_ids[t+1]`` where ``mask[t+1]``."""
    targets = torch.full_like(input_ids, IGNORE)
    targets[:, :-1] = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)
    return targets


def test_sigmoid_loss_at_zero_margin_is_ln_2():
    logps = torch.tensor([-3.0, -7.5])
    out = dpo_loss(logps, logps - 1, logps, logps - 1)  # equal log-ratios: Δ = 0
    torch.testing.assert_close(out.losses, torch.full((2,), math.log(2)), atol=1e-6, rtol=0)
    assert out.metrics["rewards/accuracies"] == 0 and out.metrics["rewards/margins"] == 0


@pytest.mark.parametrize("chunk", [1, 3, None])
def test_token_logps_are_log_softmax_gathered(chunk):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    targets = torch.randint(0, 11, (3, 5))
    targets[0, :2] = IGNORE
    targets[2, 4] = IGNORE
    ours = token_logps(logits, targets, chunk)
    full = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    expected = full * (targets != IGNORE)
    torch.testing.assert_close(ours, expected, **TOL)
    logps, counts = sequence_logps(logits, targets, chunk)
    torch.testing.assert_close(logps, expected.sum(1), **TOL)
    assert counts.tolist() == [3, 5, 4]
    grad_ours, = torch.autograd.grad(logps.sum(), logits, retain_graph=True)
    grad_ref, = torch.autograd.grad(expected.sum(), logits)
    torch.testing.assert_close(grad_ours, grad_ref, **TOL)


def test_token_logps_of_bf16_logits_are_fp32():
    logits = torch.randn(2, 3, 7).bfloat16()
    targets = torch.tensor([[1, 2, IGNORE], [IGNORE, 0, 6]])
    out = token_logps(logits, targets)
    expected = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected * (targets != IGNORE), **TOL)


def _dpo_batch(n: int = 4):
    """A TRL DPO batch (its collator) and random per-token log-probs of the policy (a leaf) and the reference."""
    batch = DataCollatorForPreference(pad_token_id=0)(_pairs(n))
    torch.manual_seed(1)
    shape = (2 * n, batch["input_ids"].shape[1] - 1)
    policy = (-3 * torch.rand(shape)).requires_grad_()
    ref = -3 * torch.rand(shape)
    return batch, policy, ref


@pytest.mark.parametrize("loss_type,beta,eps", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("ipo", 0.1, 0.0),
                                                ("hinge", 0.3, 0.0), ("robust", 0.1, 0.2), ("robust", 0.1, 0.0)])
def test_dpo_equals_trl_on_given_logps(loss_type, beta, eps):
    batch, policy, ref = _dpo_batch()
    trainer = _bare(DPOTrainer, model=_GivenLogps({batch["input_ids"].data_ptr(): policy}),
                    ref_model=_GivenLogps({batch["input_ids"].data_ptr(): ref}), beta=beta, loss_types=[loss_type],
                    loss_weights=[1.0], label_smoothing=eps, precompute_ref_logps=False, ld_alpha=None,
                    f_divergence_type="reverse_kl", use_weighting=False)
    trl_loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)
    trl_grad, = torch.autograd.grad(trl_loss, policy)

    mask = batch["completion_mask"][:, 1:]  # (2n, T-1): the scored answer tokens
    logps, refs, counts = (policy * mask).sum(1), (ref * mask).sum(1), mask.sum(1)
    n = len(logps) // 2
    out = dpo_loss(logps[:n], logps[n:], refs[:n], refs[n:], beta=beta, loss_type=loss_type, label_smoothing=eps,
                   chosen_tokens=counts[:n], rejected_tokens=counts[n:])
    torch.testing.assert_close(out.loss, trl_loss, **TOL)
    torch.testing.assert_close(torch.autograd.grad(out.loss, policy)[0], trl_grad, **TOL)
    trl_metrics = _trl_metrics(trainer)
    for name, value in mean_metrics(out.metrics, n).items():
        assert value == pytest.approx(trl_metrics[name], abs=1e-5), name


def test_conservative_dpo_equals_trl_label_smoothed_sigmoid():
    """trl 1.16's DPOTrainer dropped label smoothing from ``sigmoid``; TRL's cDPO formula lives on in CPOTrainer's
    ``cpo_loss`` (``sigmoid``), a function of ``logits = chosen - rejected``. Given the log-ratios ρc, ρr as its
    "log-probs", its logits are DPO's Δ, so it is cDPO exactly."""
    torch.manual_seed(2)
    policy = (-5 * torch.rand(2, 6)).requires_grad_()
    ref = -5 * torch.rand(2, 6)
    cpo = _bare(CPOTrainer, alpha=0.0, loss_type="sigmoid", beta=0.2, label_smoothing=0.3, simpo_gamma=0.5)
    trl_losses, trl_c, trl_r = cpo.cpo_loss(policy[0] - ref[0], policy[1] - ref[1])
    out = dpo_loss(policy[0], policy[1], ref[0], ref[1], beta=0.2, label_smoothing=0.3)
    torch.testing.assert_close(out.losses, trl_losses, **TOL)
    assert out.metrics["rewards/chosen"] == pytest.approx(trl_c.sum().item(), abs=1e-5)
    assert out.metrics["rewards/rejected"] == pytest.approx(trl_r.sum().item(), abs=1e-5)
    torch.testing.assert_close(torch.autograd.grad(out.loss, policy)[0],
                               torch.autograd.grad(trl_losses.mean(), policy)[0], **TOL)


def test_orpo_equals_trl_odds_ratio_loss():
    torch.manual_seed(3)
    sums = (-8 * torch.rand(2, 5)).requires_grad_()  # summed answer log-probs: chosen row, rejected row
    counts = torch.tensor([[3, 9, 1, 4, 6], [2, 2, 7, 5, 8]])
    orpo = _bare(ORPOTrainer, beta=0.1)
    trl_losses, trl_c, trl_r, trl_ratio, trl_odds = orpo.odds_ratio_loss(sums[0] / counts[0], sums[1] / counts[1])
    nll = torch.zeros(5)  # the NLL term is checked on the model below
    out = orpo_loss(sums[0], sums[1], counts[0], counts[1], nll, 20)
    torch.testing.assert_close(out.loss, -trl_losses.mean(), **TOL)
    torch.testing.assert_close(torch.autograd.grad(out.loss, sums)[0],
                               torch.autograd.grad(-trl_losses.mean(), sums)[0], **TOL)
    assert out.metrics["log_odds_ratio"] / 5 == pytest.approx(trl_ratio.item(), abs=1e-6)
    assert out.metrics["log_odds_chosen"] / 5 == pytest.approx(trl_odds.item(), abs=1e-6)
    assert out.metrics["rewards/chosen"] == pytest.approx(trl_c.sum().item(), abs=1e-6)
    assert out.metrics["rewards/rejected"] == pytest.approx(trl_r.sum().item(), abs=1e-6)


@pytest.mark.parametrize("beta,gamma,eps", [(2.0, 0.5, 0.0), (2.5, 1.0, 0.1)])
def test_simpo_equals_trl_cpo_loss(beta, gamma, eps):
    torch.manual_seed(4)
    sums = (-8 * torch.rand(2, 5)).requires_grad_()
    counts = torch.tensor([[3, 9, 1, 4, 6], [2, 2, 7, 5, 8]])
    cpo = _bare(CPOTrainer, alpha=0.0, loss_type="simpo", beta=beta, label_smoothing=eps, simpo_gamma=gamma)
    trl_losses, trl_c, trl_r = cpo.cpo_loss(sums[0] / counts[0], sums[1] / counts[1])
    out = simpo_loss(sums[0], sums[1], counts[0], counts[1], beta=beta, gamma=gamma, label_smoothing=eps)
    torch.testing.assert_close(out.losses, trl_losses, **TOL)
    torch.testing.assert_close(torch.autograd.grad(out.loss, sums)[0],
                               torch.autograd.grad(trl_losses.mean(), sums)[0], **TOL)
    assert out.metrics["rewards/margins"] == pytest.approx((trl_c - trl_r).sum().item(), abs=1e-5)


def _kto_batch(labels: list[bool], seed: int = 5):
    pairs = _pairs(len(labels), seed)
    completions = [p["chosen_ids"] for p in pairs]
    kl = [completions[-1]] + completions[:-1]  # TRL's mismatched pairs: completion i-1 after prompt i
    examples = [{"prompt_ids": p["prompt_ids"], "completion_ids": c, "KL_completion_ids": k, "label": y}
                for p, c, k, y in zip(pairs, completions, kl, labels)]
    return DataCollatorForUnpairedPreference(pad_token_id=0)(examples)


def _kto_trainer(model, ref_model, beta=0.1, wd=1.0, wu=1.0):
    return _bare(KTOTrainer, model=model, ref_model=ref_model, beta=beta, loss_type="kto", desirable_weight=wd,
                 undesirable_weight=wu, calculate_KL=True, precompute_ref_logps=False)


@pytest.mark.parametrize("labels,wd,wu", [([True, False, True, False, True], 1.0, 1.0),
                                          ([True, True, False, True], 1.3, 0.7), ([False, False, False], 1.0, 1.0)])
def test_kto_equals_trl_on_given_logps(labels, wd, wu):
    batch = _kto_batch(labels)
    torch.manual_seed(6)
    n, width, kl_width = len(labels), batch["input_ids"].shape[1] - 1, batch["KL_input_ids"].shape[1] - 1
    policy, ref = (-3 * torch.rand(n, width)).requires_grad_(), -3 * torch.rand(n, width)
    policy_kl, ref_kl = -2 * torch.rand(n, kl_width), -3 * torch.rand(n, kl_width)  # KL > 0 on average
    main, kl_ids = batch["input_ids"].data_ptr(), batch["KL_input_ids"].data_ptr()
    trainer = _kto_trainer(_GivenLogps({main: policy, kl_ids: policy_kl}), _GivenLogps({main: ref, kl_ids: ref_kl}),
                           beta=0.2, wd=wd, wu=wu)
    trl_loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)

    mask, kl_mask = batch["completion_mask"][:, 1:], batch["KL_completion_mask"][:, 1:]
    kl = kto_kl((policy_kl * kl_mask).sum(1), (ref_kl * kl_mask).sum(1))
    assert kl > 0
    out = kto_loss((policy * mask).sum(1), (ref * mask).sum(1), batch["label"], kl, beta=0.2, desirable_weight=wd,
                   undesirable_weight=wu)
    torch.testing.assert_close(out.loss, trl_loss, **TOL)
    torch.testing.assert_close(torch.autograd.grad(out.loss, policy)[0], torch.autograd.grad(trl_loss, policy)[0],
                               **TOL)
    trl_metrics = {k: v for k, v in _trl_metrics(trainer).items() if k.split("/")[0] in ("kl", "rewards", "logps")}
    ours = mean_metrics(out.metrics, n)
    assert ours.keys() == trl_metrics.keys()
    for name, value in ours.items():
        assert value == pytest.approx(trl_metrics[name], abs=1e-5), name


def test_kto_kl_is_clamped_at_zero_and_detached():
    kl_logps = torch.tensor([-5.0, -6.0], requires_grad=True)
    assert kto_kl(kl_logps, torch.tensor([-1.0, -1.0])).item() == 0.0
    z = kto_kl(kl_logps, torch.tensor([-9.0, -9.0]))
    assert z.item() == pytest.approx(3.5) and not z.requires_grad


def test_bad_arguments_name_the_value():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="'sppo' is not a DPO loss; allowed: sigmoid, ipo, hinge, robust"):
        dpo_loss(x, x, x, x, loss_type="sppo")
    with pytest.raises(ValueError, match="needs chosen_tokens"):
        dpo_loss(x, x, x, x, loss_type="ipo")
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5 \(robust DPO\)\), got 0.5"):
        dpo_loss(x, x, x, x, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta must be a positive number, got 0"):
        dpo_loss(x, x, x, x, beta=0)
    with pytest.raises(ValueError, match=r"must all be \(n,\)"):
        dpo_loss(x, torch.zeros(2), x, x)
    with pytest.raises(ValueError, match="cpo_alpha=1.0 weighs an NLL term"):
        simpo_loss(x, x, x, x, cpo_alpha=1.0)
    with pytest.raises(TypeError, match="desirable must be a bool tensor"):
        kto_loss(x, x, torch.ones(3), 0.0)


# --------------------------------------------------------------------------------------------------------------
# On a model: TRL's forward (its fused head) and ours (logits -> sequence_logps) give the same LoRA gradients
# --------------------------------------------------------------------------------------------------------------


class _Reference(torch.nn.Module):
    """TRL's ``ref_model``: the same LoRA model with its adapters disabled, i.e. the base model."""

    def __init__(self, lora):
        super().__init__()
        self.lora = [lora]  # not a submodule: the reference holds no parameters of its own

    def forward(self, **kwargs):
        with self.lora[0].disable_adapter():
            return self.lora[0](**kwargs)


def _lora_model():
    base = tiny_llama(seed=0)
    add_fused_lm_head(base, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))  # as DPOTrainer does
    torch.manual_seed(7)
    model = get_lora_model(base, random_lora(target_modules=["q_proj", "v_proj"]))
    model.train()
    return model


def _lora_grads(model) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return grads


def _assert_same_grads(ours, theirs):
    assert len(ours) == len(theirs) and any(g.abs().sum() > 0 for g in ours)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TOL)


def _our_logps(model, input_ids, attention_mask, targets):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
    return sequence_logps(logits, targets)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_dpo_lora_gradients_equal_trl(loss_type):
    model = _lora_model()
    batch = DataCollatorForPreference(pad_token_id=0)(_pairs(3, seed=8))
    trainer = _bare(DPOTrainer, model=model, ref_model=_Reference(model), beta=0.1, loss_types=[loss_type],
                    loss_weights=[1.0], label_smoothing=0.1 if loss_type == "robust" else 0.0,
                    precompute_ref_logps=False, ld_alpha=None, f_divergence_type="reverse_kl", use_weighting=False)
    trainer._compute_loss(model, batch, return_outputs=False).backward()
    theirs = _lora_grads(model)

    targets = _shifted(batch["input_ids"], batch["completion_mask"])
    logps, counts = _our_logps(model, batch["input_ids"], batch["attention_mask"], targets)
    with torch.no_grad(), model.disable_adapter():
        refs, _ = _our_logps(model, batch["input_ids"], batch["attention_mask"], targets)
    out = dpo_loss(logps[:3], logps[3:], refs[:3], refs[3:], loss_type=loss_type, chosen_tokens=counts[:3],
                   rejected_tokens=counts[3:], label_smoothing=0.1 if loss_type == "robust" else 0.0)
    out.loss.backward()
    _assert_same_grads(_lora_grads(model), theirs)
    trl_metrics = _trl_metrics(trainer)
    for name, value in mean_metrics(out.metrics, 3).items():
        assert value == pytest.approx(trl_metrics[name], abs=1e-5), name


def _paired_batch(pairs):
    """TRL's older paired layout (ORPO, CPO): padded chosen_* and rejected_* tensors, labels -100 on the prompt."""
    batch = {}
    for side in ("chosen", "rejected"):
        rows = [p["prompt_ids"] + p[f"{side}_ids"] for p in pairs]
        width = max(map(len, rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, IGNORE)
        for i, (p, row) in enumerate(zip(pairs, rows)):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
            labels[i, len(p["prompt_ids"]):len(row)] = torch.tensor(p[f"{side}_ids"])
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels})
    return batch


def _stacked(batch):
    """Our forward: chosen rows then rejected rows, padded to one width; answer targets and whole-row targets."""
    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])

    def pad(t, value):
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    ids = torch.cat([pad(batch[f"{s}_input_ids"], 0) for s in ("chosen", "rejected")])
    mask = torch.cat([pad(batch[f"{s}_attention_mask"], 0) for s in ("chosen", "rejected")])
    labels = torch.cat([pad(batch[f"{s}_labels"], IGNORE) for s in ("chosen", "rejected")])
    answer = torch.full_like(ids, IGNORE)
    answer[:, :-1] = labels[:, 1:]
    return ids, mask, answer, _shifted(ids, mask)


def test_orpo_lora_gradients_equal_trl():
    """TRL's ORPO NLL covers the chosen rows' prompt and answer tokens: ours is given the same tokens."""
    model = _lora_model()
    batch = _paired_batch(_pairs(3, seed=9))
    trainer = _bare(ORPOTrainer, model=model, beta=0.1, is_encoder_decoder=False, padding_value=0)
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(model, batch)
    trl_loss.backward()
    theirs = _lora_grads(model)

    ids, mask, answer, whole = _stacked(batch)
    logits = model(input_ids=ids, attention_mask=mask).logits  # (6, T, V)
    per_token = token_logps(logits, whole)  # (6, T): one pass scores both the answers and the NLL tokens
    logps, counts = (per_token * (answer != IGNORE)).sum(1), (answer != IGNORE).sum(1)
    nll, nll_tokens = -per_token[:3].sum(1), (whole[:3] != IGNORE).sum()
    out = orpo_loss(logps[:3], logps[3:], counts[:3], counts[3:], nll, nll_tokens)
    torch.testing.assert_close(out.loss, trl_loss, **TOL)
    out.loss.backward()
    _assert_same_grads(_lora_grads(model), theirs)
    for name, value in mean_metrics(out.metrics, 3).items():
        assert value == pytest.approx(trl_metrics[name], abs=1e-5), name


@pytest.mark.parametrize("cpo_alpha", [0.0, 1.0])
def test_simpo_lora_gradients_equal_trl(cpo_alpha):
    """CPO's NLL (cpo_alpha > 0) covers the chosen answers only (its labels)."""
    model = _lora_model()
    batch = _paired_batch(_pairs(3, seed=10))
    trainer = _bare(CPOTrainer, model=model, beta=2.0, loss_type="simpo", simpo_gamma=0.5, label_smoothing=0.0,
                    alpha=0.0, cpo_alpha=cpo_alpha, is_encoder_decoder=False, pad_token_id=0)
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(model, batch)
    trl_loss.backward()
    theirs = _lora_grads(model)

    ids, mask, answer, _ = _stacked(batch)
    logits = model(input_ids=ids, attention_mask=mask).logits  # (6, T, V)
    logps, counts = sequence_logps(logits, answer)
    out = simpo_loss(logps[:3], logps[3:], counts[:3], counts[3:], cpo_alpha=cpo_alpha, chosen_nll=-logps[:3],
                     nll_tokens=counts[:3].sum())
    torch.testing.assert_close(out.loss, trl_loss, **TOL)
    out.loss.backward()
    _assert_same_grads(_lora_grads(model), theirs)
    for name, value in mean_metrics(out.metrics, 3).items():
        assert value == pytest.approx(trl_metrics[name], abs=1e-5), name


def test_kto_lora_gradients_equal_trl():
    model = _lora_model()
    labels = [True, False, False, True]
    batch = _kto_batch(labels, seed=11)
    trainer = _kto_trainer(model, _Reference(model))
    trainer._compute_loss(model, batch, return_outputs=False).backward()
    theirs = _lora_grads(model)

    targets = _shifted(batch["input_ids"], batch["completion_mask"])
    kl_targets = _shifted(batch["KL_input_ids"], batch["KL_completion_mask"])
    logps, _ = _our_logps(model, batch["input_ids"], batch["attention_mask"], targets)
    with torch.no_grad():
        kl_logps, _ = _our_logps(model, batch["KL_input_ids"], batch["KL_attention_mask"], kl_targets)
        with model.disable_adapter():
            refs, _ = _our_logps(model, batch["input_ids"], batch["attention_mask"], targets)
            ref_kl, _ = _our_logps(model, batch["KL_input_ids"], batch["KL_attention_mask"], kl_targets)
    out = kto_loss(logps, refs, batch["label"], kto_kl(kl_logps, ref_kl))
    out.loss.backward()
    _assert_same_grads(_lora_grads(model), theirs)
    trl_metrics = _trl_metrics(trainer)
    for name, value in mean_metrics(out.metrics, len(labels)).items():
        assert value == pytest.approx(trl_metrics[name], abs=1e-5), name
