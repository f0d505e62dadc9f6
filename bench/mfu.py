"""Model FLOPs utilization of a training step, and where the rest of the time goes.

The step of `lorakit train`'s engine (chunked loss, fused AdamW, clipping) on SmolLM2-135M (embedded), 4 rows ×
256 tokens of real text (the Alpaca outputs in ../shared/data), r=8 on all-linear (or full fine-tuning), in the
precision `auto` picks on this machine (or --precision). MFU = the step's useful FLOPs (lorakit.models.calc.flop_counter)
per second over the best matrix-product speed this machine reaches on the model's own shapes in that precision
(lorakit.models.devices.matmul_peak). Then one step under torch.profiler: the top ops by time, and the step's time
split into matrix products, attention and everything else.

    python bench/mfu.py [--steps 6] [--method lora|full] [--precision auto|fp32|bf16] [--compile] [--top 10]

With --compile the decoder blocks are compiled as `lorakit train --compile` compiles them (the warm-up step pays
the compilation).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import cpu_name, engine_step, llm_batches  # noqa: E402
from _timing import markdown_table  # noqa: E402

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmm_", "aten::matmul"}


def _model(method: str, precision: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from lorakit import LoraConfig, get_lora_model
    from lorakit.models.embedded_models import default_model_dir

    frozen_bf16 = precision == "bf16" and method == "lora"  # the engine keeps a frozen base in bf16
    model = AutoModelForCausalLM.from_pretrained(str(default_model_dir()),
                                                 dtype=torch.bfloat16 if frozen_bf16 else torch.float32)
    if method == "full":
        return model.requires_grad_(True)
    return get_lora_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="timed steps after one warm-up step (median reported)")
    parser.add_argument("--method", choices=("lora", "full"), default="lora")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--compile", action="store_true", help="compile the decoder blocks, as lorakit train --compile")
    parser.add_argument("--top", type=int, default=10, help="ops in the profile table")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from lorakit.models.calc import flop_counter
    from lorakit.models.devices import PEAK_ROWS, decide_precision, matmul_peak, model_shapes
    from lorakit.models.embedded_models import default_model_dir

    cpu = torch.device("cpu")
    precision = decide_precision(args.precision, cpu, model_shapes("default", False, 256))
    name = precision.name
    peak = matmul_peak(model_shapes("default", False, 4 * 256, max_rows=PEAK_ROWS, head=True), name, cpu)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir()))
    model = _model(args.method, name)
    if args.compile:
        from lorakit.models.compiling import compile_blocks

        compile_blocks(model, training=True)
    model.train()
    batches = llm_batches(tokenizer, args.steps + 2)
    step = engine_step(model, name)
    # Every position but each row's last has a target: the loss computes logits there only.
    counter = flop_counter(model)
    flops = counter.step([256] * 4, head_rows=4 * 255)
    attention_flops = 3 * counter.pair_forward * 4 * (256 * 257 // 2)  # forward, and twice that backward
    times = []
    for ids in batches[:args.steps + 1]:
        start = time.perf_counter()
        step(ids)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times[1:])
    mfu = flops.total / step_s / peak

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(batches[-1])
    events = prof.key_averages()
    total_us = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:args.top]
    rows = [[e.key[:60], f"{e.self_cpu_time_total / 1e3:.0f}", f"{100 * e.self_cpu_time_total / total_us:.1f}%",
             str(e.count)] for e in top]
    parts = {"matrix products": 0.0, "attention": 0.0, "everything else": 0.0}
    for e in events:
        part = ("matrix products" if e.key in MATMUL_OPS else
                "attention" if "scaled_dot_product" in e.key else "everything else")
        parts[part] += e.self_cpu_time_total
    matmul_s = parts["matrix products"] / 1e6
    attention_s = parts["attention"] / 1e6

    print(f"{cpu_name()} ({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; precision {name} ({precision.reason})")
    print(f"SmolLM2-135M, {args.method}{' r=8 all-linear' if args.method == 'lora' else ''}"
          f"{', compiled blocks' if args.compile else ''}, 4 × 256 tokens: "
          f"{flops.total / 1e9:.1f} useful GFLOP per step ({flops.forward / 1e9:.1f} forward, "
          f"{flops.backward / 1e9:.1f} backward)")
    print()
    print(markdown_table(["step s (median)", "tokens/s", "useful GFLOP/s", "matmul peak GFLOP/s", "MFU"],
                         [[f"{step_s:.3f}", f"{1024 / step_s:.0f}", f"{flops.total / step_s / 1e9:.0f}",
                           f"{peak / 1e9:.0f}", f"{100 * mfu:.1f}%"]]))
    print()
    print(f"One step under torch.profiler ({total_us / 1e6:.2f} s of CPU time on the main thread):")
    print()
    print(markdown_table(["part", "ms", "share"], [[k, f"{v / 1e3:.0f}", f"{100 * v / total_us:.1f}%"]
                                                   for k, v in parts.items()]))
    print()
    product_flops = flops.total - attention_flops
    if matmul_s > 0 and attention_s > 0:  # compiled blocks run fused kernels instead: no split to show
        print(f"Outside attention the matrix products ran at {product_flops / matmul_s / 1e9:.0f} GFLOP/s "
              f"({100 * product_flops / matmul_s / peak:.0f}% of the peak); attention at "
              f"{attention_flops / attention_s / 1e9:.0f} GFLOP/s ({100 * attention_flops / attention_s / peak:.0f}%).")
    print()
    print(markdown_table(["op", "self ms", "share", "calls"], rows))


if __name__ == "__main__":
    main()
