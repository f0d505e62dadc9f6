"""Training speed and memory: lorakit's trainer engine vs PEFT with a plain loop, side by side in one run.

Causal LM: SmolLM2-135M (embedded), 4 rows × 256 tokens of real text (the Alpaca outputs in ../shared/data),
r=8 on `all-linear` and on `q_proj,v_proj`. Encoder: all-MiniLM-L6-v2 on SST-2 sentences, batch 32, at most 64
tokens, r=8 on query,value with the classifier head trained. Contenders:

- peft-bf16 / peft-fp32: `peft.get_peft_model` and the plain loop (`model(..., labels).loss.backward()`, AdamW),
  with bf16 autocast or in fp32;
- lorakit: the engine of `lorakit train` (its LoRA layers, the chunked loss, the precision `auto` picks on this
  machine); lorakit-bf16 forces bf16 autocast;
- lorakit-gc: the same with gradient checkpointing (less memory, more compute);
- lorakit-full: full fine-tuning in the same engine;
- lorakit-compile (causal LM): the engine with its decoder blocks compiled, as `lorakit train --compile` runs
  (the warm-up step pays the compilation);
- trainer-peft (causal LM): the baseline users actually run, as PEFT's own examples do it:
  `peft.get_peft_model(model, LoraConfig(...))` and `transformers.Trainer(...).train()` with
  `DataCollatorForLanguageModeling`, its default optimizer (fused AdamW), clipping at 1.0, and `bf16=True` exactly
  when lorakit's `auto` picks bf16 on this machine (the model loaded in fp32, as the examples load it).

Each case runs in its own process (peak RSS is sampled during the training steps only), cases interleaved
over --rounds; the median per case is reported with the ratios the issue asks for. Causal-LM rows also give MFU:
the useful FLOPs of a step (lorakit.models.calc.flop_counter; the same for every engine: logits are useful only where
there is a target) per second, over this machine's matmul peak in that precision
(lorakit.models.devices.matmul_peak).

    python bench/train.py [--rounds 1] [--llm-steps 4] [--enc-steps 20] [--only llm|enc] [--cases a,b] [--targets t]
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
from _common import DATA, PeakRSS, cpu_name, llm_batches, run_child  # noqa: E402
from _timing import markdown_table  # noqa: E402

LLM_CASES = ["peft-bf16", "peft-fp32", "trainer-peft", "lorakit", "lorakit-bf16", "lorakit-compile"]
ENC_CASES = ["peft-bf16", "peft-fp32", "lorakit", "lorakit-bf16", "lorakit-full"]


def _enc_batches(tokenizer, n: int) -> list[dict[str, torch.Tensor]]:
    path = DATA / "sst2" / "train.tsv"
    if not path.is_file():
        raise SystemExit(f"the encoder benchmark needs {path}")
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:1 + 32 * n]]
    batches = []
    for i in range(n):
        chunk = rows[32 * i:32 * (i + 1)]
        enc = tokenizer([r[0] for r in chunk], padding=True, truncation=True, max_length=64, return_tensors="pt")
        batches.append({**enc, "labels": torch.tensor([int(r[1]) for r in chunk])})
    return batches


def run_trainer_case(target: str, steps: int) -> dict:
    """`transformers.Trainer` + PEFT on the causal-LM batches: ``steps + 1`` optimizer steps, the first one (warm-up)
    untimed; tokens/s and peak RSS over the timed steps, measured from a callback at the step boundaries."""
    import tempfile

    import peft
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from lorakit.models.devices import resolve_precision
    from lorakit.models.embedded_models import default_model_dir

    torch.manual_seed(0)
    precision = resolve_precision("auto", torch.device("cpu"))  # what the lorakit case runs in
    source = str(default_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source)
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=target if target == "all-linear" else target.split(","),
        task_type="CAUSAL_LM"))
    dataset = [{"input_ids": row} for batch in llm_batches(tokenizer, steps + 1) for row in batch]  # 256 tokens each

    class Clock(TrainerCallback):
        """Timestamps every step's end; samples the peak RSS from the first step's end to the last one's."""

        def __init__(self) -> None:
            self.ends: list[float] = []
            self.rss = PeakRSS()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())
            if len(self.ends) == 1:
                self.rss.__enter__()
            elif len(self.ends) == steps + 1:
                self.rss.__exit__(None, None, None)

    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=4, max_steps=steps + 1,
                                 learning_rate=1e-4, bf16=precision == "bf16", use_cpu=True, save_strategy="no",
                                 logging_strategy="no", report_to="none", disable_tqdm=True, seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=dataset,
                          data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), callbacks=[clock])
        trainer.train()
    assert len(clock.ends) == steps + 1, clock.ends
    seconds = clock.ends[-1] - clock.ends[0]
    return {"tokens_per_s": steps * 4 * 256 / seconds, "examples_per_s": steps * 4 / seconds,
            "peak_rss_mib": clock.rss.peak, "precision": precision, "step_s": seconds / steps}


