"""What the tasks share: loading the base model and tokenizer (streamed or quantized), putting the adapter (or
prompt, or full fine-tuning) on it, reading the training and held-out items, progress bars."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...core.config import ALL_LINEAR, QA_HEAD_NAMES, LoraConfig, parse_targets
from ...core.errors import InvalidValue, MissingFile
from ...core.quant import quantize
from ...files.io import is_prompt_adapter
from ...models.embedded_models import HUB_NAME, load_pretrained, model_source, require_transformers
from ...models.model import LoraModel, get_lora_model
from ...models.prompt_tuning import PromptTuningModel
from ...models.streaming import has_safetensors, load_checkpoint, model_config
from ..data import (
    DataSource,
    eval_source,
    train_source,
)
from ..labels import HEADS
from ..options import TrainConfig

# The transformers Auto class of each PEFT task type.
AUTO_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
                "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "QUESTION_ANS": "AutoModelForQuestionAnswering",
                "TOKEN_CLS": "AutoModelForTokenClassification"}


@dataclass(frozen=True)
class Start:
    """Where a task's model starts: ``adapter`` (a saved LoRA or prompt-tuning folder) instead of a new adapter,
    trained further when ``trainable``; ``evaluate_only`` reads only the held-out data (``eval_data`` when given:
    the training file is not needed)."""

    adapter: str | None = None
    trainable: bool = False
    evaluate_only: bool = False


def say(message: str) -> None:
    print(f"lorakit: {message}", file=sys.stderr, flush=True)


def load_model(config: TrainConfig, dtype: torch.dtype, num_labels: int | None = None, head_supplied: bool = False,
          auto: str | None = None, supplied: Sequence[str] = ()) -> tuple[nn.Module, Any]:
    """The base model and its tokenizer; with ``num_labels``, a sequence classifier whose head an adapter supplies
    (``head_supplied``) or that starts from random weights and trains with the adapter. ``auto`` names another
    transformers Auto class (the other task types' heads), whose weights under ``supplied`` may be missing."""
    transformers = require_transformers()
    source = model_source(config.model, config.trust_remote_code)
    if not (source / "config.json").is_file():
        raise MissingFile(f"model {config.model!r} is not a Hugging Face model folder (no config.json)")
    trust = config.trust_remote_code
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust)
    if streams(config, source):
        # Tensor by tensor, quantized on the way: the full-precision model is never in memory at once
        labels = {"num_labels": num_labels} if num_labels is not None else {}
        kind = auto or ("AutoModelForCausalLM" if num_labels is None else "AutoModelForSequenceClassification")
        if config.quantize:
            say(f"loading {source} tensor by tensor, quantizing the base's linear layers to {config.quantize}"
                 f"{' with double quantization' if config.double_quant else ''}")
        if auto is None:  # a classifier's new head, or nothing, may be missing from the checkpoint
            supplied = HEADS if num_labels else ()
        model = load_checkpoint(getattr(transformers, kind), source, dtype=dtype, quantize=config.quantize,
                                double_quant=config.double_quant, trust_remote_code=trust, supplied=supplied,
                                **labels)
        if num_labels is not None and auto is None and not head_supplied:
            say(f"a new {num_labels}-class head starts from random weights and trains with the adapter")
    elif auto is not None:
        labels = {"num_labels": num_labels} if num_labels is not None else {}
        model = load_pretrained(getattr(transformers, auto), source, dtype=dtype, trust_remote_code=trust,
                                supplied=supplied, **labels)
    elif num_labels is None:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype, trust_remote_code=trust)
    else:
        model = load_pretrained(transformers.AutoModelForSequenceClassification, source, dtype=dtype,
                                trust_remote_code=trust, supplied=HEADS, num_labels=num_labels)
        if not head_supplied:
            say(f"a new {num_labels}-class head starts from random weights and trains with the adapter")
    if config.model == "default":
        model.config._name_or_path = HUB_NAME
    if config.quantize and not streams(config, source):
        say(f"quantizing the base's linear layers to {config.quantize}"
             f"{' with double quantization' if config.double_quant else ''}")
        quantize(model, config.quantize, double_quant=config.double_quant)
    return model, tokenizer


def streams(config: TrainConfig, source: Path) -> bool:
    """The model loads tensor by tensor (:func:`lorakit.models.streaming.load_checkpoint`): a safetensors folder other
    than the embedded default, quantized or as the frozen base of LoRA or prompt tuning."""
    return (config.model != "default" and has_safetensors(source)
            and (config.quantize is not None or config.method in ("lora", "prompt")))


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute each layer's activations in the backward pass (Hugging Face models)."""
    kwargs = {"use_reentrant": False}  # the reentrant variant needs inputs that require grad
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5 renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def prepare_model(config: TrainConfig, model: nn.Module, task_type: str, start: Start) -> nn.Module:
    """LoRA on the frozen base (a new adapter, or the saved one at ``start.adapter``, trained further when
    ``start.trainable``), every parameter trainable (``method=full``), or a prompt in front of the frozen model
    (``method=prompt``, new or saved)."""
    if config.grad_checkpointing and (start.adapter is None or start.trainable):
        enable_checkpointing(model)
    if start.adapter is not None:
        if is_prompt_adapter(start.adapter):
            if start.trainable:
                raise InvalidValue(f"--init-adapter {start.adapter} is a prompt-tuning adapter; it takes a LoRA adapter")
            return PromptTuningModel.from_pretrained(model, start.adapter)
        model = LoraModel.from_pretrained(model, start.adapter, is_trainable=start.trainable)
        return fp32_masters(model) if start.trainable else model
    if config.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if config.method == "prompt":
        return PromptTuningModel(model, config.num_virtual_tokens, seed=config.seed)
    return fp32_masters(get_lora_model(model, lora_config_of(config, task_type)))


