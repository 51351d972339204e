"""`gptoss-mlx serve`: the OpenAI-compatible server (chat completions, Responses API, models)."""

from __future__ import annotations

import socket
from typing import Any

import click

from gptoss_mlx.memory import max_context_option, parse_bytes

DEFAULT_MAX_CONCURRENT = 8
GRACEFUL_SHUTDOWN_SECONDS = 3


def _size(ctx: click.Context, param: click.Parameter, value: str) -> int:
    try:
        return parse_bytes(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, or one clear error (before the model loads)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise click.ClickException(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; is another server using "
            "it? (--port picks another)") from None
    return sock


def plan_concurrency(model_path: str, max_context: int | None, cache_slots: int,
                     max_concurrent: int | None) -> int:
    """`--max-concurrent`, or its default: as many generations as have room for their own KV
    cache at the context beside the weights (at most DEFAULT_MAX_CONCURRENT); one clear error
    when the caches asked for do not fit. Alive at once: max(cache_slots, max_concurrent)."""
    from gptoss_mlx.memory import gb, plan_memory, working_set_limit

    try:
        plan = plan_memory(model_path, max_context)
    except (OSError, ValueError, KeyError):
        return max_concurrent or DEFAULT_MAX_CONCURRENT  # load_model names the problem
    budget = working_set_limit()
    if budget is None or plan.kv_cache == 0:  # no limit applies (the CPU)
        return max_concurrent or DEFAULT_MAX_CONCURRENT
    fit = max(0, (budget - plan.total + plan.kv_cache) // plan.kv_cache)
    wanted = max(cache_slots, max_concurrent or 1)
    if wanted > fit:
        raise click.ClickException(
            f"{wanted} KV caches of {gb(plan.kv_cache)} at a {plan.max_context}-token context "
            f"(--max-concurrent, --cache-slots) do not fit beside the weights in the "
            f"{gb(budget)} working set; {fit} do: lower them or --max-context")
    return max_concurrent or max(cache_slots, min(DEFAULT_MAX_CONCURRENT, fit))


@click.command("serve")
@click.option("-m", "--model", "model_path", required=True, metavar="DIR|REPO",
              help="Converted MLX model folder, released checkpoint folder (root layout or "
                   "original/), or Hugging Face repo id (downloaded once).")
@click.option("--host", default="127.0.0.1",
              help="Address to bind; the default serves this machine only.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, help="TCP port.")
@click.option("--api-key", envvar="GPTOSS_MLX_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every path but /health, /docs and "
                   "/openapi.json included (or set GPTOSS_MLX_API_KEY).")
@click.option("--model-id", default=None,
              help="Model id to list and report [default: from the folder name or config, "
                   "e.g. gpt-oss-20b].")
@click.option("--cache-slots", type=click.IntRange(min=1), default=2,
              help="Prompt caches kept between requests (conversations served without "
                   "re-prefilling each other out).")
@click.option("--max-concurrent", type=click.IntRange(min=1), default=None,
              help="Generations running at once, taking turns token by token, each with its "
                   "own KV cache [default: as many caches as fit the memory plan, at most "
                   f"{DEFAULT_MAX_CONCURRENT}].")
@click.option("--max-queue", type=click.IntRange(min=0), default=16, show_default=True,
              help="Requests waiting for a generation slot; more get a 429 with Retry-After.")
@click.option("--queue-timeout", type=click.FloatRange(min=0, min_open=True), default=30.0,
              show_default=True, help="Seconds a request may wait for a slot before its 429.")
@click.option("--max-body-size", default="16MiB", show_default=True, callback=_size,
              help="Largest request body (e.g. 16MiB, 4MB); larger ones get a 413 unread.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              default="info", help="uvicorn's log level.")
@click.option("--no-strict-tools", is_flag=True,
              help="Constrain the arguments of only the tools marked strict: true to their "
                   "schemas [default: every tool's].")
@max_context_option
def serve_command(model_path: str, host: str, port: int, api_key: str | None,
                  model_id: str | None, cache_slots: int, max_concurrent: int | None,
                  max_queue: int, queue_timeout: float, max_body_size: int, log_level: str,
                  no_strict_tools: bool, max_context: int | None) -> None:
    """Serve a model over an OpenAI-compatible HTTP API for coding assistants.

    SIGTERM or Ctrl-C ends the running generations (each stream gets its last event) and exits
    within a few seconds.
    """
    import logging

    import uvicorn

    from gptoss_mlx.cli.generate import load_model
    from gptoss_mlx.server.app import create_app, default_model_id
    from gptoss_mlx.server.engine import Engine

    sock = bind(host, port)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        click.echo(f"warning: serving on {host} without --api-key; anyone who can reach this "
                   "address can use the model", err=True)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    server_log = logging.getLogger("gptoss_mlx.server")
    server_log.addHandler(handler)
    server_log.setLevel(log_level.upper())
    concurrent = plan_concurrency(model_path, max_context, cache_slots, max_concurrent)
    model, tokenizer = load_model(model_path, max_context)
    model_id = model_id or default_model_id(model_path, model.config.num_hidden_layers)
    engine = Engine(model, tokenizer, cache_slots=cache_slots, max_concurrent=concurrent,
                    max_queue=max_queue, queue_timeout=queue_timeout, max_context=max_context)
    app = create_app(engine, model_id, api_key, max_body_bytes=max_body_size,
                     strict_tools=not no_strict_tools)
    config = uvicorn.Config(app, log_level=log_level,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS)
    click.echo(f"serving {model_id} at http://{host}:{sock.getsockname()[1]}/v1", err=True)
    _server(config, engine).run(sockets=[sock])


def _server(config: Any, engine: Any) -> Any:
    """uvicorn's server whose exit signal (SIGTERM, Ctrl-C) first ends the generations, so
    streams close with their last event instead of holding the shutdown open."""
    import uvicorn

    server = uvicorn.Server(config)
    uvicorn_exit = server.handle_exit

    def handle_exit(sig: int, frame: Any) -> None:
        engine.shutdown()
        uvicorn_exit(sig, frame)

    server.handle_exit = handle_exit  # type: ignore[method-assign]
    return server
