"""The settings of one training run, validated before torch is imported (stdlib only)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gpt2cli.config import check_seed
from gpt2cli.errors import BadInputError

DATA_FORMATS = ("auto", "text", "jsonl")  # auto: by suffix; text: any file is one document

# Architectures for --from-scratch: (n_layer, n_head, n_embd, n_positions).
SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (2, 2, 32, 128),
    "mini": (4, 4, 256, 512),
    "small": (6, 6, 384, 1024),
    "gpt2": (12, 12, 768, 1024),
}


@dataclass
class FinetuneSettings:
    """Everything a training run needs; ``None`` means "chosen from the mode" (see ``resolved``)."""

    data: list[Path]
    output: Path
    model: str = "gpt2"
    data_format: str = "auto"  # auto (by suffix), text (any file is a document), jsonl
    block_size: int | None = None
    val_fraction: float = 0.05
    epochs: int | None = None
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int | None = None
    save_every: int | None = None
    lora: int | None = None
    lora_alpha: float | None = None
    from_scratch: bool = False
    size: str = "tiny"
    gradient_checkpointing: bool = False
    resume: bool = False
    overwrite: bool = False
    device: str = "auto"
    offline: bool = False
    allow_pickle: bool = False

    def validate(self) -> FinetuneSettings:
        """Check every value; returns self.

        Raises:
            BadInputError: a value is out of range or options conflict (exit code 2).
        """
        if not self.data:
            raise BadInputError("no training data given", hint="pass one or more .txt, .md or .jsonl files")
        if self.data_format not in DATA_FORMATS:
            raise BadInputError(
                f"unknown data format {self.data_format!r}", hint=f"use one of {', '.join(DATA_FORMATS)}"
            )
        if self.lora is not None and self.from_scratch:
            raise BadInputError(
                "--lora cannot be combined with --from-scratch",
                hint="LoRA adapts an existing model; train from scratch without --lora",
            )
        if self.size not in SIZES:
            raise BadInputError(f"unknown size {self.size!r}", hint=f"use one of {', '.join(SIZES)}")
        if self.resume and self.overwrite:
            raise BadInputError("--resume and --overwrite contradict each other")
        _positive("batch-size", self.batch_size)
        _positive("grad-accum", self.grad_accum)
        for name in ("block_size", "epochs", "max_steps", "eval_every", "save_every", "lora"):
            value = getattr(self, name)
            if value is not None:
                _positive(name.replace("_", "-"), value)
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise BadInputError(f"warmup-steps must be >= 0, got {self.warmup_steps}")
        if not (math.isfinite(self.val_fraction) and 0 < self.val_fraction < 1):
            raise BadInputError(f"val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise BadInputError(f"lr must be a positive number, got {self.lr}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise BadInputError(f"grad-clip must be >= 0 (0 disables), got {self.grad_clip}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise BadInputError(f"weight-decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise BadInputError(f"min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.lora_alpha is not None and not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise BadInputError(
                f"lora-alpha must be a positive number, got {self.lora_alpha}",
                hint="the update is scaled by alpha / rank; the default is 2 x rank",
            )
        if self.lora_alpha is not None and self.lora is None:
            raise BadInputError("--lora-alpha needs --lora RANK", hint="pass --lora 8, say")
        check_seed(self.seed, "seed", allow_random=False)  # the run is replayed from it: no -1
        return self

    @property
    def mode(self) -> str:
        """``scratch``, ``lora`` or ``full``."""
        if self.from_scratch:
            return "scratch"
        return "lora" if self.lora is not None else "full"

    @property
    def learning_rate(self) -> float:
        """--lr, or a default that suits the mode (new weights learn fast, adapters in between)."""
        if self.lr is not None:
            return self.lr
        return {"scratch": 1e-3, "lora": 3e-4, "full": 5e-5}[self.mode]

    @property
    def alpha(self) -> float:
        """LoRA's scale numerator; the update is scaled by alpha / rank (default alpha = 2 x rank)."""
        if self.lora_alpha is not None:
            return self.lora_alpha
        return 2.0 * (self.lora or 0)

    def describe(self) -> dict[str, Any]:
        """The settings as plain JSON-able values (for the README and the resume check)."""
        out = asdict(self)
        out["data"] = [str(p) for p in self.data]
        out["output"] = str(self.output)
        out["lr"] = self.learning_rate
        return out


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise BadInputError(f"{name} must be at least 1, got {value}")
