"""A 7B-class model on this machine: QLoRA and LoRA with lorakit, and QLoRA as PEFT's users run it, in one run.

The model is Llama-2-7B-shaped (hidden 4096, 32 layers, 32 heads, MLP 11008) with random bf16 weights, written
once as sharded safetensors with an index (3 shards of ≤ 5 GiB, like a checkpoint from the Hub) and cached; the
tokenizer is the embedded SmolLM2's, so the vocabulary is 49,152 (6.87B parameters instead of 6.74B). Writing is
resumable (each shard is written under a temporary name and renamed when whole; the index is written last).

Cases, each in its own process, one after the other, on the same data (Alpaca records from ../shared/data,
packed into rows of --max-length tokens) and settings (batch 1, r=16 on q,k,v,o as in the LoRA paper's LLaMA-7B
example, alpha 32, gradient checkpointing, AdamW):

- lorakit-qlora: ``lorakit train --model DIR --quantize nf4 --grad-checkpointing --batch-size 1 --max-length 256``;
- lorakit-lora-bf16: the same on the bf16 base (``--precision bf16``: the base stays in bf16);
- peft-qlora: transformers + PEFT as their users do it: ``BitsAndBytesConfig(load_in_4bit=True, nf4, double
  quant)``, ``prepare_model_for_kbit_training``, ``get_peft_model``, gradient checkpointing, torch's AdamW, the
  compute dtype lorakit's QLoRA run used.

For each: load time (process start to model ready, including imports and a one-example evaluation), peak RSS
while loading and while stepping (the child's VmRSS sampled every 20 ms by this process), seconds per step (the
median after the first), and the estimate of ``lorakit memory`` for the same configuration.

    python bench/scale.py                       # write the model if needed, run the three cases
    python bench/scale.py --shape small         # the same on a ~150M model: a quick check of the script
    python bench/scale.py --cases lorakit-qlora --steps 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import DATA, cpu_name  # noqa: E402
from _timing import markdown_table  # noqa: E402

SHAPES = {
    # Llama-2-7B's published dimensions; the vocabulary is the tokenizer's.
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
    # A quick stand-in of the same family for checking the script (~150M parameters).
    "small": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=12),
}
CASES = ("lorakit-qlora", "lorakit-lora-bf16", "peft-qlora")
SHARD_BYTES = 5 * 2**30
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


# --- the checkpoint -------------------------------------------------------------------------------------------

def _tensor_shapes(config: dict) -> list[tuple[str, list[int]]]:
    """Every tensor of a LlamaForCausalLM with this config, in the order transformers names them."""
    h, i, v, n = config["hidden_size"], config["intermediate_size"], config["vocab_size"], config["num_hidden_layers"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    shapes = [("model.embed_tokens.weight", [v, h])]
    for layer in range(n):
        p = f"model.layers.{layer}."
        shapes += [(p + "input_layernorm.weight", [h]), (p + "post_attention_layernorm.weight", [h]),
                   (p + "self_attn.q_proj.weight", [h, h]), (p + "self_attn.k_proj.weight", [kv, h]),
                   (p + "self_attn.v_proj.weight", [kv, h]), (p + "self_attn.o_proj.weight", [h, h]),
                   (p + "mlp.gate_proj.weight", [i, h]), (p + "mlp.up_proj.weight", [i, h]),
                   (p + "mlp.down_proj.weight", [h, i])]
    return shapes + [("model.norm.weight", [h]), ("lm_head.weight", [v, h])]


def _random_tensor(name: str, shape: list[int]) -> torch.Tensor:
    """A norm's weight is ones; every other weight is N(0, 0.02²), as transformers initialises Llama, seeded by
    the tensor's name so a resumed write gives the same bytes."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)


def _write_shard(path: Path, names: list[tuple[str, list[int]]]) -> None:
    """One safetensors file, written tensor by tensor (the header first: offsets follow from the shapes), so no
    more than one tensor is in memory; under a temporary name, renamed when whole."""
    header, offset = {}, 0
    for name, shape in names:
        size = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, shape in names:
            f.write(_random_tensor(name, shape).view(torch.uint8).numpy().tobytes())
    partial.rename(path)


