"""The serving engine: one base model, many LoRA adapters, and a scheduler that batches requests across adapters.

One thread owns the model. It runs *continuous batching*: at every decoding step it admits waiting requests (a
prefill pass over their prompts, its KV cache left-padded and joined to the running batch's), then runs one
decoding step for every running row. Rows that use different adapters share that step through the mixed-batch
forward (``LoraModel.mixed_batch``: each row gathers its own A and B); when every row uses one adapter, the plain
forward with that adapter active is used instead. Finished rows leave the batch at once.

Which adapters are in the model is :class:`~lorakit.serve.slots.AdapterSlots`' business (LRU, reload on demand).
Adapters are loaded and unloaded by the scheduler thread between steps (:meth:`Engine.call`), so nothing changes
under a running forward.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..config import BASE_ROW, check_adapter_name
from .kv_cache import concat_caches, joinable, left_pad_cache, new_cache, slice_cache
from .sampling import RequestError, SamplingParams, TextStream, next_token
from .slots import AdapterSlots

logger = logging.getLogger("lorakit.serve")


@dataclass
class Event:
    """What the engine tells a request's owner: a piece of text, then one final event with ``finish_reason``
    ("stop": a stop string or end of sequence; "length": ``max_tokens``) or ``error``."""

    text: str = ""
    finish_reason: str | None = None
    error: RequestError | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass
class Request:
    """One generation: prompt token ids, the adapter to use (None: the base), sampling, and where events go.

    ``emit`` is called from the scheduler thread; it must not block.
    """

    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    emit: Callable[[Event], None]
    cancelled: bool = False  # set by the owner (a client went away): the row leaves the batch at the next step


@dataclass
class _Row:
    request: Request
    stream: TextStream
    generator: torch.Generator
    pending: int = -1  # the last sampled token, fed to the model at the next step
    position: int = 0  # the position id of ``pending``
    generated: int = 0


class Engine:
    """Serves one causal LM with many adapters. Thread-safe: ``submit``, ``call`` and the properties may be used
    from any thread; the model itself is only touched by the scheduler thread.

    Args:
        model: A Hugging Face causal LM (its weights frozen; a 4-bit base works too).
        tokenizer: Its tokenizer (with a chat template for chat requests).
        base_name: The name that selects the base model in requests (None: the base is not served, as in
            merged mode).
        adapters: Adapters to register at start, name -> folder (loaded lazily when more than ``max_adapters``).
        max_adapters: Most adapters resident at once; the least recently used is evicted.
        adapter_root: The folder under which runtime loads (``load_adapter``) must lie; None turns them off.
        max_batch_size: Most requests decoded together.
        max_tokens: The largest ``max_tokens`` a request may ask for.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, base_name: str | None = "base",
                 adapters: dict[str, str | Path] | None = None, max_adapters: int = 8,
                 adapter_root: str | Path | None = None, max_batch_size: int = 32, max_tokens: int = 1024) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.model = model.eval()  # LoRA layers are injected into it in place: it is always the model to call
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.max_batch_size = max_batch_size
        self.max_tokens = max_tokens
        self.context_length = _context_length(model, tokenizer)
        self.eos_ids = _eos_ids(model, tokenizer)
        self._takes_logits_to_keep = _accepts(model, "logits_to_keep")
        self._cache_argument = "cache" if _accepts(model, "cache") else "past_key_values"  # renamed in transformers 5
        self.slots = AdapterSlots(model, max_adapters, adapter_root, before_change=self._close_routing)
        self._waiting: collections.deque[Request] = collections.deque()
        self._commands: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self._rows: list[_Row] = []
        self._cache: Any = None  # the running batch's KV cache
        self._mask: torch.Tensor | None = None  # (rows, cached tokens): 1 for real tokens, 0 for left padding
        self._warned_static = False
        self._routing: tuple[tuple[str | None, ...], ExitStack] | None = None  # the mixed-batch routing now set
        self._cv = threading.Condition()
        self._closing = False
        self.stats = Stats()
        for i, (name, path) in enumerate((adapters or {}).items()):
            if name == base_name:
                raise ValueError(f"adapter name {name!r} is the base model's name; choose another")
            self.slots.register(name, Path(path).resolve())
            try:  # a bad folder is an error now, not a 400 on the first request for it
                if i < max_adapters:
                    self.slots.place(name, busy=set())
                elif not (self.slots.paths[name] / "adapter_config.json").is_file():
                    raise RequestError(400, f"{str(self.slots.paths[name])!r} holds no adapter_config.json")
            except RequestError as err:
                raise ValueError(f"adapter {name!r}: {err.message}") from None
        self._thread = threading.Thread(target=self._loop, name="lorakit-scheduler", daemon=True)
        self._thread.start()

    # -- the public surface ------------------------------------------------------------------------------

    @property
    def adapters(self) -> dict[str, Path]:
        """Every registered adapter (resident or not), name -> folder."""
        return dict(self.slots.paths)

    @property
    def resident(self) -> list[str]:
        """The adapters now in the model, least recently used first."""
        return self.slots.resident

    def resolve(self, model: str) -> str | None:
        """The adapter a request's ``model`` field names (None: the base).

        Raises:
            RequestError: 404 when nothing of that name is served.
        """
        if model in self.slots.paths:
            return model
        if self.base_name is not None and model == self.base_name:
            return None
        served = ([self.base_name] if self.base_name is not None else []) + sorted(self.slots.paths)
        raise RequestError(404, f"the model {model!r} does not exist; this server has {served}")

    def submit(self, request: Request) -> None:
        """Queue a request. Its events arrive through ``request.emit``.

        Raises:
            RequestError: 400 for an empty or too long prompt or sampling values outside their ranges, 404 for an
                adapter that is not registered.
        """
        request.params.validate(self.max_tokens)
        if request.adapter is not None and request.adapter not in self.slots.paths:
            raise RequestError(404, f"no adapter named {request.adapter!r}; adapters: {sorted(self.slots.paths)}")
        if not request.prompt_ids:
            raise RequestError(400, "the prompt is empty")
        total = len(request.prompt_ids) + request.params.max_tokens
        if total > self.context_length:
            raise RequestError(400, f"the prompt has {len(request.prompt_ids)} tokens and max_tokens is "
                                    f"{request.params.max_tokens}: {total} tokens, more than the model's context of "
                                    f"{self.context_length}")
        with self._cv:
            if self._closing:
                raise RequestError(503, "the server is shutting down")
            self._waiting.append(request)
            self.stats.requests += 1
            self._cv.notify()

    def call(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """Run ``fn`` on the scheduler thread between two steps and return its result (or raise its error)."""
        future: Future = Future()
        with self._cv:
            if self._closing:
                raise RequestError(503, "the server is shutting down")
            self._commands.append((fn, future))
            self._cv.notify()
        return future.result(timeout)

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Register and load an adapter at runtime (vLLM's ``/v1/load_lora_adapter``).

        ``path`` must lie under ``adapter_root`` (relative paths are taken from there).

        Raises:
            RequestError: 400 for a bad or taken name or an adapter that does not load (the model stays as it
                was), 403 for a path outside ``adapter_root``, 503 when every slot is held by running requests.
        """
        try:
            check_adapter_name(name)
        except ValueError as err:
            raise RequestError(400, str(err)) from None
        if name == self.base_name:
            raise RequestError(400, f"{name!r} is the base model's name; choose another adapter name")
        folder = self.slots.allowed(path)

        def load() -> None:
            slots = self.slots
            if name in slots.paths:
                raise RequestError(400, f"an adapter named {name!r} is already loaded (from {slots.paths[name]})")
            if name in slots.retired:
                raise RequestError(409, f"the adapter {name!r} was unloaded and requests still run on it; load it "
                                        f"again once they finish")
            slots.register(name, folder, rooted=True)
            try:
                if not slots.place(name, busy=self._busy()):
                    raise RequestError(503, f"all {slots.capacity} adapter slots are in use by running requests; "
                                            f"try again shortly")
            except BaseException:
                del slots.paths[name]
                raise

        self.call(load)

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter (vLLM's ``/v1/unload_lora_adapter``): new requests for it get 404; requests already
        running finish with it.

        Raises:
            RequestError: 404 when no adapter has that name.
        """

        def unload() -> None:
            if name not in self.slots.paths:
                raise RequestError(404, f"no adapter named {name!r}; adapters: {sorted(self.slots.paths)}")
            self.slots.unregister(name, self._busy())

        self.call(unload)

    def close(self) -> None:
        """Stop the scheduler; waiting and running requests end with an error event."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(timeout=30)

    def _busy(self) -> set[str]:
        return {row.request.adapter for row in self._rows if row.request.adapter is not None}

    # -- the scheduler -----------------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.no_grad():  # grad mode is per thread
            while True:
                with self._cv:
                    while not (self._commands or self._waiting or self._rows or self._closing):
                        self._cv.wait()
                    if self._closing:
                        break
                    commands = list(self._commands)
                    self._commands.clear()
                if commands:
                    self._close_routing()  # adapters may change: no routing may outlive them
                for fn, future in commands:
                    try:
                        future.set_result(fn())
                    except BaseException as err:  # noqa: BLE001 - handed to the caller
                        future.set_exception(err)
                try:
                    self._admit()
                    if self._rows:
                        self._step()
                except Exception:  # noqa: BLE001 - a bug must not take the server down
                    logger.error("generation failed:\n%s", traceback.format_exc())
                    self._close_routing()
                    self._fail_running(RequestError(500, "internal error during generation (see the server log)"))
        closing = RequestError(503, "the server is shutting down")
        self._close_routing()
        self._fail_running(closing)
        with self._cv:
            waiting, self._waiting = list(self._waiting), collections.deque()
            commands = list(self._commands)
            self._commands.clear()
        for request in waiting:
            request.emit(Event(error=closing))
        for _, future in commands:
            future.set_exception(closing)

    def _admit(self) -> None:
        """Prefill the waiting requests that fit (batch size, adapter slots) and join them to the running batch."""
        space = self.max_batch_size - len(self._rows)
        if space <= 0:
            return
        if self._rows and not joinable(self._cache):
            if not self._warned_static:
                logger.warning("this model's KV cache (%s) cannot be joined: new requests wait for the running "
                               "batch to finish", type(self._cache).__name__)
                self._warned_static = True
            return
        with self._cv:
            waiting, self._waiting = list(self._waiting), collections.deque()
        chosen: list[Request] = []
        later: list[Request] = []
        busy = self._busy()
        for request in waiting:
            if request.cancelled:
                continue
            if len(chosen) == space:
                later.append(request)
                continue
            name = request.adapter
            try:
                if name is not None and name not in self.slots.paths:
                    raise RequestError(404, f"the adapter {name!r} was unloaded")
                if name is not None and not self.slots.place(name, busy):
                    later.append(request)  # its adapter waits for a free slot
                    continue
            except RequestError as err:
                self._finish_error(request, err)
                continue
            if name is not None:
                busy.add(name)
            chosen.append(request)
        with self._cv:
            self._waiting.extendleft(reversed(later))
        if not chosen:
            return
        try:
            self._prefill(chosen)
        except Exception:  # noqa: BLE001 - fail these requests, keep the running ones
            logger.error("prefill failed:\n%s", traceback.format_exc())
            self._close_routing()
            for request in chosen:
                self._finish_error(request, RequestError(500, "internal error during prefill (see the server log)"))

    def _prefill(self, requests: list[Request]) -> None:
        device = self._device()
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), width), self._pad_id(), dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, request in enumerate(requests):
            ids[i, width - len(request.prompt_ids):] = torch.tensor(request.prompt_ids)
            mask[i, width - len(request.prompt_ids):] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # (new rows, width): left padding does not shift positions
        cache = new_cache(self.model)
        logits = self._forward([r.adapter for r in requests], ids.to(device), mask.to(device),
                               positions.to(device), cache)
        rows = [_Row(r, TextStream(self.tokenizer, r.params.stop), r.params.generator(), position=len(r.prompt_ids))
                for r in requests]
        self.stats.prompt_tokens += int(mask.sum())
        keep = self._sample(rows, logits)
        if not keep:
            return
        if len(keep) < len(rows):
            cache.batch_select_indices(torch.tensor(keep, device=device))
        rows, mask = [rows[i] for i in keep], mask[keep].to(device)
        if not self._rows:
            self._rows, self._cache, self._mask = rows, cache, mask
            return
        width = max(self._mask.shape[1], mask.shape[1])
        self._cache = concat_caches(left_pad_cache(self._cache, width), left_pad_cache(cache, width))
        self._mask = torch.cat([F.pad(self._mask, (width - self._mask.shape[1], 0)),
                                F.pad(mask, (width - mask.shape[1], 0))])
        self._rows += rows

    def _step(self) -> None:
        """One decoding step for every running row."""
        device = self._device()
        ids = torch.tensor([[row.pending] for row in self._rows], device=device)  # (rows, 1)
        positions = torch.tensor([[row.position] for row in self._rows], device=device)  # (rows, 1)
        self._mask = F.pad(self._mask, (0, 1), value=1)  # (rows, cached + 1)
        logits = self._forward([row.request.adapter for row in self._rows], ids, self._mask, positions, self._cache)
        for row in self._rows:
            row.position += 1
        keep = self._sample(self._rows, logits)
        if len(keep) < len(self._rows):
            self._drop_rows(keep)

    def _forward(self, adapters: Sequence[str | None], ids: torch.Tensor, mask: torch.Tensor,
                 positions: torch.Tensor, cache: Any) -> torch.Tensor:
        """Next-token logits ``(rows, vocab)`` of a (left-padded) batch whose row i uses ``adapters[i]``."""
        kwargs: dict[str, Any] = {"logits_to_keep": 1} if self._takes_logits_to_keep else {}
        kwargs[self._cache_argument] = cache
        with self._adapters(adapters):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
        self.stats.count_step(len(set(adapters)), len(adapters))
        return out.logits[:, -1, :].float()

    def _adapters(self, adapters: Sequence[str | None]) -> Any:
        """The context in which the model computes row i with ``adapters[i]``.

        Rows with different adapters share one mixed-batch pass; its routing (the stacked A and B of every layer)
        stays set from one step to the next while the rows keep their adapters, since setting it walks every
        layer. Rows that all use one adapter take the plain forward with that adapter active.
        """
        lora = self.slots.lora
        if lora is None:
            return nullcontext()
        key = tuple(adapters)
        if len(set(key)) > 1:
            if self._routing is None or self._routing[0] != key:
                self._close_routing()
                stack = ExitStack()
                stack.enter_context(lora.mixed_batch([BASE_ROW if a is None else a for a in key]))
                self._routing = (key, stack)
            return nullcontext()
        self._close_routing()
        if key[0] is None:
            return lora.disable_adapter()
        if lora.active_adapters != [key[0]]:
            lora.set_adapter(key[0])
        return nullcontext()

    def _close_routing(self) -> None:
        if self._routing is not None:
            self._routing[1].close()
            self._routing = None

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """Sample each row's next token, send its text, finish the rows that are done; the indices of the rows
        that go on."""
        keep = []
        for i, row in enumerate(rows):
            request = row.request
            if request.cancelled:
                self.stats.cancelled += 1
                continue
            try:
                token = next_token(logits[i], request.params, row.generator)
            except Exception as err:  # noqa: BLE001 - one row's problem ends that row only
                logger.error("sampling failed: %s", err)
                self._finish_error(request, RequestError(500, f"sampling failed: {err}"))
                continue
            row.generated += 1
            self.stats.count_token()
            finish = None
            if token in self.eos_ids and not request.params.ignore_eos:
                finish, piece = "stop", row.stream.flush()
            else:
                piece = row.stream.add(token)
                if row.stream.stopped:
                    finish = "stop"
                elif row.generated >= request.params.max_tokens:
                    finish, piece = "length", piece + row.stream.flush()
            if finish is None:
                row.pending = token
                keep.append(i)
                if piece:
                    request.emit(Event(text=piece))
            else:
                self.stats.finished += 1
                request.emit(Event(text=piece, finish_reason=finish, prompt_tokens=len(request.prompt_ids),
                                   completion_tokens=row.generated))
        return keep

    def _drop_rows(self, keep: list[int]) -> None:
        self._rows = [self._rows[i] for i in keep]
        if not self._rows:
            self._cache = self._mask = None
            self.slots.evict_retired(self._busy())
            return
        index = torch.tensor(keep, device=self._mask.device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        first = int(self._mask.any(0).nonzero()[0])  # columns that are padding in every row can go
        if first > 0 and joinable(self._cache):
            self._cache = slice_cache(self._cache, first)
            self._mask = self._mask[:, first:]
        self.slots.evict_retired(self._busy())

    def _fail_running(self, error: RequestError) -> None:
        self._close_routing()
        for row in self._rows:
            self._finish_error(row.request, error)
        self._rows, self._cache, self._mask = [], None, None
        self.slots.evict_retired(self._busy())

    def _finish_error(self, request: Request, error: RequestError) -> None:
        self.stats.failed += 1
        request.emit(Event(error=error))

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else next(iter(self.eos_ids), 0)

    # -- what /metrics shows -----------------------------------------------------------------------------

    def snapshot(self) -> dict[str, float]:
        """Counters and gauges for ``/metrics``."""
        return {**self.stats.as_dict(), "queue_depth": len(self._waiting), "running": len(self._rows),
                "adapters_resident": len(self.slots.resident), "adapters_registered": len(self.slots.paths),
                "adapter_loads_total": self.slots.loads}


class Stats:
    """Counters since start, and the generation rate over the last ``window`` seconds."""

    def __init__(self, window: float = 10.0) -> None:
        self.started = time.time()
        self.window = window
        self.requests = self.finished = self.failed = self.cancelled = 0
        self.prompt_tokens = self.generated_tokens = 0
        self.forwards = self.mixed_forwards = self.largest_batch = 0
        self._recent: collections.deque[float] = collections.deque()

    def count_token(self) -> None:
        self.generated_tokens += 1
        self._recent.append(time.monotonic())

    def count_step(self, adapters: int, rows: int) -> None:
        """A forward pass over ``rows`` rows that use ``adapters`` different adapters (the base counts as one)."""
        self.forwards += 1
        self.mixed_forwards += adapters > 1
        self.largest_batch = max(self.largest_batch, rows)

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        while self._recent and self._recent[0] < now - self.window:
            self._recent.popleft()
        return len(self._recent) / self.window

    def as_dict(self) -> dict[str, float]:
        return {"requests_total": self.requests, "requests_finished_total": self.finished,
                "requests_failed_total": self.failed, "requests_cancelled_total": self.cancelled,
                "prompt_tokens_total": self.prompt_tokens, "generation_tokens_total": self.generated_tokens,
                "generation_tokens_per_second": round(self.tokens_per_second(), 2),
                "forward_passes_total": self.forwards,
                "mixed_adapter_forward_passes_total": self.mixed_forwards, "largest_batch": self.largest_batch, "uptime_seconds": round(time.time() - self.started, 1)}


# -- facts about the model ----------------------------------------------------------------------------------

def _context_length(model: torch.nn.Module, tokenizer: Any) -> int:
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return int(min(getattr(tokenizer, "model_max_length", 2048), 1 << 20))


def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            ids.update(value if isinstance(value, (list, tuple)) else [value])
    return ids


def _accepts(model: torch.nn.Module, argument: str) -> bool:
    import inspect

    return argument in inspect.signature(model.forward).parameters
