"""Odds Ratio Preference Optimization (``orpo``): pairs, the NLL of the chosen answer plus a log-odds-ratio term
weighted by β, no reference model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..options import task_option
from ..preference import PreferenceLoss, orpo_loss
from ..registry import register
from .preference_base import PairedTask, PreferenceOptions


@dataclass
class ORPOOptions(PreferenceOptions):
    beta: float = 0.1  # λ of the paper; the same flag as dpo's
    nll_on_prompt: bool = task_option(False, "orpo: the NLL term covers the chosen rows' prompt tokens too, as TRL's "
                                             "ORPOTrainer does (default: the answer tokens only)")


@register
class ORPOTask(PairedTask):
    """ORPO on preference pairs: supervised NLL and preference in one loss, no reference pass."""

    task_name = "orpo"
    summary = "orpo (preference pairs, no reference model)"
    headline_metric = "rewards/accuracies"
    data_optional = True
    uses_reference = False
    options = ORPOOptions

    def pair_loss(self, chosen: torch.Tensor, rejected: torch.Tensor, chosen_tokens: torch.Tensor,
                  rejected_tokens: torch.Tensor, refs: torch.Tensor | None,
                  scored: tuple[torch.Tensor, torch.Tensor] | None) -> PreferenceLoss:
        n = len(chosen)
        if scored is not None:  # --nll-on-prompt: the chosen rows' prompt and answer tokens
            nll, nll_tokens = -scored[0][:n], scored[1][:n].sum()
        else:
            nll, nll_tokens = -chosen, chosen_tokens.sum()
        return orpo_loss(chosen, rejected, chosen_tokens, rejected_tokens, nll, nll_tokens, beta=self.options["beta"])