def write_checkpoint(folder: Path, shape: str) -> Path:
    """The random Llama checkpoint of ``shape`` in ``folder`` (written once; an interrupted write resumes)."""
    from transformers import AutoConfig

    from lorakit.models.embedded_models import default_model_dir

    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    source = default_model_dir()
    base = AutoConfig.from_pretrained(source).to_dict()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16", "attention_bias": False, "mlp_bias": False,
              "vocab_size": base["vocab_size"], "bos_token_id": base.get("bos_token_id"),
              "eos_token_id": base.get("eos_token_id"), "pad_token_id": base.get("pad_token_id"),
              "initializer_range": 0.02, "use_cache": True, **SHAPES[shape]}
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
    tensors = _tensor_shapes(config)
    shards, current, size = [], [], 0
    for name, shape_ in tensors:
        nbytes = 2 * math.prod(shape_)
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape_))
        size += nbytes
    shards.append(current)
    weight_map = {}
    total = sum(2 * math.prod(s) for _, s in tensors)
    t0 = time.perf_counter()
    for k, names in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        expected = sum(2 * math.prod(s) for _, s in names)
        path = folder / file
        if not path.is_file() or path.stat().st_size < expected:
            print(f"writing {file} ({expected / 2**30:.1f} GiB) ...", file=sys.stderr, flush=True)
            _write_shard(path, names)
        weight_map.update({name: file for name, _ in names})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    tmp = index_path.with_name(index_path.name + ".partial")
    tmp.write_text(json.dumps(index, indent=2))
    tmp.rename(index_path)  # last: its presence says the checkpoint is whole
    print(f"wrote {total / 2**30:.1f} GiB in {len(shards)} shards in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    return folder


def write_data(folder: Path) -> tuple[Path, Path]:
    """Training records (Alpaca, 64 of them) and a one-record held-out file, as JSONL."""
    records = json.loads((DATA / "instruct" / "alpaca_small_2000.json").read_text())
    train, held_out = folder / "train.jsonl", folder / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records[:64]))
    held_out.write_text(json.dumps(records[64]) + "\n")
    return train, held_out


# --- measuring a child process ----------------------------------------------------------------------------------

