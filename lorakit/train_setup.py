"""What a training run is made of, per task: the model, the examples, their batches, the loss and the evaluation.

:func:`build_run` reads the config and returns a :class:`Run`; the loop in :mod:`lorakit.trainer` only calls it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ALL_LINEAR, LoraConfig, parse_targets
from .data import Example, label_ids, load_causal_lm, pack_batch, pad_batch, read_table, tokenize_chat
from .evaluate import classification, exact_match, lm_loss
from .io import is_prompt_adapter
from .loss import causal_lm_loss, classification_loss
from .model import LoraModel, get_lora_model
from .prompt import PromptTuningModel
from .quant import quantize
from .train_config import TrainConfig


@dataclass
class MicroBatch:
    tensors: dict[str, torch.Tensor]
    targets: int  # what the loss is averaged over: target tokens (LM) or examples (classification)
    tokens: int  # input tokens, for tokens/s


@dataclass
class Run:
    """One run's task-specific parts."""

    name: str
    model: nn.Module
    train: Sequence[Any]
    batch: Callable[[Sequence[int]], MicroBatch]
    loss: Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
    evaluate: Callable[[nn.Module, str], dict[str, Any]]
    save: Callable[[nn.Module, Path], int]
    tokenizer: Any = None

    def count_parameters(self) -> tuple[int, int]:
        if isinstance(self.model, LoraModel):
            return self.model.get_nb_trainable_parameters()
        total = sum(p.numel() for p in self.model.parameters())
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad), total


def _say(message: str) -> None:
    print(f"lorakit train: {message}", file=sys.stderr, flush=True)


def _load(config: TrainConfig, dtype: torch.dtype, num_labels: int | None = None) -> tuple[nn.Module, Any]:
    """The base model and its tokenizer."""
    from .pretrained import _transformers, model_source

    transformers = _transformers()
    source = model_source(config.model)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"model {config.model!r} is not a Hugging Face model folder (no config.json)")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(source))
    if num_labels is None:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype)
    else:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(str(source), dtype=dtype,
                                                                                num_labels=num_labels)
    if config.model == "default":
        from .pretrained import HUB_NAME

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
    targets = parse_targets(config.target_modules)
    if targets is None and task_type == "CAUSAL_LM":
        targets = ALL_LINEAR
    lora = LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, task_type=task_type)
    model = get_lora_model(model, lora)
    for p in model.parameters():  # a head copied from a bf16 base would train in bf16: keep fp32 masters
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def _saver(config: TrainConfig, tokenizer: Any) -> Callable[[nn.Module, Path], int]:
    def save(model: nn.Module, out: Path) -> int:
        if isinstance(model, (LoraModel, PromptTuningModel)):
            model.save_pretrained(out)
            return (out / "adapter_model.safetensors").stat().st_size
        model.save_pretrained(out)  # full fine-tuning: the whole model, safetensors
        tokenizer.save_pretrained(out)
        return sum(f.stat().st_size for f in out.glob("*.safetensors"))

    return save


def _split(items: list[Any], config: TrainConfig) -> tuple[list[Any], list[Any]]:
    n_eval = max(1, int(len(items) * config.eval_fraction))
    if len(items) - n_eval < 1:
        raise ValueError(f"{config.data} has {len(items)} examples: too few to hold {n_eval} out; pass --eval-data")
    return items[:-n_eval], items[-n_eval:]


def _limit(items: Sequence[Any], config: TrainConfig) -> Sequence[Any]:
    return items[:config.max_eval] if config.max_eval else items


def build_run(config: TrainConfig, device: torch.device, precision: str, adapter: str | None = None) -> Run:
    """Load the model and data the config names and put together batches, loss and evaluation.

    With ``adapter`` (a saved LoRA adapter folder) the model carries that adapter instead of a new one.
    """
    # With bf16 autocast a frozen base is kept in bf16 (its weights are not cast again at every step);
    # trainable weights stay fp32 (LoRA adapters are created in fp32; full fine-tuning keeps fp32 masters).
    base_dtype = torch.bfloat16 if precision == "bf16" and config.method in ("lora", "prompt") else torch.float32
    if config.task == "seq_cls":
        return _classification_run(config, device, base_dtype, adapter)
    return _causal_run(config, device, base_dtype, adapter)


