"""Per-token log-probabilities from our own model: ``log_softmax`` of its logits, nothing else.

Two entry points share one shape of result: ``sequence_logprobs`` scores a whole token sequence
(each token given its left context, the first one has none), ``step_logprobs`` scores the tokens
just chosen from a decode step's logits. Both optionally return the top-N alternatives.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from gpt2cli.model import GPT2


@dataclass
class TokenLogprob:
    """One token's log-probability given its left context (None for a sequence's first token).

    ``top`` holds the ``top`` most likely tokens at that position as (id, logprob), best first.
    """

    token: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)


def _entries(logp: torch.Tensor, chosen: torch.Tensor, top: int) -> list[TokenLogprob]:
    """Rows of ``logp`` (N, V) float log-probabilities and ``chosen`` (N,) ids -> entries."""
    picked = logp.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()  # (N,)
    alts: list[list[tuple[int, float]]] = [[] for _ in picked]
    if top > 0:
        values, ids = logp.topk(min(top, logp.shape[-1]), dim=-1)  # (N, top)
        alts = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    return [TokenLogprob(t, lp, a) for t, lp, a in zip(chosen.tolist(), picked, alts, strict=True)]


@torch.inference_mode()
def step_logprobs(logits: torch.Tensor, chosen: torch.Tensor, top: int = 0) -> list[TokenLogprob]:
    """Log-probabilities of ``chosen`` (B,) under a decode step's raw ``logits`` (B, V).

    The distribution is the model's own (before temperature, top-k or top-p), as in OpenAI's API.
    """
    return _entries(F.log_softmax(logits.float(), dim=-1), chosen, top)


@torch.inference_mode()
def sequence_logprobs(model: GPT2, ids: list[int], top: int = 0) -> list[TokenLogprob]:
    """Each token of ``ids`` scored given the tokens before it, in one forward pass.

    Args:
        model: the network (no cache is used or changed).
        ids: at most ``model.config.n_positions`` token ids.
        top: how many alternatives to return per position (0: none).

    Returns:
        One entry per token; the first has ``logprob=None`` and no alternatives (no context).
    """
    if not ids:
        return []
    x = torch.tensor([ids], device=model.wte.weight.device, dtype=torch.long)  # (1, T)
    logp = F.log_softmax(model(x)[0, :-1].float(), dim=-1)  # (T-1, V): position t predicts t+1
    return [TokenLogprob(ids[0], None), *_entries(logp, x[0, 1:], top)]
