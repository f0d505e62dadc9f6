"""A :class:`~lorakit.LoraModel` in Hugging Face's ``transformers.Trainer`` and TRL's ``SFTTrainer``.

Trainer treats PEFT's ``PeftModel`` specially, and recognises it only by ``isinstance``
(``transformers.trainer_utils._is_peft_model``): for it, it reads label names and dataset columns from the base
model, saves ``checkpoint-N/`` and ``save_model()`` as adapter files, and loads them back on resume. Any other
module takes the generic path, which is wrong for an adapter wrapper in three ways: the columns come from the
wrapper's ``forward(*args, **kwargs)``, so the default ``remove_unused_columns=True`` drops every dataset column;
there are no label names, so evaluation reports no loss; and checkpoints hold the whole ``state_dict()`` (the frozen
base included) as ``model.safetensors``. Trainer has no hook for a third-party adapter class, so
:class:`LoraTrainerMixin` overrides the methods where Trainer branches on PEFT and takes PEFT's branch for a
``LoraModel``; every other model goes to Trainer's own code unchanged.

``lorakit.models.hf_compat.Trainer`` and ``lorakit.models.hf_compat.SFTTrainer`` are the two trainers with the mixin; for another
Trainer subclass, put the mixin first: ``class MyTrainer(LoraTrainerMixin, SomeTrainer)``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from pathlib import Path
from typing import Any

import torch

from ..core.errors import InvalidValue, MissingDependency
from ..core.layers import LoraLayer
from ..files.io import check_fits, copy_in, json_targets, read_adapter
from .model import LoraModel

try:
    import transformers
    from transformers.utils.generic import can_return_loss, find_labels
except ImportError:  # pragma: no cover - lorakit[hf] is what every Trainer user has
    raise MissingDependency("lorakit.models.hf_compat needs transformers: pip install 'lorakit[hf]'") from None

TRAINING_ARGS_NAME = "training_args.bin"  # transformers.trainer's name for the pickled TrainingArguments

# SFTTrainer comes from the module __getattr__ below (built on first use, so that TRL is optional); it is left out
# of __all__ so that `from lorakit.models.hf_compat import *` does not need TRL.
__all__ = ["LoraTrainerMixin", "Trainer", "restore_adapters"]


def restore_adapters(model: LoraModel, folder: str | os.PathLike) -> list[str]:
    """Copy the adapter weights saved in ``folder`` (by ``model.save_pretrained``) back into ``model``'s adapters
    of the same names: ``default`` from ``folder``, any other from ``folder/<name>``. Trainer's resume and
    ``load_best_model_at_end`` use it; the adapters keep their trainable state.

    Every adapter is read and checked (config, base fingerprint, shapes) before any is changed.

    Returns:
        The names of the adapters restored (all of the model's).

    Raises:
        FileNotFoundError: An adapter of the model is missing from ``folder``.
        ValueError: A saved adapter was made with another config or for another base, or an adapter is merged.
    """
    merged = sorted({n for _, layer in model.lora_layers() for n in layer.merged_adapters})
    if merged:
        raise InvalidValue(f"adapter(s) {merged} are merged into the base weights; unmerge_adapter() first")
    plans = []
    for name, config in model.peft_config.items():
        path = Path(folder) if name == "default" else Path(folder) / name
        saved, tensors, metadata = read_adapter(path)
        ours, theirs = _settings(config), _settings(saved)
        if ours != theirs:
            diff = {k: (v, theirs.get(k)) for k, v in ours.items() if theirs.get(k) != v}
            raise InvalidValue(f"{str(path)!r} holds adapter {name!r} with another config than the model's "
                               f"(setting: (model, file)): {diff}")
        with model.unmerged():  # the fingerprint describes the base weights without any update folded in
            plans.append((name, check_fits(model.model, saved, tensors, metadata), tensors))
    for name, targets, tensors in plans:
        copy_in(model, name, targets, tensors)
    return [name for name, _, _ in plans]


def _settings(config: Any) -> dict[str, Any]:
    """A config's fields as saving writes them back (sorted targets), without those that saving may rewrite: the
    base's name and the initialization (PiSSA & co. are written as True; once trained the init no longer matters)."""
    out = dataclasses.asdict(config)
    out["target_modules"] = json_targets(out["target_modules"])
    out.pop("base_model_name_or_path", None)
    out.pop("init_lora_weights")
    return out


class LoraTrainerMixin:
    """Makes a Trainer treat a :class:`~lorakit.LoraModel` as it treats PEFT's ``PeftModel``.

    - labels and loss kwargs are read from the wrapped model's ``forward`` (as Trainer does through
      ``unwrap_peft_model``), so evaluation reports ``eval_loss``;
    - ``save_model()`` and every ``checkpoint-N/`` hold the adapters in PEFT's format (``adapter_config.json`` +
      ``adapter_model.safetensors``, other adapters in sub-folders), plus the tokenizer and ``training_args.bin`` as
      Trainer writes them, and no base weights;
    - ``train(resume_from_checkpoint=...)`` and ``load_best_model_at_end`` copy the saved adapters back.

    Any other model goes to Trainer's own code. Must come before the Trainer class in the bases.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        lora = self._lora_model()
        if lora is not None and (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            # Both hand _save a gathered state_dict and load checkpoints their own way: refused now, not at the
            # first save.
            raise InvalidValue("lorakit.models.hf_compat trains a LoraModel without DeepSpeed or FSDP; they "
                               "are not supported here (lorakit's own trainer, lorakit.train, has FSDP)")
        if lora is not None:
            # What Trainer.__init__ reads from unwrap_peft_model(model) for PEFT: the wrapped model's class.
            base = lora.get_base_model()
            if self.args.label_names is None:
                self.label_names = find_labels(base.__class__)
            self.can_return_loss = can_return_loss(base.__class__)
            if hasattr(base, "accepts_loss_kwargs"):
                accepts = base.accepts_loss_kwargs
            else:
                accepts = any(p.kind == inspect.Parameter.VAR_KEYWORD
                              for p in inspect.signature(base.forward).parameters.values())
            # The wrapper's forward(**kwargs) can only have made it look more permissive; a subclass (TRL) may have
            # turned it off on purpose, so the base's answer only narrows it.
            self.model_accepts_loss_kwargs = self.model_accepts_loss_kwargs and accepts

    def _lora_model(self) -> LoraModel | None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return model if isinstance(model, LoraModel) else None

    def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        lora = self._lora_model()
        if lora is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return None
        os.makedirs(output_dir, exist_ok=True)
        lora.save_pretrained(output_dir, state_dict=state_dict)
        # The rest as Trainer._save writes it for any model.
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        elif getattr(self.data_collator, "tokenizer", None) is not None:
            self.data_collator.tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        lora = self._lora_model() if model is None or model is self.model else None
        if lora is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        restore_adapters(lora, resume_from_checkpoint)
        return None

    def _load_best_model(self) -> None:
        lora = self._lora_model()
        if lora is None:
            return super()._load_best_model()
        restore_adapters(lora, self.state.best_model_checkpoint)
        return None


class Trainer(LoraTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` that trains, saves and resumes a :class:`~lorakit.LoraModel` as it does a
    ``PeftModel`` (see :class:`LoraTrainerMixin`). Same arguments as ``transformers.Trainer``."""

    def _set_signature_columns_if_needed(self) -> None:
        # Trainer's PEFT branch: keep the dataset columns the wrapped model's forward takes.
        lora = self._lora_model()
        if self._signature_columns is None and lora is not None:
            columns = list(inspect.signature(lora.get_base_model().forward).parameters)
            self._signature_columns = columns + list({"label", "label_ids", *self.label_names})
        super()._set_signature_columns_if_needed()


def __getattr__(name: str) -> Any:
    if name == "SFTTrainer":
        return _sft_trainer()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _sft_trainer() -> type:
    """TRL's SFTTrainer with the mixin, built on first use so that this module does not need TRL."""
    try:
        import trl
    except ImportError:
        raise MissingDependency("lorakit.models.hf_compat.SFTTrainer needs TRL: pip install trl") from None

    class SFTTrainer(LoraTrainerMixin, trl.SFTTrainer):
        """TRL's ``SFTTrainer`` that trains, saves and resumes a :class:`~lorakit.LoraModel` as it does a
        ``PeftModel`` (see :class:`LoraTrainerMixin`). Same arguments as ``trl.SFTTrainer``; TRL's own dataset
        columns are kept."""

        def __init__(self, model: Any, *args: Any, **kwargs: Any) -> None:
            if isinstance(model, LoraModel) and isinstance(model.get_output_embeddings(), LoraLayer):
                # TRL's loss multiplies by lm_head.weight directly (its fused LM head): the adapter would not train.
                raise InvalidValue("SFTTrainer computes the loss from lm_head.weight directly, so a LoRA adapter on "
                                   "the output head would never train; remove the head from target_modules")
            super().__init__(model, *args, **kwargs)

    SFTTrainer.__module__ = __name__
    SFTTrainer.__qualname__ = "SFTTrainer"
    return SFTTrainer
