"""transformers, imported when a model is loaded (with what to install when it is missing), and its
``from_pretrained`` with lorakit's report of the weights a checkpoint lacks."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..core.errors import MissingDependency


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise MissingDependency("loading Hugging Face models needs transformers, gguf and accelerate: "
                                "pip install 'lorakit[hf]'") from None
    # lorakit shows its own progress; transformers' bars (loading weights, converting GGUF, writing shards) would
    # interleave with them, even on error paths.
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def load_pretrained(auto: Any, source: Path, *, dtype: torch.dtype, trust_remote_code: bool = False,
                    supplied: Sequence[str] = (), **kwargs: Any) -> torch.nn.Module:
    """``auto.from_pretrained(source)``, with lorakit saying which weights the checkpoint lacks.

    transformers reports every missing weight as "newly initialized", including a classification head that an
    adapter is about to supply (a false alarm), and lorakit keeps transformers' warnings off. Here the weights
    under the module names in ``supplied`` (e.g. ``classifier``) are expected to be missing; any other missing
    weight is reported as a warning that names it.
    """
    model, info = auto.from_pretrained(str(source), dtype=dtype, trust_remote_code=trust_remote_code,
                                       output_loading_info=True, **kwargs)
    expected = set(supplied)
    missing = sorted(k for k in info["missing_keys"] if not expected & set(k.split(".")))
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        warnings.warn(f"{source} lacks {len(missing)} weight(s) of {type(model).__name__}, which start from random "
                      f"values: {shown}", stacklevel=2)
    return model
