"""Option types shared by the commands, defined once as ``Annotated`` aliases."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

MODEL_HELP = (
    "Model: alias (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2), org/name[@revision], or a directory."
)

Model = Annotated[str, typer.Option("--model", "-m", envvar="GPT2_MODEL", help=MODEL_HELP)]
Device = Annotated[
    str,
    typer.Option(
        envvar="GPT2_DEVICE", help="auto, cpu, cuda, cuda:N or mps (auto: CUDA, then MPS, then CPU)."
    ),
]
Dtype = Annotated[
    str, typer.Option(help="auto, float32, float16 or bfloat16 (auto: float32 on CPU, bf16/fp16 on GPU).")
]
Offline = Annotated[
    bool,
    typer.Option(
        "--offline", help="Never touch the network; use the local cache only (or HF_HUB_OFFLINE=1)."
    ),
]
AllowPickle = Annotated[
    bool,
    typer.Option(
        "--allow-pickle",
        help="Allow pytorch_model.bin when a repo has no safetensors (loaded with weights_only=True).",
    ),
]
Quantize = Annotated[
    str | None, typer.Option("--quantize", help="Weight quantization: int8 (per-row scales) or none.")
]

MaxNewTokens = Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate.")]
Temperature = Annotated[float, typer.Option("--temperature", "-t", help="Sampling temperature; 0 is greedy.")]
TopK = Annotated[int, typer.Option("--top-k", help="Sample from the k most likely tokens (0 disables).")]
TopP = Annotated[float, typer.Option("--top-p", help="Nucleus sampling threshold in (0, 1]; 1 disables.")]
MinP = Annotated[
    float, typer.Option("--min-p", help="Drop tokens below min-p x the top probability (0 disables).")
]
RepetitionPenalty = Annotated[
    float,
    typer.Option("--repetition-penalty", help="Penalise repeated tokens (1.0 = none), as in transformers."),
]
Seed = Annotated[int | None, typer.Option("--seed", help="Random seed: the same seed gives the same text.")]

Compile = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="Decode through a torch.compile'd step (CUDA graphs on CUDA); see docs/performance.md.",
    ),
]


class TextFormat(str, Enum):
    text = "text"
    json = "json"
    jsonl = "jsonl"


PrependBos = Annotated[
    bool,
    typer.Option(
        "--bos/--no-bos",
        help="Start the text with <|endoftext|> (as TransformerLens' prepend_bos), "
        "so that its first token is predicted too.",
    ),
]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace the output file if it exists.")]
