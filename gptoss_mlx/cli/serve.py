"""`gptoss-mlx serve`: the OpenAI-compatible server (chat completions, Responses API, models)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from gptoss_mlx.cli.options import (
    check_model,
    dtype_option,
    join_ranks,
    load_checked_model,
    max_context_option,
    model_option,
)
from gptoss_mlx.cli.prompt_cache import open_prompt_store, prompt_cache_options, size_value
from gptoss_mlx.generate import DEFAULT_PREFILL_CHUNK
from gptoss_mlx.memory import MAX_BATCH

if TYPE_CHECKING:
    from gptoss_mlx.memory import BatchPlan

GRACEFUL_SHUTDOWN_SECONDS = 3


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


def plan_serving_batch(model_dir: str | Path, max_context: int | None, cache_slots: int,
                       max_batch: int | None, dtype: str = "bfloat16",
                       prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> BatchPlan:
    """`--max-batch`, or its default from the memory plan (`gptoss_mlx.memory.plan_batch`:
    one KV cache per sequence at the context, beside the weights and the buffers of a
    `prefill_chunk`-token prefill, in `dtype`, this rank's share under `mlx.launch`, where the
    other ranks mirror the batch); one clear error when the caches asked for do not fit."""
    from gptoss_mlx import distributed
    from gptoss_mlx.memory import MemoryPlanError, plan_batch, plan_memory, working_set_limit

    try:
        plan = plan_memory(model_dir, max_context, dtype=dtype, shard=distributed.shard(),
                           prefill_chunk=prefill_chunk)
        return plan_batch(plan, working_set_limit(), max_batch, kept=cache_slots)
    except MemoryPlanError as exc:
        raise click.ClickException(str(exc)) from None


@click.command("serve")
@model_option
@dtype_option
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
@click.option("--max-batch", "--max-concurrent", "max_batch", type=click.IntRange(min=1),
              default=None,
              help="Sequences generating at once, each with its own KV cache at --max-context "
                   "(--max-concurrent is its former name) [default: as many KV caches as fit "
                   f"the memory plan beside the weights, at most {MAX_BATCH}].")
@click.option("--prefill-chunk", type=click.IntRange(min=1), default=DEFAULT_PREFILL_CHUNK,
              show_default=True,
              help="Prompt tokens prefilled per step between decode steps: larger prefills long "
                   "prompts faster, smaller delays the running streams less (each step waits "
                   "for at most one chunk); the memory plan counts its activations.")
@click.option("--max-queue", type=click.IntRange(min=0), default=16, show_default=True,
              help="Requests waiting for a generation slot; more get a 429 with Retry-After.")
@click.option("--queue-timeout", type=click.FloatRange(min=0, min_open=True), default=30.0,
              show_default=True, help="Seconds a request may wait for a slot before its 429.")
@click.option("--max-body-size", default="16MiB", show_default=True, callback=size_value,
              help="Largest request body (e.g. 16MiB, 4MB); larger ones get a 413 unread.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              default="info", help="uvicorn's log level.")
@click.option("--no-strict-tools", is_flag=True,
              help="Constrain the arguments of only the tools marked strict: true to their "
                   "schemas [default: every tool's].")
@max_context_option
@prompt_cache_options
def serve_command(model_path: str, dtype: str, host: str, port: int, api_key: str | None,
                  model_id: str | None, cache_slots: int, max_batch: int | None,
                  prefill_chunk: int, max_queue: int, queue_timeout: float,
                  max_body_size: int, log_level: str, no_strict_tools: bool,
                  max_context: int | None,
                  prompt_cache_dir: Path | None, prompt_cache_bytes: int) -> None:
    """Serve a model over an OpenAI-compatible HTTP API for coding assistants.

    SIGTERM or Ctrl-C ends the running generations (each stream gets its last event) and exits
    within a few seconds.
    """
    import logging

    import uvicorn

    from gptoss_mlx import distributed
    from gptoss_mlx.server.app import create_app, default_model_id
    from gptoss_mlx.server.engine import Engine

    join_ranks()
    sock = None if distributed.is_follower() else bind(host, port)  # followers: no port
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        click.echo(f"warning: serving on {host} without --api-key; anyone who can reach this "
                   "address can use the model", err=True)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    for name in ("gptoss_mlx.server", "gptoss_mlx.prompt_store"):
        server_log = logging.getLogger(name)
        server_log.addHandler(handler)
        server_log.setLevel(log_level.upper())
    model_dir = check_model(model_path, max_context, dtype, prefill_chunk)
    batch = plan_serving_batch(model_dir, max_context, cache_slots, max_batch, dtype,
                               prefill_chunk)
    if not distributed.is_follower():
        click.echo(batch.summary(), err=True)
    model, tokenizer = load_checked_model(model_dir, dtype)
    assert sock is not None  # only rank 0 gets here
    model_id = model_id or default_model_id(model_path, model.config.num_hidden_layers)
    store = open_prompt_store(prompt_cache_dir, prompt_cache_bytes, model, tokenizer)
    engine = Engine(model, tokenizer, cache_slots=cache_slots, max_batch=batch.batch,
                    max_queue=max_queue, queue_timeout=queue_timeout, max_context=max_context,
                    prefill_chunk=prefill_chunk, prompt_store=store)
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
    uvicorn_shutdown = server.shutdown

    async def shutdown(sockets: Any = None) -> None:
        await uvicorn_shutdown(sockets)  # the lifespan stops the engine: no model call after
        from gptoss_mlx.distributed import finish

        finish()  # other ranks exit before uvicorn re-raises the signal that ended it

    server.shutdown = shutdown  # type: ignore[method-assign]
    return server
