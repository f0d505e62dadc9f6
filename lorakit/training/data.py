"""Reading datasets, rendering them into token ids with loss masks, and batching (padded or packed).

Causal LM examples become :class:`Example`: token ids and *next-token targets*, already shifted inside each
example (``targets[t]`` is the token that should follow ``input_ids[t]``, or :data:`IGNORE`). Because the shift
happens per example, examples can be concatenated into one row (packing) without a target ever crossing into
the next example; the position ids restart at 0 for each example, which is how Hugging Face models recognise
packed sequences and keep attention inside each one.

Every reader error names the file and the line (1-based) it found wrong. Parquet and Arrow files and folders written
by ``datasets``' ``save_to_disk`` (read with the ``datasets`` library, ``pip install 'lorakit[data]'``) give the
same records as JSONL files: every reader takes them, and its errors name the file, the split and the row (1-based).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..core.errors import InvalidValue, MissingDependency, MissingFile
from ..models.chat import encode

if TYPE_CHECKING:
    from .options import TrainConfig

IGNORE = -100  # a target that takes no loss (PyTorch's ignore_index)


@dataclass(frozen=True)
class Example:
    """One tokenized causal-LM example: token ids and the shifted next-token targets (same length)."""

    input_ids: list[int]
    targets: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        return sum(t != IGNORE for t in self.targets)


class DataError(InvalidValue):
    """A dataset file that cannot be read as asked; the message names the file and line."""


# --------------------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------------------


TEXT_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".txt")  # read by lorakit itself
ARROW_SUFFIXES = (".parquet", ".arrow")  # read with the datasets library, as are save_to_disk folders
TRAIN_SPLITS = ("train",)  # the split --data reads from a DatasetDict folder unless --split names one
EVAL_SPLITS = ("validation", "test")  # the split --eval-data reads (the first the folder has) unless --eval-split
DATASETS_MISSING = "pip install 'lorakit[data]'"


@dataclass(frozen=True)
class DataSource:
    """Where records come from: a file, or a folder written by ``datasets``' ``save_to_disk``, and for a folder of
    a ``DatasetDict`` the split. Made by :func:`data_source`, which checks that it exists and picks the split.

    Attributes:
        path: The file or folder.
        kind: ``text`` (JSON, JSONL, CSV, TSV, .txt), ``parquet``, ``arrow``, ``dataset`` (a saved ``Dataset``) or
            ``dataset_dict`` (a saved ``DatasetDict``).
        split: The split of a ``dataset_dict`` folder; None for the others.
    """

    path: Path
    kind: str
    split: str | None = None

    def __str__(self) -> str:
        """How messages name it: the path, and the split of a DatasetDict folder."""
        return str(self.path) if self.split is None else f"{self.path} (split {self.split!r})"

    @property
    def is_arrow(self) -> bool:
        """Read with ``datasets`` (rows), not by lorakit's text readers (lines)."""
        return self.kind != "text"


