"""LoRA: low-rank adapters on the attention and MLP projections, merged into the weights on save.

Each adapted ``nn.Linear`` W (out, in) becomes W x + (alpha / r) * B (A x) with A (r, in) random
and B (out, r) zero, so training starts from the unchanged model; only A and B are trained.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gpt2cli.model import GPT2

# The projections adapted in every block (names relative to the block).
TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank = rank
        self.scale = alpha / rank
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, w.shape[1], device=w.device, dtype=w.dtype))
        self.lora_b = nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear, and the LoRA paper's code

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (..., in) -> (..., r) -> (..., out)
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale

    def merged_weight(self) -> torch.Tensor:
        """W + scale * B A, (out, in)."""
        return self.base.weight + (self.lora_b @ self.lora_a) * self.scale


def apply_lora(model: GPT2, rank: int, alpha: float) -> list[str]:
    """Freeze ``model`` and wrap its projections in ``LoRALinear``; returns the wrapped names."""
    model.requires_grad_(False)
    wrapped = []
    for i, block in enumerate(model.h):
        for target in TARGETS:
            parent_name, attr = target.split(".")
            parent = getattr(block, parent_name)
            setattr(parent, attr, LoRALinear(getattr(parent, attr), rank, alpha))
            wrapped.append(f"h.{i}.{target}")
    return wrapped


def merged_state_dict(model: GPT2) -> dict[str, torch.Tensor]:
    """The model's weights under the plain GPT-2 names, adapters merged in (the model is unchanged)."""
    state: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoRALinear):
                state[f"{name}.weight"] = module.merged_weight().detach().clone()
                state[f"{name}.bias"] = module.base.bias.detach().clone()
        for name, tensor in model.state_dict().items():
            if ".lora_" in name or ".base." in name:
                continue
            state[name] = tensor.detach().clone()
    return state


def adapter_state(model: GPT2) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (``...lora_a``/``...lora_b``), for resuming."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" in k}
