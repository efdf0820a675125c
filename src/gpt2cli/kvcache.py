"""A preallocated key/value cache: one buffer per layer, written in place at the current position."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer, shape (n_layer, B, n_head, capacity, head_dim) each.

    ``length`` is the number of positions filled; every batch row has the same length.
    """

    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_head: int,
        head_dim: int,
        capacity: int,
        *,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        shape = (n_layer, batch, n_head, capacity, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def write(
        self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hs) at positions [start, start+T); return all keys/values so far."""
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def truncate(self, length: int) -> None:
        """Forget positions from ``length`` on (undo, or reuse of a shared prefix)."""
        self.length = max(0, min(length, self.length))

    def reset(self) -> None:
        self.length = 0

    def expand(self, batch: int) -> KVCache:
        """A cache of ``batch`` rows, each a copy of this single-row cache (one prefill, N samples)."""
        if self.batch != 1:
            raise ValueError("only a single-row cache can be expanded")
        out = KVCache.__new__(KVCache)
        out.k = self.k.expand(-1, batch, -1, -1, -1).contiguous()
        out.v = self.v.expand(-1, batch, -1, -1, -1).contiguous()
        out.length = self.length
        return out

    def grow(self, capacity: int) -> None:
        """Enlarge the buffers to ``capacity`` positions, keeping what is stored."""
        if capacity <= self.capacity:
            return
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros((*old.shape[:3], capacity, old.shape[4]))
            new[:, :, :, : self.length] = old[:, :, :, : self.length]
            setattr(self, name, new)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows in ``rows`` (drop finished samples)."""
        self.k = self.k[:, rows].contiguous()
        self.v = self.v[:, rows].contiguous()
