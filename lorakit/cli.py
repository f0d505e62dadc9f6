"""The ``lorakit`` command. Each subcommand parses its arguments and calls one library function.

The library modules are imported inside the ``cmd_*`` functions, so ``lorakit --help`` and a mistyped option
answer at once instead of after importing torch's and transformers' stacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .core.config import ALL_LINEAR, TASK_TYPES, parse_targets

if TYPE_CHECKING:
    from .training.options import TrainConfig


def cmd_demo(args: argparse.Namespace) -> int:
    from .workflows.demo import run_demo

    print("lorakit demo: teaching SmolLM2-135M-Instruct (embedded) one new fact with a rank-8 adapter\n")
    result = run_demo(steps=args.steps, lr=args.lr, output_dir=args.output_dir)
    print(f"""
trainable params: {result['trainable_params']:,d} of {result['all_params']:,d} \
({100 * result['trainable_params'] / result['all_params']:.2f}%)
loss: {result['loss_first']:.3f} -> {result['loss_last']:.3f} in {result['train_seconds']:.1f} s
before: {result['answer_before']!r}
after:  {result['answer_after']!r}
asked another way: {result['answer_paraphrase']!r}
merged vs unmerged logits, max |diff|: {result['merged_vs_unmerged_max_abs']:.2e}
disable_adapter() equals the base model exactly: {result['disabled_equals_base']}
saved {result['adapter_bytes'] / 2**20:.2f} MiB to {result['adapter_dir']}; reloaded, max |diff|: \
{result['reload_max_abs']:.1e}
total {result['total_seconds']:.0f} s""")
    return 0 if result["learned"] and result["disabled_equals_base"] else 1


def cmd_targets(args: argparse.Namespace) -> int:
    from .core.config import LoraConfig
    from .core.inject import describe_targets
    from .models.embedded_models import build_model

    targets = parse_targets(args.target)
    if targets is None and args.task_type != "SEQ_CLS":
        targets = ALL_LINEAR  # what `lorakit train` wraps on a language model
    config = LoraConfig(r=args.r, target_modules=targets, exclude_modules=parse_targets(args.exclude),
                        task_type=args.task_type)
    model = build_model(args.model, meta=True, trust_remote_code=args.trust_remote_code)
    rows = describe_targets(model, config)
    total = sum(p.numel() for p in model.parameters())
    lora = sum(row["params"] for row in rows)
    if args.json:
        print(json.dumps({"modules": rows, "lora_params": lora, "base_params": total}, indent=2))
        return 0
    width = max(len(row["name"]) for row in rows)
    for row in rows:
        shape = "x".join(map(str, row["shape"]))
        print(f"{row['name']:<{width}}  {row['type']:<10} {shape:>12}  r={row['r']:<3} {row['params']:>10,d}")
    print(f"\n{len(rows)} modules, {lora:,d} LoRA parameters ({100 * lora / (lora + total):.4f}% of "
          f"{lora + total:,d})")
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    from .core.config import LoraConfig
    from .models.calc import count_parameters, meta_model

    config = LoraConfig(r=args.r, lora_alpha=args.alpha if args.alpha is not None else args.r,
                        target_modules=parse_targets(args.target), task_type=args.task_type)
    result = count_parameters(meta_model(args.model, args.trust_remote_code), config)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(result["line"])
    print()
    header = (f"{'module':<16} {'type':<10} {'weight shape':>14} {'r':>4} {'layers':>7} {'params each':>12} "
              f"{'params':>13}")
    print(header)
    print("-" * len(header))
    for row in result["targets"]:
        shape = "x".join(map(str, row["shape"]))
        print(f"{row['module']:<16} {row['type']:<10} {shape:>14} {row['r']:>4} {row['count']:>7} "
              f"{row['params_each']:>12,d} {row['params']:>13,d}")
    sizes = result["adapter_bytes"]
    print(f"\nLoRA parameters: {result['lora_params']:,d} "
          f"({100 * result['lora_params'] / result['base_total']:.4f}% of the base model's {result['base_total']:,d})")
    if result["modules_to_save"]:
        print(f"trained in full and saved: {', '.join(result['modules_to_save'])}")
    print(f"adapter file: {sizes['fp32'] / 2**20:.2f} MiB in fp32, {sizes['bf16'] / 2**20:.2f} MiB in bf16")
    return 0


def cmd_memory(args: argparse.Namespace) -> int:
    from .core.config import LoraConfig
    from .models.calc import METHODS, estimate_memory, meta_model

    model = meta_model(args.model, args.trust_remote_code)
    lora = LoraConfig(r=args.r, target_modules=parse_targets(args.target) or "all-linear")
    methods = METHODS if args.method == "all" else (args.method,)
    estimates = [estimate_memory(model, m, args.batch, args.seq, dtype=args.dtype,
                                 grad_checkpointing=args.grad_checkpointing, optimizer=args.optimizer, lora=lora,
                                 num_virtual_tokens=args.num_virtual_tokens, runtime=int(args.runtime_mib * 2**20))
                 for m in methods]
    if args.json:
        print(json.dumps([e.as_dict() for e in estimates], indent=2))
        return 0
    print(format_memory(args.model, estimates))
    return 0


def format_memory(model: str, estimates: list) -> str:
    """The side-by-side table of ``lorakit memory``."""
    first = estimates[0]
    gib = lambda n: f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"  # noqa: E731
    parts = [("weights", "weights"), ("gradients", "gradients"), ("optimizer states", "optimizer_states"),
             ("activations", "activations"), ("LM-head logits", "logits"), ("runtime", "runtime")]
    width = 14
    lines = [f"peak training memory of {model}: batch {first.batch} x {first.seq} tokens, {first.dtype}, "
             f"{first.optimizer}{', gradient checkpointing' if first.grad_checkpointing else ''}", "",
             f"{'':<18}" + "".join(f"{e.method:>{width}}" for e in estimates)]
    lines.append(f"{'trainable params':<18}" + "".join(f"{e.trainable:>{width},d}" for e in estimates))
    for label, key in parts:
        lines.append(f"{label:<18}" + "".join(f"{gib(getattr(e, key)):>{width}}" for e in estimates))
    lines.append(f"{'total':<18}" + "".join(f"{gib(e.total):>{width}}" for e in estimates))
    adapters = sorted({e.adapter for e in estimates if e.adapter})
    if adapters:
        lines.append(f"\nlora and qlora: an adapter of {', '.join(adapters)}")
    lines.append("\nruntime: Python and the libraries (measured for a CPU process; on a GPU, the CUDA context "
                 "plays this part; --runtime-mib sets it)")
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .models.svd import inspect_adapter

    info = inspect_adapter(args.adapter)
    overall = info["overall"]
    if args.json:
        print(json.dumps({**info, "modules": [vars(m) for m in info["modules"]]}, indent=2))
        return 0
    width = max(len(m.name) for m in info["modules"])
    print(f"{'module':<{width}}  {'r':>3}  {'rank 90%':>8}  {'rank 99%':>8}  singular values")
    for m in info["modules"]:
        values = " ".join(f"{v:.3g}" for v in m.singular_values[:6]) + (" ..." if m.r > 6 else "")
        print(f"{m.name:<{width}}  {m.r:>3}  {m.rank_90:>8}  {m.rank_99:>8}  {values}")
    kept = ", ".join(f"{k}: {100 * v:.1f}%" for k, v in enumerate(overall["kept"], 1))
    print(f"\nupdate energy kept by the top k directions of every module (k: share): {kept}")
    print(f"rank {overall['rank_90']} keeps 90% and rank {overall['rank_99']} keeps 99% of this r={info['r']} "
          f"adapter's update" + (f"; try `lorakit resize {args.adapter} --rank {overall['rank_99']}`"
                                 if overall["rank_99"] < info["r"] else ""))
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    from .models.svd import resize_adapter
    from .workflows.inference import base_model_for

    try:
        model = base_model_for(args.adapter, args.model)
    except ValueError as err:
        model = None
        print(f"lorakit resize: {err}; no logit comparison", file=sys.stderr)
    report = resize_adapter(args.adapter, args.rank, args.output, model=model)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"wrote a rank-{report['rank']} adapter to {report['output']}, keeping {100 * report['energy_kept']:.2f}% "
          f"of the update energy")
    if "max_abs_logit_diff" in report:
        print(f"logits vs the original adapter on a probe batch: max |diff| {report['max_abs_logit_diff']:.3g}, "
              f"mean {report['mean_abs_logit_diff']:.3g} (largest logit {report['max_abs_logit']:.3g})")
    return 0


def _study_config(args: argparse.Namespace) -> TrainConfig:
    """The task, model, data and budget shared by the runs of ``compare`` and ``sweep``."""
    from .training.options import TrainConfig

    fields = {k: v for k, v in (("task", args.task), ("model", args.model), ("data", args.data),
                                ("eval_data", args.eval_data), ("steps", args.budget),
                                ("max_eval", args.max_eval)) if v is not None}
    return TrainConfig.from_yaml(args.config, **fields) if args.config else TrainConfig(**fields)


def cmd_compare(args: argparse.Namespace) -> int:
    from .workflows.compare import compare

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    result = compare(_study_config(args), methods, args.output_dir)
    print(Path(result["markdown"]).read_text())
    print(f"written: {result['markdown']}, {result['json']}" + (f", {result['png']}" if result["png"] else ""))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .workflows.compare import sweep

    try:
        ranks = tuple(int(r) for r in args.ranks.split(","))
    except ValueError:
        raise ValueError(f"--ranks must be comma-separated integers, got {args.ranks!r}") from None
    targets = tuple(t for t in args.targets.split(":") if t)
    result = sweep(_study_config(args), ranks, targets, args.output_dir)
    print(Path(result["markdown"]).read_text())
    print(f"written: {result['markdown']}, {result['json']}" + (f", {result['png']}" if result["png"] else ""))
    return 0


def _study_arguments(parser: argparse.ArgumentParser, output_dir: str) -> None:
    parser.add_argument("--config", help="a YAML file of `lorakit train` options for the task, model and data")
    parser.add_argument("--task", default=None, help="builtin, causal_lm or seq_cls (default: builtin)")
    parser.add_argument("--model", default=None, help="'default', 'minilm' or a model folder (default: default)")
    parser.add_argument("--data", default=None, help="training file (causal_lm, seq_cls)")
    parser.add_argument("--eval-data", default=None, help="held-out file")
    parser.add_argument("--budget", type=int, default=None,
                        help="optimizer steps of every run (default: as `lorakit train`: 40 on the built-in task)")
    parser.add_argument("--max-eval", type=int, default=None, help="held-out examples to evaluate on")
    parser.add_argument("--output-dir", default=output_dir,
                        help=f"where the runs and tables go (default: {output_dir})")


def cmd_train(args: argparse.Namespace) -> int:
    from .training.loop import train
    from .training.options import config_from_args

    config = config_from_args(args)
    if int(os.environ.get("RANK", "0")) == 0:
        base = f"{config.model} in {config.quantize}" if config.quantize else config.model
        print(f"lorakit train: {config.method} on {base} ({config.task}), output in {config.output_dir}",
              file=sys.stderr)
    result = train(config)
    if not result:  # not the main process of a torchrun job
        return 0
    print(format_summary(result))
    return 0


def _metric(evaluation: dict) -> str:
    for key in ("exact_match", "accuracy"):
        if key in evaluation:
            return f"{key.replace('_', ' ')} {100 * evaluation[key]:.1f}%"
    return f"loss {evaluation['loss']:.4f} (perplexity {evaluation['perplexity']:.2f})"


def format_summary(result: dict) -> str:
    """The short report printed at the end of ``lorakit train``."""
    trainable, total = result["trainable_params"], result["all_params"]
    base = f" on a 4-bit {result['quantize']} base" if result.get("quantize") else ""
    lines = [
        f"task:     {result['task']} ({result['method']}{base}, {result['precision']}, {result['device']}"
        f"{', ' + result['allocator'] if result.get('allocator', 'system') != 'system' else ''}"
        f"{', %d processes' % result['processes'] if result['processes'] > 1 else ''}"
        f"{' sharded (FSDP)' if result.get('fsdp') else ''})",
        *([f"dtype:    {result['precision_reason']}"] if str(result.get("precision_reason")).startswith("auto")
          else []),
        f"trained:  {trainable:,d} of {total:,d} parameters ({100 * trainable / total:.2f}%)",
        f"steps:    {result['steps']} in {result['train_seconds']:.0f} s, {result['tokens']:,d} tokens, "
        f"{result['tokens_per_s']:.0f} tokens/s; loss {result['first_loss']:.3f} -> {result['last_loss']:.3f}",
        *([f"MFU:      {100 * result['mfu']:.1f}% (in the steps: {result['model_flops_per_s'] / 1e9:.1f} useful "
            f"GFLOP/s of the {result['matmul_peak_flops_per_s'] / 1e9:.0f} this machine's matrix products reach in "
            f"{result['precision']})"] if result.get("mfu") else []),
        f"held-out: {_metric(result['before'])} before -> {_metric(result['after'])} after",
    ]
    samples = result["after"].get("samples")
    if samples:
        lines.append(f"example:  {samples[0]['prompt']!r}\n       -> {samples[0]['prediction']}")
    what = {"lora": "adapter", "prompt": "prompt"}.get(result["method"], "model")
    lines.append(f"saved:    {what} ({result['adapter_bytes'] / 2**20:.2f} MiB) in {result['output_dir']}"
                 + (f", loss curve {result['loss_curve']}" if result.get("loss_curve") else ""))
    lines.append(f"total:    {result['total_seconds']:.0f} s")
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
    from .training.options import typed_options
    from .training.saved_adapter import eval_config
    from .workflows.inference import evaluate_adapter

    result = evaluate_adapter(args.adapter, eval_config(args.adapter, args.config, **typed_options(args)))
    print(json.dumps(result, indent=2) if args.json else _metric(result))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .workflows.predict import predict

    n = predict(args.adapter, args.data, args.output, model=args.model, text_field=args.text_field,
                label_field=args.label_field, label_map=args.label_map, batch_size=args.batch_size,
                max_length=args.max_length, max_new_tokens=args.max_new_tokens, device=args.device,
                trust_remote_code=args.trust_remote_code, progress=args.progress)
    if args.output is not None:
        print(f"lorakit predict: {n} predictions in {args.output}", file=sys.stderr)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .workflows.inference import generate

    print(generate(args.prompt, adapter=args.adapter, model=args.model, max_new_tokens=args.max_new_tokens,
                   system=args.system, trust_remote_code=args.trust_remote_code))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .workflows.inference import export_adapter

    if (args.quant is not None or args.adapter_only) and not args.gguf:
        raise ValueError("--quant and --adapter-only need --gguf")
    path = export_adapter(args.adapter, args.output, format="gguf" if args.gguf else "hf", quant=args.quant,
                          adapter_only=args.adapter_only, model=args.model, trust_remote_code=args.trust_remote_code)
    size = path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"lorakit export: wrote {path} ({size / 2**20:.1f} MiB)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import build_engine, serve

    adapters = {}
    for item in args.adapter:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--adapter {item!r}: write NAME=FOLDER, e.g. --adapter support=runs/support")
        adapters[name] = folder
    engine = build_engine(args.base, adapters, dtype=args.dtype, quantize=args.quantize, merge=args.merge,
                          served_model_name=args.served_model_name, max_adapters=args.max_adapters,
                          adapter_root=args.adapter_root, max_batch_size=args.max_batch_size,
                          max_tokens=args.max_tokens, max_request_bytes=args.max_request_bytes,
                          trust_remote_code=args.trust_remote_code, device=args.device)
    served = ", ".join([engine.base_name] + sorted(engine.adapters))
    print(f"lorakit serve: {served} on http://{args.host}:{args.port} (OpenAI API under /v1)", flush=True)
    serve(engine, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="Exact, fast LoRA fine-tuning for PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="a short LoRA tour on the embedded SmolLM2-135M-Instruct (minutes on a CPU)",
                          description="Teach the embedded SmolLM2-135M-Instruct one new fact with a rank-8 adapter, "
                                      "then check merge, disable and save/load on the real model.")
    demo.add_argument("--steps", type=int, default=40, help="training steps (default: 40)")
    demo.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default: 2e-3)")
    demo.add_argument("--output-dir", default="runs/demo", help="where the adapter is saved (default: runs/demo)")
    demo.set_defaults(func=cmd_demo)

    params = sub.add_parser("params", help="count what a LoRA config trains, from a config alone (no weights)",
                            description="Build the model on the meta device, apply the LoRA config and print PEFT's "
                                        "trainable-parameters line, a per-target table and the adapter file size.")
    params.add_argument("--model", default="default",
                        help="a preset (llama-2-7b, llama-2-13b, llama-2-70b, llama-3-8b, mistral-7b, gpt2, "
                             "bert-base), 'default' (SmolLM2-135M), 'minilm', a model folder or a config.json "
                             "(default: default)")
    params.add_argument("--target", default=None,
                        help="comma-separated module names (q_proj,v_proj), 'all-linear', or a regex "
                             "(default: the architecture's default)")
    params.add_argument("--r", type=int, default=8, help="LoRA rank (default: 8)")
    params.add_argument("--alpha", type=float, default=None, help="lora_alpha (default: equal to r)")
    params.add_argument("--task-type", default=None, choices=TASK_TYPES,
                        help="PEFT task type (SEQ_CLS also trains the classification head)")
    params.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _trust_argument(params)
    params.set_defaults(func=cmd_params)

    memory = sub.add_parser("memory", help="estimate the peak memory of a training step, by part (no weights)",
                            description="Estimate the peak memory of one training step of full fine-tuning, LoRA, "
                                        "QLoRA and prompt tuning, from the model's config alone: weights, "
                                        "gradients, optimizer states, activations, LM-head logits.")
    memory.add_argument("--model", default="default", help="as for `lorakit params` (default: default)")
    from .models.calc import DTYPES, METHODS, OPTIMIZERS, RUNTIME_BYTES

    memory.add_argument("--method", default="all", choices=("all", *METHODS),
                        help="one method, or all four side by side (default: all)")
    memory.add_argument("--batch", type=int, default=4, help="sequences per step (default: 4)")
    memory.add_argument("--seq", type=int, default=512, help="tokens per sequence (default: 512)")
    memory.add_argument("--dtype", default="bf16", choices=tuple(DTYPES),
                        help="dtype of the frozen base and the activations (default: bf16)")
    memory.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in the backward")
    memory.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS, help="(default: adamw)")
    memory.add_argument("--r", type=int, default=8, help="LoRA rank (default: 8)")
    memory.add_argument("--target", default=None, help="LoRA targets, as for `lorakit params` (default: all-linear)")
    memory.add_argument("--num-virtual-tokens", type=int, default=20, help="prompt tuning's tokens (default: 20)")
    memory.add_argument("--runtime-mib", type=float, default=RUNTIME_BYTES / 2**20,
                        help="memory of the process before the model (default: %(default)g, measured for Python + "
                             "PyTorch + transformers on CPU)")
    memory.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _trust_argument(memory)
    memory.set_defaults(func=cmd_memory)

    inspect = sub.add_parser("inspect", help="singular values of a trained adapter's updates and the rank it uses",
                             description="Per wrapped module and overall: the singular values of the update "
                                         "scaling*B*A and the smallest rank keeping 90% / 99% of its energy.")
    inspect.add_argument("adapter", help="an adapter folder (lorakit's or PEFT's)")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.set_defaults(func=cmd_inspect)

    resize = sub.add_parser("resize", help="cut an adapter to a smaller rank (truncated SVD) and report the error",
                            description="Write the best rank-R approximation of every module's update as a new "
                                        "adapter and compare its logits with the original's on a probe batch.")
    resize.add_argument("adapter", help="an adapter folder (lorakit's or PEFT's)")
    resize.add_argument("--rank", type=int, required=True, help="the new rank")
    resize.add_argument("--output", required=True, help="folder for the new adapter")
    resize.add_argument("--model", default=None, help="the base model for the logit comparison (default: the one "
                                                       "in the adapter's train_config.yaml)")
    resize.add_argument("--json", action="store_true", help="print JSON")
    resize.set_defaults(func=cmd_resize)

    comp = sub.add_parser("compare", help="train full FT, LoRA, QLoRA and prompt tuning on one task and compare",
                          description="Train each method on the same data with the same step budget (each in its "
                                      "own process), then write comparison.md/.json/.png: trainable parameters, "
                                      "peak memory, tokens/s, held-out quality, artifact size and forward time "
                                      "as trained and merged. No arguments: the built-in task on SmolLM2.")
    _study_arguments(comp, "runs/compare")
    comp.add_argument("--methods", default="full,lora,qlora,prompt", help="which methods (default: all four)")
    comp.set_defaults(func=cmd_compare)

    sw = sub.add_parser("sweep", help="train LoRA at several ranks and target sets; table and plots",
                        description="One LoRA run per (rank, targets) pair with the same task and budget; writes "
                                    "sweep.md/.json and sweep.png (quality vs trainable parameters and vs time).")
    _study_arguments(sw, "runs/sweep")
    sw.add_argument("--ranks", default="4,8,16,32", help="comma-separated ranks (default: 4,8,16,32)")
    sw.add_argument("--targets", default="q,v:q,k,v,o:all-linear",
                    help="target sets separated by ':'; q,k,v,o,gate,up,down mean q_proj, ... (default: "
                         "q,v:q,k,v,o:all-linear)")
    sw.set_defaults(func=cmd_sweep)

    targets = sub.add_parser("targets", help="list the modules a LoRA config would wrap, without loading weights",
                             description="Build the model on the meta device (no weights, no memory) and list the "
                                         "modules the config would wrap, with their shapes and LoRA parameters.")
    targets.add_argument("model", nargs="?", default="default",
                         help="'default' (SmolLM2-135M, embedded), 'minilm' (embedded BERT encoder), a Hugging Face "
                              "model folder or a config.json (default: default)")
    targets.add_argument("--target", default=None,
                         help="comma-separated module names (q_proj,v_proj), 'all-linear', or a regex full-matched "
                              "against module names (default: what `lorakit train` wraps: all-linear, or with "
                              "--task-type SEQ_CLS the architecture's PEFT default, e.g. query,value for BERT)")
    targets.add_argument("--exclude", default=None, help="modules to leave out, same syntax as --target")
    targets.add_argument("--r", type=int, default=8, help="LoRA rank (default: 8)")
    targets.add_argument("--task-type", default=None, choices=TASK_TYPES, help="PEFT task type (SEQ_CLS also trains "
                                                                               "the classification head)")
    targets.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _trust_argument(targets)
    targets.set_defaults(func=cmd_targets)

    from .training.options import add_arguments

    train = sub.add_parser("train", help="train a LoRA adapter (no arguments: the built-in task on SmolLM2-135M)",
                           usage="lorakit train [--config FILE.yaml] [options]",
                           description="Fine-tune a model with LoRA (or in full). With no arguments: the embedded "
                                       "SmolLM2-135M-Instruct learns the built-in order-to-JSON task; held-out exact "
                                       "match is measured before and after. Options come from --config FILE.yaml "
                                       "and the command line (which wins). Under torchrun it trains with "
                                       "DistributedDataParallel.")
    train.add_argument("--config", help="a YAML file of options (the names below, with _ or -)")
    add_arguments(train)
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("eval", help="evaluate a trained adapter on held-out data",
                              usage="lorakit eval ADAPTER [--config FILE.yaml] [--json] [options]",
                              description="Load an adapter onto its base and evaluate it as `lorakit train` does: "
                                          "exact match for the built-in task, loss/perplexity for causal_lm, "
                                          "accuracy/F1 (and, with --json, the confusion matrix) for seq_cls. The "
                                          "adapter folder's train_config.yaml supplies the task and held-out data "
                                          "unless options override them; --eval-data FILE evaluates on that file "
                                          "alone, all of it unless --max-eval says otherwise. An adapter without "
                                          "train_config.yaml is evaluated on its recorded base and task type. An "
                                          "option not given keeps the training run's value; the defaults below "
                                          "apply where the run recorded none.")
    evaluate.add_argument("adapter", help="the adapter folder (as written by lorakit train)")
    evaluate.add_argument("--config", help="a YAML file of options (default: the adapter's train_config.yaml)")
    evaluate.add_argument("--json", action="store_true", help="print every metric as JSON")
    add_arguments(evaluate, "eval")  # only what evaluating reads: no optimizer, schedule or LoRA shape
    evaluate.set_defaults(func=cmd_eval)

    pred = sub.add_parser("predict", help="predictions of an adapter on a data file, as JSON lines",
                          usage="lorakit predict ADAPTER --data FILE [--output preds.jsonl] [options]",
                          description="Run a saved adapter on every example of a file. A classifier writes each "
                                      "text's predicted class and the probability of every class; a language model "
                                      "writes its greedy answer to each prompt (chat, Alpaca or {\"prompt\": ...} "
                                      "records, or a .txt file with one prompt per line). Labels or answers in the "
                                      "file are copied as \"reference\". One JSON line per example, in file order.")
    pred.add_argument("adapter", help="the adapter folder")
    pred.add_argument("--data", required=True, help="the examples: CSV/TSV/JSON(L) for a classifier; JSON(L) or "
                                                    ".txt prompts for a language model; parquet, .arrow or a "
                                                    "save_to_disk folder (of one split) for either")
    pred.add_argument("--output", default=None, help="the JSONL file to write (default: standard output)")
    pred.add_argument("--model", default=None, help="the base (default: the one the adapter was trained on)")
    pred.add_argument("--text-field", default="sentence", help="classifier: the text column or field "
                                                               "(default: sentence)")
    pred.add_argument("--label-field", default="label", help="classifier: the reference label column, if any "
                                                             "(default: label)")
    pred.add_argument("--label-map", type=lambda s: [v.strip() for v in s.split(",")], default=None,
                      help="classifier: FILE_LABEL=CLASS pairs for the reference labels, comma-separated")
    pred.add_argument("--batch-size", type=int, default=32, help="examples per forward pass (default: 32)")
    pred.add_argument("--max-length", type=int, default=512, help="classifier: tokens per text (default: 512)")
    pred.add_argument("--max-new-tokens", type=int, default=128, help="language model: tokens to generate per "
                                                                      "answer (default: 128)")
    pred.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                      help="auto: CUDA when present, else CPU")
    pred.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                      help="show a progress bar on stderr (default: on)")
    _trust_argument(pred)
    pred.set_defaults(func=cmd_predict)

    gen = sub.add_parser("generate", help="try a model or adapter on one prompt (greedy)",
                         description="Answer one prompt with the chat template of the model, greedily.")
    gen.add_argument("prompt", help="the user message")
    gen.add_argument("--adapter", default=None, help="an adapter folder (default: the base model alone)")
    gen.add_argument("--model", default=None,
                     help="the base: 'default', or a model folder (default: the adapter's base, else 'default')")
    gen.add_argument("--system", default=None, help="a system message (default: the built-in task's, when the "
                                                    "adapter was trained on it)")
    gen.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (default: 128)")
    _trust_argument(gen)
    gen.set_defaults(func=cmd_generate)

    exp = sub.add_parser("export", help="merge an adapter into its base: a Hugging Face folder or a GGUF file",
                         usage="lorakit export ADAPTER [--gguf [--quant f16|q8_0|f32] [--adapter-only]] "
                               "[--output PATH] [--model BASE]",
                         description="Fold a saved LoRA adapter into its base model and write the result as a plain "
                                     "Hugging Face folder, or with --gguf as one GGUF file for llama.cpp and Ollama "
                                     "(Llama architecture). --adapter-only writes the adapter alone as a llama.cpp "
                                     "LoRA adapter (llama-cli -m base.gguf --lora FILE).")
    exp.add_argument("adapter", help="the adapter folder")
    exp.add_argument("--gguf", action="store_true", help="write a GGUF file instead of a Hugging Face folder")
    exp.add_argument("--quant", default=None, help="GGUF weights: f16 (default), q8_0 (8-bit, about half the size) "
                                                   "or f32 (default with --adapter-only)")
    exp.add_argument("--adapter-only", action="store_true",
                     help="with --gguf: the adapter alone, as a llama.cpp LoRA adapter file")
    exp.add_argument("--output", default=None, metavar="PATH",
                     help="the folder, or for GGUF a .gguf file or a folder to put it in (default: next to the "
                          "adapter, ADAPTER-merged, ADAPTER-merged-QUANT.gguf or ADAPTER-lora-QUANT.gguf)")
    exp.add_argument("--model", default=None, help="the base (default: the one the adapter was trained on)")
    _trust_argument(exp)
    exp.set_defaults(func=cmd_export)

    srv = sub.add_parser(
        "serve", help="serve a base model and many adapters over OpenAI's HTTP API",
        description="Serve one base model and many LoRA adapters over HTTP with OpenAI's API: POST "
                    "/v1/completions and /v1/chat/completions (\"stream\": true for server-sent events), GET "
                    "/v1/models; the request's \"model\" picks the adapter (or the base). Adapters are loaded and "
                    "unloaded at runtime with POST /v1/load_lora_adapter {lora_name, lora_path} and "
                    "/v1/unload_lora_adapter {lora_name} (vLLM's names). Requests for different adapters are "
                    "batched together. GET /health, GET /metrics (Prometheus).")
    srv.add_argument("--base", default="default",
                     help="the base: 'default' (the embedded SmolLM2-135M-Instruct) or a causal-LM folder")
    srv.add_argument("--adapter", action="append", default=[], metavar="NAME=FOLDER",
                     help="an adapter to serve under NAME (repeatable)")
    srv.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                     help="where the model runs; auto: CUDA when present, else CPU (default: auto)")
    srv.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="the port (default: 8000)")
    srv.add_argument("--max-adapters", type=int, default=8,
                     help="most adapters in memory at once; the least recently used is evicted and reloaded from "
                          "its folder when asked for again (default: 8)")
    srv.add_argument("--adapter-root", default=None, metavar="DIR",
                     help="allow /v1/load_lora_adapter for folders under DIR (default: runtime loading is off)")
    srv.add_argument("--max-batch-size", type=int, default=32, help="most requests decoded together (default: 32)")
    srv.add_argument("--max-tokens", type=int, default=1024,
                     help="the largest max_tokens a request may ask for (default: 1024)")
    srv.add_argument("--max-request-bytes", type=int, default=2**20,
                     help="the largest request body accepted; larger ones get 413 (default: 1048576, 1 MiB)")
    srv.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                     help="the base model's weights (default: float32)")
    srv.add_argument("--quantize", default=None, choices=("nf4", "fp4"),
                     help="serve on a 4-bit base, as QLoRA adapters were trained")
    srv.add_argument("--merge", action="store_true",
                     help="fold the one --adapter into the base and serve only it (the base model's speed)")
    srv.add_argument("--served-model-name", default=None,
                     help="the base's name in requests (default: SmolLM2-135M-Instruct, or the folder's name)")
    srv.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                     help="uvicorn's log level (default: info)")
    _trust_argument(srv)
    srv.set_defaults(func=cmd_serve)
    return parser


def _trust_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run Python code that ships in the model folder (auto_map in its config.json); "
                             "refused without this option")


def _refuse_unknown(parser: argparse.ArgumentParser, command: str, extra: list[str]) -> None:
    """Stop with the command's own usage line (not the top-level one) for options it does not take; a training
    option given to another command is named as such."""
    from .training.options import command_options

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    training = {"--" + name.replace("_", "-") for name in command_options("train")}
    given = [arg.split("=", 1)[0] for arg in extra if arg.startswith("--")]
    misplaced = [flag for flag in given if command != "train" and flag in training]
    hint = (f" ({', '.join(misplaced)}: option(s) of `lorakit train`; `lorakit {command} --help` lists what "
            f"{command} takes)" if misplaced else "")
    sub.error(f"unrecognized arguments: {' '.join(extra)}{hint}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        _refuse_unknown(parser, args.command, extra)
    try:
        return args.func(args)
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly (Python docs' recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError, ImportError) as err:  # a user's mistake or their machine's: one line, no traceback
        print(f"lorakit {args.command}: error: {err}", file=sys.stderr)
        return 2


def console_main() -> int:
    """The ``lorakit`` command. ``lorakit train`` first restarts itself with tcmalloc or jemalloc preloaded where
    the system has one (faster steps, resident memory near what the tensors need; ``LORAKIT_ALLOCATOR=system``
    keeps the C library's malloc): see :func:`lorakit.core.process_memory.exec_with_allocator`."""
    argv = sys.argv[1:]
    if argv[:1] == ["train"]:
        from .core.process_memory import exec_with_allocator

        exec_with_allocator(argv)
    return main(argv)


if __name__ == "__main__":
    sys.exit(main())
