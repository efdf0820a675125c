"""Looking inside the forward pass: the logit lens, attention patterns and named activations.

One responsibility: run the model's one forward with hooks set (``GPT2.hooked``, with
TransformerLens' hook names) and turn what the hooks see into results; rendering is the CLI's.
A text starts with ``<|endoftext|>`` unless told otherwise (TransformerLens' ``prepend_bos``),
so its first token is predicted too, and it must fit the model's window: inspection reads one
forward pass. Definitions and references: docs/inspect.md.
"""

from __future__ import annotations

import fnmatch
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpt2cli.errors import BadInputError
from gpt2cli.model import BLOCK_HOOKS, FINAL_HOOK, GPT2, hook_names
from gpt2cli.scoring import logit_rows
from gpt2cli.tokenizer import Tokenizer

Spec = str | int | Sequence[int] | None  # a selection of layers, heads or positions (see ``select``)
LENS_POINTS = ("pre", "mid", "post")  # which residual stream of a block the lens reads


# --- inputs -------------------------------------------------------------------------------------


def text_ids(
    tokenizer: Tokenizer, text: str | Sequence[int], window: int, *, prepend_bos: bool, name: str = "the text"
) -> list[int]:
    """The ids one inspection forward reads: ``<|endoftext|>`` first (if asked and not there).

    Raises:
        BadInputError: no tokens, or more than the model's window.
    """
    ids = tokenizer.encode(text, allow_special=True) if isinstance(text, str) else list(text)
    eot = tokenizer.eot_id
    if prepend_bos and (not ids or ids[0] != eot):
        ids = [eot, *ids]
    if not ids:
        raise BadInputError(f"{name} is empty", hint="give some text, or drop --no-bos")
    if len(ids) > window:
        kept = tokenizer.decode(ids[int(prepend_bos) : window])
        raise BadInputError(
            f"{name} is {len(ids)} tokens{' with the <|endoftext|> prefix' if prepend_bos else ''}, "
            f"more than the model's {window}-token window",
            hint=f"inspection reads one forward pass: cut the text to its first {len(kept)} characters "
            f"({window} tokens), or use gpt2 score, which slides windows",
        )
    return ids


