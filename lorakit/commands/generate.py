"""``lorakit generate``: a model's or adapter's greedy answer to one prompt."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Command
from .options import TrustOption, option


@dataclass(kw_only=True)
class GenerateOptions(TrustOption):
    prompt: str = option(help="the user message", positional=True)
    adapter: str | None = option(None, "an adapter folder (default: the base model alone)")
    model: str | None = option(None, "the base: 'default', or a model folder (default: the adapter's base, else "
                                     "'default')")
    system: str | None = option(None, "a system message (default: the built-in task's, when the adapter was "
                                      "trained on it)")
    max_new_tokens: int = option(128, "tokens to generate")


def run(opts: GenerateOptions) -> int:
    from ..workflows.inference import generate

    print(generate(opts.prompt, adapter=opts.adapter, model=opts.model, max_new_tokens=opts.max_new_tokens,
                   system=opts.system, trust_remote_code=opts.trust_remote_code))
    return 0


COMMAND = Command("generate", "try a model or adapter on one prompt (greedy)",
                  "Answer one prompt with the chat template of the model, greedily.", GenerateOptions, run)
