"""Greedy decoding speed: transformers' ``generate`` against lorakit's engine (the one ``lorakit serve`` runs) and
llama.cpp, on the same weights, in one run.

SmolLM2-135M-Instruct in fp32, the built-in task's chat prompts, ``--new-tokens`` tokens per answer with the end of
sequence ignored, so every contender decodes the same number of tokens:

- ``hf``: ``model.generate(do_sample=False)`` on a left-padded batch;
- ``lorakit``: :class:`lorakit.serve.Engine` in this process (continuous batching, its own KV-cache handling),
  every prompt submitted at once, greedy;
- ``llama.cpp f32``: the same weights written as an f32 GGUF by lorakit's exporter, through the ``xllamacpp``
  wheel, one stream (batch 1 only; skipped when ``xllamacpp`` is not installed);
- ``llama.cpp Q4_1``: the embedded Q4_1 GGUF the default model is converted from (batch 1 only).

Contenders alternate over ``--rounds`` rounds; the table gives the median tokens/s of each and its ratio to
``hf`` at the same batch size. lorakit's greedy tokens are checked against ``generate``'s for every prompt first
(they must be equal).

    python bench/generate.py [--batches 1,16] [--new-tokens 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import cpu_name  # noqa: E402


def prompts_of_builtin_task(tokenizer, n: int) -> list[list[int]]:
    """The token ids of ``n`` chat prompts of the built-in task (its held-out orders), with the chat template."""
    from lorakit.models.chat import prompt_ids
    from lorakit.training.builtin_task import builtin_orders

    _, held_out = builtin_orders()
    return [prompt_ids(tokenizer, r["messages"][:-1]) for r in held_out[:n]]


def hf_generate(model, tokenizer, prompts: list[list[int]], new_tokens: int, to_eos: bool = False
                ) -> list[list[int]]:
    """``generate``'s greedy tokens: exactly ``new_tokens`` of them (the end of sequence suppressed until then), or
    with ``to_eos`` up to the end of sequence (one prompt)."""
    from lorakit.serve.batch import left_padded

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask, _ = left_padded(prompts, pad)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=0 if to_eos else new_tokens, pad_token_id=pad)
    tokens = out[:, ids.shape[1]:].tolist()
    return [t[:-1] if to_eos and t and t[-1] == tokenizer.eos_token_id else t for t in tokens]


def lorakit_generate(engine, prompts: list[list[int]], new_tokens: int, keep_tokens: bool = False
                     ) -> list[list[int]] | int:
    """Every prompt submitted at once to the engine; the number of tokens generated, exactly ``new_tokens`` each
    (the end of sequence ignored). With ``keep_tokens``: the token ids of each answer up to its end of sequence
    (read from their log-probabilities, which cost a log-softmax a token: not for timing)."""
    from lorakit.serve import Request, SamplingParams

    tokens: list[list[int]] = [[] for _ in prompts]
    counted = [0]
    done = threading.Semaphore(0)

    def emit(i: int, event) -> None:
        if event.error is not None:
            raise SystemExit(f"lorakit's engine failed: {event.error.message}")
        tokens[i] += [t.token for t in event.logprobs or []]
        if event.final:
            counted[0] += event.completion_tokens
            done.release()

    for i, prompt in enumerate(prompts):
        params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=not keep_tokens,
                                logprobs=0 if keep_tokens else None)
        engine.submit(Request(prompt, None, params, lambda event, i=i: emit(i, event)))
    for _ in prompts:
        done.acquire()
    return tokens if keep_tokens else counted[0]


def llama_cpp_server(path: Path, threads: int):
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    params.n_ctx = 2048
    params.n_parallel = 1
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    return xllamacpp.Server(params)


def llama_cpp_generate(server, prompt: list[int], new_tokens: int) -> int:
    """Tokens llama.cpp generated for one prompt (given as token ids, so the prompt is the same)."""
    body = {"prompt": prompt, "n_predict": new_tokens, "temperature": 0, "top_k": 1, "ignore_eos": True,
            "cache_prompt": False}
    answer = server.handle_completions(body)
    if "error" in answer:
        raise SystemExit(f"llama.cpp failed: {str(answer['error'])[:300]}")
    return int(answer["usage"]["completion_tokens"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,16", help="batch sizes, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    from lorakit.files.gguf_export import write_gguf_model
    from lorakit.models.embedded_models import load_default_model, load_default_tokenizer, smollm2_gguf
    from lorakit.serve import Engine

    tokenizer = load_default_tokenizer()
    model = load_default_model(torch.float32).eval()
    engine = Engine(model, tokenizer, base_name=None, max_batch_size=max(batches), max_tokens=args.new_tokens)
    prompts = prompts_of_builtin_task(tokenizer, max(batches))

    # Same tokens first: lorakit's greedy answers are generate's, prompt by prompt, up to the end of sequence.
    for prompt in prompts[:4]:
        ours = lorakit_generate(engine, [prompt], args.new_tokens, keep_tokens=True)
        theirs = hf_generate(model, tokenizer, [prompt], args.new_tokens, to_eos=True)
        if ours != theirs:
            raise SystemExit(f"lorakit's greedy tokens differ from generate's:\n{ours}\n{theirs}")

    servers = {}
    try:
        import xllamacpp  # noqa: F401

        folder = Path(tempfile.mkdtemp(prefix="lorakit-bench-"))
        f32 = write_gguf_model(model, model.state_dict(), folder / "smollm2-f32.gguf", tokenizer=smollm2_gguf(),
                               quant="f32")
        servers = {"llama.cpp f32": llama_cpp_server(f32, torch.get_num_threads()),
                   "llama.cpp Q4_1": llama_cpp_server(smollm2_gguf(), torch.get_num_threads())}
    except ImportError:
        print("xllamacpp is not installed: llama.cpp is left out (pip install xllamacpp)")

    contenders = {"hf": lambda p: len(p) * len(hf_generate(model, tokenizer, p, args.new_tokens)[0]),
                  "lorakit": lambda p: lorakit_generate(engine, p, args.new_tokens)}
    for name, server in servers.items():
        contenders[name] = lambda p, server=server: sum(llama_cpp_generate(server, q, args.new_tokens) for q in p)
    speeds: dict[tuple[str, int], list[float]] = {}
    for batch in batches:
        for name, run in contenders.items():  # warm-up
            if batch == 1 or not name.startswith("llama.cpp"):
                run(prompts[:batch])
    for _ in range(args.rounds):
        for batch in batches:
            for name, run in contenders.items():
                if batch > 1 and name.startswith("llama.cpp"):
                    continue  # one stream: its batch-1 speed is the one to compare with
                start = time.perf_counter()
                tokens = run(prompts[:batch])
                speeds.setdefault((name, batch), []).append(tokens / (time.perf_counter() - start))
    engine.close()

    print(f"\n{cpu_name()} ({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; SmolLM2-135M-Instruct fp32, {args.new_tokens} new tokens, greedy, "
          f"medians of {args.rounds} rounds\n")
    print("| contender | batch | tokens/s | × hf |")
    print("|---|---:|---:|---:|")
    for batch in batches:
        hf = statistics.median(speeds[("hf", batch)])
        for (name, b), values in speeds.items():
            if b == batch:
                tps = statistics.median(values)
                print(f"| {name} | {batch} | {tps:.1f} | {tps / hf:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
