"""Putting a loaded model on its fast path: device and storage dtype, int8, compiled decode.

On CPU, float16/bfloat16 means *storage*: the linear weights and embeddings are held in half
precision (half the memory, a faster GEMV), while LayerNorms, activations and the KV cache
stay float32 (half-precision elementwise ops and GEMM are slow on CPUs, and float32
activations keep the output close to the float32 model). On GPUs the whole model is cast.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F

from gpt2cli import kernels
from gpt2cli.engine import Engine
from gpt2cli.kvcache import KVCache
from gpt2cli.model import GPT2, Block, Linear
from gpt2cli.quantize import RowQuantizer, check_method, quantize_model
from gpt2cli.weights import RowConvert

HALF = (torch.float16, torch.bfloat16)


def check_quantize(method: str | None) -> str | None:
    """Validate a ``quantize=`` value before any loading work (see quantize.check_method)."""
    return check_method(method)


def storage_converter(device: torch.device, dtype: torch.dtype, quantize: str | None) -> RowConvert | None:
    """How ``read_state_dict`` should store the weights for ``place`` (None: as read).

    int8 quantises the weights as they are read, half precision on CPU converts them: either
    way no float32 copy of the whole model is held (peak memory near the stored size).
    """
    if quantize is not None:
        return RowQuantizer()
    if device.type == "cpu" and dtype in HALF:
        return HalfRows(dtype)
    return None


class HalfRows:
    """Every 2-D weight (linear layers, wte, wpe) stored in half precision as it is read."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def wants(self, name: str) -> bool:
        return True

    def __call__(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        return rows.to(self.dtype)


def place(
    model: GPT2,
    device: torch.device,
    dtype: torch.dtype,
    quantize: str | None = None,
    converter: RowConvert | None = None,
) -> GPT2:
    """Move ``model`` to ``device`` with weights stored in ``dtype``; quantize if asked.

    ``converter`` is what ``storage_converter`` gave the reader (its int8 scales are needed).
    """
    if device.type == "cpu" and dtype in HALF:
        _half_storage(model, dtype)
    else:
        model.to(device=device, dtype=dtype)  # only floating tensors: int8 weights stay int8
    if quantize is not None:
        quantizer = converter if isinstance(converter, RowQuantizer) else None
        quantize_model(model, quantize, quantizer)
    if device.type == "cpu":
        kernels.warm_up()
    return model


@torch.no_grad()
def _half_storage(model: GPT2, dtype: torch.dtype) -> None:
    """Store the 2-D weights (linear layers, wte, wpe) in ``dtype``; everything else float32."""
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            stored = isinstance(module, (Linear, torch.nn.Embedding)) and name == "weight"
            want = dtype if stored else torch.float32
            if param.dtype != want:  # weights converted while reading are left as they are
                param.data = param.data.to(want)


class StaticDecoder:
    """A static-shape decode step (gpt-fast style) run through ``torch.compile``.

    Every step has the same shapes: the new token attends over the whole cache capacity with
    a mask (positions > pos masked out), and k/v are written with ``index_copy_`` at ``pos``
    (a tensor), so one compiled graph serves every position. On CUDA it uses CUDA graphs
    (mode "reduce-overhead"). If compiling fails (no C++ toolchain...), it warns once and
    falls back to the eager step.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.model = engine.model
        mode = "reduce-overhead" if engine.device.type == "cuda" else None
        self.compiled: Callable[..., torch.Tensor] = torch.compile(_static_step, mode=mode, dynamic=False)
        self.failed = False

    def __call__(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if self.failed or cache.length >= cache.capacity:
            return self.engine._decode_eager(ids, cache)
        pos = torch.tensor([cache.length], device=ids.device)
        try:
            logits = self.compiled(self.model, ids, pos, cache.k, cache.v)
        except Exception as exc:  # noqa: BLE001 - inductor raises many kinds; all mean "cannot compile"
            self.failed = True
            reason = type(exc).__name__
            warnings.warn(f"--compile unavailable here ({reason}); decoding eagerly", stacklevel=2)
            return self.engine._decode_eager(ids, cache)
        cache.length += 1
        self.model.forward_tokens += ids.shape[0]
        return logits.clone()  # CUDA graphs reuse their output buffer


def _static_step(
    model: GPT2, ids: torch.Tensor, pos: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor
) -> torch.Tensor:
    """ids (B, 1), pos (1,), caches (L, B, nh, cap, hs) -> logits (B, vocab); writes the caches."""
    B = ids.shape[0]
    cap = k_all.shape[3]
    x = model.wte(ids).to(model.compute_dtype) + model.wpe(pos).to(model.compute_dtype)  # (B, 1, C)
    mask = (torch.arange(cap, device=ids.device) <= pos)[None, :]  # (1, cap)
    for i, module in enumerate(model.h):
        block = cast(Block, module)
        attn = block.attn
        h = block.ln_1(x)
        C = h.shape[-1]
        q, k, v = attn.c_attn(h).split(C, dim=2)
        q, k, v = (t.view(B, 1, attn.n_head, attn.head_dim).transpose(1, 2) for t in (q, k, v))
        k_all[i].index_copy_(2, pos, k)
        v_all[i].index_copy_(2, pos, v)
        y = F.scaled_dot_product_attention(q, k_all[i], v_all[i], attn_mask=mask, scale=attn.scale)
        x = x + attn.c_proj(y.transpose(1, 2).reshape(B, 1, C))
        x = x + block.mlp(block.ln_2(x))
    return model.logits(model.ln_f(x[:, -1]))


def compile_decode(engine: Engine) -> None:
    """Make ``engine`` decode through a compiled static-shape step."""
    engine.decode_one = StaticDecoder(engine)
