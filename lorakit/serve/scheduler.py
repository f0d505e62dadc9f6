"""The serving engine: one base model, many LoRA adapters, and a scheduler that batches requests across adapters.

One thread owns the model. It runs *continuous batching*: at every decoding step it admits waiting requests (a
prefill pass over their prompts, whose rows then join the running :class:`~lorakit.serve.batch.Batch`), then runs
one decoding step for every running row. Rows that use different adapters share that step through the mixed-batch
forward (``LoraModel.mixed_batch``: each row gathers its own A and B); when every row uses one adapter, the plain
forward with that adapter active is used instead. Finished rows leave the batch at once.

Which adapters are in the model is :class:`~lorakit.serve.slots.AdapterSlots`' business (LRU, reload on demand).
Adapters are loaded and unloaded by the scheduler thread between steps (:meth:`Engine.call`), so nothing changes
under a running forward.
"""

from __future__ import annotations

import collections
import inspect
import logging
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from ..core.config import check_adapter_name
from ..core.errors import InvalidValue
from .batch import Batch, Row, left_padded
from .grammar import Constraint, Grammars
from .kv_cache import joinable, new_cache
from .request import Event, Request
from .sampling import RequestError, TextStream, next_token, quoted, token_logprob
from .slots import AdapterSlots
from .stats import Stats

logger = logging.getLogger("lorakit.serve")

