"""Extractive question answering (``--task qa``, PEFT's ``QUESTION_ANS``): SQuAD files, the windows a long context
is cut into, the span loss, and answers picked back out of the start/end scores.

The model (``...ForQuestionAnswering``: an encoder and a ``qa_outputs`` head) scores every token as the answer's
first and last token. A question and its context go in as one pair; a context too long for ``max_length`` is cut
into overlapping windows (``max_length // 4`` tokens of overlap), each a training example of its own, as
transformers' ``run_qa.py`` does.

Unanswerable questions (SQuAD 2.0's ``is_impossible``) are handled as SQuAD 2.0 models do: their answer is the
first token (``[CLS]``), and so is the answer of a window that does not hold the whole answer. At evaluation a
question's answer is the best-scoring span over its windows, or no answer (``""``) where the ``[CLS]`` score beats
it; "no answer" is only predicted when the training data has unanswerable questions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import QA_HEAD_NAMES
from ...core.errors import InvalidValue
from ..data import (
    DataError,
    DataSource,
    data_source,
    existing_file,
    locate,
    pad_encodings,
    read_records,
    read_text,
)
from ..loss import LossResult
from ..metrics import run_eval, squad_scores
from ..options import TrainConfig
from ..registry import register
from .base import MicroBatch, Task
from .loading import (
    AUTO_CLASSES,
    Start,
    data_name,
    limit,
    load_model,
    prepare_model,
    progress_bar,
    read_split,
)

MAX_ANSWER_TOKENS = 30  # longer spans are not considered (transformers' run_qa default)
N_BEST = 20  # start and end candidates per window


@dataclass(frozen=True)
class Question:
    """One question about a context, with its reference answers: ``(text, character offset)`` pairs, none when
    the question is unanswerable."""

    id: str
    question: str
    context: str
    answers: tuple[tuple[str, int], ...]
    where: str  # file and row, for messages


@dataclass(frozen=True)
class Window:
    """One model input: a question with (part of) its context, and where the answer is in it."""

    question: int  # index of its Question
    encoding: dict[str, list[int]]  # input_ids, attention_mask (and token_type_ids where the model has them)
    offsets: tuple[tuple[int, int] | None, ...]  # each token's character span in the context; None outside it
    start: int  # token position of the answer's first token; 0 (the [CLS] token) when not in this window
    end: int


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------


def read_squad(path: str | Path | DataSource) -> list[Question]:
    """The questions of a SQuAD file: the official JSON (``{"data": [{"paragraphs": [{"context", "qas"}]}]}``,
    versions 1.1 and 2.0) or JSONL/JSON records ``{"id", "question", "context", "answers"}`` whose ``answers`` is
    a list of ``{"text", "answer_start"}`` (or Hugging Face datasets' ``{"text": [...], "answer_start": [...]}``).

    Raises:
        DataError: A missing or mistyped field, or an answer that is not at its ``answer_start`` in the context
            (naming the file and the row: its line, or its place in the official JSON and its id).
    """
    if data_source(path).is_arrow:  # parquet, Arrow, save_to_disk: records as in JSONL, one per row
        return [_question(r, r.get("context"), locate(path, row), str(row)) for row, r in read_records(path)]
    path = existing_file(path)
    text = read_text(path)
    document = None
    if path.suffix.lower() != ".jsonl" and text.lstrip().startswith("{"):
        try:
            document = json.loads(text)
        except json.JSONDecodeError:
            pass  # JSONL under another name (read_records says what is wrong, if anything)
    if not (isinstance(document, dict) and "data" in document):
        return [_question(r, r.get("context"), f"{path}:{line}", str(line)) for line, r in read_records(path)]
    if not isinstance(document["data"], list):
        raise DataError(f"{path}: 'data' must be a list of articles, got {type(document['data']).__name__}")
    questions = []
    for a, article in enumerate(document["data"]):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise DataError(f"{path}: data[{a}] has no 'paragraphs' list")
        for p, paragraph in enumerate(paragraphs):
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("qas"), list):
                raise DataError(f"{path}: data[{a}].paragraphs[{p}] has no 'qas' list")
            for q, record in enumerate(paragraph["qas"]):
                if not isinstance(record, dict):
                    raise DataError(f"{path}: data[{a}].paragraphs[{p}].qas[{q}] is not an object")
                where = f"{path}: data[{a}].paragraphs[{p}].qas[{q}] (id {record.get('id')!r})"
                questions.append(_question(record, paragraph.get("context"), where, f"{a}.{p}.{q}"))
    if not questions:
        raise DataError(f"{path}: no questions in the file")
    return questions


def _question(record: dict[str, Any], context: Any, where: str, fallback_id: str) -> Question:
    question = record.get("question")
    for name, value in (("question", question), ("context", context)):
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: {name!r} must be a non-empty string, got {value!r}")
    answers = record.get("answers", [])
    if isinstance(answers, dict):  # Hugging Face datasets: {"text": [...], "answer_start": [...]}
        texts, starts = answers.get("text", []), answers.get("answer_start", [])
        if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
            raise DataError(f"{where}: 'answers' needs lists 'text' and 'answer_start' of the same length")
        answers = [{"text": t, "answer_start": s} for t, s in zip(texts, starts)]
    if not isinstance(answers, list):
        raise DataError(f"{where}: 'answers' must be a list of {{'text', 'answer_start'}}, got {answers!r}")
    if record.get("is_impossible") and answers:
        raise DataError(f"{where}: the question is marked is_impossible but has answers")
    found = []
    for i, answer in enumerate(answers):
        text = answer.get("text") if isinstance(answer, dict) else None
        start = answer.get("answer_start") if isinstance(answer, dict) else None
        if not isinstance(text, str) or not text or isinstance(start, bool) or not isinstance(start, int):
            raise DataError(f"{where}: answers[{i}] must be {{'text': a non-empty string, 'answer_start': an "
                            f"integer}}, got {answer!r}")
        if context[start:start + len(text)] != text:
            raise DataError(f"{where}: answers[{i}] {text!r} is not at answer_start {start} of the context (the "
                            f"context has {context[start:start + len(text)]!r} there)")
        found.append((text, start))
    return Question(str(record.get("id", fallback_id)), question, context, tuple(found), where)


# --------------------------------------------------------------------------------------------------------------
# Windows, batches, loss
# --------------------------------------------------------------------------------------------------------------


def make_windows(tokenizer: Any, questions: Sequence[Question], max_length: int) -> list[Window]:
    """Each question with its context, cut into windows of at most ``max_length`` tokens that overlap by
    ``max_length // 4``; the answer's token span (its first reference answer), or ``[CLS]`` where a window does not
    hold all of it or the question has none.

    Raises:
        ValueError: The tokenizer is not a fast one (character offsets are needed), or a question leaves no room
            for its context within ``max_length`` (naming it).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise InvalidValue("extractive QA needs a fast (Rust) tokenizer for character offsets; this model's "
                           f"tokenizer is {type(tokenizer).__name__}")
    stride = max_length // 4
    lengths = tokenizer([q.question.lstrip() for q in questions], add_special_tokens=False)["input_ids"]
    for q, ids in zip(questions, lengths):
        if len(ids) + 4 + stride > max_length:  # [CLS] q [SEP] ... [SEP], and the overlap must fit
            raise InvalidValue(f"{q.where}: the question has {len(ids)} tokens, which leaves no room for the context "
                               f"within max_length={max_length}; raise --max-length")
    enc = tokenizer([q.question.lstrip() for q in questions], [q.context for q in questions], truncation="only_second",
                    max_length=max_length, stride=stride, return_overflowing_tokens=True,
                    return_offsets_mapping=True)
    keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
    windows = []
    for w, q_index in enumerate(enc["overflow_to_sample_mapping"]):
        sequence = enc.sequence_ids(w)
        offsets = tuple(tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][w], sequence))
        context = [i for i, o in enumerate(offsets) if o is not None]
        start = end = 0
        answers = questions[q_index].answers
        if answers:
            first, last = answers[0][1], answers[0][1] + len(answers[0][0])  # characters [first, last)
            if offsets[context[0]][0] <= first and offsets[context[-1]][1] >= last:
                start = max(i for i in context if offsets[i][0] <= first)
                end = min(i for i in context if offsets[i][1] >= last)
        windows.append(Window(q_index, {k: enc[k][w] for k in keys}, offsets, start, end))
    return windows


