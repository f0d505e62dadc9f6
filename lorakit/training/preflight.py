"""Will this run fit? ``lorakit train`` estimates the peak memory of a step from the config alone, before loading
anything, and stops at once when it exceeds what this machine (or GPU) has free.

The estimate is :func:`lorakit.models.calc.estimate_memory` on the model built on the meta device from its ``config.json``
(no weights read), with the run's options mapped onto it by :func:`estimate_run` (``lorakit memory`` prints the same
numbers for the same settings). A run that does not fit is refused with the estimate by part, what is available, and
the cheapest changes that would fit, each with its own estimate.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import InvalidValue
from ..models.calc import RUNTIME_BYTES, MemoryEstimate, estimate_memory
from ..models.devices import (
    DEFAULT_SHAPES,
    decide_precision,
    default_cache,
    machine_key,
    model_shapes,
    pick,
    read_cache,
)
from ..models.embedded_models import model_source
from ..models.streaming import checkpoint_dtype
from .devices import Processes
from .options import TrainConfig
from .registry import peft_task_type, task_class
from .tasks import lora_config_of, meta_model_of

# A run is refused only when its estimate exceeds 95% of the available memory. The estimate counts live tensors;
# the allocator's slack (glibc's heap, PyTorch's CUDA cache) comes on top, so a run estimated above 95% will not fit,
# while one just below may still run out: refusing there would block runs that can succeed.
FIT_MARGIN = 0.95
# A suggested change must leave 15% to spare: advice should work when followed, allocator slack included.
SUGGEST_MARGIN = 0.85
MIN_LENGTH = 128  # shorter --max-length is not suggested: most examples would be cut
GiB = 2**30


class MemoryPreflightError(InvalidValue):
    """The run's estimated peak memory exceeds what is available; the message says by how much and what fits
    (``check`` holds the numbers)."""

    def __init__(self, message: str, check: Check) -> None:
        super().__init__(message)
        self.check = check


@dataclass
class Available:
    """Memory this process can use, and where the figure comes from (for the messages)."""

    bytes: int
    source: str


@dataclass
class Dtypes:
    """The dtypes an estimate assumes: the activations' (the run's precision) and the frozen base's weights."""

    activations: str  # "bf16" (autocast) or "fp32"
    base: str  # a frozen base keeps its checkpoint's dtype, and bf16 autocast keeps it in bf16
    why: str  # how the precision was decided, for the message


@dataclass
class Suggestion:
    """A change of options that fits, with its estimate."""

    changes: dict[str, Any]
    peak: int
    what: str  # what the change costs the user

    @property
    def flags(self) -> str:
        return format_flags(self.changes)


@dataclass
class Check:
    """The preflight's result: the estimate, its peak (FSDP-sharded), what is available to this process."""

    estimate: MemoryEstimate
    peak: int
    available: Available
    dtypes: Dtypes
    suggestions: list[Suggestion] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.peak <= FIT_MARGIN * self.available.bytes


# --------------------------------------------------------------------------------------------------------------
# Available memory
# --------------------------------------------------------------------------------------------------------------


def available_memory(device: torch.device) -> Available | None:
    """Memory a run on ``device`` can use: free GPU memory on CUDA; on the CPU, ``MemAvailable`` (or the
    cgroup's room when lower) plus what this process already holds (the estimate counts the whole process).
    None when it cannot be known here."""
    if device.type == "cuda":
        # The CUDA context of this process exists once this is asked, so the free figure is net of it.
        free, _ = torch.cuda.mem_get_info(device)
        return Available(free, f"free on {torch.cuda.get_device_name(device)} ({device})")
    return host_available()


