"""What a training run is made of, per task type: the model, the examples, their batches, the loss, the evaluation.

A task is one small class: :class:`CausalLMTask` (the built-in task and causal-LM data files),
:class:`ClassificationTask` (``seq_cls``), :class:`Seq2SeqTask` (``seq2seq``), :class:`QuestionAnsweringTask`
(``qa``) and :class:`TokenClassificationTask` (``token_cls``) build their model and data in ``__init__`` and answer
the loop's four
questions: ``batch`` (the tensors of some training examples), ``loss``, ``evaluate`` and ``save``.
:func:`build_task` picks the class from the config; the loop in :mod:`lorakit.training.loop` only calls these.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import ALL_LINEAR, QA_HEAD_NAMES, LoraConfig, parse_targets
from ..core.errors import InvalidValue, MissingFile
from ..core.fast_paths import set_low_precision_updates
from ..core.inject import find_targets
from ..core.quant import quantize
from ..files.io import WEIGHTS_NAME, is_prompt_adapter
from ..models.devices import low_precision_updates_fast
from ..models.embedded_models import HUB_NAME, load_pretrained, model_source, require_transformers
from ..models.model import LoraModel, get_lora_model
from ..models.prompt_tuning import PromptTuningModel
from ..models.streaming import checkpoint_dtype, has_safetensors, load_checkpoint, model_config
from .builtin_task import builtin_orders
from .data import (
    IGNORE,
    DataSource,
    Example,
    eval_source,
    existing_file,
    load_causal_lm,
    pack_batch,
    pad_batch,
    read_table,
    tokenize_chat,
    train_source,
)
from .extractive_qa import best_answers, collate_windows, make_windows, qa_logits, qa_loss, read_squad, span_loss
from .labels import HEADS, adapter_classes, check_labels, map_labels, parse_label_map, save_labels
from .loss import LossResult, causal_lm_loss, classification_loss
from .metrics import classification, exact_match, lm_loss, run_eval, squad_scores, tagging_scores
from .options import PEFT_TASK_TYPES, TrainConfig
from .seq2seq import encode_pairs, exact_match_of, generate_targets, pad_pairs, read_pairs, seq2seq_loss
from .token_cls import collate_sentences, encode_sentences, read_tagged, tag_ids, token_logits, token_loss, word_tags

# The transformers Auto class of each PEFT task type.
AUTO_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
                "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "QUESTION_ANS": "AutoModelForQuestionAnswering",
                "TOKEN_CLS": "AutoModelForTokenClassification"}


@dataclass
class MicroBatch:
    tensors: dict[str, torch.Tensor]
    targets: int  # what the loss is averaged over: target tokens (LM) or examples (classification)
    tokens: int  # input tokens, for tokens/s
    # For the step's useful FLOPs (MFU): the tokens of each sequence, and the rows the output head runs on
    # (None: every token). No lengths: not counted (an encoder-decoder's two stacks).
    lengths: list[int] | None = None
    head_rows: int | None = None


class Task:
    """The task-specific parts of a run. Subclasses set the attributes in ``__init__`` and define the methods.

    Attributes:
        config: The run's options, with what the task resolved (a classifier's labels): saved as
            ``train_config.yaml``.
        name: What the run trains on, for the summary (a file name, or the built-in task).
        model: The model as trained: a :class:`LoraModel`, a :class:`PromptTuningModel` or, for full fine-tuning,
            the base model itself.
        tokenizer: The model's tokenizer.
        train: The training examples; micro-batches are lists of indices into it.
        reference_passes: Forward-only passes of the model per example beside the trained one (a DPO reference
            pass: 1), counted in the run's useful FLOPs.
    """

    config: TrainConfig
    name: str
    model: nn.Module
    tokenizer: Any
    train: Sequence[Any]
    reference_passes: int = 0  # forward-only passes per example beside the trained one (DPO's reference: 1)

    def batch(self, indices: Sequence[int]) -> MicroBatch:
        """The tensors of the training examples at ``indices``."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossResult:
        """The summed loss of ``model`` on one batch, what it is averaged over, and the task's own metrics."""
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


@dataclass(frozen=True)
class Start:
    """Where a task's model starts: ``adapter`` (a saved LoRA or prompt-tuning folder) instead of a new adapter,
    trained further when ``trainable``; ``evaluate_only`` reads only the held-out data (``eval_data`` when given:
    the training file is not needed)."""

    adapter: str | None = None
    trainable: bool = False
    evaluate_only: bool = False


