"""``lorakit predict``: a saved adapter's prediction for every example of a file, as JSON lines."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from .base import Command
from .options import TrustOption, option

DEVICES = ("auto", "cpu", "cuda")


@dataclass(kw_only=True)
class PredictOptions(TrustOption):
    adapter: str = option(help="the adapter folder", positional=True)
    data: str = option(help="the examples: CSV/TSV/JSON(L) for a classifier; JSON(L) or .txt prompts for a language "
                            "model; parquet, .arrow or a save_to_disk folder (of one split) for either")
    output: str | None = option(None, "the JSONL file to write (default: standard output)")
    model: str | None = option(None, "the base (default: the one the adapter was trained on)")
    text_field: str = option("sentence", "classifier: the text column or field")
    label_field: str = option("label", "classifier: the reference label column, if any")
    label_map: list[str] | None = option(None, "classifier: FILE_LABEL=CLASS pairs for the reference labels, "
                                               "comma-separated", comma_list=True)
    batch_size: int = option(32, "examples per forward pass")
    max_length: int = option(512, "classifier: tokens per text")
    max_new_tokens: int = option(128, "language model: tokens to generate per answer")
    device: str = option("auto", "auto: CUDA when present, else CPU", choices=DEVICES)
    progress: bool = option(True, "show a progress bar on stderr (default: on)")


def run(opts: PredictOptions) -> int:
    from ..workflows.predict import predict

    n = predict(opts.adapter, opts.data, opts.output, model=opts.model, text_field=opts.text_field,
                label_field=opts.label_field, label_map=opts.label_map, batch_size=opts.batch_size,
                max_length=opts.max_length, max_new_tokens=opts.max_new_tokens, device=opts.device,
                trust_remote_code=opts.trust_remote_code, progress=opts.progress)
    if opts.output is not None:
        print(f"lorakit predict: {n} predictions in {opts.output}", file=sys.stderr)
    return 0


COMMAND = Command("predict", "predictions of an adapter on a data file, as JSON lines",
                  "Run a saved adapter on every example of a file. A classifier writes each text's predicted class "
                  "and the probability of every class; a language model writes its greedy answer to each prompt "
                  "(chat, Alpaca or {\"prompt\": ...} records, or a .txt file with one prompt per line). Labels or "
                  "answers in the file are copied as \"reference\". One JSON line per example, in file order.",
                  PredictOptions, run, usage="lorakit predict ADAPTER --data FILE [--output preds.jsonl] [options]")
