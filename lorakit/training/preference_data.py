"""Preference data: rows of chosen/rejected answers (DPO, ORPO, SimPO) or labelled answers (KTO), as token ids.

Tokenized as trl 1.16's ``DPOTrainer`` and ``KTOTrainer`` prepare their datasets, so the ids are TRL's:

- A conversational row renders its prompt with the chat template and the assistant's generation prompt, and the
  prompt followed by each answer without it; a plain-text row tokenizes the strings as they are, with EOS appended
  to each answer that does not end with it. The prompt's tokens are the common prefix of the prompt's ids and the
  full rows' ids (a template that renders the prompt differently alone loses the differing end, as in TRL).
- ``max_length`` keeps the *start* of each row: the prompt whole, each answer cut at its end so that prompt and
  answer fit; a row whose prompt alone fills ``max_length`` is dropped (there would be nothing to learn from).
  ``max_prompt_length`` (not in trl 1.16; older TRL's rule) first cuts the prompt from its *start*, keeping the
  end, the turn the answer follows.
- Prompt tokens never take a loss: :meth:`PreferencePair.examples` gives :class:`~lorakit.training.data.Example`
  rows whose targets are the answer tokens only.

Row formats (JSON/JSONL/parquet/``save_to_disk``, read by :func:`~lorakit.training.data.read_records`):

- pairs: TRL's ``prompt`` / ``chosen`` / ``rejected``, all strings or all message lists (``{role, content}``);
  ``chosen`` / ``rejected`` alone (full texts or conversations sharing their prompt: the prompt is their common
  prefix, TRL's ``extract_prompt``); LLaMA-Factory's sharegpt rows, ``conversations`` plus ``chosen`` and
  ``rejected`` messages, each ``{from, value}`` (``human``, ``gpt``, ``system``).
- KTO: ``prompt`` / ``completion`` / ``label`` (strings or message lists); ``messages`` + ``label`` (the last message
  is the assistant's answer, the ones before it the prompt); paired rows, unpaired as TRL does (the chosen answer
  desirable, the rejected one not).

A row that cannot be used (a missing field, an empty answer, the same chosen and rejected answer, ...) is named by
its line; ``on_bad="skip"`` leaves it out and counts it, ``on_bad="error"`` refuses the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import InvalidValue
from ..models.chat import encode, prompt_ids
from .data import IGNORE, DataError, DataSource, Example, data_source, locate, read_records

Text = str | list[dict[str, str]]  # a plain string or a list of chat messages
ON_BAD = ("skip", "error")
SHOWN_BAD_ROWS = 5  # how many bad rows a message names
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}  # LLaMA-Factory's names
ROLES = ("system", "user", "assistant")


class _BadRow(InvalidValue):
    """Why one row cannot be used (the reader adds its line)."""


@dataclass(frozen=True)
class PreferencePair:
    """One tokenized preference pair: the shared prompt and the two answers (after truncation)."""

    line: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    def examples(self) -> tuple[Example, Example]:
        """The chosen and the rejected row as causal-LM examples: loss on the answer tokens only."""
        return _example(self.prompt_ids, self.chosen_ids), _example(self.prompt_ids, self.rejected_ids)


@dataclass(frozen=True)
class UnpairedExample:
    """One tokenized KTO example: a prompt, a completion and whether the completion is desirable."""

    line: int
    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool

    def example(self) -> Example:
        """The row as a causal-LM example: loss on the completion tokens only."""
        return _example(self.prompt_ids, self.completion_ids)


@dataclass
class PreferenceData:
    """What a preference file gave.

    Attributes:
        rows: The tokenized pairs (:class:`PreferencePair`) or KTO examples (:class:`UnpairedExample`).
        truncated: How many rows were cut to fit ``max_length`` / ``max_prompt_length``.
        dropped: Lines whose prompt alone fills ``max_length`` (left out, as TRL does).
        skipped: ``(line, reason)`` of the rows that could not be used (with ``on_bad="skip"``).
        source: Where the rows came from, for messages.
    """

    rows: list[Any]
    source: DataSource
    truncated: int = 0
    dropped: list[int] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the run's log: rows kept, truncated, dropped and skipped (the first few named)."""
        parts = [f"{len(self.rows)} rows", f"{self.truncated} truncated"]
        if self.dropped:
            more = " ..." if len(self.dropped) > SHOWN_BAD_ROWS else ""
            parts.append(f"{len(self.dropped)} dropped (the prompt fills max_length: lines "
                         f"{', '.join(map(str, self.dropped[:SHOWN_BAD_ROWS]))}{more})")
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped ({_bad_rows(self.source, self.skipped)})")
        return f"{self.source}: " + ", ".join(parts)


