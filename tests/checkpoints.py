"""A factory of tiny random GPT-2 checkpoints in Hugging Face layout, for tests.

Both key layouts found on the Hub are made: ``h.0.attn...`` (openai-community/gpt2) and
``transformer.h.0...`` (most fine-tunes). Weights use a large init std (0.2) so that the
next-token distributions are peaked and greedy decoding is stable across implementations.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from bpe import copy_bpe_files
from safetensors.torch import save_file

VOCAB_SIZE = 50257


def random_hub_state(
    *,
    n_layer: int,
    n_head: int,
    n_embd: int,
    n_positions: int,
    seed: int,
    std: float,
    vocab_size: int = VOCAB_SIZE,
    n_inner: int | None = None,
) -> dict[str, torch.Tensor]:
    """Random tensors named and shaped as in openai-community/gpt2 (Conv1D weights are (in, out))."""
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, scale: float = std) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    C = n_embd
    inner = n_inner or 4 * C
    state = {"wte.weight": normal(vocab_size, C), "wpe.weight": normal(n_positions, C, scale=std / 2)}
    for i in range(n_layer):
        p = f"h.{i}."
        state |= {
            p + "ln_1.weight": 1 + normal(C, scale=0.1),
            p + "ln_1.bias": normal(C, scale=0.1),
            p + "attn.c_attn.weight": normal(C, 3 * C),
            p + "attn.c_attn.bias": normal(3 * C, scale=0.1),
            p + "attn.c_proj.weight": normal(C, C),
            p + "attn.c_proj.bias": normal(C, scale=0.1),
            p + "ln_2.weight": 1 + normal(C, scale=0.1),
            p + "ln_2.bias": normal(C, scale=0.1),
            p + "mlp.c_fc.weight": normal(C, inner),
            p + "mlp.c_fc.bias": normal(inner, scale=0.1),
            p + "mlp.c_proj.weight": normal(inner, C),
            p + "mlp.c_proj.bias": normal(C, scale=0.1),
        }
    state |= {"ln_f.weight": 1 + normal(C, scale=0.1), "ln_f.bias": normal(C, scale=0.1)}
    return state


def make_checkpoint(
    dest: Path,
    *,
    layout: str = "h",
    n_layer: int = 2,
    n_head: int = 2,
    n_embd: int = 32,
    n_positions: int = 128,
    seed: int = 0,
    std: float = 0.2,
    mask_buffers: bool = False,
    config_extra: dict | None = None,
    weights: str = "safetensors",
    n_inner: int | None = None,
) -> Path:
    """Write a complete checkpoint directory (config, tokenizer files, weights) to ``dest``.

    ``layout`` is "h" or "transformer"; ``mask_buffers`` adds the stored ``attn.bias`` /
    ``attn.masked_bias`` buffers old checkpoints carry; ``weights`` is "safetensors" or "bin".
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    state = random_hub_state(
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        n_positions=n_positions,
        seed=seed,
        std=std,
        n_inner=n_inner,
    )
    if mask_buffers:
        mask = torch.tril(torch.ones(n_positions, n_positions, dtype=torch.uint8))
        for i in range(n_layer):
            state[f"h.{i}.attn.bias"] = mask.view(1, 1, n_positions, n_positions).clone()
            state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    if layout == "transformer":
        state = {f"transformer.{k}": v for k, v in state.items()}
    if weights == "safetensors":
        save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(state, dest / "pytorch_model.bin")
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": VOCAB_SIZE,
        "n_positions": n_positions,
        "n_ctx": n_positions,
        "n_embd": n_embd,
        "n_layer": n_layer,
        "n_head": n_head,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "tie_word_embeddings": True,
    }
    if n_inner is not None:
        config["n_inner"] = n_inner
    config |= config_extra or {}
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    copy_bpe_files(dest)
    return dest
