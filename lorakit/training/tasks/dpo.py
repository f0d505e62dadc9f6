"""Direct Preference Optimization (``dpo``): pairs of a chosen and a rejected answer, the policy's log-ratios
against a reference model, TRL's ``sigmoid``, ``ipo``, ``hinge`` and ``robust`` losses (``--loss``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..options import task_option
from ..preference import DPO_LOSS_TYPES, PreferenceLoss, dpo_loss
from ..registry import register
from .preference_base import PairedTask, ReferenceOptions


@dataclass
class DPOOptions(ReferenceOptions):
    beta: float = task_option(0.1, "β: how far the policy may move from the reference (TRL's default 0.1; simpo "
                                   "2.0; for ipo, τ)")
    loss: str = task_option("sigmoid", "TRL's loss_type: sigmoid (DPO), ipo, hinge (SLiC) or robust (robust DPO, "
                                       "with --label-smoothing)", DPO_LOSS_TYPES)
    label_smoothing: float = task_option(0.0, "ε: the share of pairs assumed mislabelled (sigmoid: conservative "
                                              "DPO; robust: below 0.5)")


@register
class DPOTask(PairedTask):
    """DPO on preference pairs; the reference is the base with the adapter disabled (or the frozen
    ``--init-adapter``)."""

    task_name = "dpo"
    summary = "dpo (preference pairs: prompt/chosen/rejected JSON(L); without --data the built-in pairs)"
    headline_metric = "rewards/accuracies"
    data_optional = True  # without --data: the built-in preference pairs
    reference_passes = 1
    options = DPOOptions

    def pair_loss(self, chosen: torch.Tensor, rejected: torch.Tensor, chosen_tokens: torch.Tensor,
                  rejected_tokens: torch.Tensor, refs: torch.Tensor | None,
                  scored: tuple[torch.Tensor, torch.Tensor] | None) -> PreferenceLoss:
        o = self.options
        return dpo_loss(chosen, rejected, refs[:, 0], refs[:, 1], beta=o["beta"], loss_type=o["loss"],
                        label_smoothing=o["label_smoothing"], chosen_tokens=chosen_tokens,
                        rejected_tokens=rejected_tokens)
