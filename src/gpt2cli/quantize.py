"""Weight-only int8 quantization with per-row (per output channel) scales.

Every linear layer of the blocks and the tied ``wte`` (the embedding table and the lm_head)
get int8 weights: row ``o`` is stored as ``round(w[o] / s[o])`` with ``s[o] = max|w[o]| / 127``
(symmetric, no zero point). Weights can be quantised while the checkpoint is read
(``RowQuantizer``, a ``weights.RowConvert``: no float copy of the model is ever held) or after
loading (``quantize_model`` on a float model). On CPU each layer rounds its input to int8 per
row (one scale per row, as CTranslate2's int8) and sums the int8 products exactly
(kernels.linear_int8 picks the path); on CUDA activations stay float. The embedding lookup
dequantises the rows it reads.
"""

from __future__ import annotations

import torch
from torch import nn

from gpt2cli import kernels
from gpt2cli.errors import BadInputError
from gpt2cli.model import GPT2, Linear
from gpt2cli.weights import CONV1D_SUFFIXES

METHODS = ("int8",)
TABLE_KEYS = ("wte.weight", "lm_head.weight")  # the tied embedding / lm_head matrix


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (int8 (out, in), float32 scale (out,))."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


class RowQuantizer:
    """Quantises the linear weights and ``wte`` as the checkpoint is read (a weights.RowConvert).

    Called with blocks of rows in order; returns their int8 rows and keeps the scales, which
    ``quantize_model`` then attaches. Other tensors are stored as read.
    """

    def __init__(self) -> None:
        self._scales: dict[str, list[torch.Tensor]] = {}

    def wants(self, name: str) -> bool:
        key = name.removeprefix("transformer.")
        return key.endswith(CONV1D_SUFFIXES) or key in TABLE_KEYS

    def __call__(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        if rows.dtype == torch.float32:
            q, scale = _quantize_rows_in_place(rows)  # rows is the reader's scratch
        else:
            q, scale = quantize_rows(rows)
        self._scales.setdefault(name.removeprefix("transformer."), []).append(scale)
        return q

    def scale(self, key: str) -> torch.Tensor:
        """The per-row scales (out,) of the weight stored under our name ``key``."""
        if key == "wte.weight" and key not in self._scales:
            key = "lm_head.weight"  # a checkpoint that stores only the tied copy
        return torch.cat(self._scales[key])


def _quantize_rows_in_place(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows for a float32 scratch ``w`` that may be overwritten (no temporaries)."""
    scale = torch.linalg.vector_norm(w, ord=float("inf"), dim=1).clamp_(min=1e-12).div_(127.0)
    q = w.div_(scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale


class QLinear(nn.Module):
    """A linear layer with int8 weights (out, in) and float32 per-row scales."""

    def __init__(self, linear: nn.Linear, scale: torch.Tensor | None = None) -> None:
        super().__init__()
        w = linear.weight.detach()
        if w.dtype == torch.int8:  # quantised while reading: ``scale`` comes with it
            if scale is None:
                raise ValueError("an int8 weight needs its scales")
            q, scale = w.contiguous(), scale.to(w.device).contiguous()
        else:
            q, scale = quantize_rows(w)
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


class QEmbedding(nn.Module):
    """The token table in int8 (V, C) with per-row scales: a lookup dequantises the rows it reads.

    ``weight`` is the int8 table (shared with the int8 lm_head), so ``model.wte.weight.device``
    still answers where the model lives.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)

    weight: torch.Tensor
    scale: torch.Tensor

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return kernels.embedding_int8(ids, self.weight, self.scale)


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
def quantize_model(model: GPT2, method: str = "int8", quantizer: RowQuantizer | None = None) -> GPT2:
    """Replace the blocks' linear layers, ``wte`` and the lm_head by int8 versions, in place.

    Weights already int8 (read through ``quantizer``) take their scales from it; float
    weights are quantised here.
    """
    check_method(method)
    for i, block in enumerate(model.h):
        parents: tuple[tuple[str, nn.Module], ...] = (("attn", block.attn), ("mlp", block.mlp))  # type: ignore[assignment]
        for parent_name, parent in parents:
            for name, child in list(parent.named_children()):
                if isinstance(child, Linear):
                    key = f"h.{i}.{parent_name}.{name}.weight"
                    scale = quantizer.scale(key) if child.weight.dtype == torch.int8 and quantizer else None
                    setattr(parent, name, QLinear(child, scale))
    if isinstance(model.wte, QEmbedding):
        return model
    table = model.wte.weight.detach()
    if table.dtype == torch.int8 and quantizer is not None:
        q, scale = table.contiguous(), quantizer.scale("wte.weight").to(table.device)
    else:
        q, scale = quantize_rows(table)
    model.wte = QEmbedding(q, scale)  # type: ignore[assignment]  # same role: ids -> (.., C) rows
    model.lm_head_q = (q, scale)
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