def _example(prompt: list[int], answer: list[int]) -> Example:
    ids = prompt + answer
    labels = [IGNORE] * len(prompt) + answer
    return Example(ids, labels[1:] + [IGNORE])


def _bad_rows(source: str | DataSource, bad: Sequence[tuple[int, str]]) -> str:
    """The first few bad rows, each named by its file and line (row), and how many more there are."""
    shown = "; ".join(f"{locate(source, line)}: {reason}" for line, reason in bad[:SHOWN_BAD_ROWS])
    return shown + (f"; and {len(bad) - SHOWN_BAD_ROWS} more" if len(bad) > SHOWN_BAD_ROWS else "")


# --------------------------------------------------------------------------------------------------------------
# Rows to prompt and answers
# --------------------------------------------------------------------------------------------------------------


def _messages(value: Any, name: str) -> list[dict[str, str]]:
    """A list of ``{role, content}`` messages, checked."""
    if not isinstance(value, list) or not value:
        raise _BadRow(f"{name!r} must be a non-empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise _BadRow(f"{name}[{i}] needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise _BadRow(f"{name}[{i}] has role {m['role']!r}; allowed: {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise _BadRow(f"{name}[{i}]['content'] is not a string")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _sharegpt(value: Any, name: str) -> dict[str, str]:
    """One LLaMA-Factory ``{from, value}`` message as ``{role, content}``."""
    if not isinstance(value, dict) or "from" not in value or "value" not in value:
        raise _BadRow(f"{name} needs 'from' and 'value'")
    if value["from"] not in SHAREGPT_ROLES:
        raise _BadRow(f"{name} is from {value['from']!r}; allowed: {', '.join(SHAREGPT_ROLES)}")
    if not isinstance(value["value"], str):
        raise _BadRow(f"{name}['value'] is not a string")
    return {"role": SHAREGPT_ROLES[value["from"]], "content": value["value"]}


def _require(record: dict[str, Any], *names: str) -> None:
    for name in names:
        if name not in record:
            raise _BadRow(f"missing field {name!r} (fields: {', '.join(record) or 'none'})")


def _is_empty(answer: Text) -> bool:
    if isinstance(answer, str):
        return not answer.strip()
    return not any(m["content"].strip() for m in answer)


def _split_prompt(chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    """TRL's ``extract_prompt``: the prompt is the common prefix of the two full texts (characters, or messages);
    a space just before the first difference goes with the answers."""
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def pair_of(record: dict[str, Any]) -> tuple[Text, Text, Text]:
    """``(prompt, chosen, rejected)`` of one preference row, strings or message lists.

    Raises:
        ValueError: The row is none of the formats, or unusable (with the reason, not the line).
    """
    if "conversations" in record:
        _require(record, "chosen", "rejected")
        turns = record["conversations"]
        if not isinstance(turns, list) or not turns:
            raise _BadRow("'conversations' must be a non-empty list of {from, value} messages")
        prompt: Text = [_sharegpt(m, f"conversations[{i}]") for i, m in enumerate(turns)]
        chosen: Text = [_sharegpt(record["chosen"], "chosen")]
        rejected: Text = [_sharegpt(record["rejected"], "rejected")]
        for name, answer in (("chosen", chosen), ("rejected", rejected)):
            if answer[0]["role"] != "assistant":
                raise _BadRow(f"{name} is not the assistant's answer (from 'gpt')")
    elif "prompt" in record:
        _require(record, "chosen", "rejected")
        prompt, chosen, rejected = record["prompt"], record["chosen"], record["rejected"]
        if all(isinstance(v, str) for v in (prompt, chosen, rejected)):
            pass
        elif all(isinstance(v, list) for v in (prompt, chosen, rejected)):
            prompt, chosen, rejected = (_messages(prompt, "prompt"), _messages(chosen, "chosen"),
                                        _messages(rejected, "rejected"))
        else:
            raise _BadRow("'prompt', 'chosen' and 'rejected' must all be strings or all be message lists")
    else:
        _require(record, "chosen", "rejected")
        chosen, rejected = record["chosen"], record["rejected"]
        if any(isinstance(v, dict) and "from" in v for v in (chosen, rejected)):
            raise _BadRow("missing field 'conversations': a LLaMA-Factory row has conversations, chosen and rejected")
        if isinstance(chosen, list) and isinstance(rejected, list):
            chosen, rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
        elif not (isinstance(chosen, str) and isinstance(rejected, str)):
            raise _BadRow("'chosen' and 'rejected' must both be strings or both be message lists")
        if chosen == rejected:
            raise _BadRow("chosen and rejected are the same")
        prompt, chosen, rejected = _split_prompt(chosen, rejected)
        if not prompt:
            raise _BadRow("chosen and rejected share no prompt (their common start is empty)")
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if _is_empty(answer):
            raise _BadRow(f"empty {name} answer")
    if chosen == rejected:
        raise _BadRow("chosen and rejected are the same")
    return prompt, chosen, rejected


def unpaired_of(record: dict[str, Any]) -> list[tuple[Text, Text, bool]]:
    """``(prompt, completion, desirable)`` of one KTO row (two for a paired row).

    Raises:
        ValueError: The row is none of the formats, or unusable (with the reason, not the line).
    """
    if "completion" not in record and "messages" not in record and "chosen" in record:
        prompt, chosen, rejected = pair_of(record)  # TRL unpairs paired data
        return [(prompt, chosen, True), (prompt, rejected, False)]
    _require(record, "label")
    label = record["label"]
    if not isinstance(label, bool):
        raise _BadRow(f"'label' must be true or false, got {label!r}")
    if "messages" in record:
        messages = _messages(record["messages"], "messages")
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise _BadRow("the last message must be the assistant's answer, after at least one prompt message")
        prompt: Text = messages[:-1]
        completion: Text = messages[-1:]
    else:
        if "prompt" not in record and "completion" not in record:
            raise _BadRow(f"missing the example: a KTO row has 'messages', or 'prompt' and 'completion' (fields: "
                          f"{', '.join(record)})")
        _require(record, "prompt", "completion")
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list) and isinstance(completion, list):
            prompt, completion = _messages(prompt, "prompt"), _messages(completion, "completion")
        elif not (isinstance(prompt, str) and isinstance(completion, str)):
            raise _BadRow("'prompt' and 'completion' must both be strings or both be message lists")
    if _is_empty(completion):
        raise _BadRow("empty completion")
    return [(prompt, completion, label)]


# --------------------------------------------------------------------------------------------------------------
# Tokenizing and truncating
# --------------------------------------------------------------------------------------------------------------


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_answers(tokenizer: Any, prompt: Text, answers: Sequence[Text]) -> tuple[list[int], list[list[int]]]:
    """The prompt's ids and each answer's ids, as TRL's DPO/KTO trainers tokenize them (see the module's notes).

    Returns:
        ``(prompt_ids, [answer_ids, ...])``: the prompt is the longest prefix shared by the prompt's ids and every
        prompt + answer's ids.
    """
    if isinstance(prompt, list):
        head = prompt_ids(tokenizer, prompt)
        fulls = [encode(tokenizer, tokenizer.apply_chat_template(prompt + list(a), tokenize=False))
                 for a in answers]
    else:
        eos = tokenizer.eos_token or ""
        head = tokenizer(text=prompt)["input_ids"]
        fulls = [tokenizer(text=prompt + (a if a.endswith(eos) else a + eos))["input_ids"] for a in answers]
    n = min(_common_prefix(head, full) for full in fulls)
    return head[:n], [full[n:] for full in fulls]


def _truncate(prompt: list[int], answers: list[list[int]], max_length: int | None, max_prompt_length: int | None
              ) -> tuple[list[int], list[list[int]], bool] | None:
    """The prompt cut to ``max_prompt_length`` (keeping its end) and the answers to ``max_length`` (keeping their
    start); None when the prompt alone fills ``max_length``. The bool says whether anything was cut."""
    cut = False
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt, cut = prompt[len(prompt) - max_prompt_length:], True
    if max_length is None:
        return prompt, answers, cut
    if len(prompt) >= max_length:
        return None
    room = max_length - len(prompt)
    cut = cut or any(len(a) > room for a in answers)
    return prompt, [a[:room] for a in answers], cut


def tokenize_pair(tokenizer: Any, prompt: Text, chosen: Text, rejected: Text, max_length: int | None = 1024,
                  max_prompt_length: int | None = None, line: int = 0) -> tuple[PreferencePair, bool] | None:
    """One pair tokenized and truncated as TRL's DPOTrainer does, and whether it was cut; None when its prompt alone
    fills ``max_length``."""
    head, answers = tokenize_answers(tokenizer, prompt, [chosen, rejected])
    fitted = _truncate(head, answers, max_length, max_prompt_length)
    if fitted is None:
        return None
    head, (chosen_ids, rejected_ids), cut = fitted
    return PreferencePair(line, head, chosen_ids, rejected_ids), cut


def _check_options(on_bad: str, max_length: int | None, max_prompt_length: int | None) -> None:
    if on_bad not in ON_BAD:
        raise InvalidValue(f"on_bad must be one of {', '.join(ON_BAD)}, got {on_bad!r}")
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise InvalidValue(f"{name} must be a positive integer or None, got {value!r}")


def _rows(path: str | Path | DataSource, parse: Any, on_bad: str) -> tuple[DataSource, list, list]:
    """The parsed rows of a file with their lines, and the bad rows; refuses them all at once with ``error``."""
    source = data_source(path)
    good, bad = [], []
    for line, record in read_records(source):
        try:
            good.append((line, parse(record)))
        except _BadRow as err:
            bad.append((line, str(err)))
    if bad and (on_bad == "error" or not good):
        what = "no usable rows" if not good else f"{len(bad)} row{'s' * (len(bad) > 1)} cannot be used"
        hint = " (--bad-rows skip leaves them out)" if good else ""
        raise DataError(f"{source}: {what}: {_bad_rows(source, bad)}{hint}")
    return source, good, bad


def load_pairs(path: str | Path | DataSource, tokenizer: Any, max_length: int | None = 1024,
               max_prompt_length: int | None = None, on_bad: str = "skip") -> PreferenceData:
    """The preference pairs of a file, tokenized and truncated as TRL's DPOTrainer does.

    Args:
        path: A JSON/JSONL/parquet/Arrow file or a ``save_to_disk`` folder of preference rows.
        tokenizer: The model's tokenizer (its chat template renders conversational rows).
        max_length: The most tokens of prompt + answer (TRL's default 1024); None: no limit.
        max_prompt_length: The most prompt tokens (its start is cut); None: no limit.
        on_bad: ``skip`` leaves unusable rows out (listed in ``skipped``); ``error`` refuses the file.

    Raises:
        DataError: With ``error``, the bad rows (count and the first few, by line); with either, a file with no
            usable row.
    """
    _check_options(on_bad, max_length, max_prompt_length)
    source, rows, bad = _rows(path, pair_of, on_bad)
    data = PreferenceData([], source, skipped=bad)
    for line, (prompt, chosen, rejected) in rows:
        fitted = tokenize_pair(tokenizer, prompt, chosen, rejected, max_length, max_prompt_length, line)
        if fitted is None:
            data.dropped.append(line)
            continue
        pair, cut = fitted
        data.truncated += cut
        data.rows.append(pair)
    if not data.rows:
        raise DataError(f"{source}: every prompt fills max_length={max_length}; raise it")
    return data


def load_unpaired(path: str | Path | DataSource, tokenizer: Any, max_length: int | None = 1024,
                  max_prompt_length: int | None = None, on_bad: str = "skip") -> PreferenceData:
    """The KTO examples of a file, tokenized and truncated as TRL's KTOTrainer does (arguments as
    :func:`load_pairs`)."""
    _check_options(on_bad, max_length, max_prompt_length)
    source, rows, bad = _rows(path, unpaired_of, on_bad)
    data = PreferenceData([], source, skipped=bad)
    for line, examples in rows:
        for prompt, completion, desirable in examples:
            head, (answer,) = tokenize_answers(tokenizer, prompt, [completion])
            fitted = _truncate(head, [answer], max_length, max_prompt_length)
            if fitted is None:
                data.dropped.append(line)
                continue
            head, (answer,), cut = fitted
            data.truncated += cut
            data.rows.append(UnpairedExample(line, head, answer, desirable))
    if not data.rows:
        raise DataError(f"{source}: every prompt fills max_length={max_length}; raise it")
    return data


def kl_example(example: UnpairedExample, partner: UnpairedExample, max_length: int | None = 1024) -> Example:
    """KTO's mismatched KL row: ``example``'s prompt followed by ``partner``'s completion, cut to ``max_length``
    (keeping its start). Its log-ratio estimates the reference point."""
    row = _example(example.prompt_ids, partner.completion_ids)
    if max_length is not None and len(row) > max_length:
        row = Example(row.input_ids[:max_length], row.targets[:max_length - 1] + [IGNORE])
    return row


def mismatched(examples: Sequence[UnpairedExample], max_length: int | None = 1024) -> list[Example]:
    """KTO's KL rows for one batch: each prompt followed by the *previous* example's completion (the first by the
    last's), TRL's rotation (see :func:`kl_example`)."""
    if len(examples) < 2:
        raise InvalidValue(f"KTO's KL estimate needs at least 2 examples per batch, got {len(examples)}")
    return [kl_example(e, examples[i - 1], max_length) for i, e in enumerate(examples)]
