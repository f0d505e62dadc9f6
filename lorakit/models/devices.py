"""Where a model computes: the device, the precision (measured for ``auto``), bf16 autocast, and the matrix-product
peak of this machine (for MFU)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.errors import InvalidValue


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise InvalidValue("device='cuda' but no CUDA device is available; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


Shape = tuple[int, int, int]  # (rows, inner, columns) of one matrix product: (tokens, in) @ (in, out)
# SmolLM2-135M's layer sizes, for a decision without a model (lorakit eval of a folder whose config gives none).
DEFAULT_SHAPES: tuple[Shape, ...] = ((256, 576, 576), (256, 576, 1536), (256, 1536, 576))
BF16_MARGIN = 0.9  # bf16 must be at least 10% faster: below that, fp32's exactness is worth more
BENCH_SECONDS = 0.0125  # per measurement after a warm-up round; two per dtype: ~50 ms in all


@dataclass
class Precision:
    """The precision a run uses and why (for the summary)."""

    name: str  # "bf16" or "fp32"
    reason: str
    fp32_ms: float | None = None  # the measured time of one round of the model's products, when measured
    bf16_ms: float | None = None


def gemm_shapes(model_config: dict[str, Any], tokens: int, max_rows: int = 256, head: bool = False) -> list[Shape]:
    """The matrix products of one layer of a transformer with this ``config.json``, for ``tokens`` rows (capped at
    ``max_rows`` to keep the measurement short): attention projections and the MLP's two products, and with
    ``head`` the output head's (when the config gives a vocabulary). Empty when the config gives no width."""
    hidden = next((model_config[k] for k in ("hidden_size", "n_embd", "d_model") if k in model_config), None)
    if not isinstance(hidden, int) or hidden < 1:
        return []
    inner = next((model_config[k] for k in ("intermediate_size", "n_inner", "ffn_dim") if model_config.get(k)),
                 4 * hidden)
    rows = max(1, min(tokens, max_rows))
    shapes = [(rows, hidden, hidden), (rows, hidden, inner), (rows, inner, hidden)]
    vocab = model_config.get("vocab_size")
    if head and isinstance(vocab, int) and vocab > 0:
        shapes.append((rows, hidden, vocab))
    return shapes


def time_gemms(shapes: list[Shape], dtype: torch.dtype, device: torch.device, seconds: float = BENCH_SECONDS
               ) -> float:
    """Seconds for one round of the products ``shapes`` in ``dtype`` on ``device``: the best round within
    ``seconds`` after a warm-up round (so kernel selection and first-touch allocation are not counted)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    pairs = [(torch.randn(m, k, generator=gen).to(device, dtype), torch.randn(k, n, generator=gen).to(device, dtype))
             for m, k, n in shapes]

    def one_round() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for a, b in pairs:
            torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    one_round()
    best, spent = float("inf"), 0.0
    while spent < seconds or best == float("inf"):
        took = one_round()
        best, spent = min(best, took), spent + took
    return best


def machine_key(device: torch.device, shapes: list[Shape]) -> str:
    """What a measurement depends on: the processor (the CPU's identity, see :func:`cpu_identity`, or the GPU's
    name), the threads, the torch version and the shapes."""
    if device.type == "cuda":
        chip = torch.cuda.get_device_name(device)
    else:
        chip = cpu_identity()
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    return f"{chip} | {threads} threads | torch {torch.__version__} | {device.type} | {shapes}"


# The instruction sets that change how fast matrix products run, bf16's above all (x86, then Arm).
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
               "asimd", "bf16", "i8mm", "sve", "sve2", "sme")
# The fields of /proc/cpuinfo that number a CPU's design: x86's, then Arm's (which has no model name).
CPU_NUMBERS = (("vendor_id", ""), ("cpu family", "family"), ("model", "model"), ("stepping", "stepping"),
               ("CPU implementer", "implementer"), ("CPU part", "part"), ("CPU variant", "variant"),
               ("CPU revision", "revision"))


def cpu_identity(cpuinfo: str | None = None) -> str:
    """What tells CPUs apart for speed: the model name with the numbers of its design (vendor, family, model and
    stepping; on Arm, implementer, part, variant and revision) and the instruction sets of :data:`SPEED_FLAGS` it
    has. A name alone is not enough: clouds name a Zen 3 and a Zen 4 both "AMD EPYC", and bf16 runs 5-8× slower
    than fp32 on the one and faster on the other.

    Args:
        cpuinfo: The text of ``/proc/cpuinfo`` (read when None); without it (not Linux), the platform's processor
            name and torch's CPU capability.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block describes them all
            continue
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    name = fields.get("model name") or platform.processor() or platform.machine()
    numbers = " ".join(f"{label} {fields[key]}".strip() for key, label in CPU_NUMBERS if key in fields)
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    known = " ".join(f for f in SPEED_FLAGS if f in flags)
    details = "; ".join(part for part in (numbers, known) if part) or torch.backends.cpu.get_cpu_capability()
    return f"{name} ({details})"


