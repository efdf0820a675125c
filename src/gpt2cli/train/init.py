"""Trainable models: a new GPT-2 of a named size with GPT-2's initialisation, or a loaded
checkpoint made trainable (``loader.build_model`` builds both).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from gpt2cli.config import GPT2Config
from gpt2cli.loader import build_model
from gpt2cli.model import GPT2
from gpt2cli.train.settings import SIZES
from gpt2cli.weights import read_state_dict, weight_files


def scratch_config(size: str, vocab_size: int = 50257) -> GPT2Config:
    """The architecture of ``--size`` (see ``settings.SIZES``) with GPT-2's vocabulary."""
    n_layer, n_head, n_embd, n_positions = SIZES[size]
    return GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head
    )


def new_model(config: GPT2Config, seed: int) -> GPT2:
    """A freshly initialised GPT-2, as in the GPT-2 paper and nanoGPT.

    Weights ~ N(0, 0.02), biases 0, LayerNorms 1/0; the two residual projections of each block
    (``attn.c_proj``, ``mlp.c_proj``) get std 0.02 / sqrt(2 * n_layer) so the residual stream's
    variance does not grow with depth.
    """
    torch.manual_seed(seed)
    model = GPT2(config)
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            std = residual_std if name.endswith("c_proj") else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model.train()


def load_trainable(path: Path, config: GPT2Config, allow_pickle: bool = False) -> GPT2:
    """The checkpoint at ``path`` as a trainable float32 model on the CPU.

    Raises:
        Gpt2Error: unsafe, missing or corrupt weights.
    """
    return build_model(config, read_state_dict(weight_files(path, allow_pickle)), trainable=True)
