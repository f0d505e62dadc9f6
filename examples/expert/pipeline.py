"""Expert: a production pipeline. QLoRA training from YAML configs, evaluation of the saved artifacts, merge and
export, then `lorakit serve` with two adapters on one 4-bit base and a client querying both.

    python examples/expert/pipeline.py            # the full run (from the repository root)
    python examples/expert/pipeline.py --smoke    # a few steps per stage, with checks

Steps:
1. Train two adapters with QLoRA, each from its YAML file (orders.yaml: the built-in order-to-JSON task;
   alpaca.yaml: Alpaca instructions from ../shared/data), the base held in 4 bits (NF4).
2. Evaluate each saved adapter again from its folder, as a deployment check would (`lorakit eval`): the numbers
   must equal those training reported.
3. Merge the orders adapter into the base (dequantized, fp32) and export a plain Hugging Face folder that
   transformers loads without lorakit; the merge reports how far the logits moved.
4. Serve both adapters on one 4-bit base (`lorakit serve --quantize nf4`) and query them with client.py: each
   answer must equal `lorakit generate`'s for that adapter.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from client import chat, models, stream_chat

ORDER = "Hi, this is Priya. Could I get three large cappuccinos on Saturday?"
INSTRUCTION = "Give three tips for staying focused while studying."
# A smoke run checks the pipeline, not the quality: 2 steps of 2 examples per adapter, evaluation on 2 examples,
# and short answers everywhere.
SMOKE = {"steps": 2, "batch_size": 2, "max_eval": 2, "eval_batch_size": 2, "max_new_tokens": 12, "warmup_steps": 1,
         "progress": False}
SMOKE_TOKENS, FULL_TOKENS = 12, 48  # answer length in the export and serve stages


def headline(metrics: dict) -> str:
    """The metrics worth a line: exact match when there is one, loss and perplexity."""
    shown = {k: metrics[k] for k in ("exact_match", "loss", "perplexity") if k in metrics}
    return ", ".join(f"{k} {v:.3f}" for k, v in shown.items())


def train_step(configs: dict[str, Path], out: Path, smoke: bool) -> dict[str, dict]:
    from lorakit import TrainConfig, train

    summaries = {}
    for name, path in configs.items():
        config = TrainConfig.from_yaml(path, output_dir=str(out / name), **(SMOKE if smoke else {}))
        print(f"\n== 1. training {name} ({path.name}): QLoRA {config.quantize}, r={config.r}, {config.task}",
              flush=True)
        summaries[name] = train(config)
        print(f"   {name}: {headline(summaries[name]['before'])} -> {headline(summaries[name]['after'])}", flush=True)
    return summaries


def evaluate_step(out: Path, summaries: dict[str, dict]) -> dict[str, dict]:
    from lorakit import TrainConfig
    from lorakit.workflows.inference import evaluate_adapter

    print("\n== 2. evaluating the saved adapters", flush=True)
    results = {}
    for name in summaries:
        folder = out / name
        results[name] = evaluate_adapter(folder, TrainConfig.from_yaml(folder / "train_config.yaml"))
        print(f"   {name}: {headline(results[name])} (training reported {headline(summaries[name]['after'])})",
              flush=True)
    return results


def export_step(out: Path, tokens: int) -> dict:
    """Merge the orders adapter into its (dequantized) base, save a plain model folder, load it back."""
    import torch
    import transformers

    from lorakit import LoraModel
    from lorakit.models.embedded_models import load_default_tokenizer
    from lorakit.training.builtin_task import SYSTEM
    from lorakit.training.metrics import generate_texts
    from lorakit.workflows.inference import base_model_for, generate

    print("\n== 3. merging the orders adapter and exporting a plain model", flush=True)
    adapter, export = out / "orders", out / "orders-merged"
    tokenizer = load_default_tokenizer()
    merged = LoraModel.from_pretrained(base_model_for(adapter), adapter).merge_and_unload(dtype=torch.float32)
    report = merged.lorakit_merge_report
    merged.save_pretrained(export)
    tokenizer.save_pretrained(export)
    size = sum(f.stat().st_size for f in export.iterdir()) / 2**20
    plain = transformers.AutoModelForCausalLM.from_pretrained(export).eval()  # no lorakit needed from here
    chat_ = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ORDER}]
    exported = generate_texts(plain, tokenizer, [chat_], max_new_tokens=tokens)[0]
    adapter_answer = generate(ORDER, adapter=adapter, max_new_tokens=tokens)
    print(f"   merge: max |logit diff| {report.max_abs_logit_diff:.2e} (mean {report.mean_abs_logit_diff:.2e}); "
          f"exported {size:.0f} MiB to {export}", flush=True)
    print(f"   exported model:   {exported!r}\n   adapter on 4-bit: {adapter_answer!r}", flush=True)
    return {"max_abs_logit_diff": report.max_abs_logit_diff, "export_mib": size, "exported_answer": exported,
            "adapter_answer": adapter_answer}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_step(out: Path, tokens: int) -> dict:
    """Start `lorakit serve` with both adapters, query them with the client, stop it."""
    from lorakit.training.builtin_task import SYSTEM
    from lorakit.workflows.inference import generate

    print("\n== 4. serving both adapters on one 4-bit base", flush=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "lorakit", "serve", "--quantize", "nf4", "--port", str(port),
               "--adapter", f"orders={out / 'orders'}", "--adapter", f"alpaca={out / 'alpaca'}",
               "--log-level", "warning"]
    print("   $ " + " ".join(command[2:]), flush=True)
    server = subprocess.Popen(command, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    try:
        deadline = time.time() + 300
        while True:
            if server.poll() is not None:
                raise RuntimeError("lorakit serve exited; see its output above")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if time.time() > deadline:
                    raise TimeoutError("lorakit serve did not start in 300 s") from None
                time.sleep(0.5)
        served = models(url)
        print(f"   models: {served}", flush=True)
        orders_messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ORDER}]
        alpaca_messages = [{"role": "user", "content": INSTRUCTION}]
        answers = {"orders": chat(url, "orders", orders_messages, max_tokens=tokens),
                   "alpaca": chat(url, "alpaca", alpaca_messages, max_tokens=tokens)}
        # Both at once, several times: the scheduler puts the two adapters in one batch.
        with ThreadPoolExecutor(4) as pool:
            jobs = [pool.submit(chat, url, name, messages, tokens) for name, messages in
                    [("orders", orders_messages), ("alpaca", alpaca_messages)] * 2]
            concurrent = [job.result() for job in jobs]
        streamed = "".join(stream_chat(url, "alpaca", alpaca_messages, max_tokens=tokens))
        metrics = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    finally:
        server.terminate()
        server.wait(timeout=60)
    expected = {"orders": generate(ORDER, adapter=out / "orders", max_new_tokens=tokens),
                "alpaca": generate(INSTRUCTION, adapter=out / "alpaca", max_new_tokens=tokens)}
    for name, answer in answers.items():
        print(f"   {name}: {answer!r}\n   {'':<{len(name)}}  lorakit generate: {expected[name]!r}", flush=True)
    mixed = next(line.split()[1] for line in metrics.splitlines()
                 if line.startswith("lorakit_mixed_adapter_forward_passes_total"))
    return {"models": served, "answers": answers, "expected": expected, "concurrent": concurrent,
            "streamed": streamed, "mixed_forward_passes": float(mixed)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/examples/expert")
    parser.add_argument("--smoke", action="store_true", help="a few steps per stage, with checks")
    args = parser.parse_args()
    out = Path(args.output_dir)
    configs = {"orders": HERE / "orders.yaml", "alpaca": HERE / "alpaca.yaml"}
    data = Path(__import__("yaml").safe_load(configs["alpaca"].read_text())["data"])
    if not data.is_file():
        raise SystemExit(f"{data} does not exist: run from the repository root, with ../shared/data beside it")
    start = time.time()
    summaries = train_step(configs, out, args.smoke)
    evaluations = evaluate_step(out, summaries)
    tokens = SMOKE_TOKENS if args.smoke else FULL_TOKENS
    export = export_step(out, tokens)
    serving = serve_step(out, tokens)
    results = {"train": {n: {"before": s["before"], "after": s["after"], "train_seconds": s["train_seconds"],
                             "adapter_bytes": s["adapter_bytes"], "peak_rss_mib": s.get("peak_rss_mib")}
                         for n, s in summaries.items()},
               "evaluate": evaluations, "export": export, "serve": serving, "total_seconds": time.time() - start}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\ndone in {results['total_seconds']:.0f} s; results in {out / 'results.json'}")

    if not args.smoke:
        try:
            order = json.loads(serving["answers"]["orders"])
            print(f"the served orders adapter answers with JSON: {order}")
        except json.JSONDecodeError:
            print("the served orders adapter's answer is not JSON (did training finish?)")
    else:  # what must hold even after a few steps
        for name, summary in summaries.items():
            for metric in ("exact_match", "loss"):
                if metric in summary["after"]:
                    assert abs(evaluations[name][metric] - summary["after"][metric]) < 1e-4, (name, metric)
        assert export["max_abs_logit_diff"] < 1e-3, export
        assert export["exported_answer"] == export["adapter_answer"], export
        assert {"orders", "alpaca"} <= set(serving["models"])
        assert serving["answers"] == serving["expected"], "the server must answer as lorakit generate does"
        assert serving["answers"]["orders"] != serving["answers"]["alpaca"]
        assert serving["streamed"] == serving["answers"]["alpaca"]
        assert serving["mixed_forward_passes"] > 0, "concurrent requests for two adapters must share batches"
        print("smoke checks passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
