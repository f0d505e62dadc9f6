"""Prompt tuning (Lester et al., 2021): n trainable virtual-token embeddings before the input, the model frozen.

``PromptTuningModel(model, num_virtual_tokens)`` prepends the embeddings to every sequence's input embeddings
and drops their positions from the logits (and from the backbone's last hidden state that the loss reads), so
these line up with the real tokens, as the model's own would; ``labels`` get -100 for the virtual positions.
It saves and loads PEFT's format (``peft_type: PROMPT_TUNING``, the tensor ``prompt_embeddings``), so PEFT
reads our prompts and we read PEFT's.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..core.errors import InvalidValue
from ..files.io import WEIGHTS_NAME, check_finite, inside, read_adapter_config, write_adapter_files


class PromptTuningModel(nn.Module):
    """A frozen causal LM with ``num_virtual_tokens`` trainable input embeddings in front of every sequence.

    Attributes:
        model: The wrapped model (every parameter frozen).
        prompt: ``(num_virtual_tokens, hidden)`` fp32, initialized from the embeddings of random vocabulary tokens.
    """

    def __init__(self, model: nn.Module, num_virtual_tokens: int = 20, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
            raise InvalidValue(f"num_virtual_tokens must be a positive integer, got {num_virtual_tokens!r}")
        embed = model.get_input_embeddings()
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        picks = torch.randint(0, embed.weight.shape[0], (num_virtual_tokens,),
                              generator=torch.Generator().manual_seed(seed))
        self.prompt = nn.Parameter(embed.weight.detach()[picks.to(embed.weight.device)].float().clone())
        self.config = model.config

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt.shape[0]

    def _inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if position_ids is not None:
            raise InvalidValue("prompt tuning puts its tokens before each sequence, so packed rows (position_ids) "
                               "cannot carry it; pad the examples instead")
        embeds = self.model.get_input_embeddings()(input_ids)  # (B, T, H)
        batch, n = input_ids.shape[0], self.num_virtual_tokens
        prompt = self.prompt.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)  # (B, n, H)
        inputs = {"inputs_embeds": torch.cat([prompt, embeds], dim=1)}
        if attention_mask is not None:
            ones = attention_mask.new_ones(batch, n)
            inputs["attention_mask"] = torch.cat([ones, attention_mask], dim=1)
        return inputs

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """The model's output for ``input_ids`` with the prompt in front; ``logits`` only for the real tokens."""
        labels = kwargs.pop("labels", None)
        if labels is not None:  # the virtual tokens predict nothing
            kwargs["labels"] = torch.cat([labels.new_full((labels.shape[0], self.num_virtual_tokens), -100),
                                          labels], dim=1)
        out = self.model(**self._inputs(input_ids, attention_mask, position_ids), **kwargs)
        out.logits = out.logits[:, self.num_virtual_tokens:]
        return out

    def get_decoder(self) -> nn.Module:
        """The backbone with the prompt in front (what the chunked loss reads hidden states from)."""
        return _PromptDecoder(self)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.model.get_output_embeddings()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        """The model's ``generate`` with the prompt in front; returns ``input_ids`` followed by the new tokens,
        as ``generate`` does for a plain decoder."""
        new = self.model.generate(**self._inputs(input_ids, attention_mask, None), **kwargs)
        return torch.cat([input_ids, new.to(input_ids.device)], dim=1)

    # -- files -------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write PEFT's prompt-tuning files: ``adapter_config.json`` and ``adapter_model.safetensors``."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        config = self.model.config
        settings = {
            "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": self.num_virtual_tokens,
            "token_dim": self.prompt.shape[1], "num_transformer_submodules": 1,
            "num_attention_heads": getattr(config, "num_attention_heads", None),
            "num_layers": getattr(config, "num_hidden_layers", None), "prompt_tuning_init": "RANDOM",
            "base_model_name_or_path": getattr(config, "_name_or_path", None), "inference_mode": True,
        }
        write_adapter_files(folder, settings, {"prompt_embeddings": self.prompt.detach().float().contiguous()})

    @classmethod
    def from_pretrained(cls, model: nn.Module, path: str | os.PathLike) -> PromptTuningModel:
        """Wrap ``model`` with the prompt saved at ``path`` (by lorakit or PEFT)."""
        folder = Path(path)
        settings = read_adapter_config(folder)
        if settings.get("peft_type") != "PROMPT_TUNING":
            raise InvalidValue(f"{folder} holds a {settings.get('peft_type')!r} adapter, not a prompt "
                               f"(peft_type PROMPT_TUNING)")
        try:
            tensors = load_file(str(inside(folder, WEIGHTS_NAME)))
        except (SafetensorError, OSError) as err:
            raise InvalidValue(f"{str(folder / WEIGHTS_NAME)!r} is missing, truncated or corrupt: {err}") from None
        check_finite(tensors, folder)
        if "prompt_embeddings" not in tensors:
            raise InvalidValue(f"{folder / WEIGHTS_NAME} has no 'prompt_embeddings' tensor")
        prompt = tensors["prompt_embeddings"]
        hidden = model.get_input_embeddings().weight.shape[1]
        if prompt.ndim != 2 or prompt.shape[1] != hidden:
            raise InvalidValue(f"the saved prompt is {list(prompt.shape)}, but this model's embeddings are "
                               f"{hidden} wide")
        wrapped = cls(model, prompt.shape[0])
        with torch.no_grad():
            wrapped.prompt.copy_(prompt)
        wrapped.prompt.requires_grad_(False)
        return wrapped


class _PromptDecoder(nn.Module):
    def __init__(self, owner: PromptTuningModel) -> None:
        super().__init__()
        self.owner = owner

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        owner = self.owner
        out = owner.model.get_decoder()(**owner._inputs(input_ids, attention_mask, position_ids), **kwargs)
        return SimpleNamespace(last_hidden_state=out.last_hidden_state[:, owner.num_virtual_tokens:])
