"""``--compile`` against eager, side by side in one run: compile time and steady-state speed.

SmolLM2-135M (embedded), 4 rows × 256 tokens of real text (the Alpaca outputs in ../shared/data), r=8 on
`all-linear`, the engine of `lorakit train` (chunked loss, fused AdamW, clipping, the precision `auto` picks on this
machine). Cases, each in its own process, with an empty inductor cache (so the compile time is a cold one, as on a
first run):

- lora / qlora (the base in nf4) / full: two copies of the model, one eager and one with its blocks compiled
  (:func:`lorakit.models.compiling.compile_blocks` with ``training=True``, as ``lorakit train --compile`` does). The
  first optimizer step of each copy is reported (the compiled one's includes the compilation); then the two copies
  take ``--steps`` steps each, interleaved, after one warm-up step each; the median s/step of each is reported.
  The check column compares the loss of the two on the same weights and batch, with bf16's own error for scale.
- decode: LoRA on the model, greedy ``generate`` of 8 chat prompts × 32 new tokens (KV cache, left padding), eager
  and compiled interleaved; tokens/s is generated tokens over wall time (prefill included), and the two must give
  the same tokens.

A case that fails to compile is reported with its error instead of stopping the run.

    python bench/compile.py [--steps 3] [--rounds 3] [--cases lora,qlora,full,decode]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import PeakRSS, cpu_name, engine_step, llm_batches, run_child  # noqa: E402

CASES = ("lora", "qlora", "full", "decode")
PROMPTS = ["Write a haiku about autumn.", "What is the capital of France?", "Explain LoRA in one sentence.",
           "List three prime numbers.", "Translate 'good morning' to Spanish.", "Why is the sky blue?",
           "Give me a tip for learning Python.", "What does a CPU do?"]


def _model(case: str) -> torch.nn.Module:
    from lorakit import LoraConfig, get_lora_model, quantize
    from lorakit.models.embedded_models import load_default_model

    torch.manual_seed(0)
    base = load_default_model()
    if case == "full":
        return base.train()
    if case == "qlora":
        base = quantize(base, "nf4")
    return get_lora_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")).train()


def run_train_case(case: str, steps: int) -> dict:
    """Eager and compiled copies of one model: the compiled copy's first step (compile), then ``steps`` timed
    steps of each, interleaved, after a warm-up step of each."""
    from lorakit.models.compiling import compile_blocks
    from lorakit.models.devices import resolve_precision
    from lorakit.models.embedded_models import load_default_tokenizer

    precision = resolve_precision("auto", torch.device("cpu"))
    eager = _model(case)
    compiled = copy.deepcopy(eager)
    blocks = compile_blocks(compiled, training=True)
    batches = llm_batches(load_default_tokenizer(), 2 + steps)
    step = {"eager": engine_step(eager, precision), "compiled": engine_step(compiled, precision)}
    t = time.perf_counter()
    step["eager"](batches[0])
    first_eager = time.perf_counter() - t
    t = time.perf_counter()
    with PeakRSS() as rss:
        step["compiled"](batches[0])
    first_compiled = time.perf_counter() - t
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for i in range(1 + steps):  # step 0 is the warm-up of the steady state (one more of each, untimed)
        for name in ("eager", "compiled") if i % 2 == 0 else ("compiled", "eager"):
            t = time.perf_counter()
            step[name](batches[1 + i])
            if i:
                times[name].append(time.perf_counter() - t)
    # Exactness on this model: the same weights and batch give the same loss, compiled or eager.
    from lorakit.training.loss import causal_lm_loss

    ids = batches[-1]
    batch = {"input_ids": ids, "targets": torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)}
    with torch.no_grad():  # the eager copy's trained weights (a 4-bit base is frozen, and the same in both)
        for p, q in zip(eager.parameters(), compiled.parameters()):
            if p.requires_grad:
                q.copy_(p)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):  # the graphs already compiled
        losses = [causal_lm_loss(m, batch)[0].item() for m in (eager, compiled)]
    reference = causal_lm_loss(eager, batch)[0].item()  # fp32: how far bf16 itself moves the loss
    return {"case": case, "precision": precision, "blocks": blocks, "first_eager_s": first_eager,
            "first_compiled_s": first_compiled, "compile_rss_mib": rss.peak,
            "eager_s": statistics.median(times["eager"]), "compiled_s": statistics.median(times["compiled"]),
            "loss_eager": losses[0], "loss_compiled": losses[1], "loss_fp32": reference}


def run_decode_case(rounds: int, new_tokens: int) -> dict:
    """Greedy generation of the 8 prompts, eager vs compiled, interleaved over ``rounds`` after the first
    (compiling) call."""
    from lorakit.models.compiling import compile_blocks
    from lorakit.models.embedded_models import load_default_tokenizer
    from lorakit.training.data import prompt_ids

    tokenizer = load_default_tokenizer()
    eager = _model("lora").eval()
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled)
    prompts = [prompt_ids(tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tokenizer.eos_token_id, dtype=torch.long)  # (8, width), left padded
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1

    def generate(model: torch.nn.Module) -> tuple[float, torch.Tensor]:
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, pad_token_id=tokenizer.eos_token_id)
        return time.perf_counter() - t, out[:, width:]

    first_eager, ref = generate(eager)
    first_compiled, out = generate(compiled)
    same = bool(torch.equal(ref, out))
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for i in range(rounds):
        for name in ("eager", "compiled") if i % 2 == 0 else ("compiled", "eager"):
            seconds, out = generate(eager if name == "eager" else compiled)
            times[name].append(seconds)
            same = same and bool(torch.equal(ref, out))
    tokens = len(prompts) * new_tokens
    return {"case": "decode", "first_eager_s": first_eager, "first_compiled_s": first_compiled,
            "eager_tok_s": tokens / statistics.median(times["eager"]),
            "compiled_tok_s": tokens / statistics.median(times["compiled"]), "same_tokens": same}


def _child(case: str, steps: int, rounds: int, new_tokens: int) -> dict:
    try:
        if case == "decode":
            return run_decode_case(rounds, new_tokens)
        return run_train_case(case, steps)
    except Exception as err:  # a combination that does not compile is a result, not a crash of the benchmark
        return {"case": case, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}


def _row(r: dict) -> str:
    if "error" in r:
        return f"| {r['case']} | failed: {r['error']} | | | | | |"
    if r["case"] == "decode":
        speedup = r["compiled_tok_s"] / r["eager_tok_s"]
        return (f"| decode (8 × 32 tokens) | {r['first_eager_s']:.1f} s | {r['first_compiled_s']:.1f} s | "
                f"{r['eager_tok_s']:.1f} tok/s | {r['compiled_tok_s']:.1f} tok/s | {speedup:.2f}× | "
                f"same tokens: {r['same_tokens']} |")
    speedup = r["eager_s"] / r["compiled_s"]
    rel = abs(r["loss_compiled"] - r["loss_eager"]) / abs(r["loss_eager"])
    check = f"loss vs eager {rel:.1e}"
    if "loss_fp32" in r and r["precision"] != "fp32":  # bf16's own error, for scale
        check += f" (eager {r['precision']} vs fp32: {abs(r['loss_eager'] - r['loss_fp32']) / abs(r['loss_fp32']):.1e})"
    return (f"| {r['case']} ({r['precision']}) | {r['first_eager_s']:.1f} s | {r['first_compiled_s']:.1f} s | "
            f"{r['eager_s']:.2f} s/step | {r['compiled_s']:.2f} s/step | {speedup:.2f}× | {check} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps of each copy (after a warm-up)")
    parser.add_argument("--rounds", type=int, default=3, help="timed generate calls of each copy")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # the child's one case
    args = parser.parse_args()
    if args.case:
        print(json.dumps(_child(args.case, args.steps, args.rounds, args.new_tokens)))
        return
    results = []
    for case in args.cases.split(","):
        with tempfile.TemporaryDirectory() as cache:  # a cold inductor cache: the compile time of a first run
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
            r = run_child(__file__, "--case", case, "--steps", str(args.steps), "--rounds", str(args.rounds),
                          "--new-tokens", str(args.new_tokens))
        print(json.dumps(r), file=sys.stderr, flush=True)
        results.append(r)
    print(f"\n{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; SmolLM2-135M, "
          f"4 × 256 tokens, r=8 all-linear; medians of {args.steps} steps / {args.rounds} generate calls\n")
    print("| case | first step, eager | first step, compiled (compile) | eager | compiled | speedup | check |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(_row(r))


if __name__ == "__main__":
    main()
