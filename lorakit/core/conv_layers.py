"""LoRA around convolutions (``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d``), PEFT's layout.

A is a convolution with the base's kernel, stride and padding into r channels, B a 1×…×1 convolution back to the
output channels, so ``h = conv(x, W0) + (α/r)·(conv(conv(x, A), B) + b)``. Merged, the update is
``ΔW = (α/r)·B·A`` over the flattened kernel. With DoRA the magnitude runs over output channels and is stored
(1, out, 1…), as PEFT stores it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidValue
from .layer_base import LoraAdapter, LoraLayer


def conv_shapes(module: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of A and B for rank ``r`` on a Conv1d/2d/3d base: A (r, in, *kernel), B (out, r, 1…)."""
    ones = (1,) * len(module.kernel_size)
    return (r, module.in_channels, *module.kernel_size), (module.out_channels, r, *ones)


class LoraConv(LoraLayer):
    """LoRA around an N-d convolution (the subclasses fix N)."""

    supports_dora = True
    supports_lora_bias = True
    conv = staticmethod(F.conv2d)  # the functional convolution of this N

    def __init__(self, base: nn.Module) -> None:
        if base.groups != 1:
            raise InvalidValue(f"LoRA on {type(base).__name__} needs groups=1, got groups={base.groups}")
        super().__init__(base)
        self.in_features, self.out_features = base.in_channels, base.out_channels

    def adapter_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return conv_shapes(self.base, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.routing is not None and not self.disabled:
            raise InvalidValue(f"mixed batches (adapter_names=...) support Linear and Embedding layers, not "
                               f"{type(self.base).__name__}")
        for name in self._unmerged_active():
            adapter = self.adapters[name]
            xd = adapter.dropout(x).to(adapter.lora_A.dtype)
            update = self._update(adapter, xd)  # (N, out, *spatial), scaling and lora_bias included
            if adapter.use_dora:
                result = self._dora_forward(adapter, xd, result, update)
            else:
                result = result + update.to(result.dtype)
        return result

    def _update(self, adapter: LoraAdapter, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        xa = self.conv(x, adapter.lora_A, None, base.stride, base.padding, base.dilation)  # (N, r, *spatial)
        return self.conv(xa, adapter.lora_B, adapter.lora_B_bias) * adapter.scaling

    def _dora_forward(self, adapter: LoraAdapter, x: torch.Tensor, result: torch.Tensor,
                      update: torch.Tensor) -> torch.Tensor:
        # W' = g·(W0 + ΔW) per output channel, g = m / ‖W0 + ΔW‖: W'x = g·(W0·x) + g·ΔW·x (as PEFT's _DoraConvNdLayer).
        g = (adapter.lora_magnitude_vector.reshape(-1) / self._dora_weight_norm(adapter)).to(result.dtype)
        view = (1, -1) + (1,) * (result.dim() - 2)
        base = self.base
        if not (adapter.dropout_p and adapter.training):
            base_out = result if base.bias is None else result - base.bias.view(view)
        else:  # dropout changed the input: the magnitude applies to W0 on the same dropped-out input
            base_out = self.conv(x.to(base.weight.dtype), base.weight, None, base.stride, base.padding, base.dilation)
        return result + (g.view(view) - 1) * base_out + g.view(view) * update.to(result.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        adapter = self.adapters[name]
        r = adapter.r
        b = adapter.lora_B.float().reshape(-1, r)  # (out, r)
        delta = b @ adapter.lora_A.float().reshape(r, -1)  # (out, in·k…)
        return delta.reshape(self.base.weight.shape) * adapter.scaling

    def magnitude_shape(self) -> tuple[int, ...]:
        return (1, self.out_features) + (1,) * (self.base.weight.dim() - 2)

    def _rows(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return weight * scale.view(-1, *([1] * (weight.dim() - 1)))

    def _dora_weight_norm(self, adapter: LoraAdapter, weight: torch.Tensor | None = None) -> torch.Tensor:
        w = (self.base.weight if weight is None else weight).detach().float()  # (out, in, k…)
        r = adapter.r
        delta = adapter.lora_B.detach().float().reshape(-1, r) @ adapter.lora_A.detach().float().reshape(r, -1)
        return (w.reshape(w.shape[0], -1) + adapter.scaling * delta).norm(p=2, dim=1)  # (out,)


class LoraConv1d(LoraConv):
    """LoRA around ``nn.Conv1d``."""

    conv = staticmethod(F.conv1d)


class LoraConv2d(LoraConv):
    """LoRA around ``nn.Conv2d``."""

    conv = staticmethod(F.conv2d)


class LoraConv3d(LoraConv):
    """LoRA around ``nn.Conv3d``."""

    conv = staticmethod(F.conv3d)
