"""Putting a loaded model on its fast path: device and storage dtype, int8, compiled decode.

On CPU, float16/bfloat16 means *storage*: the linear weights and embeddings are held in half
precision (half the memory, a faster GEMV), while LayerNorms, activations and the KV cache
stay float32 (half-precision elementwise ops and GEMM are slow on CPUs, and float32
activations keep the output close to the float32 model). On GPUs the whole model is cast.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable
from typing import cast

import torch

from gpt2cli import decode_step, kernels
from gpt2cli.engine import batch_bucket
from gpt2cli.kvcache import KVCache
from gpt2cli.model import GPT2, Linear
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
        kernels.warm_up(t.dtype for t in itertools.chain(model.parameters(), model.buffers()) if t.dim() == 2)
        decode_step.warm_up(model)
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
    """The engine's decode step, compiled (gpt-fast style): ``(ids, pos, cache) -> logits``.

    Every call has the same shapes for a batch-size bucket: the batch is padded to the next
    power of two (padding rows write to the cache's scratch position and are dropped), and
    attention reads the cache's whole capacity with a mask from the positions, so one graph
    serves every prompt length and every step. On CUDA it uses CUDA graphs (mode
    "reduce-overhead"). If compiling fails (no C++ toolchain...), it warns once and runs eagerly.
    ``calls`` and ``graphs`` count compiled steps and compiled graphs (tests, stats).
    """

    def __init__(self, model: GPT2) -> None:
        self.model = model
        self.compiled: Callable[..., torch.Tensor]
        if model.device.type == "cuda":  # inductor with CUDA graphs; graphs are not counted there
            self.compiled = torch.compile(_static_step, mode="reduce-overhead", dynamic=False)
        else:
            self.compiled = torch.compile(_static_step, backend=self._backend, dynamic=False)
        self.failed = False
        self.calls = 0
        self.graphs = 0

    def _backend(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., object]:
        from torch._inductor.compile_fx import compile_fx

        self.graphs += 1
        return cast(Callable[..., object], compile_fx(gm, example_inputs))

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        rows = ids.shape[0]
        if self.failed:
            return _eager_step(self.model, ids, pos, cache)
        bucket = batch_bucket(rows)
        if bucket > rows:  # padding rows: token 0 at the scratch position
            ids = torch.cat([ids, ids.new_zeros(bucket - rows, ids.shape[1])])
            pos = torch.cat([pos, pos.new_full((bucket - rows, pos.shape[1]), cache.capacity)])
        try:
            logits = self.compiled(self.model, ids, pos, cache)
        except Exception as exc:  # noqa: BLE001 - inductor raises many kinds; all mean "cannot compile"
            self.failed = True
            warnings.warn(
                f"--compile unavailable here ({type(exc).__name__}); decoding eagerly", stacklevel=2
            )
            return _eager_step(self.model, ids[:rows], pos[:rows], cache)
        self.calls += 1
        return logits[:rows].clone()  # CUDA graphs reuse their output buffer


def _static_step(model: GPT2, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """ids (B, T), pos (B, T) -> last-position logits (B, vocab); writes the cache. Traced."""
    hidden = model.body(ids, pos, cache, rows=slice(0, ids.shape[0]), static=True)
    return model.logits(hidden[:, -1])


def _eager_step(model: GPT2, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
    return model.logits(model.body(ids, pos, cache, rows=slice(0, ids.shape[0]))[:, -1])