def _kind(path: Path) -> str:
    """What ``path`` holds (see :class:`DataSource`), after checking it exists and is not empty."""
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            return "dataset_dict"
        if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
            return "dataset"
        raise DataError(f"{path} is a folder, but not one written by datasets' save_to_disk (it has no "
                        f"dataset_dict.json, nor state.json and dataset_info.json); the data is a file "
                        f"({', '.join(TEXT_SUFFIXES + ARROW_SUFFIXES)}) or such a folder")
    if not path.is_file():
        raise MissingFile(f"dataset file {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    return path.suffix.lower().lstrip(".") if path.suffix.lower() in ARROW_SUFFIXES else "text"


def existing_file(path: str | Path | DataSource) -> Path:
    """``path`` as a ``Path``, after checking it is a non-empty file or a ``save_to_disk`` folder (with an error
    that names it)."""
    path = path.path if isinstance(path, DataSource) else Path(path)
    _kind(path)
    return path


def data_source(path: str | Path | DataSource, split: str | None = None, default_splits: Sequence[str] = ()
                ) -> DataSource:
    """The :class:`DataSource` of ``path``: its kind and, for a ``DatasetDict`` folder, the split to read:
    ``split`` when given, else the first of ``default_splits`` the folder has, else its only split.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataError: An empty file; a folder ``save_to_disk`` did not write; a split the folder does not have (with
            the splits it has); a ``split`` for a source that has no splits.
    """
    if isinstance(path, DataSource):
        if split is not None and split != path.split:
            raise InvalidValue(f"{path} is already read as split {path.split!r}, not {split!r}")
        return path
    path = Path(path)
    kind = _kind(path)
    if kind != "dataset_dict":
        if split is not None:
            what = {"text": "a text file", "parquet": "a parquet file", "arrow": "an Arrow file",
                    "dataset": "a folder saved from one Dataset"}[kind]
            raise DataError(f"{path}: split {split!r} asked for, but {what} has no splits; only a folder saved from "
                            f"a DatasetDict has (leave --split / --eval-split out)")
        return DataSource(path, kind)
    try:
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{path / 'dataset_dict.json'} is damaged ({type(err).__name__}: {err}); save the "
                        f"DatasetDict again") from None
    if not isinstance(splits, list) or not splits or not all(isinstance(s, str) for s in splits):
        raise DataError(f"{path / 'dataset_dict.json'}: 'splits' must be a non-empty list of names, got {splits!r}")
    if split is None:
        split = next((s for s in default_splits if s in splits), None)
        if split is None and len(splits) == 1 and not default_splits:
            split = splits[0]
        if split is None:
            wanted = f"none is {' or '.join(map(repr, default_splits))}; " if default_splits else ""
            raise DataError(f"{path} holds the splits {', '.join(splits)}: {wanted}choose one with --split "
                            f"(--eval-split for --eval-data), or give the split's own folder, {path / splits[0]}")
    if split not in splits:
        raise DataError(f"{path}: no split {split!r}; its splits are {', '.join(splits)}")
    return DataSource(path, kind, split)


def locate(source: str | Path | DataSource, row: int) -> str:
    """How a message names one record: ``data.jsonl:17`` (line 17) in a text file; ``data.parquet, row 17`` or
    ``folder (split 'train'), row 17`` (the table's 1-based row) in parquet, Arrow and ``save_to_disk`` data."""
    if isinstance(source, DataSource):
        arrow = source.is_arrow
    else:
        arrow = Path(source).suffix.lower() in ARROW_SUFFIXES or Path(source).is_dir()
    return f"{source}, row {row}" if arrow else f"{source}:{row}"


def train_source(config: TrainConfig) -> DataSource:
    """The source of ``--data``: for a DatasetDict folder, ``--split`` (default: ``train``)."""
    return data_source(config.data, config.split, TRAIN_SPLITS)


def eval_source(config: TrainConfig) -> DataSource:
    """The source of ``--eval-data``: for a DatasetDict folder, ``--eval-split`` (default: ``validation``, else
    ``test``)."""
    return data_source(config.eval_data, config.eval_split, EVAL_SPLITS)


def arrow_dataset(source: DataSource) -> Any:
    """The ``datasets.Dataset`` of a parquet file, an Arrow file (IPC stream, as ``datasets`` writes them, or IPC
    file/Feather v2) or a ``save_to_disk`` folder (the source's split). Nothing is written: no cache, no copy.

    Raises:
        ImportError: ``datasets`` is not installed (with what to install).
        DataError: A file or folder that ``datasets``/``pyarrow`` cannot read (with their reason).
    """
    try:
        import datasets
        import pyarrow as pa
    except ImportError:
        raise MissingDependency(f"reading {source.path} (parquet, Arrow or a save_to_disk folder) needs the datasets "
                                f"library: {DATASETS_MISSING}") from None
    try:
        if source.kind == "parquet":
            import pyarrow.parquet as pq

            # pyarrow directly: Dataset.from_parquet would first copy the file into the datasets cache.
            return datasets.Dataset(pq.read_table(source.path))
        if source.kind == "arrow":
            try:
                return datasets.Dataset.from_file(str(source.path))  # IPC stream, memory-mapped
            except pa.ArrowInvalid:
                # IPC file format (Feather v2); the map stays open as long as the table's buffers point into it
                return datasets.Dataset(pa.ipc.open_file(pa.memory_map(str(source.path))).read_all())
        folder = source.path if source.split is None else source.path / source.split
        return datasets.Dataset.load_from_disk(str(folder))
    except (pa.ArrowException, OSError, ValueError, KeyError) as err:
        if isinstance(err, FileNotFoundError) and source.split is not None:
            raise DataError(f"{source}: the split's folder is missing or incomplete ({err})") from None
        raise DataError(f"{source}: not readable as {source.kind} ({type(err).__name__}: {err})") from None