def run_case(kind: str, case: str, target: str, steps: int) -> dict:
    """One contender: build, warm up, time ``steps`` optimizer steps; tokens/s, examples/s and peak RSS."""
    if case == "trainer-peft":
        return run_trainer_case(target, steps)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from lorakit import LoraConfig, get_lora_model
    from lorakit.models.devices import resolve_precision
    from lorakit.models.embedded_models import default_model_dir, minilm_dir
    from lorakit.training.loop import make_optimizer
    from lorakit.training.loss import causal_lm_loss, classification_loss
    from lorakit.training.tasks import enable_checkpointing

    torch.manual_seed(0)
    precision = {"peft-bf16": "bf16", "peft-fp32": "fp32", "lorakit-bf16": "bf16"}.get(
        case, resolve_precision("auto", torch.device("cpu")))
    frozen_bf16 = precision == "bf16" and case.startswith("lorakit") and case != "lorakit-full"
    dtype = torch.bfloat16 if frozen_bf16 else torch.float32  # the engine keeps a frozen base in bf16
    if kind == "llm":
        source = str(default_model_dir())
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        targets, task = (target if target == "all-linear" else target.split(",")), "CAUSAL_LM"
        batches = [{"input_ids": ids} for ids in llm_batches(tokenizer, steps + 1)]
    else:
        source = str(minilm_dir())
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForSequenceClassification.from_pretrained(source, dtype=dtype, num_labels=2)
        targets, task = ["query", "value"], "SEQ_CLS"
        batches = _enc_batches(tokenizer, steps + 2)
    if case.startswith("peft"):
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                                           task_type=task))

        def loss_of(batch):
            if kind == "llm":
                return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
            return model(**batch).loss
    else:
        if case == "lorakit-gc":
            enable_checkpointing(model)
        if case == "lorakit-full":
            for p in model.parameters():
                p.requires_grad_(True)
        else:
            model = get_lora_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type=task))
        if case == "lorakit-compile":
            from lorakit.models.compiling import compile_blocks

            compile_blocks(model, training=True)

        def loss_of(batch):
            if kind == "llm":
                ids = batch["input_ids"]
                total, count = causal_lm_loss(model, {"input_ids": ids, "targets": torch.cat(
                    [ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)})
            else:
                total, count = classification_loss(model, batch)
            return total / count
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # PEFT's plain loop takes the default AdamW; the engine its own choice (fused where available).
    optimizer = (torch.optim.AdamW(params, lr=1e-4) if case.startswith("peft") else make_optimizer(params, 1e-4, 0.0))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(batch) -> None:
        with autocast:
            loss = loss_of(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    warm = 1 if kind == "llm" else 2
    for batch in batches[:warm]:
        step(batch)
    timed = batches[warm:]
    with PeakRSS() as rss:
        start = time.perf_counter()
        for batch in timed:
            step(batch)
        seconds = time.perf_counter() - start
    tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in timed)
    examples = sum(b["input_ids"].shape[0] for b in timed)
    return {"tokens_per_s": tokens / seconds, "examples_per_s": examples / seconds, "peak_rss_mib": rss.peak,
            "precision": precision, "step_s": seconds / len(timed)}


def _mfu(case: str, target: str, measured: dict) -> float | None:
    """MFU of a causal-LM case: useful FLOPs of a step of 4 × 256 tokens over its seconds and the matmul peak."""
    from lorakit import LoraConfig, get_lora_model
    from lorakit.models.calc import flop_counter, meta_model
    from lorakit.models.devices import PEAK_ROWS, matmul_peak, model_shapes

    model = meta_model("default")
    if case == "lorakit-full":
        model.requires_grad_(True)
    else:
        model = get_lora_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=target if target == "all-linear"
                                                 else target.split(",")))
    flops = flop_counter(model).step([256] * 4, head_rows=4 * 255).total
    peak = matmul_peak(model_shapes("default", False, 4 * 256, max_rows=PEAK_ROWS, head=True), measured["precision"],
                       torch.device("cpu"))
    return flops / measured["step_s"] / peak if peak else None