def host_available(proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> Available | None:
    """Linux: ``MemAvailable`` from ``/proc/meminfo``, or the memory cgroup's limit less its working set when that is
    lower (v2 ``memory.max``, v1 ``memory.limit_in_bytes``), plus this process's resident memory. None elsewhere."""
    meminfo = _kib_fields(proc / "meminfo")
    if "MemAvailable" not in meminfo:
        return None
    free, source = meminfo["MemAvailable"], "MemAvailable"
    room = _cgroup_room(proc, cgroup_root)
    if room is not None and room[0] < free:
        free, source = room
    rss = _kib_fields(proc / "self" / "status").get("VmRSS", 0)
    return Available(max(0, free) + rss, f"{source} {_size(max(0, free))} + {_size(rss)} this process holds")


def _kib_fields(path: Path) -> dict[str, int]:
    """``Name: 123 kB`` lines as bytes by name."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            out[name] = int(parts[0]) * 1024
    return out


def _cgroup_room(proc: Path, root: Path) -> tuple[int, str] | None:
    """The memory cgroup's limit less its working set (usage less inactive file cache, which the kernel reclaims
    first: what docker and the kubelet count), or None without a limit."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            names, base = ("memory.max", "memory.current", "inactive_file"), root
        elif "memory" in controllers.split(","):  # v1
            names, base = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"), root / "memory"
        else:
            continue
        # Inside a container the cgroup's own folder is mounted at the root; on a host it is under its path.
        for folder in (base / path.lstrip("/"), base):
            limit = _read_int(folder / names[0])
            if limit is None:
                continue
            if limit >= 2**60:  # "max", or v1's page-rounded 2^63: no limit
                return None
            usage = _read_int(folder / names[1]) or 0
            stat = _stat_fields(folder / "memory.stat")
            used = max(0, usage - stat.get(names[2], 0))
            return limit - used, f"the cgroup's limit {_size(limit)} less {_size(used)} in use:"
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return 2**63
    return int(text) if text.isdigit() else None


def _stat_fields(path: Path) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines()
                                       if len(line.split()) == 2 and line.split()[1].isdigit())}
    except OSError:
        return {}


# --------------------------------------------------------------------------------------------------------------
# The estimate of a run
# --------------------------------------------------------------------------------------------------------------


def stored_dtype(config: TrainConfig) -> str | None:
    """The dtype the model's checkpoint is stored in (``bfloat16``, ``float16``, ``float32``), read as the loader
    reads it (:func:`lorakit.models.streaming.checkpoint_dtype`: config.json, else the safetensors headers); None for the
    embedded default model and for checkpoints without safetensors weights, which load in the run's precision."""
    if config.model == "default":
        return None
    try:
        dtype = checkpoint_dtype(model_source(config.model, config.trust_remote_code))
    except (OSError, ValueError):
        return None
    return None if dtype is None else str(dtype).removeprefix("torch.")


def run_dtypes(config: TrainConfig, precision: str, stored: str | None, why: str = "") -> Dtypes:
    """The dtypes of a run in ``precision``. The frozen base is held as :func:`lorakit.training.tasks.build_task`
    loads it: in bf16 under bf16 autocast, and a bfloat16 checkpoint stays bf16 unless ``--precision fp32`` is
    asked; any other base in fp32 (a float16 checkpoint is widened: fp16 weights would overflow in training)."""
    keeps_bf16 = stored == "bfloat16" and config.precision != "fp32"
    return Dtypes(precision, "bf16" if precision == "bf16" or keeps_bf16 else "fp32", why)


def known_precision(config: TrainConfig, device: torch.device) -> tuple[str, str] | None:
    """The run's precision without measuring: the option, or ``auto``'s measurement cached on this machine
    (:func:`lorakit.models.devices.decide_precision`). None when ``auto`` has not been measured here yet."""
    if config.precision != "auto":
        return config.precision, f"--precision {config.precision}"
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "fp32", f"{torch.cuda.get_device_name(device)} has no bf16"
    shapes = model_shapes(config.model, config.trust_remote_code, config.batch_size * config.max_length)
    known = read_cache(default_cache()).get(machine_key(device, list(shapes or DEFAULT_SHAPES)))
    if known is None:
        return None
    return pick(known["fp32_s"], known["bf16_s"]), "--precision auto, measured earlier on this machine"


