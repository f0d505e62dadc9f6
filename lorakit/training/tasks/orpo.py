"""Odds Ratio Preference Optimization (``orpo``): pairs, the NLL of the chosen answer plus a log-odds-ratio term
weighted by β, no reference model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..data import IGNORE
from ..options import task_option
from ..preference import PreferenceLoss, orpo_loss
from ..preference_data import PreferencePair
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

    def extra_tensors(self, pairs: Sequence[PreferencePair], tensors: dict[str, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
        if not self.options["nll_on_prompt"]:
            return {}
        n = len(pairs)
        scored = tensors["targets"].clone()  # (2n, T)
        whole = tensors["input_ids"][:n, 1:].masked_fill(tensors["attention_mask"][:n, 1:] == 0, IGNORE)
        scored[:n, :-1] = whole  # the chosen rows: every next token of prompt and answer
        return {"scored_targets": scored}

    def pair_loss(self, chosen: torch.Tensor, rejected: torch.Tensor, chosen_tokens: torch.Tensor,
                  rejected_tokens: torch.Tensor, refs: torch.Tensor | None, per_token: torch.Tensor,
                  batch: dict[str, torch.Tensor]) -> PreferenceLoss:
        n = len(chosen)
        if "scored_targets" in batch:
            nll_mask = batch["scored_targets"][:n] != IGNORE  # (n, T)
            nll, nll_tokens = -(per_token[:n] * nll_mask).sum(dim=1), nll_mask.sum()
        else:
            nll, nll_tokens = -chosen, chosen_tokens.sum()
        return orpo_loss(chosen, rejected, chosen_tokens, rejected_tokens, nll, nll_tokens, beta=self.options["beta"])