def fp32_masters(model: nn.Module) -> nn.Module:
    for p in model.parameters():  # a head copied from a bf16 base would train in bf16: keep fp32 masters
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def give_pad_token(model: nn.Module, tokenizer: Any, name: str) -> None:
    """A decoder classifies from its last real token, found through ``pad_token_id``; many decoder configs have
    none (transformers then refuses batches of more than one). Take the tokenizer's pad token, else its EOS, as PEFT
    users do by hand."""
    if getattr(model.config, "pad_token_id", None) is not None:
        return
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise InvalidValue(f"model {name!r} has no pad token and no end-of-sequence token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    say(f"the model's config has no pad_token_id; padding with the tokenizer's token {tokenizer.pad_token!r} "
         f"(id {tokenizer.pad_token_id})")


def lora_config_of(config: TrainConfig, task_type: str) -> LoraConfig:
    """The adapter a run trains: all linear layers of a language model unless ``target_modules`` says otherwise;
    for the other task types, the architecture's PEFT default and the head."""
    targets = parse_targets(config.target_modules)
    if targets is None and task_type == "CAUSAL_LM":
        targets = ALL_LINEAR
    # PEFT writes the head of these task types into the saved modules_to_save; so does lorakit
    heads = {"QUESTION_ANS": list(QA_HEAD_NAMES), "TOKEN_CLS": list(HEADS)}.get(task_type)
    return LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, task_type=task_type, modules_to_save=heads)


def read_split(config: TrainConfig, start: Start, read: Callable[[DataSource], list[Any]]
                ) -> tuple[list[Any], list[Any]]:
    """The training and held-out items ``read`` finds: ``--eval-data`` when given (only it when evaluating a saved
    adapter), else the last ``--eval-fraction`` of ``--data``."""
    train_from, eval_from = sources(config, start)
    if train_from is None:
        return [], read(eval_from)
    items = read(train_from)
    return (items, read(eval_from)) if config.eval_data else split_held_out(items, config)


def sources(config: TrainConfig, start: Start) -> tuple[DataSource | None, DataSource]:
    """Where the training and held-out items come from: no training source when evaluating a saved adapter on
    ``--eval-data`` (the file the adapter was trained on need not exist any more); held-out items come from
    ``--data`` when there is no ``--eval-data``."""
    train_from = None if start.evaluate_only and config.eval_data else train_source(config)
    return train_from, eval_source(config) if config.eval_data else train_from


def data_name(config: TrainConfig, start: Start) -> str:
    return Path(config.eval_data if start.evaluate_only and config.eval_data else config.data).name


def meta_model_of(config: TrainConfig, task_type: str) -> nn.Module:
    """The model's modules without weights, from its ``config.json``."""
    transformers = require_transformers()
    source = model_source(config.model, config.trust_remote_code)
    if not (source / "config.json").is_file():
        raise MissingFile(f"model {config.model!r} is not a Hugging Face model folder (no config.json)")
    auto = getattr(transformers, AUTO_CLASSES[task_type])
    trust = config.trust_remote_code
    with torch.device("meta"):  # model_config: an unknown architecture is named, with what to do
        return auto.from_config(model_config(source, trust), trust_remote_code=trust)


@contextmanager
def progress_bar(enabled: bool, total: int, what: str) -> Iterator[Callable[[int], None] | None]:
    """A progress bar over ``total`` examples (examples done, time left), or None when progress is off."""
    if not enabled or total == 0:
        yield None
        return
    from tqdm.auto import tqdm  # an optional dependency (the hf extra), as transformers is

    with tqdm(total=total, desc=what, unit="example", dynamic_ncols=True, leave=False) as bar:
        yield bar.update


def split_held_out(items: list[Any], config: TrainConfig) -> tuple[list[Any], list[Any]]:
    n_eval = max(1, int(len(items) * config.eval_fraction))
    if len(items) - n_eval < 1:
        raise InvalidValue(f"{config.data} has {len(items)} examples: too few to hold {n_eval} out; pass --eval-data")
    return items[:-n_eval], items[-n_eval:]


def limit(items: Sequence[Any], config: TrainConfig) -> Sequence[Any]:
    return items[:config.max_eval] if config.max_eval else items
