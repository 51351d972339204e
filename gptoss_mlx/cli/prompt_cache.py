"""`--prompt-cache-dir` and `--prompt-cache-bytes`, shared by `serve` and `chat`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from gptoss_mlx.cli.options import size_value

DEFAULT_BUDGET = "4GiB"


def prompt_cache_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add `prompt_cache_dir` and `prompt_cache_bytes` to a command."""
    f = click.option("--prompt-cache-bytes", default=DEFAULT_BUDGET, show_default=True,
                     callback=size_value, metavar="SIZE",
                     help="Most bytes --prompt-cache-dir may hold; the least recently used "
                          "prefixes are removed first.")(f)
    return click.option("--prompt-cache-dir", type=click.Path(file_okay=False, path_type=Path),
                        default=None, metavar="DIR",
                        help="Keep the KV caches of long system/developer prefixes (1024 tokens "
                             "or more) in DIR, e.g. ~/.cache/gptoss-mlx/prompts, so that after "
                             "a restart they are read back instead of prefilled.")(f)


def open_prompt_store(folder: Path | None, max_bytes: int, model: Any, tokenizer: Any) -> Any:
    """The PromptStore in `folder` for `model` (None without a folder); one clear error when
    the folder cannot be created."""
    if folder is None:
        return None
    from gptoss_mlx.prompt_store import PromptStore, model_identity

    try:
        return PromptStore(folder.expanduser(), model_identity(model), tokenizer,
                           max_bytes=max_bytes)
    except OSError as exc:
        raise click.ClickException(f"--prompt-cache-dir {folder}: cannot use it: "
                                   f"{exc.strerror or exc}") from None
