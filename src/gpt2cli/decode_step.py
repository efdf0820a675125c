"""The fused CPU decode step: each block of a one-token-per-row forward in one native call.

A decode step multiplies one row per sequence by every weight matrix, so its matmuls are
short and the ~15 small torch ops around them per block (LayerNorm, views, the cache write,
SDPA, GELU, residual adds) plus four Python-level kernel calls cost as much as the matmuls in
bf16 and int8. ``GPT2.body`` hands its blocks to ``run_blocks`` when ``usable`` says the
forward is such a step; each block is then one ``numba_kernels.block_step`` doing all of it
(the matmuls through the same ``gemv`` / ``gemv_i8`` kernels as the unfused path), and the
blocks one ``model_step`` call, which finds each block's arrays by address in a table made once
per model (12 calls of ``block_step`` from Python, each unboxing 24 arrays, cost 0.4-1.5 ms a
step more on a 2-core Ice Lake). The embeddings, the final LayerNorm and the lm_head stay as
they are.

Used only where nothing would notice: CPU, float32 activations and cache, no hooks, no
autograd, not inside ``torch.compile``, the numba kernels on, at most ``SMALL_BATCH`` rows of
one token each. ``GPT2_KERNELS=unfused`` (or ``set_enabled(False)``) turns it off, leaving the
numba matmuls on; ``calls`` counts the fused steps (tests prove the path runs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast
from weakref import WeakKeyDictionary

import torch
from torch import nn

from gpt2cli import kernels, switches
from gpt2cli.kvcache import KVCache

if TYPE_CHECKING:
    from gpt2cli.model import GPT2, Block, Linear
    from gpt2cli.quantize import QLinear

_enabled = True
calls = 0
"""Decode steps run through the fused blocks in this process."""


def set_enabled(enabled: bool) -> None:
    """Switch the fused step on or off for this process (tests compare both)."""
    global _enabled
    _enabled = enabled


def _on() -> bool:
    return _enabled and switches.choice(switches.KERNELS_ENV, switches.KERNEL_CHOICES) != "unfused"


def usable(model: GPT2, idx: torch.Tensor, cache: KVCache | None, static: bool) -> bool:
    """Whether the forward of ids ``idx`` (B, T) over ``cache`` can run fused."""
    if not _on() or cache is None or static or idx.shape[1] != 1 or idx.shape[0] > kernels.SMALL_BATCH:
        return False
    if idx.device.type != "cpu" or model.hooks or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    if not kernels.is_enabled() or model.config.activation_function not in kernels.nk().ACTIVATIONS:
        return False
    return cache.k[0].dtype == torch.float32 and model.compute_dtype == torch.float32


def warm_up(model: GPT2) -> None:
    """Compile (or load from numba's cache) ``model_step`` (or ``block_step``) for this model's
    weights now, not in the first decode step: one tiny step, serial and parallel."""
    if not _on() or model.device.type != "cpu" or not kernels.is_enabled():
        return
    if (
        model.compute_dtype != torch.float32
        or model.config.activation_function not in kernels.nk().ACTIVATIONS
    ):
        return
    c = model.config
    cache = KVCache(c.n_layer, 1, c.n_head, c.head_dim, 1, device=torch.device("cpu"), dtype=torch.float32)
    for parallel in (False, True):
        x, pos = torch.zeros(1, c.n_embd), torch.zeros(1, dtype=torch.int64)
        _blocks(model, x.numpy(), pos.numpy(), cache, 0, parallel)


def run_blocks(model: GPT2, x: torch.Tensor, pos: torch.Tensor, cache: KVCache, rows: slice) -> torch.Tensor:
    """x (B, 1, C) after the embeddings, positions (B, 1) -> the last block's output (B, 1, C).

    Writes each row's keys and values into ``cache`` rows ``rows`` at its position. One native
    call for every block (``model_step``) where the blocks' weights share their types, else one
    per block.
    """
    global calls
    B, _, C = x.shape
    h = x.reshape(B, C).contiguous()  # updated in place, block after block
    with kernels.parallel_slot() as parallel:
        _blocks(model, h.numpy(), pos.reshape(B).contiguous().numpy(), cache, rows.start or 0, parallel)
    calls += 1
    return h.view(B, 1, C)


def _blocks(model: GPT2, h: Any, pos: Any, cache: KVCache, row0: int, parallel: bool) -> None:
    """Every block on h (B, C) in place, the rows at positions pos (B,), cache rows from row0."""
    nk = kernels.nk()
    eps = float(model.config.layer_norm_epsilon)
    act = nk.ACTIVATIONS[model.config.activation_function]
    table = _operand_table(model)
    if table is None:
        blocks = _block_operands(model)
        layout = kernels.gemv_layout(blocks[0][0][1][0])  # by block 0's c_attn weight
        for i, (operands, scale) in enumerate(blocks):
            k, v = cache.k[i].numpy(), cache.v[i].numpy()
            nk.block_step(h, pos, k, v, row0, *operands, eps, scale, act, parallel, layout)
        return
    shared, like, dims, scales = table
    layout = kernels.gemv_layout(like)  # like: block 0's c_attn weight
    addresses = shared.copy()  # this call's own: another thread may decode the model into another cache
    # KVCache allocates each layer's keys and values as one contiguous float32 tensor
    kv = [(k.data_ptr(), v.data_ptr()) for k, v in zip(cache.k, cache.v, strict=True)]
    addresses[:, [nk.KEYS, nk.VALUES]] = kv
    kv_shape = tuple(cache.k[0].shape)
    nk.model_step(h, pos, addresses, like, dims, kv_shape, row0, eps, scales, act, parallel, layout)


Table = tuple[Any, Any, Any, Any]
"""``model_step``'s (addresses, weight-type witness, dims, attention scales)."""


def _operand_table(model: GPT2) -> Table | None:
    """``model_step``'s table for the model's current block operands, or None where blocks'
    operand types differ (one call each). Its addresses point into the arrays
    ``_block_operands`` keeps, and it is rebuilt with them."""
    return _kept(model)[1]


def _make_table(blocks: list[tuple[Any, float]]) -> Table | None:
    import numpy as np

    weight_type = blocks[0][0][1][0].dtype  # block 0's c_attn weight
    if not all(_as_model_step_reads(_flat(operands), weight_type) for operands, _ in blocks):
        return None  # e.g. one block's weights of another type: one call per block
    nk = kernels.nk()
    addresses = np.zeros((len(blocks), nk.TABLE_WIDTH), np.int64)
    for i, (operands, _) in enumerate(blocks):
        addresses[i, : nk.KEYS] = [a.ctypes.data for a in _flat(operands)]
    ln1, qkv, _, _, fc, _ = blocks[0][0]
    with_sums = int(qkv[3].shape[0] > 0)
    dims = np.array([ln1[0].shape[0], qkv[0].shape[0], fc[0].shape[0], with_sums], np.int64)
    scales = np.array([scale for _, scale in blocks], np.float64)
    return addresses, qkv[0], dims, scales


def _as_model_step_reads(arrays: list[Any], weight_type: Any) -> bool:
    """Whether a block's 20 arrays are C-ordered with the element types ``model_step`` reads
    them as: the weights ``weight_type``, int32 row sums, float32 norms, scales and biases."""
    import numpy as np

    weights = kernels.nk().LINEAR_COLUMNS
    sums = [column + 3 for column in weights]  # a linear's (weight, scale, bias, row sums)
    for i, a in enumerate(arrays):
        expected = weight_type if i in weights else np.int32 if i in sums else np.float32
        if a.dtype != expected or not a.flags.c_contiguous:
            return False
    return True


def _flat(operands: tuple[Any, ...]) -> list[Any]:
    """A block's operands (ln_1, c_attn, c_proj, ln_2, c_fc, c_proj) as one list of 20 arrays."""
    return [array for group in operands for array in group]


_operands: WeakKeyDictionary[GPT2, tuple[list[int], list[tuple[Any, float]], Table | None]] = (
    WeakKeyDictionary()
)
"""Per model: its blocks' tensors' addresses, their numpy operands (gathering them takes ~0.6 ms
a step, more than a block's int8 matmuls take in a thread's share) and ``model_step``'s table."""


def _block_operands(model: GPT2) -> list[tuple[Any, float]]:
    """Per block: its (ln_1, c_attn, c_proj, ln_2, c_fc, c_proj) as ``block_step`` takes them,
    and its attention scale.

    Kept while the tensors stay where they are (training updates them in place); rebuilt
    when any moved (weights replaced or converted).
    """
    return _kept(model)[0]


def _kept(model: GPT2) -> tuple[list[tuple[Any, float]], Table | None]:
    """The model's block operands and table, rebuilt if any of its blocks' tensors moved."""
    addresses = [0 if t is None else t.data_ptr() for block in model.h for t in _block_tensors(block)]
    kept = _operands.get(model)
    if kept is not None and kept[0] == addresses:
        return kept[1], kept[2]
    blocks = cast("list[Block]", list(model.h))
    operands = [(_operands_of(block), float(block.attn.scale)) for block in blocks]
    table = _make_table(operands)
    _operands[model] = (addresses, operands, table)
    return operands, table


def _operands_of(block: Block) -> tuple[Any, ...]:
    attn, mlp = block.attn, block.mlp
    return (
        _norm(block.ln_1),
        _linear(attn.c_attn),
        _linear(attn.c_proj),
        _norm(block.ln_2),
        _linear(mlp.c_fc),
        _linear(mlp.c_proj),
    )


def _block_tensors(block: nn.Module) -> list[torch.Tensor | None]:
    """The tensors ``block_step`` reads from a block, straight from the modules' dicts
    (``nn.Module.__getattr__`` would make this check cost a third of a millisecond a step)."""
    modules = block._modules
    attn, mlp = modules["attn"]._modules, modules["mlp"]._modules  # type: ignore[union-attr]
    found: list[torch.Tensor | None] = []
    layers = (modules["ln_1"], modules["ln_2"], attn["c_attn"], attn["c_proj"], mlp["c_fc"], mlp["c_proj"])
    for layer in layers:
        found += layer._parameters.values()  # type: ignore[union-attr]
        found += layer._buffers.values()  # type: ignore[union-attr]
    return found


def _norm(ln: nn.LayerNorm) -> tuple[Any, Any]:
    return ln.weight.detach().numpy(), ln.bias.detach().numpy()


def _linear(layer: Linear | QLinear) -> tuple[Any, Any, Any, Any]:
    """(weight as the kernel reads it, per-row scale, bias, row sums) of a ``Linear`` or a ``QLinear``."""
    if hasattr(layer, "qweight"):
        q = cast("QLinear", layer)
        return kernels.gemv_operands(q.qweight, q.scale, q.bias)
    linear = cast("Linear", layer)
    return kernels.gemv_operands(linear.weight, None, linear.bias)