def estimate_run(config: TrainConfig, model: nn.Module | None = None, dtypes: Dtypes | None = None,
                 runtime: int = RUNTIME_BYTES) -> MemoryEstimate:
    """The peak memory of one step of ``config``'s run, by part: :func:`lorakit.models.calc.estimate_memory` with the
    run's method (QLoRA when ``quantize``), micro-batch, ``max_length``, checkpointing, AdamW and adapter.

    Args:
        model: The run's model on the meta device (default: built from the model's config.json, no weights read).
        dtypes: Activations and frozen base (default: as ``precision`` says, fp32 for ``auto``; the base as
            :func:`run_dtypes` says).
        runtime: Bytes of the process before the model.
    """
    task_type = peft_task_type(config.task)
    model = model if model is not None else meta_model_of(config, task_type)
    if dtypes is None:
        dtypes = run_dtypes(config, "fp32" if config.precision == "auto" else config.precision, stored_dtype(config))
    method = "qlora" if config.quantize else config.method
    lora = lora_config_of(config, task_type) if config.method == "lora" else None
    task = task_class(config.task)  # a preference pair trains two rows; full fine-tuning's reference is a copy
    estimate = estimate_memory(model, method, config.batch_size * task.rows_per_example, config.max_length,
                               dtype=dtypes.activations, base_dtype=dtypes.base,
                               grad_checkpointing=config.grad_checkpointing, optimizer="adamw", lora=lora,
                               num_virtual_tokens=config.num_virtual_tokens, runtime=runtime,
                               double_quant=config.double_quant)
    if task.reference_passes and config.method == "full":
        estimate = dataclasses.replace(estimate, reference=estimate.weights)
    return estimate


