"""`gpt2 serve`: an OpenAI-compatible local server (completions, chat, models, tokenize, metrics)."""

from __future__ import annotations

import importlib.util
import socket
import sys
from typing import Annotated

import typer

from gpt2cli.cli import options as opt
from gpt2cli.errors import BadInputError, Gpt2Error, MissingExtraError

SERVE_EXTRA_HINT = "install the server's dependencies: pip install 'gpt2cli[serve]'"


def serve(
    model: opt.Model = "gpt2",
    host: Annotated[
        str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="GPT2_API_KEY", help="Require 'Authorization: Bearer KEY' on every request but /health."
        ),
    ] = None,
    max_queue: Annotated[
        int, typer.Option(min=1, help="Prompts that may wait for a place; more get 503 with Retry-After.")
    ] = 64,
    max_batch: Annotated[
        int,
        typer.Option(min=1, help="Most sequences decoding at once (requests join and leave between steps)."),
    ] = 8,
    served_model_name: Annotated[
        list[str] | None,
        typer.Option(
            "--served-model-name",
            metavar="NAME",
            help="Name the model is served under (repeatable; the first is listed first).",
        ),
    ] = None,
    cache_tokens: Annotated[
        int,
        typer.Option(min=0, help="Tokens of recent sequences kept to reuse their prompts (0: off)."),
    ] = 4096,
    default_max_tokens: Annotated[
        int, typer.Option(min=1, help="Tokens a chat request without max_tokens may generate.")
    ] = 256,
    timeout_keep_alive: Annotated[
        float, typer.Option(min=0.1, help="Seconds an idle keep-alive connection stays open.")
    ] = 5.0,
    timeout_header: Annotated[
        float, typer.Option(min=0.1, help="Seconds a request's headers may take to arrive (then 408).")
    ] = 10.0,
    timeout_body: Annotated[
        float, typer.Option(min=0.1, help="Seconds a request body may pause between reads (then 408).")
    ] = 30.0,
    timeout_write: Annotated[
        float,
        typer.Option(min=0.1, help="Seconds a client may read nothing of a waiting response (then dropped)."),
    ] = 60.0,
    device: opt.Device = "auto",
    dtype: opt.Dtype = "auto",
    quantize: opt.Quantize = None,
    offline: opt.Offline = False,
    allow_pickle: opt.AllowPickle = False,
) -> None:
    """Serve a model over OpenAI's HTTP API (/v1/completions, /v1/chat/completions, /v1/models).

    Also /tokenize, /detokenize, /metrics (Prometheus) and /health. Requests batch
    continuously and reuse cached prompt prefixes. Stop it with Ctrl-C or SIGTERM: running
    streams end with a shutting_down error event and the exit status is 0.
    """
    _require_extra()
    if api_key is not None and not api_key.strip():
        raise BadInputError("the API key cannot be empty", hint="pass --api-key KEY or unset GPT2_API_KEY")
    _check_port(host, port)

    names = [n.strip() for n in served_model_name or []]
    if any(not n for n in names):
        raise BadInputError("a served model name cannot be empty", hint="pass --served-model-name NAME")

    from gpt2cli.cli.loading import load_model
    from gpt2cli.server.http import Timeouts
    from gpt2cli.server.run import serve as run_server

    lm = load_model(
        model, device=device, dtype=dtype, offline=offline, allow_pickle=allow_pickle, quantize=quantize
    )
    _log(f"serving {lm.name} on http://{_url_host(host)}:{port}/v1 (Ctrl-C to stop)")
    run_server(
        lm,
        host=host,
        port=port,
        api_key=api_key,
        max_queue=max_queue,
        max_batch=max_batch,
        served_model_names=names,
        cache_tokens=cache_tokens,
        default_max_tokens=default_max_tokens,
        timeouts=Timeouts(timeout_keep_alive, timeout_header, timeout_body, timeout_write),
        log=_log,
    )
    _log("stopped")


def _require_extra() -> None:
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(
            f"gpt2 serve needs {' and '.join(missing)}, which is not installed", SERVE_EXTRA_HINT
        )


def _check_port(host: str, port: int) -> None:
    """Fail early, as one line, if the address cannot be listened on."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise BadInputError(f"cannot resolve host {host!r}: {exc}") from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise Gpt2Error(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}", hint="pick another --port"
            ) from exc


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _log(line: str) -> None:
    sys.stderr.write(f"gpt2 serve: {line}\n")
    sys.stderr.flush()