def build_task(config: TrainConfig, device: torch.device, precision: str, adapter: str | None = None,
               evaluate_only: bool = False) -> Task:
    """Load the model and data the config names, for the task type it names.

    With ``adapter`` (a saved LoRA or prompt-tuning folder) the model carries that adapter instead of a new one;
    with ``config.init_adapter`` it carries that one, trainable. With ``evaluate_only`` only the held-out data is
    read.
    """
    # With bf16 autocast a frozen base is kept in bf16 (its weights are not cast again at every step);
    # trainable weights stay fp32 (LoRA adapters are created in fp32; full fine-tuning keeps fp32 masters).
    base_dtype = torch.bfloat16 if precision == "bf16" and config.method in ("lora", "prompt") else torch.float32
    if config.method in ("lora", "prompt") and config.precision != "fp32" and config.model != "default" \
            and checkpoint_dtype(model_source(config.model, config.trust_remote_code)) == torch.bfloat16:
        base_dtype = torch.bfloat16  # a bf16 checkpoint's frozen base stays bf16 (no fp32 copy) unless fp32 is asked
    if adapter is None and config.init_adapter is not None and not evaluate_only:
        start = Start(config.init_adapter, trainable=True)
    else:
        start = Start(adapter, evaluate_only=evaluate_only)
    check_before_loading(config, start)
    task_class = {"seq_cls": ClassificationTask, "seq2seq": Seq2SeqTask, "qa": QuestionAnsweringTask,
                  "token_cls": TokenClassificationTask}.get(config.task, CausalLMTask)
    task = task_class(config, device, base_dtype, start)
    if precision == "bf16":  # the LoRA updates under autocast: bf16 where this CPU's rank products are fast
        set_low_precision_updates(task.model, low_precision_updates_fast(device))
    return task


def check_before_loading(config: TrainConfig, start: Start = Start()) -> None:
    """What can be checked before any weight is loaded: the data files exist, and the LoRA targets match modules
    of the model (on a copy built from its config on the meta device, which costs no memory and no time).

    Raises:
        FileNotFoundError: A data file or the model does not exist.
        ValueError: A target matches no module (with the closest real names).
    """
    needed = [config.eval_data] if start.evaluate_only and config.eval_data else [config.data, config.eval_data]
    for path in needed:
        if path is not None:
            existing_file(path)
    if config.method == "lora" and start.adapter is None:
        task_type = PEFT_TASK_TYPES[config.task]
        find_targets(meta_model_of(config, task_type), lora_config_of(config, task_type))


class CausalLMTask(Task):
    """Next-token prediction on chat or text examples, the loss on the answers only: the built-in task (with
    exact match of generated answers as its metric) or a data file (held-out loss and perplexity)."""

    def __init__(self, config: TrainConfig, device: torch.device, dtype: torch.dtype, start: Start) -> None:
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
                raise InvalidValue(f"max_length={config.max_length} cuts off the answers of the built-in task; use "
                                   f"at least {max(len(e) for e in self.train)}")
            self.name = "the built-in order-to-JSON task"
        elif start.evaluate_only and config.eval_data:
            self.train, eval_examples = [], load_causal_lm(eval_source(config), tokenizer, config.max_length)
            self.name = Path(config.eval_data).name
        else:
            examples = load_causal_lm(train_source(config), tokenizer, config.max_length)
            if config.eval_data:
                self.train = examples
                eval_examples = load_causal_lm(eval_source(config), tokenizer, config.max_length)
            else:
                self.train, eval_examples = _split(examples, config)
            self.name = Path(config.data).name
        self.model = _prepare(config, model, "CAUSAL_LM", start).to(device)
        held_out = list(_limit(eval_examples, config))
        self.eval_batches = [pad_batch(held_out[i:i + config.eval_batch_size], self.pad)
                             for i in range(0, len(held_out), config.eval_batch_size)]

    def batch(self, indices: Sequence[int]) -> MicroBatch:
        examples: list[Example] = [self.train[i] for i in indices]
        # A prompt goes in front of each example, so prompt tuning pads instead of packing.
        packed = self.config.packing and self.config.method != "prompt"
        tensors = pack_batch(examples, self.config.max_length, self.pad) if packed else pad_batch(examples, self.pad)
        n_targets = sum(e.n_targets for e in examples)
        return MicroBatch(tensors, n_targets, sum(len(e) for e in examples), [len(e) for e in examples],
                          head_rows=n_targets)  # the useful logits: where there is a target

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossResult:
        return LossResult(*causal_lm_loss(model, batch))

    def evaluate(self, model: nn.Module, label: str) -> dict[str, Any]:
        batches = [{k: v.to(self.device) for k, v in b.items()} for b in self.eval_batches]
        with progress_bar(self.config.progress, sum(len(b["input_ids"]) for b in batches), f"loss ({label})") as bar:
            metrics = lm_loss(lambda b: self.loss(model, b), model, batches, progress=bar)
        if self.eval_records is not None:
            records = _limit(self.eval_records, self.config)
            _say(f"evaluating exact match on {len(records)} held-out examples ({label})")
            with progress_bar(self.config.progress, len(records), f"exact match ({label})") as bar:
                metrics.update(exact_match(model, self.tokenizer, records, self.config.max_new_tokens,
                                           self.config.eval_batch_size, progress=bar))
        return metrics


