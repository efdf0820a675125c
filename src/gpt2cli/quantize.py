"""Weight-only int8 quantization with per-row (per output channel) scales.

Every linear layer of the blocks and the tied lm_head get int8 weights: row ``o`` is stored
as ``round(w[o] / s[o])`` with ``s[o] = max|w[o]| / 127`` (symmetric, no zero point).
Activations stay float: on CPU a batch-1 step runs the numba int8 GEMV (kernels.linear_int8),
several rows dequantise per call; on CUDA it is weight-only int8 (dequantised per call).
The embedding lookup keeps the float ``wte`` (a lookup reads one row, not the matrix).
"""

from __future__ import annotations

import torch
from torch import nn

from gpt2cli import kernels
from gpt2cli.errors import BadInputError
from gpt2cli.model import GPT2, Linear

METHODS = ("int8",)


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (int8 (out, in), float32 scale (out,))."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


class QLinear(nn.Module):
    """A linear layer with int8 weights (out, in) and float32 per-row scales."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        q, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        bias = linear.bias.detach().float() if linear.bias is not None else None
        self.register_buffer("bias", bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    qweight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear_int8(x, self.qweight, self.scale, self.bias)


def check_method(method: str | None) -> str | None:
    """Normalise a ``quantize=`` value: None/"none" -> None, "int8" -> "int8".

    Raises:
        BadInputError: an unknown method.
    """
    if method is None or method.strip().lower() in ("", "none"):
        return None
    method = method.strip().lower()
    if method not in METHODS:
        raise BadInputError(f"unknown quantization {method!r}", hint="use --quantize int8 or none")
    return method


@torch.no_grad()
def quantize_model(model: GPT2, method: str = "int8") -> GPT2:
    """Replace the blocks' linear layers and the lm_head by int8 versions, in place."""
    check_method(method)
    for block in model.h:
        parents: tuple[nn.Module, ...] = (block.attn, block.mlp)  # type: ignore[assignment]
        for parent in parents:
            for name, child in list(parent.named_children()):
                if isinstance(child, Linear):
                    setattr(parent, name, QLinear(child))
    model.lm_head_q = quantize_rows(model.wte.weight.detach())
    return model


@torch.no_grad()
def compare_next_token(reference: GPT2, model: GPT2, ids: torch.Tensor) -> dict[str, float]:
    """Quality cost of ``model`` against ``reference`` on token ids (1, T).

    Returns perplexity of both on ``ids`` and the mean KL(reference || model) of the
    next-token distributions over the T-1 scored positions, as llama.cpp's perplexity tool.
    """
    ref_logp = reference(ids)[0, :-1].float().log_softmax(-1)  # (T-1, V)
    new_logp = model(ids)[0, :-1].float().log_softmax(-1)
    target = ids[0, 1:, None]  # (T-1, 1)
    ppl_ref = float(torch.exp(-ref_logp.gather(1, target).mean()))
    ppl_new = float(torch.exp(-new_logp.gather(1, target).mean()))
    kl = (ref_logp.exp() * (ref_logp - new_logp)).sum(-1).mean()
    return {"perplexity_reference": ppl_ref, "perplexity": ppl_new, "mean_kl": float(kl)}