def select(spec: Spec, n: int, what: str) -> list[int]:
    """Indices 0..n-1 chosen by ``spec``: None or "all" (every one), an int, a list of ints,
    or a string of comma-separated ints and Python slices (``0,3``, ``-1``, ``4:8``, ``-5:``).

    Negative numbers count from the end. Order is kept, repeats dropped.

    Raises:
        BadInputError: an index out of range, an empty slice or an unreadable string.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return list(range(n))
    items: list[int] = []
    parts: Iterable[Any] = (
        [spec] if isinstance(spec, int) else spec.split(",") if isinstance(spec, str) else spec
    )
    for part in parts:
        if isinstance(part, str) and ":" in part:
            items.extend(_slice(part, n, what))
        else:
            items.append(_index(part, n, what))
    return list(dict.fromkeys(items))


def _index(part: object, n: int, what: str) -> int:
    try:
        i = int(part)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise BadInputError(
            f"cannot read {what} {part!r}", hint="use numbers, slices like 2:5 or -3:, or all"
        ) from None
    if not -n <= i < n:
        raise BadInputError(
            f"{what} {i} is out of range: there are {n} {what}s (0 to {n - 1}, or -{n} to -1)",
            hint=f"choose {what}s between 0 and {n - 1}",
        )
    return i % n


def _slice(part: str, n: int, what: str) -> list[int]:
    bounds = part.split(":")
    try:
        if len(bounds) != 2:
            raise ValueError
        start, stop = (int(b) if b.strip() else None for b in bounds)
    except ValueError:
        raise BadInputError(
            f"cannot read {what}s {part!r}", hint="a slice is START:STOP, like 2:5 or -3:"
        ) from None
    chosen = list(range(n))[slice(start, stop)]
    if not chosen:
        raise BadInputError(f"{what}s {part!r} select nothing: there are {n} {what}s (0 to {n - 1})")
    return chosen


def match_hooks(patterns: Sequence[str], n_layer: int) -> list[str]:
    """The hook points (in forward order) matching any of the glob ``patterns``.

    Raises:
        BadInputError: a pattern that matches no hook point (the hint lists the valid ones).
    """
    names = hook_names(n_layer)
    if not patterns:
        raise BadInputError("no hook chosen", hint=f"pass --hook NAME; valid: {valid_hooks_text(n_layer)}")
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise BadInputError(
                f"no hook point is called {pattern!r}", hint=f"valid names: {valid_hooks_text(n_layer)}"
            )
    return [name for name in names if any(fnmatch.fnmatchcase(name, p) for p in patterns)]


def valid_hooks_text(n_layer: int) -> str:
    """The hook points, compactly: ``blocks.{0..11}.hook_resid_pre, ..., ln_final.hook_normalized``."""
    return ", ".join([f"blocks.{{0..{n_layer - 1}}}.{point}" for point in BLOCK_HOOKS] + [FINAL_HOOK])


# --- results ------------------------------------------------------------------------------------


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """One token shown on its own (bytes that are part of a character become U+FFFD)."""
    if token_id >= tokenizer.n_vocab:
        return ""  # a padding row of a larger embedding matrix: no text
    return tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Token:
    """An input token: its position in the forward, id and text."""

    position: int
    id: int
    text: str

    def to_json(self) -> dict[str, Any]:
        return {"position": self.position, "id": self.id, "text": self.text}


def tokens_of(tokenizer: Tokenizer, ids: Sequence[int]) -> list[Token]:
    return [Token(i, t, token_text(tokenizer, t)) for i, t in enumerate(ids)]


@dataclass(frozen=True)
class Candidate:
    """A token the lens predicts, with its log-probability (nats)."""

    text: str
    id: int
    logprob: float

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "id": self.id, "logprob": self.logprob}


@dataclass(frozen=True)
class LensCell:
    """What one layer's residual stream at one position predicts for the next token.

    ``target`` is the token that actually follows (None at the last position); its rank is
    1 + the number of tokens with a higher logit.
    """

    layer: int
    position: int
    token: Token
    top: list[Candidate]
    target: Token | None
    target_logprob: float | None
    target_rank: int | None

    @property
    def target_prob(self) -> float | None:
        return None if self.target_logprob is None else math.exp(self.target_logprob)

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "position": self.position,
            "token": self.token.text,
            "token_id": self.token.id,
            "top": [c.to_json() for c in self.top],
            "target": None if self.target is None else self.target.text,
            "target_id": None if self.target is None else self.target.id,
            "target_logprob": self.target_logprob,
            "target_rank": self.target_rank,
        }


@dataclass
class LensResult:
    """The logit lens over chosen layers and positions of one text."""

    model: str
    at: str
    tokens: list[Token]
    layers: list[int]
    positions: list[int]
    cells: list[LensCell]  # layer-major: layers[0] at every position, then layers[1], ...

    def cell(self, layer: int, position: int) -> LensCell:
        i, j = self.layers.index(layer), self.positions.index(position)
        return self.cells[i * len(self.positions) + j]

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "at": self.at,
            "tokens": [t.to_json() for t in self.tokens],
            "layers": self.layers,
            "positions": self.positions,
            "cells": [c.to_json() for c in self.cells],
        }


@dataclass(frozen=True)
class Attended:
    """The keys one query of one head attends to most: (key position, weight), heaviest first."""

    layer: int
    head: int
    query: int
    keys: list[tuple[int, float]]


@dataclass
class AttentionResult:
    """Attention weights of chosen layers and heads over one text: ``pattern`` is
    (layer, head, query, key), float32 on the CPU, each query row summing to 1 over keys <= query.
    """

    model: str
    tokens: list[Token]
    layers: list[int]
    heads: list[int]
    pattern: torch.Tensor

    def top_keys(self, k: int) -> Iterator[Attended]:
        """For every (layer, head, query), its ``k`` heaviest keys (at most query + 1 of them)."""
        T = self.pattern.shape[-1]
        weights, keys = self.pattern.topk(min(k, T), dim=-1)  # (L, H, T, k)
        for li, layer in enumerate(self.layers):
            for hi, head in enumerate(self.heads):
                for q in range(T):
                    n = min(k, q + 1)
                    pairs = zip(keys[li, hi, q, :n].tolist(), weights[li, hi, q, :n].tolist(), strict=True)
                    yield Attended(layer, head, q, list(pairs))

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "tokens": [t.to_json() for t in self.tokens],
            "layers": self.layers,
            "heads": self.heads,
            "shape": list(self.pattern.shape),
            "pattern": self.pattern.tolist(),
        }

    def to_npy(self) -> bytes:
        """The pattern as a NumPy ``.npy`` file (layer, head, query, key), float32."""
        import io

        import numpy as np

        buffer = io.BytesIO()
        np.save(buffer, self.pattern.numpy(), allow_pickle=False)
        return buffer.getvalue()

    def to_safetensors(self) -> bytes:
        """``pattern`` (layer, head, query, key) float32, ``tokens`` (query,) int64, ``layers``, ``heads``."""
        from safetensors.torch import save

        tensors = {
            "pattern": self.pattern.contiguous(),
            "tokens": torch.tensor([t.id for t in self.tokens], dtype=torch.int64),
            "layers": torch.tensor(self.layers, dtype=torch.int64),
            "heads": torch.tensor(self.heads, dtype=torch.int64),
        }
        return save(tensors, metadata={"model": self.model, "format": "gpt2cli.attention/1"})


# --- running the forward with hooks ------------------------------------------------------------


Keep = Callable[[torch.Tensor], torch.Tensor]


@torch.inference_mode()
def capture(model: GPT2, ids: Sequence[int], keep: dict[str, Keep]) -> dict[str, torch.Tensor]:
    """Run one forward of ``ids`` and return, per hook name, what ``keep`` took from its activation.

    The hooks are set only for this forward (``GPT2.hooked``) and never change the output.
    """
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str, fn: Keep) -> Callable[[torch.Tensor], None]:
        def take(x: torch.Tensor) -> None:
            seen[name] = fn(x)

        return take

    with model.hooked({name: hook(name, fn) for name, fn in keep.items()}):
        model.hidden(torch.tensor([list(ids)], dtype=torch.long, device=model.device))
    return seen


def logit_lens(
    model: GPT2,
    tokenizer: Tokenizer,
    ids: Sequence[int],
    *,
    name: str,
    at: str = "post",
    layers: Spec = None,
    positions: Spec = None,
    top: int = 5,
) -> LensResult:
    """The logit lens: each chosen layer's residual stream, through ``ln_f`` and the unembedding.

    Args:
        name: the model's name, for the result.
        at: which residual stream of a block: ``pre`` (its input), ``mid`` (after attention)
            or ``post`` (its output). ``post`` of the last layer gives the model's own logits.
        layers, positions: see ``select``.
        top: candidates kept per cell.

    Raises:
        BadInputError: an unknown ``at``, ``top`` below 1, or a selection out of range.
    """
    if at not in LENS_POINTS:
        raise BadInputError(f"unknown --at {at!r}", hint="use pre, mid or post")
    if top < 1:
        raise BadInputError(f"--top {top} is below 1", hint="use --top 1 or more")
    chosen_layers = select(layers, model.config.n_layer, "layer")
    chosen_positions = select(positions, len(ids), "position")
    rows = torch.tensor(chosen_positions, device=model.device)
    seen = capture(model, ids, {f"blocks.{L}.hook_resid_{at}": lambda x: x[0, rows] for L in chosen_layers})
    tokens = tokens_of(tokenizer, ids)
    next_ids = [ids[p + 1] if p + 1 < len(ids) else -1 for p in chosen_positions]
    targets = torch.tensor(next_ids, device=model.device)
    cells = []
    for layer in chosen_layers:
        resid = seen[f"blocks.{layer}.hook_resid_{at}"]  # (P, C)
        for j, (logprob, rank, values, indices) in enumerate(_lens_rows(model, resid, targets, top)):
            nxt = next_ids[j]
            cells.append(
                LensCell(
                    layer=layer,
                    position=chosen_positions[j],
                    token=tokens[chosen_positions[j]],
                    top=[
                        Candidate(token_text(tokenizer, i), i, v)
                        for v, i in zip(values, indices, strict=True)
                    ],
                    target=None if nxt < 0 else tokens[chosen_positions[j] + 1],
                    target_logprob=None if nxt < 0 else logprob,
                    target_rank=None if nxt < 0 else rank,
                )
            )
    return LensResult(name, at, tokens, chosen_layers, chosen_positions, cells)


@torch.inference_mode()
def _lens_rows(
    model: GPT2, resid: torch.Tensor, targets: torch.Tensor, top: int
) -> Iterator[tuple[float, int, list[float], list[int]]]:
    """Per row of ``resid`` (P, C): (target logprob, target rank, top-k logprobs, top-k ids).

    ``targets`` (P,) holds -1 where there is none. Logits are made a few rows at a time.
    """
    step = logit_rows(model)
    for i in range(0, resid.shape[0], step):
        logits = model.logits(model.ln_f(resid[i : i + step])).float()  # (n, V)
        logprobs = logits.log_softmax(-1)
        tgt = targets[i : i + step].clamp(min=0)[:, None]  # (n, 1)
        picked = logits.gather(1, tgt)
        ranks = (logits > picked).sum(dim=1) + 1
        values, indices = logprobs.topk(min(top, model.config.vocab_size), dim=-1)  # (n, k)
        yield from zip(
            logprobs.gather(1, tgt)[:, 0].tolist(),
            ranks.tolist(),
            values.tolist(),
            indices.tolist(),
            strict=True,
        )


def attention(
    model: GPT2,
    tokenizer: Tokenizer,
    ids: Sequence[int],
    *,
    name: str,
    layers: Spec = None,
    heads: Spec = None,
) -> AttentionResult:
    """Attention weights (``blocks.{L}.attn.hook_pattern``) of chosen layers and heads.

    Raises:
        BadInputError: a layer or head out of range.
    """
    chosen_layers = select(layers, model.config.n_layer, "layer")
    chosen_heads = select(heads, model.config.n_head, "head")
    index = torch.tensor(chosen_heads, device=model.device)
    seen = capture(
        model,
        ids,
        {f"blocks.{L}.attn.hook_pattern": lambda x: x[0, index].float().cpu() for L in chosen_layers},
    )
    pattern = torch.stack([seen[f"blocks.{L}.attn.hook_pattern"] for L in chosen_layers])  # (L, H, T, T)
    return AttentionResult(name, tokens_of(tokenizer, ids), chosen_layers, chosen_heads, pattern)


def activations(model: GPT2, ids: Sequence[int], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The named activations of one forward, on the CPU, each with the token axis first.

    Shapes (T tokens): ``hook_resid_*`` and ``ln_final.hook_normalized`` (T, d_model);
    ``attn.hook_z`` (T, n_head, d_head); ``mlp.hook_post`` (T, d_mlp); ``attn.hook_pattern``
    (T, n_head, T): query, head, key. Token-first, so the activations of several texts
    concatenate along the first axis.
    """

    def keep(name: str) -> Keep:
        if name.endswith("attn.hook_pattern"):
            return lambda x: x[0].transpose(0, 1).cpu().contiguous()  # (nh, T, T) -> (T, nh, T)
        return lambda x: x[0].cpu().contiguous()

    return capture(model, ids, {name: keep(name) for name in names})


class ActivationsInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``save_activations``: the texts finished so far were written (``file``)."""

    def __init__(self, file: ActivationsFile | None) -> None:
        super().__init__()
        self.file = file


@dataclass
class ActivationsFile:
    """What ``save_activations`` wrote: the path, texts, tokens and each tensor's shape."""

    path: Path
    texts: int
    tokens: int
    shapes: dict[str, list[int]]
    complete: bool = True


def save_activations(
    model: GPT2,
    tokenizer: Tokenizer,
    texts: Iterable[str | Sequence[int]],
    path: str | os.PathLike[str],
    *,
    hooks: Sequence[str],
    model_name: str,
    overwrite: bool = False,
    prepend_bos: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> ActivationsFile:
    """Write the activations of ``texts`` at the hook points matching ``hooks`` to a safetensors file.

    One tensor per hook point, named by it, holding every text's tokens one after another
    along its first axis (shapes as in ``activations``; ``attn.hook_pattern``'s key axis is
    zero-padded to the longest text), plus ``tokens`` (N,) int64 ids and ``offsets``
    (texts + 1,) int64: text i is rows ``offsets[i]:offsets[i+1]``. Texts are read lazily and
    written as they are done (bounded memory). On Ctrl-C the texts finished so far are
    written (metadata ``complete`` = "false") and ``ActivationsInterrupted`` (a
    KeyboardInterrupt) is raised with what was written.

    Raises:
        BadInputError: no hook matches, a text too long or empty, or an output that exists
            (without ``overwrite``) or cannot be written.
    """
    from gpt2cli.tensorfile import GrowingSafetensors

    names = match_hooks(hooks, model.config.n_layer)
    metadata = {
        "format": "gpt2cli.activations/1",
        "model": model_name,
        "hooks": ",".join(names),
        "prepend_bos": str(prepend_bos).lower(),
    }
    out = GrowingSafetensors(path, overwrite=overwrite, metadata=metadata)
    offsets, complete = [0], True
    try:
        for number, text in enumerate(texts, start=1):
            ids = text_ids(
                tokenizer, text, model.config.n_positions, prepend_bos=prepend_bos, name=f"text {number}"
            )
            acts = activations(model, ids, names)
            out.append("tokens", torch.tensor(ids, dtype=torch.int64))
            for name in names:
                out.append(name, acts[name], pad_last=name.endswith("hook_pattern"))
            out.commit()
            offsets.append(offsets[-1] + len(ids))
            if progress:
                progress(number, offsets[-1])
    except KeyboardInterrupt:
        complete = False
    except BaseException:
        out.discard()
        raise
    if len(offsets) == 1:
        out.discard()
        if not complete:
            raise ActivationsInterrupted(None)
        raise BadInputError("no texts to read", hint="give a text, or a JSONL file with a text per line")
    out.append("offsets", torch.tensor(offsets, dtype=torch.int64))
    out.commit()
    out.metadata |= {"texts": str(len(offsets) - 1), "complete": str(complete).lower()}
    shapes = {name: entry.shape() for name, entry in out.entries.items()}
    written = out.close()
    result = ActivationsFile(written, len(offsets) - 1, offsets[-1], shapes, complete)
    if not complete:
        raise ActivationsInterrupted(result)
    return result
