"""Adapter lifecycle speed on SmolLM2-135M (the embedded default), lorakit vs PEFT, timed interleaved in one run.

1. Merge time: fold an r=8 all-linear adapter into the base (and take it out again).
2. Mixed batches: 8 rows, each with its own r=8 all-linear adapter (`adapter_names=[...]`), against the same
   batch through the model with one adapter merged (the cheapest single-adapter deployment), for prefill (8×128)
   and decode-like (8×1) forwards, fp32 and bf16. Targets: mixed-8 overhead ≤ 5% (prefill), ≤ 30% (decode).
   An overhead is the median over rounds of the per-round time ratio; its quartiles are printed beside it.
   "Routing held" is the same mixed batch with the routing set once (`with model.mixed_batch(names):`) for all the
   timed passes, as `generate()` and `lorakit serve` decode; the plain lorakit column sets it on every call.

    python bench/adapters.py [--rounds 9]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import (  # noqa: E402
    fastest_ratio,
    interleaved,
    interleaved_samples,
    markdown_table,
    overhead,
    ratio_quartiles,
)

from lorakit import LoraConfig, get_lora_model  # noqa: E402
from lorakit.models.embedded_models import load_default_model  # noqa: E402

NAMES = [f"task{i}" for i in range(8)]


def _randomize(params) -> None:
    with torch.no_grad():
        for p in params:
            if p.requires_grad or p.dim() == 2:
                p.normal_(0, 0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9, help="timing rounds per fp32 cell (median is reported)")
    parser.add_argument("--bf16-rounds", type=int, default=2, help="timing rounds per bf16 cell")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    args = parser.parse_args()
    import peft

    torch.manual_seed(0)
    base = load_default_model(torch.float32)
    config = dict(r=8, lora_alpha=16, target_modules="all-linear")

    ours = get_lora_model(copy.deepcopy(base), LoraConfig(**config), NAMES[0])
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config), adapter_name=NAMES[0])
    for name in NAMES[1:]:
        ours.add_adapter(name, LoraConfig(**config))
        theirs.add_adapter(name, peft.LoraConfig(**config))
    for name in NAMES:  # the same random update in both libraries
        ours.set_adapter(name)
        _randomize(p for p in ours.parameters() if p.requires_grad)
    from lorakit.files.io import adapter_state_dict

    for name in NAMES:
        peft.set_peft_model_state_dict(theirs, {"base_model.model." + k: v for k, v in
                                                adapter_state_dict(ours, name).items()}, adapter_name=name)
    ours.set_adapter(NAMES[0])
    theirs.set_adapter(NAMES[0])
    ours.eval()
    theirs.eval()  # PEFT refuses adapter_names in training mode

    # 1. merge time (fp32)
    def merge_ours():
        ours.merge_adapter()
        ours.unmerge_adapter()

    def merge_theirs():
        theirs.merge_adapter()
        theirs.unmerge_adapter()

    t = interleaved({"lorakit": merge_ours, "peft": merge_theirs}, rounds=args.rounds, iters=2, warmup=1)
    merge_rows = [["merge + unmerge, r=8 all-linear (210 layers)", f"{1e3 * t['lorakit']:.1f}",
                   f"{1e3 * t['peft']:.1f}", f"{t['peft'] / t['lorakit']:.2f}×"]]
    print(merge_rows[-1], flush=True)

    # 2. mixed batches vs the merged single-adapter batch
    merged = copy.deepcopy(ours).merge_and_unload(NAMES[:1])
    # As generate() and `lorakit serve` decode: the routing set once, held over many forward passes.
    held = copy.deepcopy(ours)
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        for m in (ours, theirs, merged, held):
            m.to(dtype)
        for shape_name, (seq, iters) in {"prefill 8×128": (128, 1), "decode 8×1": (1, 10)}.items():
            ids = torch.randint(0, 49152, (8, seq))
            with torch.inference_mode(), held.mixed_batch(NAMES):
                fns = {
                    "merged": lambda: merged(input_ids=ids, use_cache=False).logits,
                    "lorakit": lambda: ours(input_ids=ids, use_cache=False, adapter_names=NAMES).logits,
                    "held": lambda: held(input_ids=ids, use_cache=False).logits,
                    "peft": lambda: theirs(input_ids=ids, use_cache=False, adapter_names=NAMES).logits,
                }
                rounds = args.rounds if dtype_name == "fp32" else args.bf16_rounds
                samples = interleaved_samples(fns, rounds=rounds * (2 if seq == 1 else 1), iters=iters, warmup=1)
            t = {name: statistics.median(values) for name, values in samples.items()}
            rows.append([dtype_name, shape_name, f"{1e3 * t['merged']:.1f}", f"{1e3 * t['lorakit']:.1f}",
                         f"{1e3 * t['peft']:.1f}", f"{100 * overhead(samples, 'lorakit', 'merged'):+.1f}%",
                         ratio_quartiles(samples, "lorakit", "merged"), fastest_ratio(samples, "lorakit", "merged"),
                         f"{1e3 * t['held']:.1f}", f"{100 * overhead(samples, 'held', 'merged'):+.1f}%",
                         f"{100 * overhead(samples, 'peft', 'merged'):+.1f}%"])
            print(rows[-1], flush=True)
    print()
    print(f"SmolLM2-135M, 8 adapters r=8 all-linear, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}; {args.rounds} interleaved rounds (twice that "
          f"for decode); times are medians, overheads the median of per-round ratios (quartiles: 25th…75th "
          f"percentile of those ratios; fastest: fastest round over fastest round)")
    print(markdown_table(["operation (fp32)", "lorakit ms", "PEFT ms", "lorakit speed-up"], merge_rows))
    print()
    print(markdown_table(["dtype", "batch", "merged 1 adapter ms", "lorakit mixed-8 ms", "PEFT mixed-8 ms",
                          "lorakit overhead", "lorakit quartiles", "lorakit fastest", "lorakit, routing held ms",
                          "lorakit, routing held overhead", "PEFT overhead"], rows))


if __name__ == "__main__":
    main()