class Sampler:
    """Samples a process's VmRSS every 20 ms; the peaks before and after ``mark()`` (model ready)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.load_peak, self.step_peak, self.ready_at = pid, 0, 0, None
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _rss(self) -> int:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                line = next(line for line in f if line.startswith("VmRSS:"))
            return int(line.split()[1]) * 1024
        except (OSError, StopIteration):
            return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self._rss()
            if self.ready_at is None:
                self.load_peak = max(self.load_peak, rss)
            else:
                self.step_peak = max(self.step_peak, rss)
            time.sleep(0.02)

    def mark(self) -> None:
        if self.ready_at is None:
            self.ready_at = time.perf_counter() - self.t0

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_lorakit(case: str, model_dir: Path, train: Path, held_out: Path, out: Path, args: argparse.Namespace
                ) -> dict:
    """``lorakit train`` as a user types it; the model is ready when the first record (the evaluation before
    training) reaches metrics.jsonl."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "lorakit", "train", "--model", str(model_dir), "--task", "causal_lm",
               "--data", str(train), "--eval-data", str(held_out), "--grad-checkpointing", "--batch-size", "1",
               "--max-length", str(args.max_length), "--steps", str(args.steps), "--r", "16", "--lora-alpha", "32",
               "--target-modules", ",".join(TARGETS), "--warmup-steps", "0", "--output-dir", str(out),
               "--no-progress"]
    command += ["--quantize", "nf4"] if case == "lorakit-qlora" else ["--precision", "bf16"]
    log = out / "metrics.jsonl"
    with open(out.with_suffix(".log"), "w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        sampler = Sampler(process.pid)
        while process.poll() is None:
            if sampler.ready_at is None and log.is_file() and log.stat().st_size:
                sampler.mark()
            time.sleep(0.05)
        sampler.stop()
    if process.returncode:
        raise SystemExit(f"{case} failed:\n{out.with_suffix('.log').read_text()[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    steps = [r["step_s"] for r in map(json.loads, log.read_text().splitlines()) if "step_s" in r]
    return {"case": case, "precision": summary["precision"], "load_s": sampler.ready_at,
            "load_peak_gib": sampler.load_peak / 2**30, "step_peak_gib": sampler.step_peak / 2**30,
            "step_s": statistics.median(steps[1:] or steps), "first_step_s": steps[0],
            "tokens_per_step": summary["tokens"] / summary["steps"], "trainable": summary["trainable_params"]}


def peft_child(model_dir: str, train: str, steps: int, max_length: int, precision: str) -> None:
    """transformers + PEFT QLoRA, as PEFT's guides write it; prints READY when the model is ready (after one
    no-grad forward on the held-out record, as lorakit's evaluation before training), then one line per step."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from lorakit.training.data import load_causal_lm
    from lorakit.training.devices import Processes
    from lorakit.training.loop import micro_batch_indices

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantization, dtype=torch.bfloat16)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=list(TARGETS), lora_dropout=0.0,
                                             task_type="CAUSAL_LM"))
    examples = load_causal_lm(train, tokenizer, max_length)
    # In train mode: a no-grad forward in eval mode makes bitsandbytes (on CPUs with AVX512-BF16) repack every
    # 4-bit weight for a kernel without a backward pass, and the training steps after it would then run faster
    # with gradients that skip the frozen layers (lorakit turns that repacking off).
    model.train()
    with torch.no_grad():
        model(input_ids=torch.tensor([examples[-1].input_ids[:32]]))
    print("READY", flush=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    for step in range(steps):
        t = time.perf_counter()
        # The example `lorakit train --batch-size 1 --seed 0` takes at this step.
        (i,) = micro_batch_indices(step, len(examples), 1, Processes(), seed=0)
        ids = torch.tensor([examples[i].input_ids])
        labels = torch.tensor([[-100] + examples[i].targets[:-1]])  # transformers shifts its labels itself
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens = ids.numel()
        print(json.dumps({"step_s": time.perf_counter() - t, "tokens": tokens}), flush=True)


def run_peft(model_dir: Path, train: Path, out: Path, args: argparse.Namespace, precision: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, __file__, "--peft-child", str(model_dir), str(train), str(args.steps),
               str(args.max_length), precision]
    with open(out / "peft.log", "w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
        sampler = Sampler(process.pid)
        lines = []
        for line in process.stdout:
            if line.startswith("READY"):
                sampler.mark()
            elif line.startswith("{"):
                lines.append(json.loads(line))
        process.wait()
        sampler.stop()
    if process.returncode:
        raise SystemExit(f"peft-qlora failed:\n{(out / 'peft.log').read_text()[-3000:]}")
    steps = [r["step_s"] for r in lines]
    return {"case": "peft-qlora", "precision": precision, "load_s": sampler.ready_at,
            "load_peak_gib": sampler.load_peak / 2**30, "step_peak_gib": sampler.step_peak / 2**30,
            "step_s": statistics.median(steps[1:] or steps), "first_step_s": steps[0],
            "tokens_per_step": statistics.mean(r["tokens"] for r in lines), "trainable": None}


def estimate_gib(model_dir: Path, case: str, precision: str, max_length: int) -> float:
    """What ``lorakit memory`` (and the preflight of ``lorakit train``) estimate for the case's configuration."""
    from lorakit.training.options import TrainConfig
    from lorakit.training.preflight import estimate_run

    config = TrainConfig(model=str(model_dir), task="causal_lm", data="-", quantize="nf4" if case.endswith("qlora")
                         else None, grad_checkpointing=True, batch_size=1, max_length=max_length, r=16,
                         lora_alpha=32, target_modules=",".join(TARGETS), precision=precision)
    return estimate_run(config).total / 2**30


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--peft-child":
        peft_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="7b", choices=tuple(SHAPES))
    parser.add_argument("--dir", default=None, help="where the checkpoint is cached (default: "
                                                    "~/.cache/lorakit/bench-models/llama-<shape>-random)")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()

    from lorakit.models.embedded_models import cache_root

    model_dir = Path(args.dir) if args.dir else cache_root() / "bench-models" / f"llama-{args.shape}-random"
    write_checkpoint(model_dir, args.shape)
    work = Path(tempfile.mkdtemp(prefix="lorakit-scale-"))
    train, held_out = write_data(work)
    cpu = cpu_name()
    print(f"CPU: {cpu}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}; "
          f"MemTotal {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.1f} GiB; "
          f"model: {model_dir}", flush=True)
    rows = []
    # PEFT's QLoRA guides compute the 4-bit layers in bf16, which is also what lorakit's 4-bit layers do on a bf16
    # checkpoint (they compute in the dtype the base is kept in).
    qlora_precision = "bf16"
    for case in args.cases.split(","):
        print(f"running {case} ...", file=sys.stderr, flush=True)
        if case.startswith("lorakit"):
            row = run_lorakit(case, model_dir, train, held_out, work / case, args)
        elif case == "peft-qlora":
            row = run_peft(model_dir, train, work / case, args, qlora_precision)
        else:
            raise SystemExit(f"unknown case {case!r}; cases: {', '.join(CASES)}")
        # The estimate of the configuration as `lorakit train` was given it (QLoRA: --precision auto).
        row["estimate_gib"] = estimate_gib(model_dir, case, "bf16" if case == "lorakit-lora-bf16" else "auto",
                                           args.max_length)
        row["estimate_vs_peak"] = row["estimate_gib"] / max(row["load_peak_gib"], row["step_peak_gib"]) - 1
        rows.append(row)
        print(json.dumps(row), flush=True)
    table = [[r["case"], r["precision"], f"{r['load_s']:.0f}", f"{r['load_peak_gib']:.2f}",
              f"{r['step_peak_gib']:.2f}", f"{r['step_s']:.1f}", f"{r['estimate_gib']:.2f}",
              f"{100 * r['estimate_vs_peak']:+.0f}%"] for r in rows]
    print()
    print(markdown_table(["case", "precision", "load s", "load peak GiB", "step peak GiB", "s/step",
                          "`lorakit memory` GiB", "estimate vs peak"], table))
    by = {r["case"]: r for r in rows}
    if "lorakit-qlora" in by and "peft-qlora" in by:
        ours, theirs = by["lorakit-qlora"], by["peft-qlora"]
        peak = lambda r: max(r["load_peak_gib"], r["step_peak_gib"])  # noqa: E731
        print(f"\nlorakit vs PEFT (QLoRA): peak RSS {peak(ours) / peak(theirs):.2f}x, "
              f"seconds per step {ours['step_s'] / theirs['step_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