def arrow_records(source: DataSource) -> list[tuple[int, dict[str, Any]]]:
    """The rows of a parquet/Arrow/``save_to_disk`` source as ``(row, record)``, rows numbered from 1: the same
    records a JSONL file with these objects gives (a null cell is ``None``, as JSON's null)."""
    dataset = arrow_dataset(source)
    if dataset.num_rows == 0:
        raise DataError(f"{source}: no rows")
    return list(_arrow_rows(dataset))


def _arrow_rows(dataset: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(row, record)`` of each row, made one at a time from the columns: a reader that keeps only some values
    never holds a dict per row at once (tens of thousands of live dicts make Python's garbage collector rescan
    them over and over, which tripled the time to read SST-2's 67k rows)."""
    columns = dataset.to_dict()  # name → list of values, nulls as None
    names = list(columns)
    for row, values in enumerate(zip(*columns.values()), 1):
        yield row, dict(zip(names, values))


def read_text(path: str | Path) -> str:
    """The text of a UTF-8 file; a byte that is not UTF-8 is an error naming the file and its line."""
    path = existing_file(path)
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(f"{path}:{line}: byte 0x{raw[err.start]:02x} (column {column}) is not UTF-8; save the file "
                        f"as UTF-8") from None


def read_records(path: str | Path | DataSource) -> list[tuple[int, dict[str, Any]]]:
    """The records of a JSONL file (one object per line) or a JSON file (an array of objects), with line numbers;
    or of a parquet/Arrow file or ``save_to_disk`` folder (one per row), with row numbers.

    Raises:
        FileNotFoundError: The file does not exist.
        DataError: Empty file, malformed JSON (with the line), or a record that is not an object.
    """
    source = data_source(path)
    if source.is_arrow:
        return arrow_records(source)
    path = source.path
    text = read_text(path)
    records: list[tuple[int, Any]] = []
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: malformed JSON: {err.msg}") from None
        except RecursionError:
            raise DataError(f"{path}: JSON nested too deeply to read; expected an array of objects") from None
        # A JSON array does not keep line numbers per item; find each object's opening line for messages.
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            bad = next(i for i, item in enumerate(items) if not isinstance(item, dict)) if isinstance(items, list) \
                else None
            what = f"item {bad}" if bad is not None else "the file"
            raise DataError(f"{path}: {what} is not a JSON object; expected an array of objects")
        records = list(zip(_object_lines(text), items))
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((lineno, json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: malformed JSON: {err.msg} (column {err.colno})") from None
            except RecursionError:
                raise DataError(f"{path}:{lineno}: JSON nested too deeply to read; expected one object") from None
    if not records:
        raise DataError(f"{path}: no records in the file")
    for lineno, record in records:
        if not isinstance(record, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    return records


def _json_type(value: Any) -> str:
    """How a JSON value reads in a message: null, a number, a list, ..."""
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__)


def _object_lines(text: str) -> list[int]:
    """1-based line numbers where each top-level object of a JSON array starts."""
    lines, depth, line, in_str, escape = [], 0, 1, False, False
    for ch in text:
        if ch == "\n":
            line += 1
        if in_str:
            escape, in_str = (False, in_str) if escape else (ch == "\\", ch != '"')
            continue
        if ch == '"':
            in_str = True
        elif ch in "[{":
            if depth == 1 and ch == "{":
                lines.append(line)
            depth += 1
        elif ch in "]}":
            depth -= 1
    return lines


def read_table(path: str | Path | DataSource, text_field: str = "sentence", label_field: str = "label",
               labels_required: bool = True) -> list[tuple[int, str, str | None]]:
    """``(line, text, label)`` rows of a CSV/TSV file with a header, of a JSONL/JSON file, or of a parquet/Arrow file
    or ``save_to_disk`` folder (``line`` is then the row). Without ``labels_required``, a file with no label column
    (or a record without the field) gives ``None`` labels.

    Raises:
        DataError: Empty file, a missing column or field (with the columns there are), an empty text.
    """
    source = data_source(path)
    path = source.path
    rows: list[tuple[int, str, str | None]] = []
    required = (text_field, label_field) if labels_required else (text_field,)
    if source.is_arrow or path.suffix.lower() in (".jsonl", ".json"):
        if source.is_arrow:
            dataset = arrow_dataset(source)
            for field in required:  # every row has every column: say it once, as for a CSV header
                if field not in dataset.column_names:
                    raise DataError(f"{source}: no column {field!r} (columns: {', '.join(dataset.column_names)})")
            records: Iterable[tuple[int, dict[str, Any]]] = _arrow_rows(dataset)
        else:
            records = read_records(source)
        for lineno, record in records:
            for field in required:
                if field not in record:
                    raise DataError(f"{locate(source, lineno)}: missing field {field!r} (fields: {', '.join(record)})")
            text, label = record[text_field], record.get(label_field)
            if not isinstance(text, str):
                raise DataError(f"{locate(source, lineno)}: {text_field!r} is {_json_type(text)}, not a string")
            if label is not None and (not isinstance(label, (str, int)) or isinstance(label, bool)):
                raise DataError(f"{locate(source, lineno)}: {label_field!r} is {_json_type(label)}; a label is a "
                                f"string or an integer")
            rows.append((lineno, text, None if label is None else str(label)))
    else:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        with io.StringIO(read_text(path), newline="") as f:
            reader = csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else
                                csv.QUOTE_MINIMAL)
            header = next(reader, None)
            if not header:
                raise DataError(f"{path}:1: no header row")
            for field in required:
                if field not in header:
                    raise DataError(f"{path}:1: no column {field!r} (columns: {', '.join(header)})")
            ti = header.index(text_field)
            li = header.index(label_field) if label_field in header else None
            for row in reader:
                lineno = reader.line_num  # the file's line, even after quoted line breaks
                if not row:
                    continue
                if len(row) != len(header):
                    raise DataError(f"{path}:{lineno}: {len(row)} columns, the header has {len(header)}")
                rows.append((lineno, row[ti], None if li is None else row[li]))
    if not rows:
        raise DataError(f"{source}: no rows" if source.is_arrow else f"{path}: no rows after the header")
    for lineno, text, _ in rows:
        if not text.strip():
            raise DataError(f"{locate(source, lineno)}: empty {text_field!r}")
    return rows


def read_prompts(path: str | Path | DataSource) -> list[tuple[int, list[dict[str, str]], str | None]]:
    """``(line, chat, reference)`` of each prompt in a file, for generating answers: chat records (the messages
    before the last assistant turn; that turn is the reference), Alpaca records (``instruction`` and ``input``;
    ``output``, when present, is the reference), ``{"prompt": ...}`` records (in JSON/JSONL, parquet, Arrow or
    ``save_to_disk`` data), or a ``.txt`` file with one prompt per non-blank line.

    Raises:
        DataError: A record that is none of these (with its file and line), or no prompt at all.
    """
    source = data_source(path)
    path = source.path
    if path.suffix.lower() == ".txt" and not source.is_arrow:
        prompts = [(i, [{"role": "user", "content": line.strip()}], None)
                   for i, line in enumerate(read_text(path).splitlines(), 1) if line.strip()]
        if not prompts:
            raise DataError(f"{path}: the file holds only blank lines")
        return prompts
    out: list[tuple[int, list[dict[str, str]], str | None]] = []
    for lineno, record in read_records(source):
        at = locate(source, lineno)
        if "prompt" in record and "messages" not in record and "instruction" not in record:
            if not isinstance(record["prompt"], str) or not record["prompt"].strip():
                raise DataError(f"{at}: 'prompt' must be a non-empty string")
            out.append((lineno, [{"role": "user", "content": record["prompt"]}], None))
            continue
        if "messages" not in record and "instruction" in record and "output" not in record:
            record = {**record, "output": ""}  # a prompt without a reference answer
        chat = chat_of(record, at) if "messages" not in record or any(
            m.get("role") == "assistant" for m in record["messages"] if isinstance(m, dict)) else None
        if chat is None:  # a chat that ends with the user's turn: all of it is the prompt
            chat = chat_of({"messages": [*record["messages"], {"role": "assistant", "content": ""}]}, at)
        last = max(i for i, m in enumerate(chat) if m["role"] == "assistant")
        reference = chat[last]["content"] or None
        if not any(m["role"] == "user" for m in chat[:last]):
            raise DataError(f"{at}: no user message before the answer")
        out.append((lineno, chat[:last], reference))
    return out


def chat_of(record: dict[str, Any], where: str) -> list[dict[str, str]]:
    """The chat messages of an Alpaca record (``instruction``, optional ``input``, ``output``) or a chat record
    (``messages``: a list of ``{role, content}`` with at least one assistant turn)."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"{where}: messages[{i}] needs 'role' and 'content'")
            if m["role"] not in ("system", "user", "assistant"):
                raise DataError(f"{where}: messages[{i}] has role {m['role']!r}; allowed: system, user, assistant")
            if not isinstance(m["content"], str):
                raise DataError(f"{where}: messages[{i}]['content'] is {_json_type(m['content'])}, not a string")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: no assistant message to learn from")
        return messages
    for field in ("instruction", "output"):
        if field not in record:
            raise DataError(f"{where}: missing field {field!r}; an Alpaca record has 'instruction', 'input' "
                            f"(optional) and 'output', a chat record has 'messages'")
    for field in ("instruction", "input", "output"):
        if field in record and not isinstance(record[field], str) and not (field == "input" and record[field] is None):
            raise DataError(f"{where}: {field!r} is {_json_type(record[field])}, not a string")
    prompt = record["instruction"]
    if record.get("input"):
        prompt = f"{prompt}\n\n{record['input']}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]


# --------------------------------------------------------------------------------------------------------------
# Tokenizing
# --------------------------------------------------------------------------------------------------------------


def tokenize_chat(tokenizer: Any, messages: Sequence[dict[str, str]], max_length: int) -> Example:
    """Render a conversation with the tokenizer's chat template; the loss is on the assistant turns only.

    Each turn is tokenized as the difference between the rendering up to it and the rendering before it, so the
    prompt tokens are exactly those ``prompt_ids`` gives at inference time. Truncated at ``max_length``.
    """
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            head = tokenizer.apply_chat_template(list(messages[:i]), add_generation_prompt=True, tokenize=False)
            piece = encode(tokenizer, head[len(rendered):])
            ids += piece
            labels += [IGNORE] * len(piece)
            rendered = head
        full = tokenizer.apply_chat_template(list(messages[:i + 1]), tokenize=False)
        if not full.startswith(rendered):
            raise InvalidValue("the tokenizer's chat template does not render conversations as growing prefixes; "
                               "lorakit cannot tell the assistant's tokens apart")
        piece = encode(tokenizer, full[len(rendered):])
        ids += piece
        labels += piece if message["role"] == "assistant" else [IGNORE] * len(piece)
        rendered = full
    ids, labels = ids[:max_length], labels[:max_length]
    return Example(ids, labels[1:] + [IGNORE])


def tokenize_text(tokenizer: Any, text: str, max_length: int) -> list[Example]:
    """Plain language modelling: the text (with EOS appended) in chunks of ``max_length`` tokens, loss on all."""
    ids = encode(tokenizer, text) + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    chunks = [ids[i:i + max_length] for i in range(0, len(ids), max_length)]
    return [Example(c, c[1:] + [IGNORE]) for c in chunks if len(c) > 1]


def load_causal_lm(path: str | Path | DataSource, tokenizer: Any, max_length: int) -> list[Example]:
    """Causal-LM examples from a JSON/JSONL file (or parquet, Arrow, ``save_to_disk`` data) of Alpaca records, chat
    records or ``{"text": ...}`` records, or from a ``.txt`` file (plain text, one document per blank-line-separated
    block)."""
    source = data_source(path)
    path = source.path
    if path.suffix.lower() == ".txt" and not source.is_arrow:
        blocks = [b for b in read_text(path).split("\n\n") if b.strip()]
        if not blocks:
            raise DataError(f"{path}: the file holds only blank lines")
        return [e for block in blocks for e in tokenize_text(tokenizer, block, max_length)]
    examples: list[Example] = []
    for lineno, record in read_records(source):
        at = locate(source, lineno)
        if "text" in record and "messages" not in record and "instruction" not in record:
            if not isinstance(record["text"], str):
                raise DataError(f"{at}: 'text' is {_json_type(record['text'])}, not a string")
            examples += tokenize_text(tokenizer, record["text"], max_length)
            continue
        example = tokenize_chat(tokenizer, chat_of(record, at), max_length)
        if example.n_targets == 0:
            raise DataError(f"{at}: no response tokens left within max_length={max_length}")
        examples.append(example)
    return examples


# --------------------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------------------


def pad_batch(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded rows with an attention mask; padding takes no loss."""
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e)] = torch.tensor(e.input_ids)
        targets[i, :len(e)] = torch.tensor(e.targets)
        mask[i, :len(e)] = 1
    return {"input_ids": ids, "attention_mask": mask, "targets": targets}


def pack_batch(examples: Sequence[Example], max_length: int, pad_id: int, segments: bool = False
               ) -> dict[str, torch.Tensor]:
    """Padding-free packing: examples concatenated (in order) into rows of at most ``max_length`` tokens.

    Position ids restart at 0 for every example, so the model keeps attention inside each example (Hugging Face
    models derive a block-diagonal causal mask from them when no attention mask is given). The tail of a row
    shorter than the longest becomes one more filler "example" of pad tokens with no loss. With ``segments`` the
    result also holds ``segments``: the index of the example each token belongs to (-1 for filler), for losses
    summed per example.
    """
    rows: list[list[Example]] = [[]]
    used = 0
    for e in examples:
        if rows[-1] and used + len(e) > max_length:
            rows.append([])
            used = 0
        rows[-1].append(e)
        used += len(e)
    width = max(sum(len(e) for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    owner = torch.full((len(rows), width), -1, dtype=torch.long)
    k = 0
    for i, row in enumerate(rows):
        start = 0
        for e in row:
            end = start + len(e)
            ids[i, start:end] = torch.tensor(e.input_ids)
            targets[i, start:end] = torch.tensor(e.targets)
            positions[i, start:end] = torch.arange(len(e))
            owner[i, start:end] = k
            start, k = end, k + 1
        positions[i, start:] = torch.arange(width - start)
    packed = {"input_ids": ids, "position_ids": positions, "targets": targets}
    return {**packed, "segments": owner} if segments else packed


def pad_encodings(encodings: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Tokenizer outputs of different lengths (``input_ids``, ``attention_mask``, ``token_type_ids``, ...) right-padded
    into tensors: ``input_ids`` with ``pad_id``, every other field with 0 (masked out, segment 0)."""
    width = max(len(e["input_ids"]) for e in encodings)
    out = {}
    for key in encodings[0]:
        tensor = torch.full((len(encodings), width), pad_id if key == "input_ids" else 0, dtype=torch.long)  # (B, L)
        for row, e in enumerate(encodings):
            tensor[row, :len(e[key])] = torch.tensor(e[key])
        out[key] = tensor
    return out