def _causal_run(config: TrainConfig, device: torch.device, dtype: torch.dtype, adapter: str | None) -> Run:
    model, tokenizer = _load(config, dtype)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eval_records: list[dict] | None = None
    if config.task == "builtin":
        from .tasks import builtin_orders

        train_records, eval_records = builtin_orders()
        train = [tokenize_chat(tokenizer, r["messages"], config.max_length) for r in train_records]
        eval_examples = [tokenize_chat(tokenizer, r["messages"], config.max_length) for r in eval_records]
        if any(e.n_targets == 0 for e in train):
            raise ValueError(f"max_length={config.max_length} cuts off the answers of the built-in task; use at "
                             f"least {max(len(e) for e in train)}")
        name = "the built-in order-to-JSON task"
    else:
        examples = load_causal_lm(config.data, tokenizer, config.max_length)
        if config.eval_data:
            train, eval_examples = examples, load_causal_lm(config.eval_data, tokenizer, config.max_length)
        else:
            train, eval_examples = _split(examples, config)
        name = Path(config.data).name
    model = _prepare(config, model, "CAUSAL_LM", adapter).to(device)

    def batch(indices: Sequence[int]) -> MicroBatch:
        examples: list[Example] = [train[i] for i in indices]
        # A prompt goes in front of each example, so prompt tuning pads instead of packing.
        packed = config.packing and config.method != "prompt"
        tensors = pack_batch(examples, config.max_length, pad) if packed else pad_batch(examples, pad)
        return MicroBatch(tensors, sum(e.n_targets for e in examples), sum(len(e) for e in examples))

    eval_batches = [pad_batch(list(_limit(eval_examples, config))[i:i + config.eval_batch_size], pad)
                    for i in range(0, len(_limit(eval_examples, config)), config.eval_batch_size)]

    def evaluate(model: nn.Module, label: str) -> dict[str, Any]:
        batches = [{k: v.to(device) for k, v in b.items()} for b in eval_batches]
        metrics = lm_loss(lambda b: causal_lm_loss(model, b), model, batches)
        if eval_records is not None:
            records = _limit(eval_records, config)
            _say(f"evaluating exact match on {len(records)} held-out examples ({label})")
            em = exact_match(model, tokenizer, records, config.max_new_tokens, config.eval_batch_size)
            metrics.update(em)
        return metrics

    return Run(name, model, train, batch, causal_lm_loss, evaluate, _saver(config, tokenizer), tokenizer)


def _classification_run(config: TrainConfig, device: torch.device, dtype: torch.dtype, adapter: str | None
                        ) -> Run:
    rows = read_table(config.data, config.text_field, config.label_field)
    labels = config.labels or sorted({label for _, _, label in rows})
    if len(labels) < 2:
        raise ValueError(f"{config.data}: only one label ({labels[0]!r}); a classifier needs at least two")
    train_rows, eval_rows = ((rows, read_table(config.eval_data, config.text_field, config.label_field))
                             if config.eval_data else _split(rows, config))
    train_y = label_ids(train_rows, config.data, labels)
    eval_y = label_ids(eval_rows, config.eval_data or config.data, labels)
    train = [(text, y) for (_, text, _), y in zip(train_rows, train_y)]
    evals = [(text, y) for (_, text, _), y in zip(eval_rows, eval_y)]
    model, tokenizer = _load(config, dtype, num_labels=len(labels))
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {name: i for i, name in enumerate(labels)}
    model = _prepare(config, model, "SEQ_CLS", adapter).to(device)

    def encode(items: Sequence[tuple[str, int]]) -> dict[str, torch.Tensor]:
        enc = tokenizer([t for t, _ in items], padding=True, truncation=True, max_length=config.max_length,
                        return_tensors="pt")
        return {**enc, "labels": torch.tensor([y for _, y in items])}

    def batch(indices: Sequence[int]) -> MicroBatch:
        tensors = encode([train[i] for i in indices])
        return MicroBatch(tensors, len(indices), int(tensors["attention_mask"].sum()))

    eval_items = list(_limit(evals, config))
    eval_batches = [encode(eval_items[i:i + config.eval_batch_size])
                    for i in range(0, len(eval_items), config.eval_batch_size)]

    def evaluate(model: nn.Module, label: str) -> dict[str, Any]:
        batches = [{k: v.to(device) for k, v in b.items()} for b in eval_batches]
        return classification(model, batches, len(labels))

    return Run(Path(config.data).name, model, train, batch, classification_loss, evaluate,
               _saver(config, tokenizer), tokenizer)
