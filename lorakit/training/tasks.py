"""What a training run is made of, per task type: the model, the examples, their batches, the loss, the evaluation.

A task is one small class: :class:`CausalLMTask` (the built-in task and causal-LM data files) and
:class:`ClassificationTask` (``seq_cls``) build their model and data in ``__init__`` and answer the loop's four
questions: ``batch`` (the tensors of some training examples), ``loss``, ``evaluate`` and ``save``.
:func:`build_task` picks the class from the config; the loop in :mod:`lorakit.training.loop` only calls these.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ALL_LINEAR, LoraConfig, parse_targets
from ..embedded_models import HUB_NAME, model_source, require_transformers
from ..inject import find_targets
from ..io import WEIGHTS_NAME, is_prompt_adapter
from ..model import LoraModel, get_lora_model
from ..prompt_tuning import PromptTuningModel
from ..quant import quantize
from .builtin_task import builtin_orders
from .data import Example, existing_file, label_ids, load_causal_lm, pack_batch, pad_batch, read_table, tokenize_chat
from .loss import causal_lm_loss, classification_loss
from .metrics import classification, exact_match, lm_loss
from .options import TrainConfig


@dataclass
class MicroBatch:
    tensors: dict[str, torch.Tensor]
    targets: int  # what the loss is averaged over: target tokens (LM) or examples (classification)
    tokens: int  # input tokens, for tokens/s


class Task:
    """The task-specific parts of a run. Subclasses set the attributes in ``__init__`` and define the methods.

    Attributes:
        name: What the run trains on, for the summary (a file name, or the built-in task).
        model: The model as trained: a :class:`LoraModel`, a :class:`PromptTuningModel` or, for full fine-tuning,
            the base model itself.
        tokenizer: The model's tokenizer.
        train: The training examples; micro-batches are lists of indices into it.
    """

    name: str
    model: nn.Module
    tokenizer: Any
    train: Sequence[Any]

    def batch(self, indices: Sequence[int]) -> MicroBatch:
        """The tensors of the training examples at ``indices``."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, count it is averaged over) of ``model`` on one batch."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, label: str) -> dict[str, Any]:
        """The held-out metrics; ``label`` says when (``before``, ``after``, ``step N``) for progress messages."""
        raise NotImplementedError

    def save(self, model: nn.Module, out: Path) -> int:
        """Save what was trained into ``out`` (an adapter, or the whole model); returns the weight files' bytes."""
        model.save_pretrained(out)
        if isinstance(model, (LoraModel, PromptTuningModel)):
            return (out / WEIGHTS_NAME).stat().st_size
        self.tokenizer.save_pretrained(out)  # full fine-tuning: the whole model, safetensors
        return sum(f.stat().st_size for f in out.glob("*.safetensors"))

    def count_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters) of the model as trained."""
        if isinstance(self.model, LoraModel):
            return self.model.get_nb_trainable_parameters()
        total = sum(p.numel() for p in self.model.parameters())
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad), total


def build_task(config: TrainConfig, device: torch.device, precision: str, adapter: str | None = None) -> Task:
    """Load the model and data the config names, for the task type it names.

    With ``adapter`` (a saved LoRA or prompt-tuning folder) the model carries that adapter instead of a new one.
    """
    # With bf16 autocast a frozen base is kept in bf16 (its weights are not cast again at every step);
    # trainable weights stay fp32 (LoRA adapters are created in fp32; full fine-tuning keeps fp32 masters).
    base_dtype = torch.bfloat16 if precision == "bf16" and config.method in ("lora", "prompt") else torch.float32
    check_before_loading(config, adapter)
    task_class = ClassificationTask if config.task == "seq_cls" else CausalLMTask
    return task_class(config, device, base_dtype, adapter)


def check_before_loading(config: TrainConfig, adapter: str | None = None) -> None:
    """What can be checked before any weight is loaded: the data files exist, and the LoRA targets match modules
    of the model (on a copy built from its config on the meta device, which costs no memory and no time).

    Raises:
        FileNotFoundError: A data file or the model does not exist.
        ValueError: A target matches no module (with the closest real names).
    """
    for path in (config.data, config.eval_data):
        if path is not None:
            existing_file(path)
    if config.method == "lora" and adapter is None:
        task_type = "SEQ_CLS" if config.task == "seq_cls" else "CAUSAL_LM"
        find_targets(_meta_model(config, task_type), _lora_config(config, task_type))


class CausalLMTask(Task):
    """Next-token prediction on chat or text examples, the loss on the answers only: the built-in task (with
    exact match of generated answers as its metric) or a data file (held-out loss and perplexity)."""

    def __init__(self, config: TrainConfig, device: torch.device, dtype: torch.dtype, adapter: str | None) -> None:
        self.config, self.device = config, device
        model, self.tokenizer = _load(config, dtype)
        tokenizer = self.tokenizer
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eval_records: list[dict] | None = None
        if config.task == "builtin":
            train_records, self.eval_records = builtin_orders()
            self.train = [tokenize_chat(tokenizer, r["messages"], config.max_length) for r in train_records]
            eval_examples = [tokenize_chat(tokenizer, r["messages"], config.max_length) for r in self.eval_records]
            if any(e.n_targets == 0 for e in self.train):
                raise ValueError(f"max_length={config.max_length} cuts off the answers of the built-in task; use "
                                 f"at least {max(len(e) for e in self.train)}")
            self.name = "the built-in order-to-JSON task"
        else:
            examples = load_causal_lm(config.data, tokenizer, config.max_length)
            if config.eval_data:
                self.train = examples
                eval_examples = load_causal_lm(config.eval_data, tokenizer, config.max_length)
            else:
                self.train, eval_examples = _split(examples, config)
            self.name = Path(config.data).name
        self.model = _prepare(config, model, "CAUSAL_LM", adapter).to(device)
        held_out = list(_limit(eval_examples, config))
        self.eval_batches = [pad_batch(held_out[i:i + config.eval_batch_size], self.pad)
                             for i in range(0, len(held_out), config.eval_batch_size)]

    def batch(self, indices: Sequence[int]) -> MicroBatch:
        examples: list[Example] = [self.train[i] for i in indices]
        # A prompt goes in front of each example, so prompt tuning pads instead of packing.
        packed = self.config.packing and self.config.method != "prompt"
        tensors = pack_batch(examples, self.config.max_length, self.pad) if packed else pad_batch(examples, self.pad)
        return MicroBatch(tensors, sum(e.n_targets for e in examples), sum(len(e) for e in examples))

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return causal_lm_loss(model, batch)

    def evaluate(self, model: nn.Module, label: str) -> dict[str, Any]:
        batches = [{k: v.to(self.device) for k, v in b.items()} for b in self.eval_batches]
        with _progress(self.config.progress, sum(len(b["input_ids"]) for b in batches), f"loss ({label})") as bar:
            metrics = lm_loss(lambda b: self.loss(model, b), model, batches, progress=bar)
        if self.eval_records is not None:
            records = _limit(self.eval_records, self.config)
            _say(f"evaluating exact match on {len(records)} held-out examples ({label})")
            with _progress(self.config.progress, len(records), f"exact match ({label})") as bar:
                metrics.update(exact_match(model, self.tokenizer, records, self.config.max_new_tokens,
                                           self.config.eval_batch_size, progress=bar))
        return metrics


class ClassificationTask(Task):
    """Sequence classification (``seq_cls``): text and label rows, a classification head trained in full next to
    the adapter, accuracy as the metric."""

    def __init__(self, config: TrainConfig, device: torch.device, dtype: torch.dtype, adapter: str | None) -> None:
        self.config, self.device = config, device
        rows = read_table(config.data, config.text_field, config.label_field)
        self.labels = config.labels or sorted({label for _, _, label in rows})
        if len(self.labels) < 2:
            raise ValueError(f"{config.data}: only one label ({self.labels[0]!r}); a classifier needs at least two")
        train_rows, eval_rows = ((rows, read_table(config.eval_data, config.text_field, config.label_field))
                                 if config.eval_data else _split(rows, config))
        train_y = label_ids(train_rows, config.data, self.labels)
        eval_y = label_ids(eval_rows, config.eval_data or config.data, self.labels)
        self.train = [(text, y) for (_, text, _), y in zip(train_rows, train_y)]
        held_out = list(_limit([(text, y) for (_, text, _), y in zip(eval_rows, eval_y)], config))
        model, self.tokenizer = _load(config, dtype, num_labels=len(self.labels))
        _give_pad_token(model, self.tokenizer, config.model)
        model.config.id2label = dict(enumerate(self.labels))
        model.config.label2id = {name: i for i, name in enumerate(self.labels)}
        self.model = _prepare(config, model, "SEQ_CLS", adapter).to(device)
        self.name = Path(config.data).name
        self.eval_batches = [self._encode(held_out[i:i + config.eval_batch_size])
                             for i in range(0, len(held_out), config.eval_batch_size)]

    def _encode(self, items: Sequence[tuple[str, int]]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer([t for t, _ in items], padding=True, truncation=True, max_length=self.config.max_length,
                             return_tensors="pt")
        return {**enc, "labels": torch.tensor([y for _, y in items])}

    def batch(self, indices: Sequence[int]) -> MicroBatch:
        tensors = self._encode([self.train[i] for i in indices])
        return MicroBatch(tensors, len(indices), int(tensors["attention_mask"].sum()))

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return classification_loss(model, batch)

    def evaluate(self, model: nn.Module, label: str) -> dict[str, Any]:
        batches = [{k: v.to(self.device) for k, v in b.items()} for b in self.eval_batches]
        with _progress(self.config.progress, sum(len(b["labels"]) for b in batches), f"accuracy ({label})") as bar:
            return classification(model, batches, len(self.labels), progress=bar)


# -- shared by the tasks ---------------------------------------------------------------------------------------


def _say(message: str) -> None:
    print(f"lorakit: {message}", file=sys.stderr, flush=True)


def _load(config: TrainConfig, dtype: torch.dtype, num_labels: int | None = None) -> tuple[nn.Module, Any]:
    """The base model and its tokenizer."""
    transformers = require_transformers()
    source = model_source(config.model, config.trust_remote_code)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"model {config.model!r} is not a Hugging Face model folder (no config.json)")
    trust = config.trust_remote_code
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust)
    if num_labels is None:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype, trust_remote_code=trust)
    else:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            str(source), dtype=dtype, num_labels=num_labels, trust_remote_code=trust)
    if config.model == "default":
        model.config._name_or_path = HUB_NAME
    if config.quantize:
        _say(f"quantizing the base's linear layers to {config.quantize}"
             f"{' with double quantization' if config.double_quant else ''}")
        quantize(model, config.quantize, double_quant=config.double_quant)
    return model, tokenizer


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute each layer's activations in the backward pass (Hugging Face models)."""
    kwargs = {"use_reentrant": False}  # the reentrant variant needs inputs that require grad
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5 renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def _prepare(config: TrainConfig, model: nn.Module, task_type: str, adapter: str | None) -> nn.Module:
    """LoRA on the frozen base (a new adapter, or the saved one at ``adapter``), every parameter trainable
    (``method=full``), or a prompt in front of the frozen model (``method=prompt``, new or saved)."""
    if adapter is not None:
        if is_prompt_adapter(adapter):
            return PromptTuningModel.from_pretrained(model, adapter)
        return LoraModel.from_pretrained(model, adapter)
    if config.grad_checkpointing:
        enable_checkpointing(model)
    if config.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if config.method == "prompt":
        return PromptTuningModel(model, config.num_virtual_tokens, seed=config.seed)
    model = get_lora_model(model, _lora_config(config, task_type))
    for p in model.parameters():  # a head copied from a bf16 base would train in bf16: keep fp32 masters
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def _give_pad_token(model: nn.Module, tokenizer: Any, name: str) -> None:
    """A decoder classifies from its last real token, found through ``pad_token_id``; many decoder configs have
    none (transformers then refuses batches of more than one). Take the tokenizer's pad token, else its EOS, as PEFT
    users do by hand."""
    if getattr(model.config, "pad_token_id", None) is not None:
        return
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"model {name!r} has no pad token and no end-of-sequence token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    _say(f"the model's config has no pad_token_id; padding with the tokenizer's token {tokenizer.pad_token!r} "
         f"(id {tokenizer.pad_token_id})")


