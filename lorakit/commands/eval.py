"""``lorakit eval``: a trained adapter evaluated again, on its run's held-out data or on a new file."""

from __future__ import annotations

import argparse
import json

from .base import Command
from .train import metric


def arguments(parser: argparse.ArgumentParser) -> None:
    from ..training.options import add_arguments

    parser.add_argument("adapter", help="the adapter folder (as written by lorakit train)")
    parser.add_argument("--config", help="a YAML file of options (default: the adapter's train_config.yaml)")
    parser.add_argument("--json", action="store_true", help="print every metric as JSON")
    add_arguments(parser, "eval")  # only what evaluating reads: no optimizer, schedule or LoRA shape


def run(args: argparse.Namespace) -> int:
    from ..training.options import typed_options
    from ..training.saved_adapter import eval_config
    from ..workflows.inference import evaluate_adapter

    result = evaluate_adapter(args.adapter, eval_config(args.adapter, args.config, **typed_options(args)))
    print(json.dumps(result, indent=2) if args.json else metric(result))
    return 0


COMMAND = Command("eval", "evaluate a trained adapter on held-out data",
                  "Load an adapter onto its base and evaluate it as `lorakit train` does: exact match for the "
                  "built-in task, loss/perplexity for causal_lm, accuracy/F1 (and, with --json, the confusion "
                  "matrix) for seq_cls. The adapter folder's train_config.yaml supplies the task and held-out data "
                  "unless options override them; --eval-data FILE evaluates on that file alone, all of it unless "
                  "--max-eval says otherwise. An adapter without train_config.yaml is evaluated on its recorded "
                  "base and task type. An option not given keeps the training run's value; the defaults below apply "
                  "where the run recorded none.", None, run,
                  usage="lorakit eval ADAPTER [--config FILE.yaml] [--json] [options]", arguments=arguments)
