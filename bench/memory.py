"""Memory estimates (`lorakit memory`) against the measured peak RSS of a training step, on SmolLM2-135M.

For full fine-tuning, LoRA (r=8, all-linear) and QLoRA (the same on an NF4 base), at two batch sizes of 256-token
rows, in fp32 (the precision `lorakit train` picks on CPUs without AMX): the estimate of
`lorakit.models.calc.estimate_memory` and the peak resident memory of the process during two timed steps of the
`lorakit train` engine (after two warm-up steps, so AdamW's states exist), measured twice: with glibc's default
allocator, which keeps much of the memory freed within a step, and as `lorakit train --low-memory` runs (large
allocations mapped and returned at once: RSS then follows what the tensors need, which is what the estimate
counts). Each measurement runs in its own process.

    python bench/memory.py [--batches 2,4] [--seq 256]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import PeakRSS, engine_step, llm_batches, rss_mib, run_child  # noqa: E402
from _timing import markdown_table  # noqa: E402

METHODS = ["full", "lora", "qlora"]


def run_case(method: str, batch: int, seq: int, low_memory: bool) -> dict:
    from lorakit.core.process_memory import map_large_allocations

    if low_memory:
        map_large_allocations()  # as `lorakit train --low-memory` does
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit import LoraConfig, get_lora_model
    from lorakit.core.quant import quantize
    from lorakit.models.embedded_models import default_model_dir

    torch.manual_seed(0)
    source = str(default_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(source)
    runtime = rss_mib()  # Python, PyTorch, transformers and the tokenizer: the estimate's "runtime" part
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    if method == "qlora":
        quantize(model, "nf4", double_quant=True)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model = get_lora_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    model.train()
    rows = [ids.reshape(-1)[:batch * seq].view(batch, seq) for ids in llm_batches(tokenizer, 4 * batch)]
    step = engine_step(model, "fp32")
    for ids in rows[:2]:
        step(ids)
    with PeakRSS() as rss:
        for ids in rows[2:4]:
            step(ids)
    return {"peak_rss_mib": rss.peak, "runtime_mib": runtime}


def estimate(method: str, batch: int, seq: int) -> dict:
    from lorakit.models.calc import estimate_memory
    from lorakit.models.embedded_models import build_model

    return estimate_memory(build_model("default", meta=True), method, batch, seq, dtype="fp32").as_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="2,4", help="batch sizes (rows of --seq tokens)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per row")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # a child process: one measurement, as JSON on the last line
        method, batch, low = args.case.split(":")
        print(json.dumps(run_case(method, int(batch), args.seq, low == "low")))
        return
    from tqdm.auto import tqdm

    cases = [(m, int(b)) for b in args.batches.split(",") for m in METHODS]
    rows, worst = [], {"default": 0.0, "low": 0.0}
    with tqdm(total=2 * len(cases), desc="measurements", unit="run") as bar:
        for method, batch in cases:
            peak = {}
            for allocator in ("default", "low"):
                measured = run_child(__file__, "--case", f"{method}:{batch}:{allocator}", "--seq", str(args.seq))
                peak[allocator] = measured["peak_rss_mib"]
                bar.update()
            est = estimate(method, batch, args.seq)
            mib = {k: v / 2**20 for k, v in est.items() if isinstance(v, int) and not isinstance(v, bool)}
            ratios = {k: mib["total"] / v for k, v in peak.items()}
            worst = {k: max(worst[k], abs(ratios[k] - 1)) for k in worst}
            rows.append([method, batch, f"{mib['weights']:.0f}", f"{mib['gradients'] + mib['optimizer_states']:.0f}",
                         f"{mib['activations']:.0f}", f"{mib['logits']:.0f}", f"{mib['runtime']:.0f}",
                         f"{mib['total']:.0f}", f"{peak['low']:.0f}", f"{ratios['low']:.2f}",
                         f"{peak['default']:.0f}", f"{ratios['default']:.2f}"])
    print(markdown_table(["method", "batch", "weights", "grads + AdamW", "activations", "logits", "runtime",
                          "estimate", "measured (--low-memory)", "ratio", "measured (glibc default)", "ratio"], rows))
    print(f"\nMiB; SmolLM2-135M, {args.seq}-token rows, fp32. Largest deviation of the estimate: "
          f"{worst['low']:.0%} from --low-memory runs, {worst['default']:.0%} from default runs (target: 20%)")


if __name__ == "__main__":
    main()
