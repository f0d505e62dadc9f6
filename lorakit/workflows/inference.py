"""Using a trained adapter: evaluate it (``lorakit eval``), answer a prompt with it (``lorakit generate``) or export
it merged into its base (``lorakit export``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..core.errors import InvalidValue, MissingFile
from ..files.export import FORMATS, export_merged
from ..files.io import is_prompt_adapter, read_adapter_config
from ..models.devices import autocast, resolve_device, resolve_precision
from ..models.embedded_models import HUB_NAME, build_model, model_source, require_transformers, smollm2_gguf
from ..models.model import LoraModel
from ..models.prompt_tuning import PromptTuningModel
from ..training.builtin_task import SYSTEM
from ..training.labels import HEADS, adapter_classes, is_classifier
from ..training.metrics import generate_texts
from ..training.options import TrainConfig
from ..training.saved_adapter import base_spec_for, eval_config, saved_config
from ..training.tasks import build_task, give_pad_token

__all__ = ["base_model_for", "base_spec_for", "evaluate_adapter", "export_adapter", "generate", "load_adapter_model"]


def _kind(folder: str | Path) -> str:
    folder = Path(folder)
    if (folder / "adapter_config.json").is_file():
        return "adapter"
    if (folder / "config.json").is_file():
        return "model"
    raise MissingFile(f"{str(folder)!r} holds neither a LoRA adapter (adapter_config.json) nor a model "
                      f"(config.json)")


def evaluate_adapter(path: str | Path, config: TrainConfig | None = None, **options: Any) -> dict[str, Any]:
    """Evaluate the adapter (or fully fine-tuned model) at ``path`` on held-out data.

    Args:
        path: The adapter folder (or a fully fine-tuned model folder).
        config: The options; default: :func:`~lorakit.training.saved_adapter.eval_config` of the adapter with
            ``options`` on top (its training run's options, or what its ``adapter_config.json`` says).
        **options: TrainConfig fields, e.g. ``eval_data="new.csv", text_field="text", label_map=["neg=0"]``. With
            ``eval_data`` only that file is read (all of it, unless ``max_eval`` is given).

    Returns:
        The same metrics ``lorakit train`` reports after training; for a classifier also the ``confusion``
        matrix (rows: true class, columns: predicted) and the class names (``labels``).
    """
    if config is None:
        config = eval_config(path, **options)
    elif options:
        config = dataclasses.replace(config, **options)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    if _kind(path) == "model":
        config = dataclasses.replace(config, model=str(path), method="full", init_adapter=None)
        run = build_task(config, device, precision, evaluate_only=True)
    else:
        method = "prompt" if is_prompt_adapter(path) else "lora"
        run = build_task(dataclasses.replace(config, method=method, init_adapter=None), device, precision,
                         adapter=str(path), evaluate_only=True)
    with autocast(precision, device):  # as training computed: a bf16 base feeds fp32 heads
        return run.evaluate(run.model, "eval")


def generate(prompt: str, adapter: str | Path | None = None, model: str | None = None, max_new_tokens: int = 128,
             system: str | None = None, trust_remote_code: bool = False) -> str:
    """Greedy answer to one user message, with the model's chat template; for an encoder-decoder adapter
    (``SEQ_2_SEQ_LM``, from ``--task seq2seq``) the decoder's output for the prompt as the encoder's input.

    Args:
        prompt: The user message (the input text of a seq2seq adapter).
        adapter: A LoRA adapter folder (or a fully fine-tuned model folder); None for the base alone.
        model: The base ('default' or a model folder); default: the one the adapter was trained on.
        system: A system message; default: the built-in task's when the adapter was trained on it.
        trust_remote_code: Run Python code that ships in the model folder (``auto_map``); refused otherwise.
    """
    transformers = require_transformers()
    kind = _kind(adapter) if adapter is not None else None
    if kind == "adapter" and read_adapter_config(Path(adapter)).get("task_type") == "SEQ_2_SEQ_LM":
        return _generate_seq2seq(prompt, adapter, model, max_new_tokens, trust_remote_code)
    trained = saved_config(adapter) if adapter is not None else {}
    if kind == "adapter":
        base = base_spec_for(adapter, model)
        net = base_model_for(adapter, base, trust_remote_code)
        net = PromptTuningModel.from_pretrained(net, adapter) if is_prompt_adapter(adapter) else \
            LoraModel.from_pretrained(net, adapter)
    else:
        base = model or (str(adapter) if kind else "default")
        net = transformers.AutoModelForCausalLM.from_pretrained(
            str(model_source(base, trust_remote_code)), dtype=torch.float32, trust_remote_code=trust_remote_code).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_source(base, trust_remote_code)),
                                                           trust_remote_code=trust_remote_code)
    if system is None and trained.get("task") == "builtin":
        system = SYSTEM
    chat = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return generate_texts(net, tokenizer, [chat], max_new_tokens=max_new_tokens, batch_size=1)[0]


def _generate_seq2seq(prompt: str, adapter: str | Path, model: str | None, max_new_tokens: int,
                      trust_remote_code: bool) -> str:
    """Greedy decoder output of an encoder-decoder (T5/BART) base with a seq2seq adapter, for ``prompt``."""
    transformers = require_transformers()
    source = str(model_source(base_spec_for(adapter, model), trust_remote_code))
    net = transformers.AutoModelForSeq2SeqLM.from_pretrained(source, dtype=torch.float32,
                                                             trust_remote_code=trust_remote_code).eval()
    net = LoraModel.from_pretrained(net, adapter)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = net.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                           max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)  # (1, T)
    return tokenizer.decode(out[0], skip_special_tokens=True).strip()


def base_model_for(adapter: str | Path, model: str | None = None, trust_remote_code: bool = False
                   ) -> torch.nn.Module:
    """The base an adapter was trained on (see :func:`~lorakit.training.saved_adapter.base_spec_for`), in fp32, and
    in 4 bits again for a QLoRA adapter, ready for the adapter's weights. For a classifier, with as many classes as
    the adapter's head and their names in its config (``id2label``); the head's weights come with the adapter."""
    classes = adapter_classes(adapter) if is_classifier(adapter) else None
    trained = saved_config(adapter)
    # A QLoRA adapter goes on the 4-bit base it was trained on, quantized while loading.
    four_bit = {"quantize": trained.get("quantize"), "double_quant": trained.get("double_quant", True)}
    if classes is None:
        net = build_model(base_spec_for(adapter, model), trust_remote_code=trust_remote_code, **four_bit).eval()
    else:
        heads = set(HEADS) | set(read_adapter_config(Path(adapter)).get("modules_to_save") or ())
        net = build_model(base_spec_for(adapter, model), trust_remote_code=trust_remote_code,
                          num_labels=len(classes), supplied=sorted(heads), **four_bit).eval()
        net.config.id2label = dict(enumerate(classes))
        net.config.label2id = {name: i for i, name in enumerate(classes)}
    return net


def load_adapter_model(adapter: str | Path, model: str | None = None, trust_remote_code: bool = False
                       ) -> tuple[LoraModel | PromptTuningModel, Any]:
    """A saved adapter on its base, ready to use, and the base's tokenizer: one call, as PEFT's
    ``AutoPeftModel*.from_pretrained(adapter)``.

    The base is the one the adapter names (see :func:`~lorakit.training.saved_adapter.base_spec_for`), or
    ``model``. A classifier gets its trained head and class names from the adapter folder, without transformers'
    false "newly initialized" alarm for the head (weights missing for any other reason are still reported).

    Raises:
        FileNotFoundError: ``adapter`` holds no adapter.
        ValueError: The base cannot be found, or the adapter does not fit it.
    """
    if _kind(adapter) != "adapter":
        raise MissingFile(f"{str(adapter)!r} holds no adapter (adapter_config.json)")
    transformers = require_transformers()
    base = base_spec_for(adapter, model)
    net = base_model_for(adapter, base, trust_remote_code)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_source(base, trust_remote_code)),
                                                           trust_remote_code=trust_remote_code)
    if is_classifier(adapter):
        give_pad_token(net, tokenizer, base)
    if is_prompt_adapter(adapter):
        return PromptTuningModel.from_pretrained(net, adapter), tokenizer
    return LoraModel.from_pretrained(net, adapter), tokenizer


def export_adapter(adapter: str | Path, output: str | Path | None = None, *, format: str = "hf",
                   quant: str | None = None, adapter_only: bool = False, model: str | None = None,
                   trust_remote_code: bool = False) -> Path:
    """Export a saved adapter (``lorakit export``): merged into its base as a Hugging Face folder or a GGUF file,
    or (GGUF, ``adapter_only``) as a llama.cpp LoRA adapter file.

    Args:
        adapter: The adapter folder.
        output: Where to write. Default: next to the adapter, ``<adapter>-merged`` (a folder),
            ``<adapter>-merged-<quant>.gguf`` or ``<adapter>-lora-<quant>.gguf``. For GGUF, a path not ending in
            ``.gguf`` is a folder to write that file name in.
        format: ``hf`` (default) or ``gguf``.
        quant: GGUF only: ``f16`` (default for a merged model), ``q8_0`` or ``f32`` (default for an adapter alone).
        adapter_only: GGUF only: write the adapter alone, for ``llama-cli -m base.gguf --lora FILE``.
        model: The base (default: the one the adapter was trained on). With the embedded default model the
            GGUF file gets the original SmolLM2 GGUF's tokenizer; otherwise the base folder's tokenizer is described.
        trust_remote_code: Run Python code that ships in the base model folder (``auto_map``).

    Returns:
        The folder or file written.
    """
    from ..files.gguf_export import check_quant, write_gguf_adapter

    if format not in FORMATS:
        raise InvalidValue(f"unknown export format {format!r}; allowed: {', '.join(FORMATS)}")
    if format == "hf" and (quant is not None or adapter_only):
        raise InvalidValue("quant and adapter_only apply to format='gguf' only")
    if format == "gguf":
        quant = check_quant(quant or ("f32" if adapter_only else "f16"))
    source = Path(adapter)
    kind = "lora" if adapter_only else "merged"
    default_name = f"{source.resolve().name}-{kind}" + (f"-{quant}.gguf" if format == "gguf" else "")
    target = source.resolve().parent / default_name if output is None else Path(output)
    if format == "gguf" and target.suffix != ".gguf":
        target = target / default_name
    net, tokenizer = load_adapter_model(source, model, trust_remote_code)
    if not isinstance(net, LoraModel):
        raise InvalidValue(f"{source} is a prompt-tuning adapter: its virtual tokens cannot be folded into weights")
    if adapter_only:
        return write_gguf_adapter(net, target, quant=quant)
    if format == "gguf":
        if base_spec_for(source, model) == "default":  # the original file's tokenizer, exactly as llama.cpp wrote it
            tokenizer = smollm2_gguf()
            net.model.config._name_or_path = HUB_NAME  # the file's general.name, not the cache folder's
    return export_merged(net, target, tokenizer, format=format, quant=quant)