def default_cache() -> Path:
    """``$XDG_CACHE_HOME/lorakit/precision.json`` (``~/.cache/lorakit/precision.json`` by default)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lorakit" / "precision.json"


def pick(fp32_s: float, bf16_s: float) -> str:
    """bf16 when its products take at most :data:`BF16_MARGIN` of fp32's time, else fp32."""
    return "bf16" if bf16_s <= BF16_MARGIN * fp32_s else "fp32"


def decide_precision(name: str, device: torch.device, shapes: list[Shape] | None = None, *,
                     cache: Path | None = None,
                     measure: Callable[[list[Shape], torch.dtype, torch.device], float] = time_gemms) -> Precision:
    """The precision of a run: ``name`` unless it is ``auto``; then the faster of fp32 and bf16 on ``device`` for
    the products ``shapes`` (default: SmolLM2's), measured once per machine and cached in ``cache``.

    Machines differ too much for a rule: AVX2 CPUs run bf16 products several times slower than fp32, AVX-512 BF16
    and AMX CPUs several times faster, and GPUs faster still. So the products of the model's own layer sizes are
    timed in both dtypes (~50 ms) and the result is kept under the CPU (or GPU) model, torch version and shapes.

    Args:
        name: ``auto``, ``bf16`` or ``fp32``.
        measure: Seconds for one round of ``shapes`` in a dtype (injected by tests).
    """
    if name != "auto":
        return Precision(name, f"--precision {name}")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return Precision("fp32", f"{torch.cuda.get_device_name(device)} has no bf16 support")
    shapes = list(shapes or DEFAULT_SHAPES)
    cache = cache or default_cache()
    key = machine_key(device, shapes)
    known = read_cache(cache)
    if key in known:
        fp32_s, bf16_s = known[key]["fp32_s"], known[key]["bf16_s"]
        where = f"measured earlier on this machine ({cache})"
    else:
        # Interleaved, best of two each: a burst of other work on the machine then skews both dtypes alike.
        fp32_s, bf16_s = measure(shapes, torch.float32, device), measure(shapes, torch.bfloat16, device)
        fp32_s = min(fp32_s, measure(shapes, torch.float32, device))
        bf16_s = min(bf16_s, measure(shapes, torch.bfloat16, device))
        known[key] = {"fp32_s": fp32_s, "bf16_s": bf16_s}
        _write_json(cache, known)
        where = "measured now"
    chosen = pick(fp32_s, bf16_s)
    ratio = fp32_s / bf16_s if bf16_s > 0 else float("inf")
    reason = (f"auto: the model's matrix products took {fp32_s * 1e3:.2f} ms in fp32 and {bf16_s * 1e3:.2f} ms in "
              f"bf16 (bf16 {ratio:.2f}× as fast; chosen when ≥ {1 / BF16_MARGIN:.2f}×), {where}")
    return Precision(chosen, reason, fp32_s * 1e3, bf16_s * 1e3)


# A rank-8 update of a 1024-wide layer over 256 tokens, as the layers compute it: A·xᵀ, then (x·Aᵀ)·Bᵀ
RANK_SHAPES: list[Shape] = [(8, 1024, 256), (256, 8, 1024)]
RANK_MARGIN = 2.0  # low-precision rank products count as fast up to this many times fp32's time


