"""gpt2cli: run OpenAI's GPT-2 family locally.

Importing this package is cheap: torch and friends load only when ``load`` is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from gpt2cli.api import LM, load
    from gpt2cli.kvcache import PromptCache

__all__ = ["LM", "GenerationConfig", "PromptCache", "__version__", "load"]


def __getattr__(name: str) -> Any:
    # Lazy re-exports keep `gpt2 --help` free of torch.
    if name in ("load", "LM"):
        from gpt2cli import api

        return getattr(api, name)
    if name == "GenerationConfig":
        from gpt2cli.config import GenerationConfig

        return GenerationConfig
    if name == "PromptCache":
        from gpt2cli.kvcache import PromptCache

        return PromptCache
    raise AttributeError(name)
