"""The GPT-2 network in PyTorch, in the spirit of nanoGPT: one readable module.

Parameter names equal the Hub checkpoint keys (``wte``, ``h.0.attn.c_attn`` ...) after
``weights.normalize_state_dict``; linear weights are stored (out, in) as ``nn.Linear`` wants.
Attention uses ``scaled_dot_product_attention`` and reads/writes a passed-in ``KVCache``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from gpt2cli import kernels
from gpt2cli.config import GPT2Config
from gpt2cli.kvcache import KVCache


class Linear(nn.Linear):
    """``nn.Linear`` whose forward goes through ``kernels.linear`` (a fast batch-1 CPU path)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias)


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """GPT-2's ``gelu_new`` is the tanh approximation: exact GELU misses 1e-4 fidelity."""
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu(x)
    if name == "relu":
        return F.relu(x)
    return F.silu(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.layer_idx = layer_idx
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)  # fused q, k, v
        self.c_proj = Linear(config.n_embd, config.n_embd)
        scale = 1.0 / math.sqrt(self.head_dim) if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        self.scale = scale

    def forward(
        self,
        x: torch.Tensor,
        start: int,
        cache: KVCache | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.write(self.layer_idx, start, k, v)  # (B, nh, start+T, hs)
        if mask is None:
            # Fresh sequence: plain causal. One new token: it sees every cached key.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=self.scale)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = Linear(config.n_embd, config.inner_dim)
        self.c_proj = Linear(config.inner_dim, config.n_embd)
        self.act = config.activation_function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(activation(self.act, self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, start: int, cache: KVCache | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), start, cache, mask)
        return x + self.mlp(self.ln_2(x))


def _embedding(n: int, dim: int) -> nn.Embedding:
    """``nn.Embedding``; built on meta (weights assigned later) without its random init:
    ``normal_`` on meta goes through torch._refs, whose import of torch._dynamo costs ~70 MB
    of RSS and a second of start-up."""
    if torch.get_default_device().type == "meta":
        return nn.Embedding(n, dim, _weight=torch.empty(n, dim))
    return nn.Embedding(n, dim)


class GPT2(nn.Module):
    """GPT-2 language model; ``lm_head`` is tied to ``wte``."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.wte = _embedding(config.vocab_size, config.n_embd)
        self.wpe = _embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.forward_tokens = 0  # tokens run through the network, for tests and stats
        # Training only: recompute each block's activations in backward instead of storing them.
        self.gradient_checkpointing = False
        # int8 lm_head (quantize.py): (qweight (vocab, C) int8, scale (vocab,)); None = use wte.
        self.lm_head_q: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def compute_dtype(self) -> torch.dtype:
        """Activations' dtype: LayerNorms stay float32 when CPU weights are stored in half."""
        return self.ln_f.weight.dtype

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        c = self.config
        capacity = min(capacity, c.n_positions)
        device, dtype = self.wte.weight.device, self.compute_dtype
        return KVCache(c.n_layer, batch, c.n_head, c.head_dim, capacity, device=device, dtype=dtype)

    def hidden(
        self, idx: torch.Tensor, cache: KVCache | None = None, start: int | None = None
    ) -> torch.Tensor:
        """Final hidden states (B, T, C) for token ids ``idx`` (B, T).

        With a cache, the tokens continue it at position ``cache.length`` (or ``start``)
        and the cache advances; without one, positions start at 0.
        """
        B, T = idx.shape
        if start is None:
            start = cache.length if cache is not None else 0
        if start + T > self.config.n_positions:
            raise ValueError(f"positions {start}..{start + T} exceed n_positions")
        if cache is not None and start + T > cache.capacity:
            cache.grow(min(self.config.n_positions, max(start + T, 2 * cache.capacity)))
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.wte(idx).to(self.compute_dtype) + self.wpe(pos).to(self.compute_dtype)  # (B, T, C)
        mask = None
        if cache is not None and start > 0 and T > 1:
            # Chunk after a cached prefix: query i (at start+i) sees keys 0..start+i.
            keys = torch.arange(start + T, device=idx.device)
            mask = keys[None, :] <= pos[:, None]  # (T, start+T)
        checkpointed = self.gradient_checkpointing and self.training and cache is None
        for block in self.h:
            if checkpointed:
                x = torch.utils.checkpoint.checkpoint(block, x, start, cache, mask, use_reentrant=False)
            else:
                x = block(x, start, cache, mask)
        if cache is not None:
            cache.length = start + T
        self.forward_tokens += B * T
        return self.ln_f(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The tied lm_head: (..., C) -> (..., vocab)."""
        if self.lm_head_q is not None:
            return kernels.linear_int8(hidden, *self.lm_head_q, None)
        return kernels.linear(hidden, self.wte.weight)

    def forward(
        self, idx: torch.Tensor, cache: KVCache | None = None, *, last_only: bool = False
    ) -> torch.Tensor:
        """Logits (B, T, vocab), or (B, vocab) for the last position only."""
        h = self.hidden(idx, cache)
        return self.logits(h[:, -1] if last_only else h)