def _lora_config(config: TrainConfig, task_type: str) -> LoraConfig:
    """The adapter a run trains: all linear layers of a language model unless ``target_modules`` says otherwise;
    for classification, the architecture's PEFT default and the head."""
    targets = parse_targets(config.target_modules)
    if targets is None and task_type == "CAUSAL_LM":
        targets = ALL_LINEAR
    return LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, task_type=task_type)


def _meta_model(config: TrainConfig, task_type: str) -> nn.Module:
    """The model's modules without weights, from its ``config.json``."""
    transformers = require_transformers()
    source = model_source(config.model, config.trust_remote_code)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"model {config.model!r} is not a Hugging Face model folder (no config.json)")
    auto = (transformers.AutoModelForSequenceClassification if task_type == "SEQ_CLS"
            else transformers.AutoModelForCausalLM)
    trust = config.trust_remote_code
    with torch.device("meta"):
        return auto.from_config(transformers.AutoConfig.from_pretrained(str(source), trust_remote_code=trust),
                                trust_remote_code=trust)


@contextmanager
def _progress(enabled: bool, total: int, what: str) -> Iterator[Callable[[int], None] | None]:
    """A progress bar over ``total`` examples (examples done, time left), or None when progress is off."""
    if not enabled or total == 0:
        yield None
        return
    from tqdm.auto import tqdm  # an optional dependency (the hf extra), as transformers is

    with tqdm(total=total, desc=what, unit="example", dynamic_ncols=True, leave=False) as bar:
        yield bar.update


def _split(items: list[Any], config: TrainConfig) -> tuple[list[Any], list[Any]]:
    n_eval = max(1, int(len(items) * config.eval_fraction))
    if len(items) - n_eval < 1:
        raise ValueError(f"{config.data} has {len(items)} examples: too few to hold {n_eval} out; pass --eval-data")
    return items[:-n_eval], items[-n_eval:]


def _limit(items: Sequence[Any], config: TrainConfig) -> Sequence[Any]:
    return items[:config.max_eval] if config.max_eval else items
