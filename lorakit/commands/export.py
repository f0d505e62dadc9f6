"""``lorakit export``: an adapter merged into its base, as a Hugging Face folder or a GGUF file."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import InvalidValue
from .base import Command
from .options import TrustOption, option


@dataclass(kw_only=True)
class ExportOptions(TrustOption):
    adapter: str = option(help="the adapter folder", positional=True)
    gguf: bool = option(False, "write a GGUF file instead of a Hugging Face folder")
    quant: str | None = option(None, "GGUF weights: f16 (default), q8_0 (8-bit, about half the size) or f32 "
                                     "(default with --adapter-only)")
    adapter_only: bool = option(False, "with --gguf: the adapter alone, as a llama.cpp LoRA adapter file")
    output: str | None = option(None, "the folder, or for GGUF a .gguf file or a folder to put it in (default: next "
                                      "to the adapter, ADAPTER-merged, ADAPTER-merged-QUANT.gguf or "
                                      "ADAPTER-lora-QUANT.gguf)", metavar="PATH")
    model: str | None = option(None, "the base (default: the one the adapter was trained on)")


def run(opts: ExportOptions) -> int:
    from ..workflows.inference import export_adapter

    if (opts.quant is not None or opts.adapter_only) and not opts.gguf:
        raise InvalidValue("--quant and --adapter-only need --gguf")
    path = export_adapter(opts.adapter, opts.output, format="gguf" if opts.gguf else "hf", quant=opts.quant,
                          adapter_only=opts.adapter_only, model=opts.model, trust_remote_code=opts.trust_remote_code)
    size = path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"lorakit export: wrote {path} ({size / 2**20:.1f} MiB)")
    return 0


COMMAND = Command("export", "merge an adapter into its base: a Hugging Face folder or a GGUF file",
                  "Fold a saved LoRA adapter into its base model and write the result as a plain Hugging Face "
                  "folder, or with --gguf as one GGUF file for llama.cpp and Ollama (Llama and Mistral architectures). "
                  "--adapter-only writes the adapter alone as a llama.cpp LoRA adapter (llama-cli -m base.gguf "
                  "--lora FILE).", ExportOptions, run,
                  usage="lorakit export ADAPTER [--gguf [--quant f16|q8_0|f32] [--adapter-only]] [--output PATH] "
                        "[--model BASE]")
