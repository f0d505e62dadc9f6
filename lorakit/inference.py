"""Using a trained adapter: evaluate it (``lorakit eval``) or answer a prompt with it (``lorakit generate``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from .embedded_models import HUB_NAME, build_model, model_source, require_transformers
from .io import is_prompt_adapter, read_adapter_config
from .model import LoraModel
from .prompt_tuning import PromptTuningModel
from .quant import quantize
from .training.builtin_task import SYSTEM
from .training.devices import resolve_device, resolve_precision
from .training.metrics import generate_texts
from .training.options import TrainConfig
from .training.tasks import build_task


def _kind(folder: str | Path) -> str:
    folder = Path(folder)
    if (folder / "adapter_config.json").is_file():
        return "adapter"
    if (folder / "config.json").is_file():
        return "model"
    raise FileNotFoundError(f"{str(folder)!r} holds neither a LoRA adapter (adapter_config.json) nor a model "
                            f"(config.json)")


def evaluate_adapter(path: str | Path, config: TrainConfig) -> dict[str, Any]:
    """Evaluate the adapter (or fully fine-tuned model) at ``path`` on ``config``'s held-out data.

    Returns:
        The same metrics ``lorakit train`` reports after training.
    """
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    if _kind(path) == "model":
        config = dataclasses.replace(config, model=str(path), method="full")
        run = build_task(config, device, precision)
    else:
        method = "prompt" if is_prompt_adapter(path) else "lora"
        run = build_task(dataclasses.replace(config, method=method), device, precision, adapter=str(path))
    return run.evaluate(run.model, "eval")


def _saved_config(folder: Path) -> dict[str, Any]:
    """The ``train_config.yaml`` that ``lorakit train`` wrote next to an adapter ({} when there is none)."""
    saved = folder / "train_config.yaml"
    if not saved.is_file():
        return {}
    return TrainConfig.from_yaml(saved).to_dict()  # checked: a damaged file is an error that names it


def generate(prompt: str, adapter: str | Path | None = None, model: str | None = None, max_new_tokens: int = 128,
             system: str | None = None, trust_remote_code: bool = False) -> str:
    """Greedy answer to one user message, with the model's chat template.

    Args:
        prompt: The user message.
        adapter: A LoRA adapter folder (or a fully fine-tuned model folder); None for the base alone.
        model: The base ('default' or a model folder); default: the one the adapter was trained on.
        system: A system message; default: the built-in task's when the adapter was trained on it.
        trust_remote_code: Run Python code that ships in the model folder (``auto_map``); refused otherwise.
    """
    transformers = require_transformers()
    kind = _kind(adapter) if adapter is not None else None
    trained = _saved_config(Path(adapter)) if adapter is not None else {}
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


def base_spec_for(adapter: str | Path, model: str | None = None) -> str:
    """Which base an adapter belongs on: ``model`` if given, else the ``model`` of its ``train_config.yaml``, else
    its ``base_model_name_or_path`` when that is SmolLM2's hub name ('default') or a local folder.

    Raises:
        ValueError: No base is named anywhere.
    """
    if model is not None:
        return model
    trained = _saved_config(Path(adapter))
    if trained.get("model"):
        return trained["model"]
    named = read_adapter_config(Path(adapter)).get("base_model_name_or_path")
    if named == HUB_NAME:
        return "default"
    if named and Path(named).exists():
        return named
    raise ValueError(f"{adapter} does not say which base it was trained on; pass the base model")


def base_model_for(adapter: str | Path, model: str | None = None, trust_remote_code: bool = False
                   ) -> torch.nn.Module:
    """The base an adapter was trained on (see :func:`base_spec_for`), in fp32, and in 4 bits again for a QLoRA
    adapter, ready for the adapter's weights."""
    net = build_model(base_spec_for(adapter, model), trust_remote_code=trust_remote_code).eval()
    trained = _saved_config(Path(adapter))
    if trained.get("quantize"):  # a QLoRA adapter: on the 4-bit base it was trained on
        quantize(net, trained["quantize"], double_quant=trained.get("double_quant", True))
    return net
