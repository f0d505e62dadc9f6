"""Unmerged LoRA overhead over the base model: lorakit vs PEFT, on SmolLM2-135M (the embedded default).

r=8 on all-linear, fp32 and bf16, prefill (8×128) and decode-like (8×1) forwards, timed interleaved in one
run. Targets: lorakit's overhead ≤ 3% (prefill) and ≤ 5% (decode). An overhead is the median over rounds of the
per-round time ratio; the quartiles of those ratios are printed beside it, so that a difference of a few percent
can be told from the machine's noise.

    python bench/overhead.py [--rounds 11]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import fastest_ratio, interleaved_samples, markdown_table, overhead, ratio_quartiles  # noqa: E402

from lorakit import LoraConfig, get_lora_model  # noqa: E402
from lorakit.models.embedded_models import load_default_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=11, help="timing rounds per fp32 cell (median is reported)")
    parser.add_argument("--bf16-rounds", type=int, default=3,
                        help="timing rounds per bf16 cell (bf16 is slow on CPUs without AVX512-BF16/AMX)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    args = parser.parse_args()
    import peft

    torch.manual_seed(0)
    base = load_default_model(torch.float32)
    ours = get_lora_model(copy.deepcopy(base), LoraConfig(r=8, target_modules="all-linear"))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, target_modules="all-linear"))
    models = {"base": base, "lorakit": ours, "peft": theirs}
    # (batch, seq, calls per round, rounds factor): decode calls are cheap, so they get more rounds against noise
    shapes = {"prefill 8×128": (8, 128, 1, 1), "decode 8×1": (8, 1, 10, 2)}
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        for model in models.values():
            model.to(dtype)
        for shape_name, (batch, seq, iters, factor) in shapes.items():
            ids = torch.randint(0, 49152, (batch, seq))
            with torch.inference_mode():
                fns = {name: (lambda m=m: m(input_ids=ids, use_cache=False).logits) for name, m in models.items()}
                rounds = factor * (args.rounds if dtype_name == "fp32" else args.bf16_rounds)
                samples = interleaved_samples(fns, rounds=rounds, iters=iters)
            t = {name: statistics.median(values) for name, values in samples.items()}
            over = {name: 100 * overhead(samples, name, "base") for name in ("lorakit", "peft")}
            rows.append([dtype_name, shape_name, f"{1e3 * t['base']:.2f}", f"{1e3 * t['lorakit']:.2f}",
                         f"{1e3 * t['peft']:.2f}", f"{over['lorakit']:+.1f}%",
                         ratio_quartiles(samples, "lorakit", "base"), fastest_ratio(samples, "lorakit", "base"),
                         f"{over['peft']:+.1f}%"])
            print(rows[-1], flush=True)
    print()
    print(f"SmolLM2-135M, r=8 all-linear (210 layers), unmerged, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}; "
          f"{args.rounds} (fp32) / {args.bf16_rounds} (bf16) interleaved rounds, twice that for decode; times are medians, "
          f"overheads the median of per-round ratios (quartiles: 25th…75th percentile of those ratios; fastest: "
          f"fastest round over fastest round)")
    print(markdown_table(["dtype", "batch", "base ms", "lorakit ms", "PEFT ms", "lorakit overhead",
                          "lorakit quartiles", "lorakit fastest", "PEFT overhead"], rows))


if __name__ == "__main__":
    main()
