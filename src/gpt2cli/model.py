"""The GPT-2 network in PyTorch, in the spirit of nanoGPT: one readable module.

Parameter names equal the Hub checkpoint keys (``wte``, ``h.0.attn.c_attn`` ...) after
``weights.normalize_state_dict``; linear weights are stored (out, in) as ``nn.Linear`` wants.
Attention uses ``scaled_dot_product_attention`` over a passed-in ``KVCache`` written at per-row
positions (gpt-fast's ``forward(idx, input_pos)``), so rows of different lengths share a batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from gpt2cli import decode_step, kernels
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


Hooks = dict[str, Callable[[torch.Tensor], "torch.Tensor | None"]]

# A block's hook points in forward order (TransformerLens' names, after ``blocks.{L}.``).
BLOCK_HOOKS = (
    "hook_resid_pre",
    "attn.hook_pattern",
    "attn.hook_z",
    "hook_resid_mid",
    "mlp.hook_post",
    "hook_resid_post",
)
FINAL_HOOK = "ln_final.hook_normalized"


def hook_names(n_layer: int) -> list[str]:
    """Every hook point of an ``n_layer`` model, in the order the forward reaches them."""
    return [f"blocks.{layer}.{point}" for layer in range(n_layer) for point in BLOCK_HOOKS] + [FINAL_HOOK]


def _run_hook(hooks: Hooks, name: str, x: torch.Tensor) -> torch.Tensor:
    """Call the hook named ``name`` if one is set; a hook may return a replacement tensor."""
    fn = hooks.get(name)
    if fn is None:
        return x
    out = fn(x)
    return x if out is None else out


@dataclass
class AttentionPlan:
    """How every layer of one forward attends: computed once per forward from the positions.

    ``kv_len`` keys of each cache row are read; ``mask`` (B, 1, T, kv_len) says which a query
    sees (None: plain causal when ``causal``, else every key read).
    """

    kv_len: int
    mask: torch.Tensor | None
    causal: bool


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int, hooks: Hooks) -> None:
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
        self.hooks = hooks  # the model's hook table, shared

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        cache: KVCache | None,
        rows: slice,
        plan: AttentionPlan,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if cache is not None:
            k_all, v_all = cache.write(self.layer_idx, rows, pos, k, v)  # (B, nh, cap+1, hs)
            k, v = k_all[:, :, : plan.kv_len], v_all[:, :, : plan.kv_len]
        if self.hooks and f"blocks.{self.layer_idx}.attn.hook_pattern" in self.hooks:
            y = self._explicit(q, k, v, plan)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=plan.mask, is_causal=plan.causal, scale=self.scale
            )
        if self.hooks:
            y = _run_hook(self.hooks, f"blocks.{self.layer_idx}.attn.hook_z", y.transpose(1, 2)).transpose(
                1, 2
            )
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.c_proj(y)

    def _explicit(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan
    ) -> torch.Tensor:
        """Attention with its weights materialised, for the ``attn.hook_pattern`` hook."""
        scores = (q @ k.transpose(-2, -1)).float() * self.scale  # (B, nh, T, kv)
        if plan.mask is not None:
            scores = scores.masked_fill(~plan.mask, float("-inf"))
        elif plan.causal:
            T, S = scores.shape[-2:]
            causal = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
            scores = scores.masked_fill(~causal, float("-inf"))
        pattern = _run_hook(self.hooks, f"blocks.{self.layer_idx}.attn.hook_pattern", scores.softmax(-1))
        return pattern.to(v.dtype) @ v  # (B, nh, T, hs)


class MLP(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int, hooks: Hooks) -> None:
        super().__init__()
        self.c_fc = Linear(config.n_embd, config.inner_dim)
        self.c_proj = Linear(config.inner_dim, config.n_embd)
        self.act = config.activation_function
        self.hook_post = f"blocks.{layer_idx}.mlp.hook_post"
        self.hooks = hooks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.hooks:
            fused = kernels.int8_mlp(x, self.c_fc, self.c_proj, self.act)  # int8 layers, many rows
            if fused is not None:
                return fused
        h = activation(self.act, self.c_fc(x))
        if self.hooks:
            h = _run_hook(self.hooks, self.hook_post, h)
        return self.c_proj(h)


class Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int, hooks: Hooks) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_idx, hooks)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config, layer_idx, hooks)
        self.prefix = f"blocks.{layer_idx}."
        self.hooks = hooks

    def forward(
        self, x: torch.Tensor, pos: torch.Tensor, cache: KVCache | None, rows: slice, plan: AttentionPlan
    ) -> torch.Tensor:
        if not self.hooks:
            x = x + self.attn(self.ln_1(x), pos, cache, rows, plan)
            return x + self.mlp(self.ln_2(x))
        x = _run_hook(self.hooks, self.prefix + "hook_resid_pre", x)
        x = x + self.attn(self.ln_1(x), pos, cache, rows, plan)
        x = _run_hook(self.hooks, self.prefix + "hook_resid_mid", x)
        x = x + self.mlp(self.ln_2(x))
        return _run_hook(self.hooks, self.prefix + "hook_resid_post", x)


def _embedding(n: int, dim: int) -> nn.Embedding:
    """``nn.Embedding``; built on meta (weights assigned later) without its random init:
    ``normal_`` on meta goes through torch._refs, whose import of torch._dynamo costs ~70 MB
    of RSS and a second of start-up."""
    if torch.get_default_device().type == "meta":
        return nn.Embedding(n, dim, _weight=torch.empty(n, dim))
    return nn.Embedding(n, dim)


class GPT2(nn.Module):
    """GPT-2 language model; ``lm_head`` is tied to ``wte``.

    One forward serves every use: scoring (no cache), prefill and decode (a ``KVCache`` written
    at per-row positions ``input_pos``), and the speculative verify step. ``hooks`` maps
    TransformerLens hook names (``blocks.{L}.hook_resid_pre|mid|post``, ``blocks.{L}.attn.hook_z``,
    ``blocks.{L}.attn.hook_pattern``, ``blocks.{L}.mlp.hook_post``, ``ln_final.hook_normalized``)
    to functions called with that activation; empty, it costs one truth test per block.
    """

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.hooks: Hooks = {}
        self.wte = _embedding(config.vocab_size, config.n_embd)
        self.wpe = _embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config, i, self.hooks) for i in range(config.n_layer))
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

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    @contextmanager
    def hooked(self, hooks: Hooks) -> Iterator[GPT2]:
        """Set ``hooks`` for the forwards run inside a ``with`` block, and remove them after.

        The table is shared by every block, so it is edited in place. Hooks are model state:
        do not generate with the same model from another thread meanwhile.

        Raises:
            ValueError: a name that is not a hook point, or one already set.
        """
        unknown = set(hooks) - set(hook_names(self.config.n_layer))
        if unknown:
            raise ValueError(f"not hook points of this model: {sorted(unknown)}")
        if set(hooks) & set(self.hooks):
            raise ValueError(f"hooks already set: {sorted(set(hooks) & set(self.hooks))}")
        self.hooks.update(hooks)
        try:
            yield self
        finally:
            for name in hooks:
                self.hooks.pop(name, None)

    def new_cache(self, rows: int, capacity: int) -> KVCache:
        """A zeroed cache of ``rows`` slots, each ``capacity`` positions (at most the window)."""
        c = self.config
        capacity = min(capacity, c.n_positions)
        return KVCache(
            c.n_layer, rows, c.n_head, c.head_dim, capacity, device=self.device, dtype=self.compute_dtype
        )

    def hidden(
        self,
        idx: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        cache: KVCache | None = None,
        *,
        rows: slice | None = None,
        static: bool = False,
    ) -> torch.Tensor:
        """Final hidden states (B, T, C) for token ids ``idx`` (B, T).

        Args:
            input_pos: each token's position (B, T) (or (T,) for every row); default 0..T-1.
            cache: keys/values to write at those positions and attend over; rows ``rows``
                (default the first B) of it hold these sequences.
            static: attend over the cache's whole capacity (one shape for every step: the
                compiled decode step); the mask alone says which keys a query sees.

        Raises:
            ValueError: a position beyond the window or the cache.
        """
        self.forward_tokens += idx.numel()
        return self.body(idx, self._positions(idx, input_pos), cache, rows=rows, static=static)

    def body(
        self,
        idx: torch.Tensor,
        pos: torch.Tensor,
        cache: KVCache | None,
        *,
        rows: slice | None = None,
        static: bool = False,
    ) -> torch.Tensor:
        """``hidden`` with explicit positions (B, T) and no bookkeeping: what ``torch.compile`` traces."""
        rows = slice(0, idx.shape[0]) if rows is None else rows
        plan = self._plan(pos, cache, static)
        # Static steps' padding rows sit at the scratch position, one past the window.
        wpe_pos = pos.clamp(max=self.config.n_positions - 1) if static else pos
        x = self.wte(idx).to(self.compute_dtype) + self.wpe(wpe_pos).to(self.compute_dtype)  # (B, T, C)
        if decode_step.usable(self, idx, cache, static):
            return self.ln_f(decode_step.run_blocks(self, x, pos, cache, rows))  # type: ignore[arg-type]  # cache: usable checked it
        checkpointed = self.gradient_checkpointing and self.training and cache is None
        for block in self.h:
            if checkpointed:
                x = torch.utils.checkpoint.checkpoint(block, x, pos, cache, rows, plan, use_reentrant=False)
            else:
                x = block(x, pos, cache, rows, plan)
        x = self.ln_f(x)
        return _run_hook(self.hooks, FINAL_HOOK, x) if self.hooks else x

    def _positions(self, idx: torch.Tensor, input_pos: torch.Tensor | None) -> torch.Tensor:
        B, T = idx.shape
        if input_pos is None:
            if self.config.n_positions < T:
                raise ValueError(f"{T} positions exceed n_positions {self.config.n_positions}")
            return torch.arange(T, device=idx.device).expand(B, T)
        return input_pos.to(idx.device).expand(B, T)

    def _plan(self, pos: torch.Tensor, cache: KVCache | None, static: bool) -> AttentionPlan:
        """Keys to read and the mask, from the positions (B, T)."""
        B, T = pos.shape
        if cache is None:
            return AttentionPlan(T, None, T > 1)  # a fresh sequence at positions 0..T-1
        if static:
            keys = torch.arange(cache.capacity + 1, device=pos.device)
            return AttentionPlan(cache.capacity + 1, (keys <= pos[:, :, None]).unsqueeze(1), False)
        last = int(pos.max()) + 1
        if last > min(cache.capacity, self.config.n_positions):
            raise ValueError(f"position {last - 1} is beyond the cache ({cache.capacity}) or the window")
        if B == 1 and T == 1:
            return AttentionPlan(last, None, False)  # one query sees every key so far
        if B == 1 and last == T and int(pos[0, 0]) == 0:
            return AttentionPlan(T, None, T > 1)  # a fresh prompt: plain causal
        keys = torch.arange(last, device=pos.device)
        return AttentionPlan(last, (keys <= pos[:, :, None]).unsqueeze(1), False)  # (B, 1, T, kv)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The tied lm_head: (..., C) -> (..., vocab)."""
        if self.lm_head_q is not None:
            return kernels.linear_int8(hidden, *self.lm_head_q, None)
        return kernels.linear(hidden, self.wte.weight)

    def forward(
        self,
        idx: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        cache: KVCache | None = None,
        *,
        rows: slice | None = None,
        last_only: bool = False,
        static: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, vocab), or (B, vocab) for the last position only (see ``hidden``)."""
        h = self.hidden(idx, input_pos, cache, rows=rows, static=static)
        return self.logits(h[:, -1] if last_only else h)