def low_precision_updates_fast(device: torch.device, *, cache: Path | None = None,
                               measure: Callable[[list[Shape], torch.dtype, torch.device], float] = time_gemms
                               ) -> bool:
    """Whether LoRA updates may run in bf16 under CPU autocast here: this CPU's rank-8 bf16 products take at most
    :data:`RANK_MARGIN` × fp32's time. Measured once per machine beside the precision (same cache, same key rules);
    always True on CUDA, whose layers pick the dtype themselves.

    The margin is wide on purpose: CPUs differ by far more than timing noise (AVX2-only CPUs run these products
    many times slower in bf16, CPUs with AVX-512 BF16 faster), and near parity bf16 still wins, as the fp32 path
    also pays casts of every layer's input and output. Set the answer on a model's layers with
    :func:`lorakit.core.fast_paths.set_low_precision_updates`.
    """
    if device.type != "cpu":
        return True
    measured = decide_precision("auto", device, RANK_SHAPES, cache=cache, measure=measure)
    return measured.bf16_ms <= RANK_MARGIN * measured.fp32_ms


def read_cache(path: Path) -> dict[str, Any]:
    """The precision measurements in ``path`` that are well formed."""
    known = _read_json(path)
    return {k: v for k, v in known.items() if isinstance(v, dict) and isinstance(v.get("fp32_s"), (int, float))
            and isinstance(v.get("bf16_s"), (int, float))}


def _read_json(path: Path) -> dict[str, Any]:
    """A cache file's dict; empty when it is absent or damaged (then measure again)."""
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _write_json(path: Path, known: dict[str, Any]) -> None:
    """Write atomically; a read-only home only costs a new measurement next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context a run computes in: bf16 autocast for ``bf16`` (the frozen base is then held in bf16 while
    trained weights and heads stay fp32), nothing for ``fp32``. Training and evaluation both run in it."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def resolve_precision(name: str, device: torch.device, shapes: list[Shape] | None = None) -> str:
    """``name``, or for ``auto`` the measured choice of :func:`decide_precision`."""
    return decide_precision(name, device, shapes).name


PEAK_ROWS = 1024  # rows of the products the matmul peak is measured on (a training micro-batch's tokens, capped)
PEAK_SECONDS = 0.1  # per product after a warm-up: a second or two on a small model, more with a big head; once


def peak_cache() -> Path:
    """``$XDG_CACHE_HOME/lorakit/matmul_peak.json``, beside the precision cache."""
    return default_cache().with_name("matmul_peak.json")


def matmul_peak(shapes: list[Shape], precision: str, device: torch.device, *, cache: Path | None = None,
                measure: Callable[[list[Shape], torch.dtype, torch.device], float] | None = None) -> float | None:
    """The matrix-product speed this machine reaches on a model's own products, in FLOP/s: the best of
    ``shapes`` (a layer's products and the output head's, see :func:`gemm_shapes`; the layer's also as their
    backward pass runs them) timed one by one in ``precision`` (``fp32`` or ``bf16``), measured once per machine
    and cached. None also when the products do not fit in memory.

    MFU divides a run's useful FLOPs per second by this: the share of the time the step would take if all its
    work ran as fast as the machine's best matrix product on these shapes. None when ``shapes`` is empty.

    Args:
        measure: Seconds for one product (injected by tests); default :func:`time_gemms` for
            :data:`PEAK_SECONDS`.
    """
    if not shapes:
        return None
    if precision not in ("fp32", "bf16"):
        raise InvalidValue(f"precision must be fp32 or bf16, got {precision!r}")
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    cache = cache or peak_cache()
    key = f"{machine_key(device, shapes)} | {precision}"
    known = _read_json(cache)
    if isinstance(known.get(key), (int, float)) and known[key] > 0:
        return float(known[key])
    measure = measure or (lambda s, d, dev: time_gemms(s, d, dev, PEAK_SECONDS))
    # Each product also as the backward pass runs it (the input gradient: inner and outer sizes swapped), except
    # the head's, which is the slowest to time and never the fastest product.
    products = [*shapes, *((m, n, k) for m, k, n in shapes[:3])]
    try:
        peak = max(2 * m * k * n / measure([(m, k, n)], dtype, device) for m, k, n in products)
    except (RuntimeError, MemoryError):  # no room for the head's product (a GPU already full): no MFU, no failure
        return None
    known[key] = peak
    _write_json(cache, known)
    return peak


def model_shapes(model: str, trust_remote_code: bool, tokens: int, max_rows: int = 256, head: bool = False
                 ) -> list[Shape]:
    """:func:`gemm_shapes` of a model spec (``default``, ``minilm`` or a folder), read from its ``config.json``
    without loading it; empty when it cannot be read (the model's own loading then says why)."""
    from .embedded_models import model_source

    try:
        values = json.loads((model_source(model, trust_remote_code) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return gemm_shapes(values, tokens, max_rows, head) if isinstance(values, dict) else []
