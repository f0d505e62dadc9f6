"""Simple Preference Optimization (``simpo``, TRL's ``CPOTrainer`` with ``loss_type="simpo"``): pairs, the
length-normalised log-probs with a target margin, no reference model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..options import task_option
from ..preference import PreferenceLoss, simpo_loss
from ..registry import register
from .preference_base import PairedTask, PreferenceOptions


@dataclass
class SimPOOptions(PreferenceOptions):
    beta: float = 2.0  # the same flag as dpo's (its help lists the defaults)
    simpo_gamma: float = task_option(0.5, "γ: the target reward margin (TRL's simpo_gamma)")
    label_smoothing: float = 0.0
    cpo_alpha: float = task_option(0.0, "weight of CPO's NLL term on the chosen answers (0: plain SimPO; TRL's "
                                        "CPOConfig defaults to 1.0)")


@register
class SimPOTask(PairedTask):
    """SimPO on preference pairs: no reference pass."""

    task_name = "simpo"
    summary = "simpo (preference pairs, no reference model)"
    headline_metric = "rewards/accuracies"
    data_optional = True
    uses_reference = False
    options = SimPOOptions

    def pair_loss(self, chosen: torch.Tensor, rejected: torch.Tensor, chosen_tokens: torch.Tensor,
                  rejected_tokens: torch.Tensor, refs: torch.Tensor | None,
                  scored: tuple[torch.Tensor, torch.Tensor] | None) -> PreferenceLoss:
        o = self.options
        return simpo_loss(chosen, rejected, chosen_tokens, rejected_tokens, beta=o["beta"], gamma=o["simpo_gamma"],
                          label_smoothing=o["label_smoothing"], cpo_alpha=o["cpo_alpha"], chosen_nll=-chosen,
                          nll_tokens=chosen_tokens.sum())