class ClassificationTask(Task):
    """Sequence classification (``seq_cls``): text and label rows, a classification head trained in full next to
    the adapter, accuracy as the metric."""

    def __init__(self, config: TrainConfig, device: torch.device, dtype: torch.dtype, start: Start) -> None:
        self.device = device
        mapping = parse_label_map(config.label_map)

        def read(path: DataSource) -> list[tuple[int, str, str]]:
            return map_labels(read_table(path, config.text_field, config.label_field), mapping)

        train_from, eval_from = _sources(config, start)
        if train_from is None:
            train_rows, eval_rows = [], read(eval_from)
        else:
            rows = read(train_from)
            train_rows, eval_rows = (rows, read(eval_from)) if config.eval_data else _split(rows, config)
        # The classes: a saved adapter's (its head was trained on them), else --labels, else the data's labels
        saved = adapter_classes(start.adapter) if start.adapter and not is_prompt_adapter(start.adapter) else None
        if saved and config.labels and list(config.labels) != saved:
            raise InvalidValue(f"--labels {','.join(config.labels)} differ from the classes of the adapter "
                               f"{start.adapter} ({','.join(saved)}); map the data's labels with --label-map")
        self.labels = saved or config.labels or sorted({label for _, _, label in train_rows or eval_rows})
        if len(self.labels) < 2:
            raise InvalidValue(f"{config.data}: only one label ({self.labels[0]!r}); a classifier needs at least two")
        check_labels(train_rows, train_from or eval_from, self.labels, mapping)
        check_labels(eval_rows, eval_from, self.labels, mapping)
        self.config = dataclasses.replace(config, labels=self.labels)  # saved as train_config.yaml
        index = {name: i for i, name in enumerate(self.labels)}
        self.train = [(text, index[label]) for _, text, label in train_rows]
        held_out = list(_limit([(text, index[label]) for _, text, label in eval_rows], config))
        model, self.tokenizer = _load(config, dtype, num_labels=len(self.labels),
                                      head_supplied=start.adapter is not None)
        give_pad_token(model, self.tokenizer, config.model)
        model.config.id2label = dict(enumerate(self.labels))
        model.config.label2id = dict(index)
        self.model = _prepare(config, model, "SEQ_CLS", start).to(device)
        self.name = Path(config.eval_data if start.evaluate_only and config.eval_data else config.data).name
        self.eval_batches = [self._encode(held_out[i:i + config.eval_batch_size])
                             for i in range(0, len(held_out), config.eval_batch_size)]

    def _encode(self, items: Sequence[tuple[str, int]]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer([t for t, _ in items], padding=True, truncation=True, max_length=self.config.max_length,
                             return_tensors="pt")
        return {**enc, "labels": torch.tensor([y for _, y in items])}

    def batch(self, indices: Sequence[int]) -> MicroBatch:
        tensors = self._encode([self.train[i] for i in indices])
        mask = tensors["attention_mask"]
        return MicroBatch(tensors, len(indices), int(mask.sum()), mask.sum(1).tolist(), head_rows=len(indices))

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossResult:
        return LossResult(*classification_loss(model, batch))

    def evaluate(self, model: nn.Module, label: str) -> dict[str, Any]:
        batches = [{k: v.to(self.device) for k, v in b.items()} for b in self.eval_batches]
        with progress_bar(self.config.progress, sum(len(b["labels"]) for b in batches), f"accuracy ({label})") as bar:
            return {**classification(model, batches, len(self.labels), progress=bar), "labels": list(self.labels)}

    def save(self, model: nn.Module, out: Path) -> int:
        """The adapter (or model) and ``labels.json``: which class each output of the head stands for."""
        saved = super().save(model, out)
        save_labels(out, self.labels)
        return saved


class Seq2SeqTask(Task):
    """Encoder-decoder generation (``seq2seq``, PEFT's ``SEQ_2_SEQ_LM``): input/target pairs, the loss on the
    target; held-out loss, perplexity and exact match of greedy generations."""

    def __init__(self, config: TrainConfig, device: torch.device, dtype: torch.dtype, start: Start) -> None:
        self.config, self.device = config, device
        model, self.tokenizer = _load(config, dtype, auto=AUTO_CLASSES["SEQ_2_SEQ_LM"])
        if self.tokenizer.pad_token_id is None:
            raise InvalidValue(f"model {config.model!r}: its tokenizer has no pad token to pad inputs and targets with")
        self.pad = self.tokenizer.pad_token_id
        train_rows, eval_rows = _read_split(config, start, read_pairs)
        self.train = encode_pairs(self.tokenizer, train_rows, config.max_length)
        self.eval_pairs = encode_pairs(self.tokenizer, list(_limit(eval_rows, config)), config.max_length)
        self.model = _prepare(config, model, "SEQ_2_SEQ_LM", start).to(device)
        self.name = _data_name(config, start)
        size = config.eval_batch_size
        self.eval_batches = [pad_pairs(self.eval_pairs[i:i + size], self.pad)
                             for i in range(0, len(self.eval_pairs), size)]

    def batch(self, indices: Sequence[int]) -> MicroBatch:
        pairs = [self.train[i] for i in indices]
        tensors = pad_pairs(pairs, self.pad)
        return MicroBatch(tensors, int((tensors["labels"] != IGNORE).sum()), sum(len(p) for p in pairs))

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossResult:
        return LossResult(*seq2seq_loss(model, batch))

    def evaluate(self, model: nn.Module, label: str) -> dict[str, Any]:
        batches = [{k: v.to(self.device) for k, v in b.items()} for b in self.eval_batches]
        with progress_bar(self.config.progress, len(self.eval_pairs), f"loss ({label})") as bar:
            metrics = lm_loss(lambda b: self.loss(model, b), model, batches, progress=bar)
        with progress_bar(self.config.progress, len(self.eval_pairs), f"exact match ({label})") as bar:
            predictions = generate_targets(model, self.tokenizer, batches, self.config.max_new_tokens, bar)
        return {**metrics, **exact_match_of(predictions, self.eval_pairs)}


class QuestionAnsweringTask(Task):
    """Extractive question answering (``qa``, PEFT's ``QUESTION_ANS``) on SQuAD files: the span head
    (``qa_outputs``) trained in full next to the adapter; SQuAD's exact match and F1 as the metrics."""

    def __init__(self, config: TrainConfig, device: torch.device, dtype: torch.dtype, start: Start) -> None:
        self.config, self.device = config, device
        model, self.tokenizer = _load(config, dtype, auto=AUTO_CLASSES["QUESTION_ANS"], supplied=QA_HEAD_NAMES)
        self.pad = self.tokenizer.pad_token_id or 0
        train_questions, eval_questions = _read_split(config, start, read_squad)
        # "No answer" is a possible prediction only for a model that was shown unanswerable questions.
        self.allow_null = any(not q.answers for q in train_questions or eval_questions)
        self.train = make_windows(self.tokenizer, train_questions, config.max_length) if train_questions else []
        self.eval_questions = list(_limit(eval_questions, config))
        self.eval_windows = make_windows(self.tokenizer, self.eval_questions, config.max_length)
        self.model = _prepare(config, model, "QUESTION_ANS", start).to(device)
        self.name = _data_name(config, start)
        size = config.eval_batch_size
        self.eval_batches = [collate_windows(self.eval_windows[i:i + size], self.pad)
                             for i in range(0, len(self.eval_windows), size)]

    def batch(self, indices: Sequence[int]) -> MicroBatch:
        tensors = collate_windows([self.train[i] for i in indices], self.pad)
        mask = tensors["attention_mask"]
        return MicroBatch(tensors, len(indices), int(mask.sum()), mask.sum(1).tolist())

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossResult:
        return LossResult(*qa_loss(model, batch))

    def evaluate(self, model: nn.Module, label: str) -> dict[str, Any]:
        def scores(b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, float]:
            start, end = qa_logits(model, b)  # (B, L) each
            return start.cpu(), end.cpu(), span_loss(start, end, b).item()

        batches = [{k: v.to(self.device) for k, v in b.items()} for b in self.eval_batches]
        with progress_bar(self.config.progress, len(self.eval_windows), f"exact match ({label})") as bar:
            results = run_eval(model, batches, scores, progress=bar)
        starts = [row for start, _, _ in results for row in start]
        ends = [row for _, end, _ in results for row in end]
        answers = best_answers(self.eval_questions, self.eval_windows, starts, ends, self.allow_null)
        references = [[text for text, _ in q.answers] for q in self.eval_questions]
        samples = [{"prompt": q.question, "reference": refs[0] if refs else "", "prediction": a}
                   for q, refs, a in list(zip(self.eval_questions, references, answers))[:3]]
        return {"loss": sum(loss for _, _, loss in results) / max(len(self.eval_windows), 1),
                **squad_scores(answers, references), "samples": samples}


class TokenClassificationTask(Task):
    """Token classification (``token_cls``, PEFT's ``TOKEN_CLS``): a tag per word, the classification head trained
    in full next to the adapter; token accuracy and, for IOB2/IOBES tags, seqeval's entity F1."""

    def __init__(self, config: TrainConfig, device: torch.device, dtype: torch.dtype, start: Start) -> None:
        self.device = device
        train_rows, eval_rows = _read_split(config, start, read_tagged)
        # The tags: a saved adapter's (its head was trained on them), else --labels, else the data's sorted tags.
        saved = adapter_classes(start.adapter) if start.adapter else None
        self.labels = saved or config.labels or sorted({t for _, _, tags in train_rows or eval_rows for t in tags})
        if len(self.labels) < 2:
            raise InvalidValue(f"{config.data}: only one tag ({self.labels[0]!r}); a tagger needs at least two")
        self.config = dataclasses.replace(config, labels=self.labels)  # saved as train_config.yaml
        train_from, eval_from = _sources(config, start)
        train_y = tag_ids(train_rows, train_from or eval_from, self.labels)
        eval_rows = list(_limit(eval_rows, config))
        eval_y = tag_ids(eval_rows, eval_from, self.labels)
        model, self.tokenizer = _load(config, dtype, auto=AUTO_CLASSES["TOKEN_CLS"], supplied=HEADS,
                                      num_labels=len(self.labels))
        model.config.id2label = dict(enumerate(self.labels))
        model.config.label2id = {name: i for i, name in enumerate(self.labels)}
        self.pad = self.tokenizer.pad_token_id or 0
        self.train = encode_sentences(self.tokenizer, [w for _, w, _ in train_rows], train_y, config.max_length) \
            if train_rows else []
        held_out = encode_sentences(self.tokenizer, [w for _, w, _ in eval_rows], eval_y, config.max_length)
        self.model = _prepare(config, model, "TOKEN_CLS", start).to(device)
        self.name = _data_name(config, start)
        size = config.eval_batch_size
        self.eval_batches = [collate_sentences(held_out[i:i + size], self.pad) for i in range(0, len(held_out), size)]

    def batch(self, indices: Sequence[int]) -> MicroBatch:
        sentences = [self.train[i] for i in indices]
        tensors = collate_sentences(sentences, self.pad)
        mask = tensors["attention_mask"]
        return MicroBatch(tensors, sum(s.n_words for s in sentences), int(mask.sum()), mask.sum(1).tolist())

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossResult:
        return LossResult(*token_loss(model, batch))

    def evaluate(self, model: nn.Module, label: str) -> dict[str, Any]:
        def tags(b: dict[str, torch.Tensor]) -> tuple[list[list[str]], list[list[str]], float, int]:
            logits = token_logits(model, b)  # (B, L, n_labels)
            keep = b["labels"] != IGNORE
            loss = F.cross_entropy(logits[keep].float(), b["labels"][keep], reduction="sum").item()
            return *word_tags(logits.cpu(), {"labels": b["labels"].cpu()}, self.labels), loss, int(keep.sum())

        batches = [{k: v.to(self.device) for k, v in b.items()} for b in self.eval_batches]
        n = sum(len(b["input_ids"]) for b in batches)
        with progress_bar(self.config.progress, n, f"accuracy ({label})") as bar:
            results = run_eval(model, batches, tags, progress=bar)
        predicted = [p for pred, _, _, _ in results for p in pred]
        gold = [g for _, ref, _, _ in results for g in ref]
        words = sum(count for _, _, _, count in results)
        return {"loss": sum(loss for _, _, loss, _ in results) / max(words, 1), **tagging_scores(predicted, gold),
                "labels": list(self.labels)}

    def save(self, model: nn.Module, out: Path) -> int:
        """The adapter (or model) and ``labels.json``: which tag each output of the head stands for."""
        saved = super().save(model, out)
        save_labels(out, self.labels)
        return saved


# -- shared by the tasks ---------------------------------------------------------------------------------------


def _say(message: str) -> None:
    print(f"lorakit: {message}", file=sys.stderr, flush=True)


def _load(config: TrainConfig, dtype: torch.dtype, num_labels: int | None = None, head_supplied: bool = False,
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
            _say(f"loading {source} tensor by tensor, quantizing the base's linear layers to {config.quantize}"
                 f"{' with double quantization' if config.double_quant else ''}")
        if auto is None:  # a classifier's new head, or nothing, may be missing from the checkpoint
            supplied = HEADS if num_labels else ()
        model = load_checkpoint(getattr(transformers, kind), source, dtype=dtype, quantize=config.quantize,
                                double_quant=config.double_quant, trust_remote_code=trust, supplied=supplied,
                                **labels)
        if num_labels is not None and auto is None and not head_supplied:
            _say(f"a new {num_labels}-class head starts from random weights and trains with the adapter")
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
            _say(f"a new {num_labels}-class head starts from random weights and trains with the adapter")
    if config.model == "default":
        model.config._name_or_path = HUB_NAME
    if config.quantize and not streams(config, source):
        _say(f"quantizing the base's linear layers to {config.quantize}"
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


def _prepare(config: TrainConfig, model: nn.Module, task_type: str, start: Start) -> nn.Module:
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
        return _fp32_masters(model) if start.trainable else model
    if config.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if config.method == "prompt":
        return PromptTuningModel(model, config.num_virtual_tokens, seed=config.seed)
    return _fp32_masters(get_lora_model(model, lora_config_of(config, task_type)))


def _fp32_masters(model: nn.Module) -> nn.Module:
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
    _say(f"the model's config has no pad_token_id; padding with the tokenizer's token {tokenizer.pad_token!r} "
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


def _read_split(config: TrainConfig, start: Start, read: Callable[[DataSource], list[Any]]
                ) -> tuple[list[Any], list[Any]]:
    """The training and held-out items ``read`` finds: ``--eval-data`` when given (only it when evaluating a saved
    adapter), else the last ``--eval-fraction`` of ``--data``."""
    train_from, eval_from = _sources(config, start)
    if train_from is None:
        return [], read(eval_from)
    items = read(train_from)
    return (items, read(eval_from)) if config.eval_data else _split(items, config)


def _sources(config: TrainConfig, start: Start) -> tuple[DataSource | None, DataSource]:
    """Where the training and held-out items come from: no training source when evaluating a saved adapter on
    ``--eval-data`` (the file the adapter was trained on need not exist any more); held-out items come from
    ``--data`` when there is no ``--eval-data``."""
    train_from = None if start.evaluate_only and config.eval_data else train_source(config)
    return train_from, eval_source(config) if config.eval_data else train_from


def _data_name(config: TrainConfig, start: Start) -> str:
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


def _split(items: list[Any], config: TrainConfig) -> tuple[list[Any], list[Any]]:
    n_eval = max(1, int(len(items) * config.eval_fraction))
    if len(items) - n_eval < 1:
        raise InvalidValue(f"{config.data} has {len(items)} examples: too few to hold {n_eval} out; pass --eval-data")
    return items[:-n_eval], items[-n_eval:]


def _limit(items: Sequence[Any], config: TrainConfig) -> Sequence[Any]:
    return items[:config.max_eval] if config.max_eval else items
