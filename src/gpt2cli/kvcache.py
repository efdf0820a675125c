"""Key/value storage: a preallocated ``KVCache`` of slots, and the caller-owned ``PromptCache``.

A ``KVCache`` holds keys and values of every layer for ``rows`` slots of ``capacity`` positions.
It does not know how long each row is: its owner (the engine, or a ``PromptCache``) tracks
that, and the model's forward writes at explicit per-row positions. One extra position per
row (index ``capacity``) is scratch: padding rows of a fixed-shape (compiled) decode step
write there, and no real row ever reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class KVCache:
    """Keys and values: per layer, one tensor each of shape (rows, n_head, capacity + 1, head_dim).

    One tensor per layer, not one for all: a write is then an ``index_put_`` on a whole
    tensor, which ``torch.compile`` keeps in place. Writing into a view of one shared tensor
    made the compiled decode step copy every layer's cache once per layer (4x slower than eager).
    """

    def __init__(
        self,
        n_layer: int,
        rows: int,
        n_head: int,
        head_dim: int,
        capacity: int,
        *,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        shape = (rows, n_head, capacity + 1, head_dim)
        # Zeros, not empty: masked keys still meet their values in the softmax-weighted sum
        # (weight 0 times garbage NaN would be NaN).
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]

    @property
    def rows(self) -> int:
        return self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        """Usable positions per row (the scratch position is not counted)."""
        return self.k[0].shape[2] - 1

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def write(
        self, layer: int, rows: slice, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hs) of rows ``rows`` at positions ``pos`` (B, T).

        Returns that layer's keys and values of those rows, (B, nh, capacity + 1, hs) views.
        """
        k_layer, v_layer = self.k[layer], self.v[layer]
        first = rows.start or 0
        row = torch.arange(first, first + k.shape[0], device=k.device)[:, None]  # (B, 1)
        # Advanced indices (row, pos) around a slice put their dims first: (B, T, nh, hs).
        k_layer[row, :, pos] = k.transpose(1, 2)
        v_layer[row, :, pos] = v.transpose(1, 2)
        return k_layer[rows], v_layer[rows]

    def ensure(self, rows: int, capacity: int) -> None:
        """Grow to at least ``rows`` rows and ``capacity`` positions, keeping what is stored."""
        if rows <= self.rows and capacity <= self.capacity:
            return
        rows, capacity = max(rows, self.rows), max(capacity, self.capacity)
        for layers in (self.k, self.v):
            for i, old in enumerate(layers):
                new = old.new_zeros((rows, old.shape[1], capacity + 1, old.shape[3]))
                new[: old.shape[0], :, : old.shape[2] - 1] = old[:, :, :-1]
                layers[i] = new

    def copy_row(self, src: int, dst: int, length: int, source: KVCache | None = None) -> None:
        """Copy positions [0, length) of row ``src`` (of ``source``, default this cache) to row ``dst``."""
        source = self if source is None else source
        if length <= 0 or (source is self and src == dst):
            return
        for mine, theirs in zip((*self.k, *self.v), (*source.k, *source.v), strict=True):
            mine[dst, :, :length] = theirs[src, :, :length]


def reusable_prefix(cached: list[int], ids: list[int], capacity: int | None = None) -> int:
    """Length of the prefix ``ids`` shares with ``cached``, leaving at least one id of ``ids`` to run."""
    limit = min(len(cached), len(ids) - 1, len(cached) if capacity is None else capacity)
    n = 0
    while n < limit and cached[n] == ids[n]:
        n += 1
    return n


@dataclass
class PromptCache:
    """One sequence's token ids and their keys/values, owned by the caller (mlx-lm's prompt cache).

    Pass it to ``LM.stream(..., cache=...)``: the stream reuses the longest prefix its prompt
    shares with ``ids`` and runs only the rest; afterwards ``ids`` are the tokens fed so far
    (prompt plus generated, as far as the keys/values hold them). A REPL session keeps one
    across turns. ``kv`` is created on first use, on the model's device.
    """

    ids: list[int] = field(default_factory=list)
    kv: KVCache | None = field(default=None, repr=False)

    def common_prefix(self, ids: list[int]) -> int:
        """How many leading ids are reusable for a prompt ``ids`` (at least one is always run)."""
        if self.kv is None:
            return 0
        return reusable_prefix(self.ids, ids, self.kv.capacity)

    def clear(self) -> None:
        self.ids = []