MAX_REQUEST_BYTES = 2**20  # 1 MiB: a prompt of ~200,000 tokens, far past any context this server runs


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
        adapter_root: The folder under which runtime loads (``load_adapter``) must lie, and whose adapter folders
            a request may name to have them loaded on first use (:meth:`resolve_or_load`); None turns both off.
        max_batch_size: Most requests decoded together.
        max_tokens: The largest ``max_tokens`` a request may ask for.
        max_request_bytes: The largest request body the HTTP API accepts (:func:`~lorakit.serve.api.create_app`
            answers larger ones with 413 before reading them).

    Attributes:
        slots: The adapters registered and resident.
        batch: The running rows (changed only by the scheduler thread).
        stats: Counters for ``/metrics``.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, base_name: str | None = "base",
                 adapters: dict[str, str | Path] | None = None, max_adapters: int = 8,
                 adapter_root: str | Path | None = None, max_batch_size: int = 32, max_tokens: int = 1024,
                 max_request_bytes: int = MAX_REQUEST_BYTES) -> None:
        if max_batch_size < 1:
            raise InvalidValue(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_request_bytes < 1:
            raise InvalidValue(f"max_request_bytes must be at least 1, got {max_request_bytes}")
        self.model = model.eval()  # LoRA layers are injected into it in place: it is always the model to call
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.max_batch_size = max_batch_size
        self.max_tokens = max_tokens
        self.max_request_bytes = max_request_bytes
        self.context_length = _context_length(model, tokenizer)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.grammars = Grammars(tokenizer, _vocab_size(model, tokenizer))
        self._takes_logits_to_keep = _accepts(model, "logits_to_keep")
        self._cache_argument = "cache" if _accepts(model, "cache") else "past_key_values"  # renamed in transformers 5
        self.batch = Batch()
        # A routing set for the old adapters must not outlive a change of the model's adapters.
        self.slots = AdapterSlots(model, max_adapters, adapter_root, before_change=self.batch.close_routing)
        self._waiting: collections.deque[Request] = collections.deque()
        self._commands: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self._warned_static = False
        self._cv = threading.Condition()
        self._first_loads: dict[str, threading.Lock] = {}  # an adapter loading on demand: one load, others wait
        self._first_loads_lock = threading.Lock()
        self._closing = False
        self.stats = Stats()
        self._register(adapters or {})
        self._thread = threading.Thread(target=self._loop, name="lorakit-scheduler", daemon=True)
        self._thread.start()

    def _register(self, adapters: dict[str, str | Path]) -> None:
        """Register the adapters served from the start; load as many as there are slots."""
        for i, (name, path) in enumerate(adapters.items()):
            if name == self.base_name:
                raise InvalidValue(f"adapter name {name!r} is the base model's name; choose another")
            self.slots.register(name, Path(path).resolve())
            try:  # a bad folder is an error now, not a 400 on the first request for it
                if i < self.slots.capacity:
                    self.slots.place(name, busy=set())
                elif not (self.slots.paths[name] / "adapter_config.json").is_file():
                    raise RequestError(400, f"the adapter {name!r} at {str(self.slots.paths[name])!r} has no "
                                            f"adapter_config.json")
            except RequestError as err:  # its message names the adapter and its folder
                raise InvalidValue(err.message) from None

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
        raise RequestError(404, f"the model {quoted(model)} does not exist; this server has {served}")

    def resolve_or_load(self, model: str) -> str | None:
        """:meth:`resolve`; with ``adapter_root``, a ``model`` that names an adapter folder directly under it and is
        not registered is loaded now, as :meth:`load_adapter` loads (the LRU limit, the base's fingerprint and the
        serve-safe checks apply), and once however many requests ask for it at the same time. Blocks until the
        load is done: call it from a worker thread.

        Raises:
            RequestError: 404 when nothing of that name is served or loadable, 400 for a folder that does not load
                (its message names it), 503 when every slot is held by running requests.
        """
        try:
            return self.resolve(model)
        except RequestError as err:
            if err.status != 404 or not self._loadable(model):
                raise
        with self._first_loads_lock:
            lock = self._first_loads.setdefault(model, threading.Lock())
        with lock:
            if model not in self.slots.paths:  # the first of the requests asking at once loads it
                self.load_adapter(model, model)
        return model

    def loadable(self) -> list[str]:
        """The adapter folders directly under ``adapter_root`` that are not registered (at most 1,000, sorted)."""
        root = self.slots.root
        if root is None:
            return []
        try:
            names = sorted(p.name for p in root.iterdir() if self._loadable(p.name))
        except OSError:
            return []
        return [name for name in names if name not in self.slots.paths][:1000]

    def _loadable(self, name: str) -> bool:
        """Whether ``name`` is a folder directly under ``adapter_root`` (not a link) holding an adapter config."""
        root = self.slots.root
        if root is None or len(name) > 255 or name == self.base_name:
            return False
        try:
            check_adapter_name(name)  # no path separators, dots or NUL: the name cannot leave the root
        except ValueError:
            return False
        folder = root / name
        if folder.is_symlink():  # the server never follows one
            return False
        return folder.is_dir() and (folder / "adapter_config.json").is_file()

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
                was), 403 for a path outside ``adapter_root``, 409 for the name of an unloaded adapter that running
                requests still use, 503 when every slot is held by running requests.
        """
        if len(name) > 255:  # a folder name's limit on most file systems
            raise RequestError(400, f"lora_name {quoted(name)} is longer than 255 characters")
        try:
            check_adapter_name(name)
        except ValueError as err:
            raise RequestError(400, str(err)) from None
        if name == self.base_name:
            raise RequestError(400, f"{name!r} is the base model's name; choose another adapter name")
        folder = self.slots.allowed(path)
        self.call(lambda: self.slots.add(name, folder, self.batch.busy()))

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter (vLLM's ``/v1/unload_lora_adapter``): new requests for it get 404; requests already
        running finish with it.

        Raises:
            RequestError: 404 when no adapter has that name.
        """
        self.call(lambda: self.slots.unregister(name, self.batch.busy()))

    def close(self) -> None:
        """Stop the scheduler; waiting and running requests end with an error event."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(timeout=30)

    def snapshot(self) -> dict[str, float]:
        """Counters and gauges for ``/metrics``."""
        return {**self.stats.as_dict(), "queue_depth": len(self._waiting), "running": len(self.batch.rows),
                "adapters_resident": len(self.slots.resident), "adapters_registered": len(self.slots.paths),
                "adapter_loads_total": self.slots.loads}

    # -- the scheduler thread ----------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.no_grad():  # grad mode is per thread
            while True:
                with self._cv:
                    while not (self._commands or self._waiting or self.batch.rows or self._closing):
                        self._cv.wait()
                    if self._closing:
                        break
                    commands = list(self._commands)
                    self._commands.clear()
                if commands:
                    self.batch.close_routing()  # adapters may change: no routing may outlive them
                for fn, future in commands:
                    try:
                        future.set_result(fn())
                    except BaseException as err:  # noqa: BLE001 - handed to the caller
                        future.set_exception(err)
                try:
                    self._admit()
                    if self.batch.rows:
                        self._step()
                except Exception:  # noqa: BLE001 - a bug must not take the server down
                    logger.error("generation failed:\n%s", traceback.format_exc())
                    self.batch.close_routing()
                    self._fail_running(RequestError(500, "internal error during generation (see the server log)"))
        self._shut_down()

    def _shut_down(self) -> None:
        """End every running and waiting request and every pending command with a 503."""
        closing = RequestError(503, "the server is shutting down")
        self.batch.close_routing()
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
        space = self.max_batch_size - len(self.batch.rows)
        if space <= 0:
            return
        if self.batch.rows and not joinable(self.batch.cache):
            if not self._warned_static:
                logger.warning("this model's KV cache (%s) cannot be joined: new requests wait for the running "
                               "batch to finish", type(self.batch.cache).__name__)
                self._warned_static = True
            return
        ready = self._with_grammars(self._choose(space))
        if not ready:
            return
        try:
            self._prefill(ready)
        except Exception:  # noqa: BLE001 - fail these requests, keep the running ones
            logger.error("prefill failed:\n%s", traceback.format_exc())
            self.batch.close_routing()
            for request, _ in ready:
                self._finish_error(request, RequestError(500, "internal error during prefill (see the server log)"))

    def _with_grammars(self, requests: list[Request]) -> list[tuple[Request, Constraint | None]]:
        """Each request with the state of its grammar (None: free text); those whose grammar does not build fail."""
        ready = []
        for r in requests:
            try:
                ready.append((r, self.grammars.constraint(r.params.grammar) if r.params.grammar is not None else None))
            except RequestError as err:
                self._finish_error(r, err)
        return ready

    def _choose(self, space: int) -> list[Request]:
        """Take up to ``space`` waiting requests whose adapters are (made) resident; the rest keep their place in
        the queue, cancelled ones are dropped and those for unloaded adapters fail."""
        with self._cv:
            waiting, self._waiting = list(self._waiting), collections.deque()
        chosen: list[Request] = []
        later: list[Request] = []
        busy = self.batch.busy()
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
        return chosen

    def _prefill(self, ready: list[tuple[Request, Constraint | None]]) -> None:
        """Run the prompts of the ``ready`` requests, sample their first tokens (each within its grammar, if it has
        one) and join the rows that go on to the batch. Requests with the same prompt and adapter (the ``n`` choices
        of one request) share one prefill: its KV cache is copied to each of their rows."""
        requests = [r for r, _ in ready]
        device = self._device()
        first: dict[tuple[tuple[int, ...], str | None], Request] = {}  # each prompt's first request
        for r in requests:
            first.setdefault((tuple(r.prompt_ids), r.adapter), r)
        unique = list(first.values())
        slot = {key: i for i, key in enumerate(first)}
        owner = [slot[(tuple(r.prompt_ids), r.adapter)] for r in requests]  # the prefill row of each request
        ids, mask, positions = left_padded([r.prompt_ids for r in unique], self._pad_id())
        self.stats.prompt_tokens += int(mask.sum())  # the tokens computed
        cache = new_cache(self.model)
        logits = self._forward([r.adapter for r in unique], ids.to(device), mask.to(device),
                               positions.to(device), cache)
        if len(unique) < len(requests):  # each shared prompt's logits and cache, once per request
            copies = torch.tensor(owner, device=device)
            logits, mask = logits[copies], mask[copies.cpu()]
            cache.batch_select_indices(copies)
        rows = [Row(r, TextStream(self.tokenizer, r.params.stop), r.params.generator(), position=len(r.prompt_ids),
                    constraint=constraint) for r, constraint in ready]
        keep = self._sample(rows, logits)
        if not keep:
            return
        if len(keep) < len(rows):
            cache.batch_select_indices(torch.tensor(keep, device=device))
        self.batch.join([rows[i] for i in keep], cache, mask[keep].to(device))

    def _step(self) -> None:
        """One decoding step for every running row."""
        batch = self.batch
        ids, positions = batch.next_inputs(self._device())
        logits = self._forward(batch.adapters(), ids, batch.mask, positions, batch.cache)
        for row in batch.rows:
            row.position += 1
        keep = self._sample(batch.rows, logits)
        if len(keep) < len(batch.rows):
            batch.keep(keep)
            self.slots.evict_retired(batch.busy())  # unloaded adapters leave with their last row

    def _forward(self, adapters: Sequence[str | None], ids: torch.Tensor, mask: torch.Tensor,
                 positions: torch.Tensor, cache: Any) -> torch.Tensor:
        """Next-token logits ``(rows, vocab)`` of a (left-padded) batch whose row i uses ``adapters[i]``."""
        kwargs: dict[str, Any] = {"logits_to_keep": 1} if self._takes_logits_to_keep else {}
        kwargs[self._cache_argument] = cache
        with self.batch.routed(self.slots.lora, adapters):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
        self.stats.count_step(len(set(adapters)), len(adapters))
        return out.logits[:, -1, :].float()

    def _sample(self, rows: list[Row], logits: torch.Tensor) -> list[int]:
        """Sample each row's next token (within its grammar if it has one), send its text, finish the rows that are
        done; the indices of the rows that go on. A row with a grammar has the log-probabilities of the tokens its
        grammar allows (the model's distribution restricted to them, as vLLM reports them)."""
        start = time.perf_counter()
        allowed = self.grammars.mask(logits, [row.constraint for row in rows], self.eos_ids)
        if allowed is not logits:
            self.stats.grammar_seconds += time.perf_counter() - start
        keep = []
        for i, row in enumerate(rows):
            request = row.request
            if request.cancelled:
                self.stats.cancelled += 1
                continue
            params = request.params
            try:
                token = next_token(allowed[i], params, row.generator)
                scored = token_logprob(allowed[i], token, params.logprobs) if params.logprobs is not None else None
                # An end of sequence is only allowed once the document may end: it ends the row, ignore_eos or not.
                complete = row.constraint is not None and (token in self.eos_ids or row.constraint.advance(token))
            except RequestError as err:
                self._finish_error(request, err)
                continue
            except Exception as err:  # noqa: BLE001 - one row's problem ends that row only
                logger.error("sampling failed: %s", err)
                self._finish_error(request, RequestError(500, f"sampling failed: {err}"))
                continue
            self.stats.count_token()
            event = row.add(token, self.eos_ids, scored, complete)
            if event is None or not event.final:
                keep.append(i)
            else:
                self.stats.finished += 1
            if event is not None:
                request.emit(event)
        return keep

    def _fail_running(self, error: RequestError) -> None:
        self.batch.close_routing()
        for row in self.batch.rows:
            self._finish_error(row.request, error)
        self.batch.clear()
        self.slots.evict_retired(self.batch.busy())

    def _finish_error(self, request: Request, error: RequestError) -> None:
        self.stats.failed += 1
        request.emit(Event(error=error))

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else next(iter(self.eos_ids), 0)


# -- facts about the model ----------------------------------------------------------------------------------

def _context_length(model: torch.nn.Module, tokenizer: Any) -> int:
    """The most tokens (prompt and answer) the model attends to."""
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return int(min(getattr(tokenizer, "model_max_length", 2048), 1 << 20))


def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> set[int]:
    """Every end-of-sequence token id the model, its generation config or its tokenizer names."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            ids.update(value if isinstance(value, (list, tuple)) else [value])
    return ids


def _vocab_size(model: torch.nn.Module, tokenizer: Any) -> int:
    """The width of the model's logits: its head's outputs (a 4-bit head's packed weight has another shape), else
    the config's vocabulary."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    width = getattr(head, "out_features", None)
    if isinstance(width, int) and width > 0:
        return width
    return int(getattr(model.config, "vocab_size", None) or len(tokenizer))


def _accepts(model: torch.nn.Module, argument: str) -> bool:
    """Whether the model's ``forward`` takes ``argument``."""
    return argument in inspect.signature(model.forward).parameters
