"""`gptoss-mlx generate --prompts FILE.jsonl`: an offline batch of chat-completions requests; one
JSON result per line, in input order, on stdout or written atomically to `--output`; per-request
stats and a total on stderr."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import click

from gptoss_mlx.cli.options import load_model

if TYPE_CHECKING:
    from gptoss_mlx.batch import LineRequest


def read_lines(path: Path) -> list[str]:
    """The file's lines; one clear error naming the line that is not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise click.ClickException(f"cannot read {path}: {e.strerror or e}") from None
    lines = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise click.ClickException(
                f"{path}: line {number} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte "
                f"{e.start + 1}); expected UTF-8 JSON") from None
    return lines


@contextlib.contextmanager
def atomic_output(path: Path | None) -> Iterator[TextIO]:
    """stdout, or a temporary sibling of `path` renamed to it once the block succeeds (removed
    if it fails or is interrupted), so `path` never holds half the results."""
    if path is None:
        yield sys.stdout
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        stream = open(tmp, "x", encoding="utf-8")  # renamed or removed below
    except OSError as e:
        raise click.ClickException(f"cannot write --output {path}: {e.strerror or e}") from None
    try:
        with stream:
            yield stream
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def run_batch(model_path: str, prompts: Path, output: Path | None, opts: dict[str, Any]) -> None:
    """Validate every line, load the model, render every request, then generate them all."""
    from gptoss_mlx.batch import BatchContext, BatchInputError, parse_requests, prepare_requests
    from gptoss_mlx.generate import NonFiniteLogitsError

    source = str(prompts)
    defaults = {"temperature": opts["temperature"], "top_p": opts["top_p"],
                "top_k": opts["top_k"] or None, "min_p": opts["min_p"] or None,
                "seed": opts["seed"], "max_tokens": opts["max_tokens"],
                "reasoning_effort": opts["reasoning_effort"]}
    try:
        bodies = parse_requests(read_lines(prompts), source=source, defaults=defaults)
        with atomic_output(output) as out:
            model, tokenizer = load_model(model_path, opts["max_context"], opts["dtype"])
            context = BatchContext.of(model, tokenizer, opts["max_context"])
            requests = prepare_requests(bodies, context, source=source)
            _generate(model, tokenizer, requests, out, opts["max_context"])
    except BatchInputError as e:
        raise click.ClickException(str(e)) from None
    except NonFiniteLogitsError as e:
        raise click.ClickException(f"{model_path}: {e}") from None


def _generate(model: Any, tokenizer: Any, requests: list[LineRequest], out: TextIO,
              max_context: int | None) -> None:
    """Write the results in input order as they come; stats to stderr."""
    from gptoss_mlx.batch import result, run_requests

    start = time.perf_counter()
    pending: dict[int, dict[str, Any]] = {}
    written = prompt_tokens = completion_tokens = 0
    generations = [r.generation for r in requests]
    for index, feed in run_requests(model, tokenizer, generations, max_context=max_context):
        line = requests[index].line
        stats = feed.done.stats.summary() if feed.done else (
            f"{feed.completion_tokens} tokens, ended by a stop string")
        click.echo(f"line {line}: {stats}", err=True)
        pending[index] = result(requests[index], feed)
        prompt_tokens += len(generations[index].prompt)
        completion_tokens += feed.completion_tokens
        while written in pending:
            out.write(json.dumps(pending.pop(written), ensure_ascii=False) + "\n")
            out.flush()
            written += 1
    seconds = time.perf_counter() - start
    click.echo(f"{len(requests)} requests: {prompt_tokens} prompt tokens, {completion_tokens} "
               f"generated tokens in {seconds:.1f} s "
               f"({completion_tokens / max(seconds, 1e-9):.1f} tok/s)", err=True)
