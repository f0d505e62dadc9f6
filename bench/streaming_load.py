"""Loading a sharded bf16 checkpoint into a 4-bit (NF4, double-quantized) model on CPU: peak memory and time.

Each way runs in a child process of its own (peak RSS is per process):

- ``streamed``: lorakit.models.streaming.load_checkpoint(quantize="nf4"): tensor by tensor, plain file reads.
- ``streamed-mmap``: the same, each tensor read through safetensors' memory mapping (one open file per shard,
  kept open for the whole load, as transformers does), to compare the two ways of reading.
- ``whole+quantize``: from_pretrained(dtype=bf16), then lorakit.core.quant.quantize (the whole model first).
- ``transformers-bnb``: from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True,
  bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=bf16), device_map="cpu").

Usage: python bench/streaming_load.py MODEL_DIR [--repeat N]

MODEL_DIR: a sharded bf16 safetensors checkpoint, e.g. one that ``bench/scale.py --shape small`` (or ``7b``)
writes under ~/.cache/lorakit/bench-models/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import gc, json, sys, time
    from pathlib import Path
    import torch, transformers
    from lorakit.core import process_memory, quant
    from lorakit.models import streaming
    quant.bitsandbytes()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    folder, how = Path(sys.argv[1]), sys.argv[2]
    auto = transformers.AutoModelForCausalLM
    if how == "streamed-mmap":
        from safetensors import safe_open
        handles = {}

        def read(self, entry):
            if entry.file not in handles:
                handles[entry.file] = safe_open(str(entry.file), "pt")
            return handles[entry.file].get_tensor(entry.name)

        streaming._Reader.read = read
    before = rss()
    t0 = time.perf_counter()
    if how.startswith("streamed"):
        model = streaming.load_checkpoint(auto, folder, quantize="nf4")
    elif how == "whole+quantize":
        model = quant.quantize(auto.from_pretrained(str(folder), dtype=torch.bfloat16), "nf4")
    else:
        config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=True,
                                                 bnb_4bit_compute_dtype=torch.bfloat16)
        model = auto.from_pretrained(str(folder), quantization_config=config, device_map="cpu",
                                     dtype=torch.bfloat16)
    seconds = time.perf_counter() - t0
    peak = process_memory.peak_rss_mib()
    gc.collect()
    process_memory.return_freed_memory()
    final = rss()
    four_bit = sum(quant.is_4bit(m) for m in model.modules())
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    logits = quant.logits(model, ids)
    print(json.dumps({"how": how, "seconds": round(seconds, 2), "before_mib": round(before), "peak_mib": round(peak),
                      "final_mib": round(final), "after_forward_mib": round(rss()),
                      "layers_4bit": four_bit,
                      "logit_sum": float(logits.double().sum())}))
""")

WAYS = ("streamed", "streamed-mmap", "whole+quantize", "transformers-bnb")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--ways", default=",".join(WAYS))
    args = parser.parse_args()
    for _ in range(args.repeat):
        for how in args.ways.split(","):
            done = subprocess.run([sys.executable, "-c", CHILD, args.model, how], capture_output=True, text=True)
            if done.returncode:
                print(json.dumps({"how": how, "error": done.stderr.strip().splitlines()[-1:]}), flush=True)
            else:
                print(done.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