def _spawn(kind: str, case: str, target: str, steps: int) -> dict:
    return run_child(__file__, "--case", f"{kind}:{case}:{target}", "--steps", str(steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1, help="runs of every case, interleaved (median reported)")
    parser.add_argument("--llm-steps", type=int, default=4, help="timed steps per causal-LM case (after 1 warmup)")
    parser.add_argument("--enc-steps", type=int, default=20, help="timed steps per encoder case (after 2 warmup)")
    parser.add_argument("--only", choices=["llm", "enc"], help="run one half only")
    parser.add_argument("--cases", help="comma-separated engines to run only, e.g. lorakit,trainer-peft")
    parser.add_argument("--targets", help="causal-LM targets to run only: all-linear or q_proj,v_proj")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # a child process: one measurement, as JSON on the last line
        kind, case, target = args.case.split(":")
        print(json.dumps(run_case(kind, case, target, args.steps)))
        return

    plan = []
    if args.only != "enc":
        plan += [("llm", c, t, args.llm_steps) for t in ("all-linear", "q_proj,v_proj") for c in LLM_CASES]
        plan += [("llm", c, "all-linear", args.llm_steps) for c in ("lorakit-gc", "lorakit-full")]
    if args.only != "llm":
        plan += [("enc", c, "query,value", args.enc_steps) for c in ENC_CASES]
    if args.cases:
        plan = [key for key in plan if key[1] in args.cases.split(",")]
    if args.targets:
        plan = [key for key in plan if key[0] != "llm" or key[2] == args.targets]
    runs: dict[tuple, list[dict]] = {}
    for r in range(args.rounds):
        for key in (plan if r % 2 == 0 else plan[::-1]):
            result = _spawn(*key)
            runs.setdefault(key[:3], []).append(result)
            print(f"  {':'.join(key[:3])}: {result['tokens_per_s']:.0f} tok/s, {result['examples_per_s']:.1f} ex/s, "
                  f"peak RSS {result['peak_rss_mib']:.0f} MiB ({result['precision']})", file=sys.stderr, flush=True)
    med = {key: {m: statistics.median(r[m] for r in rs) for m in rs[0] if m != "precision"} | {
        "precision": rs[0]["precision"]} for key, rs in runs.items()}

    rows = []
    for (kind, case, target), m in med.items():
        mfu = _mfu(case, target, m) if kind == "llm" else None
        rows.append([kind, target, case, m["precision"], f"{m['tokens_per_s']:.0f}", f"{m['examples_per_s']:.1f}",
                     f"{m['peak_rss_mib']:.0f}", f"{100 * mfu:.1f}%" if mfu else "—"])
    print(f"{cpu_name()} ({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}")
    print(markdown_table(["model", "targets", "engine", "precision", "tokens/s", "examples/s", "peak RSS MiB", "MFU"],
                         rows))
    print()

    def ratio(a: tuple, b: tuple, metric: str = "tokens_per_s") -> str:
        return f"{med[a][metric] / med[b][metric]:.2f}×" if a in med and b in med else "n/a"

    lines = []
    for t in ("all-linear", "q_proj,v_proj"):
        ours = ("llm", "lorakit", t)
        if ours not in med:
            continue
        lines.append(f"SmolLM2 {t}: lorakit vs PEFT-bf16 {ratio(ours, ('llm', 'peft-bf16', t))} (target ≥ 1.5×), "
                     f"vs PEFT-fp32 {ratio(ours, ('llm', 'peft-fp32', t))} (target ≥ 4×); peak RSS vs PEFT-bf16 "
                     f"{ratio(ours, ('llm', 'peft-bf16', t), 'peak_rss_mib')} (target ≤ 0.8×)")
        trainer = ("llm", "trainer-peft", t)
        lines.append(f"SmolLM2 {t}: lorakit vs Trainer+PEFT ({med.get(trainer, {}).get('precision', 'n/a')}) "
                     f"{ratio(ours, trainer)} tokens/s (target ≥ 1.5×), peak RSS "
                     f"{ratio(ours, trainer, 'peak_rss_mib')} (target ≤ 0.9×)")
    if ("llm", "lorakit-full", "all-linear") in med:
        lines.append(f"SmolLM2: lorakit LoRA (all-linear) vs lorakit full fine-tuning "
                     f"{ratio(('llm', 'lorakit', 'all-linear'), ('llm', 'lorakit-full', 'all-linear'))} "
                     f"(target ≥ 1.7×)")
    enc = ("enc", "lorakit", "query,value")
    if enc in med:
        lines.append(f"MiniLM SST-2: lorakit LoRA vs PEFT LoRA bf16 "
                     f"{ratio(enc, ('enc', 'peft-bf16', 'query,value'), 'examples_per_s')} (target ≥ 2×), vs PEFT "
                     f"fp32 {ratio(enc, ('enc', 'peft-fp32', 'query,value'), 'examples_per_s')}; vs lorakit full "
                     f"{ratio(enc, ('enc', 'lorakit-full', 'query,value'), 'examples_per_s')} (target ≥ 1.2×)")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