def collate_windows(windows: Sequence[Window], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded windows with their answer positions (``start_positions`` / ``end_positions``, as transformers'
    QA models name them)."""
    batch = pad_encodings([w.encoding for w in windows], pad_id)
    batch["start_positions"] = torch.tensor([w.start for w in windows])  # (B,)
    batch["end_positions"] = torch.tensor([w.end for w in windows])  # (B,)
    return batch


def qa_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end) scores of every token, each ``(B, L)``, in fp32."""
    inputs = {k: v for k, v in batch.items() if k not in ("start_positions", "end_positions")}
    out = model(**inputs)
    return out.start_logits.float(), out.end_logits.float()


def span_loss(start: torch.Tensor, end: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed span loss of the ``(B, L)`` start and end scores: per window, the mean of the start and end
    cross-entropies, as transformers' QA models compute it."""
    return (F.cross_entropy(start, batch["start_positions"], reduction="sum")
            + F.cross_entropy(end, batch["end_positions"], reduction="sum")) / 2


def qa_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed span loss of a batch and the number of windows."""
    start, end = qa_logits(model, batch)  # (B, L) each
    return span_loss(start, end, batch), torch.tensor(len(start))


# --------------------------------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------------------------------


def best_answers(questions: Sequence[Question], windows: Sequence[Window], starts: Sequence[torch.Tensor],
                 ends: Sequence[torch.Tensor], allow_null: bool) -> list[str]:
    """Each question's answer: the context span whose start + end score is highest over all its windows (at most
    :data:`MAX_ANSWER_TOKENS` long, from the :data:`N_BEST` best starts and ends), or ``""`` (no answer) when
    ``allow_null`` and the lowest ``[CLS]`` score of its windows is above that span's score.

    Args:
        questions: The questions.
        windows: Their windows (from :func:`make_windows`).
        starts: Each window's start scores, ``(L,)`` (padding may follow: it is never in the context).
        ends: Each window's end scores, ``(L,)``.
        allow_null: Predict "no answer" at all (a model trained on unanswerable questions).
    """
    best: dict[int, tuple[float, str]] = {}
    null: dict[int, float] = {}
    for window, start, end in zip(windows, starts, ends):
        q = window.question
        null[q] = min(null.get(q, float("inf")), float(start[0] + end[0]))
        n = len(window.offsets)
        top_start = start[:n].topk(min(N_BEST, n)).indices.tolist()
        top_end = end[:n].topk(min(N_BEST, n)).indices.tolist()
        for i in top_start:
            for j in top_end:
                first, last = window.offsets[i], window.offsets[j]
                if first is None or last is None or j < i or j - i + 1 > MAX_ANSWER_TOKENS:
                    continue
                score = float(start[i] + end[j])
                if q not in best or score > best[q][0]:
                    best[q] = (score, questions[q].context[first[0]:last[1]])
    answers = []
    for q in range(len(questions)):
        score, text = best.get(q, (float("-inf"), ""))
        answers.append("" if allow_null and null.get(q, float("-inf")) > score else text)
    return answers


@register
class QuestionAnsweringTask(Task):
    """Extractive question answering (``qa``, PEFT's ``QUESTION_ANS``) on SQuAD files: the span head
    (``qa_outputs``) trained in full next to the adapter; SQuAD's exact match and F1 as the metrics."""

    task_name = "qa"
    peft_task_type = "QUESTION_ANS"
    summary = "qa (extractive QA on SQuAD JSON)"
    headline_metric = "f1"

    def __init__(self, config: TrainConfig, device: torch.device, dtype: torch.dtype, start: Start) -> None:
        self.config, self.device = config, device
        model, self.tokenizer = load_model(config, dtype, auto=AUTO_CLASSES["QUESTION_ANS"], supplied=QA_HEAD_NAMES)
        self.pad = self.tokenizer.pad_token_id or 0
        train_questions, eval_questions = read_split(config, start, read_squad)
        # "No answer" is a possible prediction only for a model that was shown unanswerable questions.
        self.allow_null = any(not q.answers for q in train_questions or eval_questions)
        self.train = make_windows(self.tokenizer, train_questions, config.max_length) if train_questions else []
        self.eval_questions = list(limit(eval_questions, config))
        self.eval_windows = make_windows(self.tokenizer, self.eval_questions, config.max_length)
        self.model = prepare_model(config, model, "QUESTION_ANS", start).to(device)
        self.name = data_name(config, start)
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
