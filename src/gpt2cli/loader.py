"""Building models and tokenizers from a checkpoint directory: the one place both inference
(``api.load``) and fine-tuning (``train``) get them from.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gpt2cli.config import GPT2Config
from gpt2cli.errors import CorruptWeightsError
from gpt2cli.model import GPT2
from gpt2cli.tokenizer import Tokenizer
from gpt2cli.weights import normalize_state_dict


def build_model(config: GPT2Config, raw_state: dict[str, torch.Tensor], *, trainable: bool = False) -> GPT2:
    """A GPT2 built on the meta device and given ``raw_state``'s tensors (no second copy).

    ``raw_state`` is emptied. Inference models are frozen in eval mode; ``trainable`` ones are
    float32 in train mode with gradients on.
    """
    state = normalize_state_dict(raw_state, config, contiguous=False)
    raw_state.clear()
    for name in list(state):  # one Conv1D transpose at a time: its original is freed right after
        state[name] = state[name].contiguous()
        if trainable:
            state[name] = state[name].float()
    with torch.device("meta"):
        model = GPT2(config)
    model.requires_grad_(False)  # weights read as int8 cannot be parameters that require grad
    model.load_state_dict(state, strict=True, assign=True)
    if trainable:
        return model.train().requires_grad_(True)
    return model.eval().requires_grad_(False)


def load_tokenizer(path: Path, config: GPT2Config | None = None) -> Tokenizer:
    """GPT-2's tokenizer from the checkpoint's ``vocab.json`` and ``merges.txt``.

    Raises:
        MissingTokenizerError: the tokenizer files are missing (the message names them).
        CorruptWeightsError: the tokenizer has more tokens than ``config``'s vocabulary.
    """
    tokenizer = Tokenizer.from_dir(path)
    if config is not None and tokenizer.n_vocab > config.vocab_size:
        raise CorruptWeightsError(
            f"the tokenizer has {tokenizer.n_vocab} tokens but the model only {config.vocab_size}"
        )
    return tokenizer
