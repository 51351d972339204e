"""`gptoss-mlx serve`: the OpenAI-compatible server (chat completions, Responses API, models)."""

from __future__ import annotations

import click

from gptoss_mlx.memory import max_context_option


@click.command("serve")
@click.option("-m", "--model", "model_path", required=True, metavar="DIR|REPO",
              help="Converted MLX model folder, released checkpoint folder (root layout or "
                   "original/), or Hugging Face repo id (downloaded once).")
@click.option("--host", default="127.0.0.1",
              help="Address to bind; the default serves this machine only.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, help="TCP port.")
@click.option("--api-key", envvar="GPTOSS_MLX_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1 (or set GPTOSS_MLX_API_KEY).")
@click.option("--model-id", default=None,
              help="Model id to list and report [default: from the folder name or config, "
                   "e.g. gpt-oss-20b].")
@click.option("--cache-slots", type=click.IntRange(min=1), default=2,
              help="Prompt caches kept between requests (conversations served without "
                   "re-prefilling each other out).")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              default="info", help="uvicorn's log level.")
@max_context_option
def serve_command(model_path: str, host: str, port: int, api_key: str | None,
                  model_id: str | None, cache_slots: int, log_level: str,
                  max_context: int | None) -> None:
    """Serve a model over an OpenAI-compatible HTTP API for coding assistants."""
    import logging

    import uvicorn

    from gptoss_mlx.cli.generate import load_model
    from gptoss_mlx.server.app import create_app, default_model_id
    from gptoss_mlx.server.engine import Engine

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        click.echo(f"warning: serving on {host} without --api-key; anyone who can reach this "
                   "address can use the model", err=True)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    server_log = logging.getLogger("gptoss_mlx.server")
    server_log.addHandler(handler)
    server_log.setLevel(log_level.upper())
    model, tokenizer = load_model(model_path, max_context)
    model_id = model_id or default_model_id(model_path, model.config.num_hidden_layers)
    engine = Engine(model, tokenizer, cache_slots=cache_slots, max_context=max_context)
    app = create_app(engine, model_id, api_key)
    click.echo(f"serving {model_id} at http://{host}:{port}/v1", err=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
