"""Kahneman-Tversky Optimization (``kto``): unpaired answers, each labelled desirable or undesirable, against a
reference point estimated from mismatched (prompt, answer) pairs, as TRL's ``KTOTrainer``.

Each example's mismatched partner is fixed for the run (the answer of another example, drawn from ``--seed``), so
the KL rows' reference log-probs can be precomputed like the others'; TRL fixes them the same way, when it builds its
KL dataset.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core.errors import InvalidValue
from ..data import IGNORE, Example, pack_batch, pad_batch
from ..loss import LossResult
from ..options import TrainConfig, task_option
from ..preference import kto_kl, kto_loss, model_token_logps
from ..preference_data import PreferenceData, UnpairedExample, kl_example, load_unpaired
from ..registry import register
from .base import MicroBatch
from .loading import Start, limit, say
from .preference_base import PreferenceTask, ReferenceOptions


@dataclass
class KTOOptions(ReferenceOptions):
    beta: float = 0.1  # the same flag as dpo's
    desirable_weight: float = task_option(1.0, "λD: the weight of the desirable examples' losses")
    undesirable_weight: float = task_option(1.0, "λU: the weight of the undesirable examples' losses (TRL suggests "
                                                 "λD·desirable / (λU·undesirable) in [1, 4/3])")


def partners(n: int, seed: int) -> list[int]:
    """For each of ``n`` examples, another example whose answer makes its mismatched KL row (a cycle through a
    seeded permutation, so no example is its own partner)."""
    if n < 2:
        raise InvalidValue(f"KTO's KL estimate needs at least 2 examples, got {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    partner = [0] * n
    for k, i in enumerate(order):
        partner[i] = order[k - 1]
    return partner


def rows(examples: Sequence[Example], config: TrainConfig, pad: int) -> dict[str, torch.Tensor]:
    """The examples as model inputs: packed without padding into rows of ``--max-length`` tokens (``segments``
    says which example each token belongs to), or right-padded rows with ``--no-packing``."""
    if config.packing:
        return pack_batch(examples, max(config.max_length, max(len(e) for e in examples)), pad, segments=True)
    return pad_batch(examples, pad)


def model_inputs(tensors: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """What the model reads of a batch from :func:`rows`: the ids, and the position ids or the attention mask."""
    extra = "position_ids" if prefix + "position_ids" in tensors else "attention_mask"
    return {"input_ids": tensors[prefix + "input_ids"], extra: tensors[prefix + extra]}


def per_example(values: torch.Tensor, tensors: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
    """``(n,)`` the sum of ``values`` ``(B, T)`` over each example's tokens: per packed segment, or per row."""
    segments = tensors.get(prefix + "segments")
    if segments is None:
        return values.sum(dim=1)
    inside = segments >= 0
    out = values.new_zeros(int(segments.max()) + 1)
    return out.index_add(0, segments[inside], values[inside])


@register
class KTOTask(PreferenceTask):
    """KTO on desirable / undesirable answers; the reference is the base with the adapter disabled (or the frozen
    ``--init-adapter``)."""

    task_name = "kto"
    summary = "kto (unpaired answers: prompt/completion/label or messages/label JSON(L))"
    headline_metric = "rewards/margins"
    reference_passes = 3  # the policy's KL rows, the reference's examples and KL rows
    precomputed_passes = 1  # the policy's KL rows
    options = KTOOptions

    def read(self, start: Start) -> tuple[list[Any], list[Any], str]:
        train, held_out, name = self.read_files(start)
        held_out = list(limit(held_out, self.config))
        self.partners = partners(len(train), self.config.seed) if train else []
        if len(held_out) < 2:
            raise InvalidValue(f"KTO's KL estimate needs at least 2 held-out examples, got {len(held_out)}; raise "
                               f"--eval-fraction or pass --eval-data")
        self.held_out_partners = partners(len(held_out), self.config.seed)
        for split, what in ((train, "training"), (held_out, "held-out")):
            if split and len({e.desirable for e in split}) == 1:
                say(f"the {what} examples are all {'desirable' if split[0].desirable else 'undesirable'}")
        return train, held_out, name

    def load(self, source: Any) -> PreferenceData:
        data = load_unpaired(source, self.tokenizer, self.config.max_length, self.options["max_prompt_length"],
                             self.options["bad_rows"])
        say(data.summary())
        return data

    def row_ids(self, row: UnpairedExample) -> Any:
        return row.prompt_ids, row.completion_ids

    def _batch(self, examples: Sequence[UnpairedExample], partners_: Sequence[UnpairedExample],
               indices: Sequence[int]) -> MicroBatch:
        answers = [e.example() for e in examples]
        kl_rows = [kl_example(e, p, self.config.max_length) for e, p in zip(examples, partners_)]
        tensors = rows(answers, self.config, self.pad)
        tensors.update({f"kl_{name}": t for name, t in rows(kl_rows, self.config, self.pad).items()})
        tensors["desirable"] = torch.tensor([e.desirable for e in examples])
        tensors["index"] = torch.tensor(list(indices), dtype=torch.long)
        # Tokens: the examples' (the policy's trained rows); the KL rows are counted as forward passes, like the
        # reference's (reference_passes).
        return MicroBatch(tensors, len(examples), sum(len(e) for e in answers), [len(e) for e in answers],
                          head_rows=int((tensors["targets"] != IGNORE).sum()))

    def batch(self, indices: Sequence[int]) -> MicroBatch:
        return self._batch([self.train[i] for i in indices], [self.train[self.partners[i]] for i in indices],
                           indices)

    def eval_batch(self, indices: Sequence[int]) -> MicroBatch:
        return self._batch([self.held_out[i] for i in indices],
                           [self.held_out[self.held_out_partners[i]] for i in indices], indices)

    def reference_logps(self, tensors: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
        """The reference's summed log-probs of each example's targets in a batch from :func:`rows` (no gradient)."""
        with torch.no_grad(), self._as_reference() as reference:
            per_token = model_token_logps(reference, model_inputs(tensors, prefix), tensors[prefix + "targets"])
        return per_example(per_token, tensors, prefix)

    def reference_columns(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([self.reference_logps(tensors), self.reference_logps(tensors, "kl_")], dim=1)  # (n, 2)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossResult:
        answer = (batch["targets"] != IGNORE).float()
        per_token, mean_logits = model_token_logps(model, model_inputs(batch), batch["targets"], mean_logits=True)
        logps = per_example(per_token, batch)  # (n,)
        with torch.no_grad():  # TRL's KL estimate takes no gradient
            kl_logps = per_example(model_token_logps(model, model_inputs(batch, "kl_"), batch["kl_targets"]), batch,
                                   "kl_")
        if "ref_logps" in batch:
            refs = batch["ref_logps"]
        elif self.options["precompute_ref"]:
            refs = self.precomputed()[batch["index"]]
        else:
            refs = self.reference_columns(batch)
        o, desirable = self.options, batch["desirable"].bool()
        result = kto_loss(logps, refs[:, 0], desirable, kto_kl(kl_logps, refs[:, 1]), beta=o["beta"],
                          desirable_weight=o["desirable_weight"], undesirable_weight=o["undesirable_weight"])
        logit_sums, counts = per_example(mean_logits * answer, batch), per_example(answer, batch)  # (n,) each
        metrics = {**result.metrics, "logits/chosen": float(logit_sums[desirable].sum()),
                   "logits/rejected": float(logit_sums[~desirable].sum()),
                   "tokens/chosen": float(counts[desirable].sum()), "tokens/rejected": float(counts[~desirable].sum())}
        return LossResult(result.losses.sum(), len(logps), metrics)
