"""Option types shared by the commands, defined once as ``Annotated`` aliases; the help
panels they are listed under; the backslash escapes of ``--stop``; the environment checks."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from enum import Enum
from typing import Annotated, Any

import typer
from typer._click.core import ParameterSource

from gpt2cli.errors import BadInputError
from gpt2cli.switches import (
    GEMM_CHOICES,
    GEMM_ENV,
    GEMV_CHOICES,
    GEMV_ENV,
    INT8_GEMM_CHOICES,
    INT8_GEMM_ENV,
    KERNEL_CHOICES,
    KERNELS_ENV,
    THREADS_ENV,
)

# Help headings (cli/help.py lists each option under its panel)
MODEL_PANEL = "Model"
SAMPLING_PANEL = "Sampling"
OUTPUT_PANEL = "Output"
PERFORMANCE_PANEL = "Performance"

MODEL_HELP = (
    "Model: alias (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2), org/name[@revision], or a directory."
)

DEVICE_ENV = "GPT2_DEVICE"
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _check_device(ctx: typer.Context, param: Any, value: str) -> str:
    """Refuse a device name that cannot be one, saying where it came from (option or env)."""
    from_env = ctx.get_parameter_source(param.name) is ParameterSource.ENVIRONMENT
    if from_env:
        ENV_VALUES[DEVICE_ENV] = value
    if value is not None and not _DEVICE.match(value.strip().lower()):
        where = f"{DEVICE_ENV}={value!r} in the environment" if from_env else f"--device {value!r}"
        raise BadInputError(
            f"unknown device in {where}",
            hint="use auto, cpu, cuda, cuda:N or mps" + (f", or unset {DEVICE_ENV}" if from_env else ""),
        )
    return value


# Values that came from the environment rather than the command line (for error messages).
ENV_VALUES: dict[str, str] = {}

Model = Annotated[
    str, typer.Option("--model", "-m", envvar="GPT2_MODEL", help=MODEL_HELP, rich_help_panel=MODEL_PANEL)
]
Device = Annotated[
    str,
    typer.Option(
        envvar=DEVICE_ENV,
        callback=_check_device,
        help="auto, cpu, cuda, cuda:N or mps (auto: CUDA, then MPS, then CPU).",
        rich_help_panel=MODEL_PANEL,
    ),
]
Dtype = Annotated[
    str,
    typer.Option(
        help="auto, float32, float16 or bfloat16 (auto: float32 on CPU, bf16/fp16 on GPU).",
        rich_help_panel=MODEL_PANEL,
    ),
]
Offline = Annotated[
    bool,
    typer.Option(
        "--offline",
        help="Never touch the network; use the local cache only (or HF_HUB_OFFLINE=1).",
        rich_help_panel=MODEL_PANEL,
    ),
]
AllowPickle = Annotated[
    bool,
    typer.Option(
        "--allow-pickle",
        help="Allow pytorch_model.bin when a repo has no safetensors (loaded with weights_only=True).",
        rich_help_panel=MODEL_PANEL,
    ),
]
Quantize = Annotated[
    str | None,
    typer.Option(
        "--quantize",
        help="Weight quantization: int8 (per-row scales) or none.",
        rich_help_panel=PERFORMANCE_PANEL,
    ),
]

MaxNewTokens = Annotated[
    int,
    typer.Option(
        "--max-new-tokens", "-n", help="Tokens to generate (at least 1).", rich_help_panel=SAMPLING_PANEL
    ),
]
Temperature = Annotated[
    float,
    typer.Option(
        "--temperature",
        "-t",
        help="Sampling temperature: 0 is greedy, else at least 0.001.",
        rich_help_panel=SAMPLING_PANEL,
    ),
]
TopK = Annotated[
    int,
    typer.Option(
        "--top-k", help="Sample from the k most likely tokens (0 disables).", rich_help_panel=SAMPLING_PANEL
    ),
]
TopP = Annotated[
    float,
    typer.Option(
        "--top-p", help="Nucleus sampling threshold in (0, 1]; 1 disables.", rich_help_panel=SAMPLING_PANEL
    ),
]
MinP = Annotated[
    float,
    typer.Option(
        "--min-p",
        help="Drop tokens below min-p x the top probability, in [0, 1] (0 disables).",
        rich_help_panel=SAMPLING_PANEL,
    ),
]
RepetitionPenalty = Annotated[
    float,
    typer.Option(
        "--repetition-penalty",
        help="Penalise repeated tokens, 0.01 to 100 (1.0 = none), as in transformers.",
        rich_help_panel=SAMPLING_PANEL,
    ),
]
Seed = Annotated[
    int | None,
    typer.Option(
        "--seed",
        help="Random seed, 0 to 2^64-1: the same seed gives the same text; -1 or none draws one "
        "(shown by --stats and in --format json).",
        rich_help_panel=SAMPLING_PANEL,
    ),
]

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", "'": "'", '"': '"', "a": "\a"}
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|.)", re.DOTALL)


def unescape(text: str) -> str:
    """Backslash escapes as llama.cpp reads them: ``\\n \\t \\r \\0 \\\\ \\' \\" \\xHH \\uHHHH``.

    An unknown escape (``\\q``) is kept as written.
    """

    def one(match: re.Match[str]) -> str:
        code = match.group(1)
        if len(code) > 1:
            return chr(int(code[1:], 16))
        return _ESCAPES.get(code, match.group(0))

    return _ESCAPE.sub(one, text)


def check_environment(environ: dict[str, str] | None = None) -> None:
    """Refuse GPT2_* variables with values we would otherwise have to ignore.

    Raises:
        BadInputError: GPT2_THREADS is not a positive integer, GPT2_KERNELS, GPT2_GEMM,
            GPT2_INT8_GEMM or GPT2_GEMV not a known path.
    """
    env = os.environ if environ is None else environ
    threads = env.get(THREADS_ENV, "").strip()
    if threads and not (threads.isdigit() and int(threads) >= 1):
        raise BadInputError(
            f"{THREADS_ENV}={env[THREADS_ENV]!r} in the environment is not a positive integer",
            hint=f"set it to a thread count such as {THREADS_ENV}=2, or unset it",
        )
    _check_choice(
        env,
        KERNELS_ENV,
        KERNEL_CHOICES,
        f"{KERNELS_ENV}=torch uses PyTorch's matmuls only, unfused the numba matmuls without "
        "the fused decode step; unset it for the default",
    )
    _check_choice(
        env,
        GEMM_ENV,
        GEMM_CHOICES,
        f"{GEMM_ENV}=onednn or blas picks the float32 GEMM of prefill and scoring; unset it "
        "for the default (oneDNN on AMD CPUs, BLAS elsewhere)",
    )
    _check_choice(
        env,
        INT8_GEMM_ENV,
        INT8_GEMM_CHOICES,
        f"{INT8_GEMM_ENV}=int-mm or numba picks the int8 GEMM of prefill and scoring; unset it "
        "for the default (torch's _int_mm where the CPU has VNNI or AMX, numba elsewhere)",
    )
    _check_choice(
        env,
        GEMV_ENV,
        GEMV_CHOICES,
        f"{GEMV_ENV}=rows, prefetched-rows or blocks picks how batch-1 decode reads the weights; "
        "unset it for the default (chosen by weight type and CPU)",
    )


def _check_choice(env: Mapping[str, str], name: str, choices: tuple[str, ...], hint: str) -> None:
    """Refuse ``name`` in ``env`` unless unset or one of ``choices`` (any case, spaces around)."""
    value = env.get(name, "").strip().lower()
    if value and value not in choices:
        raise BadInputError(
            f"{name}={env[name]!r} in the environment is not one of " + ", ".join(choices), hint=hint
        )


Compile = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="Decode through a torch.compile'd step: pays on CUDA (CUDA graphs); on CPU slower than "
        "the default fused step, after a slow first step that compiles (docs/performance.md).",
        rich_help_panel=PERFORMANCE_PANEL,
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
