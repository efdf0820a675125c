"""The one table of user-facing errors: each kind carries its message, a hint and an exit code.

Stdlib only, so the CLI can import it before any heavy dependency.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class Gpt2Error(Exception):
    """Base of every error we render as one line: ``gpt2: error: <message>`` plus a hint."""

    exit_code: int = EXIT_RUNTIME
    default_hint: str | None = None

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint


class BadInputError(Gpt2Error):
    """The user asked for something invalid (an option value, an empty prompt)."""

    exit_code = EXIT_USAGE


class ModelNotFoundError(Gpt2Error):
    """No model by that name exists locally or on the Hub."""

    default_hint = "check the name on huggingface.co, or pass a local directory with config.json"


class OfflineMissError(Gpt2Error):
    """Offline mode was requested but the model is not in the cache."""

    default_hint = "run once with network access, or unset HF_HUB_OFFLINE / drop --offline"


class NotGPT2Error(Gpt2Error):
    """The checkpoint is not a GPT-2 architecture model."""

    default_hint = "gpt2cli runs GPT-2-architecture models (model_type 'gpt2') only"


class MissingTokenizerError(Gpt2Error):
    """A model directory lacks vocab.json or merges.txt (the weights may be fine)."""

    default_hint = "copy vocab.json and merges.txt from the model it came from"


class UnsafeWeightsError(Gpt2Error):
    """Only pickle weights are available and the user did not opt in."""

    default_hint = "pass --allow-pickle to load pytorch_model.bin through torch.load(weights_only=True)"


class CorruptWeightsError(Gpt2Error):
    """A weight file is truncated, corrupt, or has the wrong keys or shapes."""

    default_hint = "a cached model: `gpt2 models verify MODEL --repair`; a model directory: write it again"


class DeviceUnavailableError(Gpt2Error):
    """The requested device (or dtype on it) is not available on this machine."""

    exit_code = EXIT_USAGE
    default_hint = "use --device auto, or check `python -c 'import torch; print(torch.cuda.is_available())'`"


class NetworkError(Gpt2Error):
    """The Hub could not be reached."""

    default_hint = "check your connection, or use --offline with a cached model"


class CacheWriteError(Gpt2Error):
    """The model cache cannot be written: read-only, no permission, or the disk is full."""

    default_hint = "point HF_HOME (or HF_HUB_CACHE) at a writable directory with free space"


class OutOfMemoryError(Gpt2Error):
    """An allocation failed: the request needs more memory than the machine has."""

    default_hint = "ask for less: fewer --num-samples, fewer --max-new-tokens, or a smaller model"


class MissingExtraError(Gpt2Error):
    """An optional dependency is not installed."""
