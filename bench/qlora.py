"""QLoRA vs LoRA: base weight bytes, peak memory and speed of a train step, measured in one run.

SmolLM2-135M (embedded), r=8 LoRA on `all-linear`, 4 rows × 256 tokens of real text per step (the Alpaca
outputs in ../shared/data), the engine of `lorakit train` (chunked loss, fused AdamW). Cases:

- lora-bf16: the base in bf16, bf16 autocast (the issue's reference: "LoRA (bf16 base)");
- qlora-bf16: the same base quantized to NF4 with double quantization, computing in bf16;
- lora-fp32 / qlora-fp32: the same two in fp32 (the precision `auto` picks on CPUs without AMX).

Each case runs in its own process; peak RSS is sampled during the timed steps only (after 2 warm-up steps, when
the allocator has reached its plateau), cases interleaved over --rounds, medians reported.

    python bench/qlora.py [--rounds 1] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import PeakRSS, engine_step, llm_batches, rss_mib, run_child  # noqa: E402
from _timing import markdown_table  # noqa: E402

CASES = ["lora-bf16", "qlora-bf16", "lora-fp32", "qlora-fp32"]


def _base_bytes(model: torch.nn.Module) -> int:
    """Bytes of the frozen base: parameters and buffers as stored, plus the 4-bit layers' scales."""
    from lorakit.core.layers import is_4bit
    from lorakit.core.quant import quantized_bytes

    plain = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                if ".adapters." not in n and type(p).__name__ != "Params4bit")
    if any(is_4bit(m) for m in model.modules()):
        plain += quantized_bytes(model)[0]
    return plain


def run_case(case: str, steps: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit import LoraConfig, get_lora_model
    from lorakit.core.quant import quantize, quantized_bytes
    from lorakit.models.embedded_models import default_model_dir

    torch.manual_seed(0)
    method, precision = case.split("-")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    source = str(default_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    bf16_bytes = sum(p.numel() * 2 for p in model.parameters())  # the whole base in bf16, for the ratio
    if method == "qlora":
        quantize(model, "nf4", double_quant=True)
    model = get_lora_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    model.train()
    batches = llm_batches(tokenizer, steps + 2)
    step = engine_step(model, precision)
    ready_rss = rss_mib()
    for ids in batches[:2]:
        step(ids)
    with PeakRSS() as rss:
        start = time.perf_counter()
        for ids in batches[2:]:
            step(ids)
        seconds = time.perf_counter() - start
    packed, layers_bf16 = quantized_bytes(model)
    return {"tokens_per_s": sum(b.numel() for b in batches[2:]) / seconds, "peak_rss_mib": rss.peak,
            "ready_rss_mib": ready_rss, "base_bytes": _base_bytes(model), "base_bf16_bytes": bf16_bytes,
            "quantized_layer_bytes": packed, "quantized_layer_bf16_bytes": layers_bf16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1, help="runs of every case, interleaved (median reported)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case (after 2 warm-up steps)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # a child process: one measurement, as JSON on the last line
        print(json.dumps(run_case(args.case, args.steps)))
        return
    from tqdm.auto import tqdm

    runs: dict[str, list[dict]] = {c: [] for c in CASES}
    with tqdm(total=args.rounds * len(CASES), desc="cases", unit="case") as bar:
        for _ in range(args.rounds):
            for case in CASES:
                bar.set_postfix_str(case)
                runs[case].append(run_child(__file__, "--case", case, "--steps", str(args.steps)))
                bar.update()
    med = {c: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for c, rs in runs.items()}
    rows = [[c, f"{m['base_bytes'] / 2**20:.0f}", f"{m['ready_rss_mib']:.0f}", f"{m['peak_rss_mib']:.0f}",
             f"{m['tokens_per_s']:.0f}"] for c, m in med.items()]
    print(markdown_table(["case", "base weights MiB", "RSS before training MiB", "peak RSS in steps MiB",
                          "tokens/s"], rows))
    q = med["qlora-bf16"]
    packed, bf16 = q["quantized_layer_bytes"], q["quantized_layer_bf16_bytes"]
    print(f"\n4-bit layers: {packed / 2**20:.1f} MiB vs {bf16 / 2**20:.1f} MiB in bf16 = {packed / bf16:.3f}x "
          f"(target <= 0.3x)")
    print(f"whole base (embeddings stay bf16): {q['base_bytes'] / 2**20:.1f} MiB vs "
          f"{q['base_bf16_bytes'] / 2**20:.1f} MiB = {q['base_bytes'] / q['base_bf16_bytes']:.3f}x")
    for precision in ("bf16", "fp32"):
        lora, qlora = med[f"lora-{precision}"], med[f"qlora-{precision}"]
        print(f"{precision}: peak RSS QLoRA / LoRA = {qlora['peak_rss_mib'] / lora['peak_rss_mib']:.3f} "
              f"({qlora['peak_rss_mib'] - lora['peak_rss_mib']:+.0f} MiB); speed QLoRA / LoRA = "
              f"{qlora['tokens_per_s'] / lora['tokens_per_s']:.2f}x")
    print(f"({args.rounds} round(s), {args.steps} timed steps of 4 x 256 tokens per case)")


if __name__ == "__main__":
    main()
