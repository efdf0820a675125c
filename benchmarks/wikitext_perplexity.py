"""Reproduce published WikiText-2 perplexities with `gpt2 score`'s method (needs network).

Scores the raw WikiText-2 test split, joined with blank lines exactly as Hugging Face's
perplexity guide does (``"\\n\\n".join(test["text"])``), with ``gpt2`` and ``gpt2-large``, a
1024-token context and the guide's strides (1024 = disjoint windows, 512), with both methods,
and prints our perplexity beside the published values.

``--protocol hf`` is the guide's own method (no prefix, CONTEXT - 1 predictions per window, its
per-window weighting): its rows are the ones that must match the guide's figures. The default
method (lm-eval) prefixes ``<|endoftext|>`` so the first token is scored too, scores every
token exactly once and pools NLL over tokens: its rows differ from the guide's a little.

    pip install datasets && python benchmarks/wikitext_perplexity.py [--device cuda]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable
from dataclasses import dataclass

CONTEXT = 1024
STRIDES = (1024, 512)
MODELS = ("gpt2", "gpt2-large")
PROTOCOLS = ("hf", "lm-eval")

# Hugging Face, "Perplexity of fixed-length models" (transformers docs): gpt2-large on the
# WikiText-2 raw test split, max_length 1024.
PUBLISHED_HF = {("gpt2-large", 1024): 19.44, ("gpt2-large", 512): 16.45}
# Radford et al. 2019, Table 3 (zero-shot, with the paper's de-tokenizers: a different protocol).
PUBLISHED_PAPER = {"gpt2": 29.41, "gpt2-large": 19.93}


@dataclass
class Row:
    model: str
    protocol: str
    stride: int
    tokens: int
    perplexity: float
    published: float | None
    paper: float | None

    @property
    def difference(self) -> float | None:
        """Our perplexity relative to the guide's, in percent."""
        return None if self.published is None else 100 * (self.perplexity / self.published - 1)


def corpus_text(lines: Iterable[str]) -> str:
    """The guide's corpus: the split's lines joined with blank lines."""
    return "\n\n".join(lines)


def score_rows(
    lm,
    model: str,
    text: str,
    strides: Iterable[int] = STRIDES,
    batch_size: int = 8,
    protocols: Iterable[str] = PROTOCOLS,
) -> list[Row]:
    """One row per method and stride: our perplexity beside the published ones (the guide's
    figure beside the hf rows only: that is the method it used)."""
    context = min(CONTEXT, lm.window)
    rows = []
    for protocol in protocols:
        for stride in strides:
            result = lm.score(
                text, context=context, stride=min(stride, context), batch_size=batch_size, protocol=protocol
            )
            guide = PUBLISHED_HF.get((model, stride)) if protocol == "hf" else None
            rows.append(
                Row(
                    model,
                    protocol,
                    stride,
                    result.tokens,
                    result.perplexity,
                    guide,
                    PUBLISHED_PAPER.get(model),
                )
            )
    return rows


def markdown(rows: list[Row]) -> str:
    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None or math.isnan(value) else format(value, fmt)

    lines = [
        "| model | method | stride | tokens | ours | HF guide | ours vs guide | GPT-2 paper |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.protocol} | {r.stride} | {r.tokens} | {r.perplexity:.2f} | {num(r.published, '.2f')} "
            f"| {num(r.difference, '+.2f')}{'%' if r.difference is not None else ''} | {num(r.paper, '.2f')} |"
        )
    return "\n".join(lines)


def load_wikitext() -> list[str]:
    """The raw WikiText-2 test split's lines, as the guide loads them."""
    try:
        from datasets import load_dataset
    except ImportError as exc:
        raise SystemExit("this script needs the `datasets` package: pip install datasets") from exc
    return list(load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", help="float32 to compare with published figures")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)

    from gpt2cli import load

    text = corpus_text(load_wikitext())
    rows: list[Row] = []
    for model in args.models:
        lm = load(model, device=args.device, dtype=args.dtype)
        rows += score_rows(lm, model, text, batch_size=args.batch_size)
        print(markdown(rows), flush=True)
        print()


if __name__ == "__main__":
    main()
