"""Per-token cost of the JSON-schema grammar engines on PyPI, on this CPU, with the default model's tokenizer.

For each engine (llguidance, xgrammar, outlines-core) and each of the five test schemas: the time to compile the
schema for the tokenizer, then the time per token to compute the allowed-token mask and advance the matcher while
a valid document (the tokenizer's own tokens of it) is fed through, which is what decoding pays at every step.
``lorakit serve`` uses the engine chosen from these figures (docs/serving.md).

    python bench/grammar_engines.py                  # every engine that is installed
    python bench/grammar_engines.py --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import cpu_name  # noqa: E402

SCHEMAS = Path(__file__).resolve().parents[1] / "tests" / "serve" / "schemas"
DOCUMENTS = {  # one valid document per schema, as json.dumps writes it
    "order": {"name": "Maya", "item": "green tea", "size": "large", "quantity": 3, "day": "friday"},
    "person": {"name": "Ada Lovelace", "age": 36, "address": {"city": "London", "country": "UK",
                                                             "postcode": "12345"}},
    "review": {"sentiment": "positive", "confidence": 93, "stars": 4.5, "recommended": True},
    "tags": {"topic": "cooking", "tags": ["pasta", "italian", "quick"], "scores": [90, 75]},
    "invoice": {"id": 1042, "status": "sent", "lines": [{"sku": "ABC-123", "qty": 2}, {"sku": "XYZ-900", "qty": 1}],
                "note": None},
}


def llguidance_engine(tokenizer, vocab_size):
    import llguidance
    import llguidance.hf

    start = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
    setup = time.perf_counter() - start
    words = (vocab_size + 31) // 32

    def compile_schema(schema):
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
        return llguidance.LLMatcher(lltok, grammar)

    def step(matcher, mask, token):
        matcher.unsafe_compute_mask_ptr(mask.data_ptr(), words * 4)
        assert matcher.consume_token(token), matcher.get_error()

    return setup, compile_schema, step


def xgrammar_engine(tokenizer, vocab_size):
    import xgrammar

    start = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    compiler = xgrammar.GrammarCompiler(info, max_threads=torch.get_num_threads())
    setup = time.perf_counter() - start

    def compile_schema(schema):
        return xgrammar.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema), any_whitespace=False))

    def step(matcher, mask, token):
        matcher.fill_next_token_bitmask(mask.view(1, -1))
        assert matcher.accept_token(token)

    return setup, compile_schema, step


def outlines_engine(tokenizer, vocab_size):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    start = time.perf_counter()
    vocabulary = Vocabulary.from_pretrained_tokenizer(tokenizer) if hasattr(Vocabulary, "from_pretrained_tokenizer") \
        else _outlines_vocabulary(tokenizer, Vocabulary)
    setup = time.perf_counter() - start

    def compile_schema(schema):
        return Guide(Index(build_regex_from_schema(json.dumps(schema), r" ?"), vocabulary))

    def step(guide, mask, token):
        guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
        guide.advance(token)

    return setup, compile_schema, step


def _outlines_vocabulary(tokenizer, vocabulary_type):
    """outlines-core's Vocabulary from a Hugging Face tokenizer: each token's bytes -> its ids."""
    tokens: dict[str, list[int]] = {}
    for token, index in tokenizer.get_vocab().items():
        if index == tokenizer.eos_token_id:
            continue
        text = tokenizer.convert_tokens_to_string([token])
        tokens.setdefault(text, []).append(index)
    return vocabulary_type(tokenizer.eos_token_id, tokens)


ENGINES = {"llguidance": llguidance_engine, "xgrammar": xgrammar_engine, "outlines-core": outlines_engine}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="passes over the five documents per engine")
    args = parser.parse_args()
    from transformers import AutoConfig, AutoTokenizer

    from lorakit.models.embedded_models import default_model_dir

    folder = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab_size = AutoConfig.from_pretrained(folder).vocab_size
    print(f"CPU: {cpu_name()} ({torch.backends.cpu.get_cpu_capability()}), "
          f"{torch.get_num_threads()} threads; vocabulary {vocab_size}")
    print(f"{'engine':14} {'setup s':>8} {'compile ms':>11} {'per token µs':>13}  tokens")
    for name, make in ENGINES.items():
        try:
            setup, compile_schema, step = make(tokenizer, vocab_size)
        except ImportError as err:
            print(f"{name:14} not installed ({err.name})")
            continue
        compile_ms, per_token = [], []
        mask = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)
        for _ in range(args.repeat):
            for title, document in DOCUMENTS.items():
                schema = json.loads((SCHEMAS / f"{title}.json").read_text())
                start = time.perf_counter()
                matcher = compile_schema(schema)
                compile_ms.append((time.perf_counter() - start) * 1e3)
                tokens = tokenizer(json.dumps(document), add_special_tokens=False)["input_ids"]
                start = time.perf_counter()
                for token in tokens:
                    step(matcher, mask, token)
                per_token.append((time.perf_counter() - start) * 1e6 / len(tokens))
        print(f"{name:14} {setup:8.2f} {statistics.median(compile_ms):11.1f} {statistics.median(per_token):13.1f}  "
              f"{sum(len(tokenizer(json.dumps(d))['input_ids']) for d in DOCUMENTS.values())}")


if __name__ == "__main__":
    main()