def peak_bytes(estimate: MemoryEstimate, shards: int = 1) -> int:
    """The estimate's peak; under FSDP (``shards`` processes) each holds 1/N of the weights, gradients and optimizer
    states, but first loads the whole model (each process reads the checkpoint, then keeps its shard)."""
    if shards == 1:
        return estimate.total
    held = estimate.weights + estimate.gradients + estimate.optimizer_states
    return max(estimate.total - held + -(-held // shards), estimate.weights + estimate.runtime)


# --------------------------------------------------------------------------------------------------------------
# Suggestions
# --------------------------------------------------------------------------------------------------------------

_FLAG_ORDER = ("method", "quantize", "grad_checkpointing", "batch_size", "grad_accum", "max_length")


def format_flags(changes: dict[str, Any]) -> str:
    """``{"method": "lora", "grad_checkpointing": True}`` → ``--method lora --grad-checkpointing``."""
    flags = []
    for name in _FLAG_ORDER:
        if name in changes:
            value = changes[name]
            flag = "--" + name.replace("_", "-")
            flags.append(flag if value is True else f"{flag} {value}")
    return " ".join(flags)


@dataclass
class _Lever:
    """One kind of change, and the ways to make it, cheapest first: alone, then with the changes that only shrink
    activations (``extras``: checkpointing, smaller micro-batches with more accumulation)."""

    kind: str  # "checkpointing", "micro-batch", "quantize", "method" or "length"
    what: str  # what it costs the user; may name the changes' values, e.g. {max_length}
    ways: list[tuple[dict[str, Any], set[str]]]  # (the changes, the kinds of the extras among them)


def _levers(config: TrainConfig) -> list[_Lever]:
    """The changes a user could make to lower the peak, cheapest first: the same training more slowly
    (checkpointing, then the same update in smaller micro-batches), a 4-bit base, LoRA instead of full fine-tuning,
    and last cutting examples shorter (at least :data:`MIN_LENGTH` tokens)."""
    checkpointing = [({}, set())] if config.grad_checkpointing else [({}, set()),
                                                                      ({"grad_checkpointing": True}, {"checkpointing"})]
    b, a = config.batch_size, config.grad_accum
    splits = [{"batch_size": d, "grad_accum": a * b // d} for d in range(b - 1, 0, -1) if b % d == 0]
    extras = checkpointing + [({**s, **c}, kinds | {"micro-batch"}) for s in splits for c, kinds in checkpointing]
    levers = []
    if not config.grad_checkpointing:
        levers.append(_Lever("checkpointing", "the same training, about 30% slower (activations recomputed in the "
                                              "backward pass)", [({"grad_checkpointing": True}, set())]))
    if splits:
        levers.append(_Lever("micro-batch", "the same update in smaller micro-batches (slower steps on a GPU)",
                             [(c, k - {"micro-batch"}) for c, k in extras[len(checkpointing):]]))
    model_changes = []
    if config.method == "lora" and not config.quantize:
        model_changes.append(("quantize", "QLoRA: the frozen base's linear layers held in 4 bits (nf4)",
                              {"quantize": "nf4"}))
    if config.method == "full":
        model_changes.append(("method", f"LoRA (r={config.r}) instead of training every weight", {"method": "lora"}))
        model_changes.append(("method", f"QLoRA (r={config.r} on a 4-bit base) instead of training every weight",
                              {"method": "lora", "quantize": "nf4"}))
    for kind, what, change in model_changes:
        levers.append(_Lever(kind, what, [({**change, **c}, k) for c, k in extras]))
    lengths = [config.max_length >> i for i in range(1, 32) if config.max_length >> i >= MIN_LENGTH]
    if lengths:  # the longest that fits: level by level, each with the extras
        levers.append(_Lever("length", "examples longer than {max_length} tokens are cut",
                             [({"max_length": n, **c}, k) for n in lengths for c, k in extras]))
    return levers


def suggest(config: TrainConfig, model: nn.Module, dtypes: Dtypes, budget: float, runtime: int = RUNTIME_BYTES,
            shards: int = 1) -> tuple[list[Suggestion], Suggestion | None]:
    """The cheapest way of each kind of change whose peak is at most ``budget`` bytes, cheapest kind first; and the
    smallest peak of all tried (to say how far off it is when nothing fits).

    A way is passed over when it adds a cheaper kind of change that already fits on its own (grad checkpointing
    fits: LoRA with grad checkpointing is not news), or contains a listed suggestion's changes.
    """
    found: list[Suggestion] = []
    fitting: set[str] = set()  # kinds with a suggestion
    smallest: Suggestion | None = None
    for lever in _levers(config):
        last_fixed: tuple[Any, ...] | None = None
        for changes, extra_kinds in lever.ways:
            if extra_kinds & fitting or any(s.changes.items() <= changes.items() for s in found):
                continue
            model_side = (changes.get("method"), changes.get("quantize"))
            if model_side == last_fixed:
                continue  # its weights alone did not fit: the other extras only shrink activations
            estimate = estimate_run(dataclasses.replace(config, **changes), model, dtypes, runtime)
            peak = peak_bytes(estimate, shards)
            if smallest is None or peak < smallest.peak:
                smallest = Suggestion(changes, peak, lever.what.format(**changes))
            if peak <= budget:
                what = lever.what.format(**changes)
                found.append(Suggestion(changes, peak, what))
                fitting.add(lever.kind)
                break
            if peak - estimate.activations - estimate.logits > budget:
                last_fixed = model_side
    return found, smallest


# --------------------------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------------------------


def preflight(config: TrainConfig, device: torch.device, procs: Processes | None = None) -> Check | None:
    """Estimate the run's peak memory from the config and stop it if it cannot fit; one line on stderr when it does.

    Every process checks its own device (its GPU, or its share of this machine's memory: ``LOCAL_WORLD_SIZE``
    processes share it); the main one prints. With ``precision=auto`` not yet measured on this machine the check
    uses bf16 and fp32 both: a run that fits in fp32 passes, one that does not fit in bf16 is refused, and in between
    the precision is measured (as the run would do next anyway).

    Returns:
        The check, or None when skipped (``preflight=False``, or the memory or the model's shape is unknown here).

    Raises:
        MemoryPreflightError: The run will not fit; the message gives the estimate by part, the available memory and
            the cheapest changes that fit, each with its estimate.
    """
    procs = procs or Processes()
    if not config.preflight:
        return None
    available = available_memory(device)
    if available is None:
        _say(procs, "memory preflight skipped: the available memory is unknown on this system")
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" and procs.world > 1 else 1
    if local > 1:
        available = Available(available.bytes // local, f"1/{local} of {_size(available.bytes)}: {available.source}")
    shards = procs.world if config.fsdp else 1
    runtime = 0 if device.type == "cuda" else RUNTIME_BYTES  # on CUDA the context is already out of the free memory
    try:
        model = meta_model_of(config, peft_task_type(config.task))
        stored = stored_dtype(config)
        known = known_precision(config, device)
        if known is not None:
            options = [run_dtypes(config, known[0], stored, known[1])]
        else:
            why = "--precision auto, not measured on this machine yet: the {} of bf16 and fp32"
            options = [run_dtypes(config, p, stored, why.format(size))
                       for p, size in (("bf16", "smaller"), ("fp32", "larger"))]
        checks = []
        for dtypes in options:
            estimate = estimate_run(config, model, dtypes, runtime)
            checks.append(Check(estimate, peak_bytes(estimate, shards), available, dtypes))
    except (ValueError, OSError, ImportError, TypeError) as err:  # the model's own loading will say what is wrong
        _say(procs, f"memory preflight skipped: no estimate for {config.model!r} ({str(err).splitlines()[0]})")
        return None
    check = checks[-1]  # the largest (fp32 when two)
    if not check.fits and len(checks) == 2:
        check = checks[0]
        if check.fits:  # fits in bf16 only: the measurement decides (the run would measure next anyway)
            if procs.world > 1:  # measuring is collective (run_precision); do not refuse what may fit
                _say(procs, f"memory preflight: {_size(checks[1].peak)} with fp32 activations, {_size(check.peak)} "
                            f"with bf16, of {_size(available.bytes)} available; --precision auto will decide")
                return check
            shapes = model_shapes(config.model, config.trust_remote_code, config.batch_size * config.max_length)
            measured = decide_precision("auto", device, shapes).name
            check = checks[0] if measured == "bf16" else checks[1]
            check.dtypes.why = f"--precision auto, measured now: {measured}"
    if check.fits:
        _say(procs, f"memory preflight: about {_size(check.peak)} at the peak of a step "
                    f"({_describe(check, short=True)}); {_size(available.bytes)} available ({available.source})")
        return check
    check.suggestions, smallest = suggest(config, model, check.dtypes, SUGGEST_MARGIN * available.bytes, runtime,
                                          shards)
    raise MemoryPreflightError(refusal(check, smallest, shards), check)


def refusal(check: Check, smallest: Suggestion | None, shards: int = 1) -> str:
    """The message of a refused run."""
    e = check.estimate
    parts = [("weights", e.weights), ("gradients", e.gradients), ("optimizer states", e.optimizer_states),
             ("activations", e.activations), ("LM-head logits", e.logits), ("runtime", e.runtime),
             *([("reference copy", e.reference)] if e.reference else [])]
    lines = [f"this run needs about {_size(check.peak)} of memory at its peak, more than {FIT_MARGIN:.0%} of the "
             f"{_size(check.available.bytes)} available ({check.available.source}). Nothing was loaded.",
             f"  estimate: {_describe(check)}:",
             "    " + " + ".join(f"{name} {_size(n)}" for name, n in parts)
             + (f" (FSDP: each process holds 1/{shards} of the first three)" if shards > 1 else "")]
    if check.suggestions:
        lines.append(f"  changes that fit, cheapest first (each leaves {1 - SUGGEST_MARGIN:.0%} to spare):")
        width = max(len(s.flags) for s in check.suggestions)
        lines += [f"    {s.flags:<{width}}  {_size(s.peak):>10}  {s.what}" for s in check.suggestions]
    else:
        best = f": the smallest, {smallest.flags}, needs {_size(smallest.peak)}" if smallest else ""
        lines.append(f"  no change of batch size, gradient checkpointing, quantization, method or --max-length fits "
                     f"in {SUGGEST_MARGIN:.0%} of the available memory{best}; a machine with more memory is needed")
    lines.append("  (--no-preflight starts the run anyway)")
    return "\n".join(lines)


def _describe(check: Check, short: bool = False) -> str:
    e, d = check.estimate, check.dtypes
    method = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA", "prompt": "prompt tuning"}[e.method]
    if short:
        return f"{method}, micro-batch {e.batch} x {e.seq} tokens, {d.activations} activations: {d.why}"
    adapter = f" {e.adapter}" if e.adapter else ""
    base = f", frozen base in {d.base}" if e.method != "full" else ""
    checkpointing = ", gradient checkpointing" if e.grad_checkpointing else ""
    return (f"{method}{adapter}, {e.trainable:,d} trainable parameters, micro-batch {e.batch} x {e.seq} tokens, "
            f"{d.activations} activations ({d.why}){base}{checkpointing}")


def _size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.0f} MiB"


def _say(procs: Processes, message: str) -> None:
    if procs.main:
        print(f"lorakit: {message}", file=sys.stderr, flush=True)
