"""Command-line options shared by `generate`, `chat`, `serve` and `bench` (model, dtype, harmony
system and developer messages, sampling, context), what they turn into, and model loading with
one-line errors."""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from gptoss_mlx.cli.terminal import utf8_text

if TYPE_CHECKING:
    from gptoss_mlx.chat.harmony import SystemOptions
    from gptoss_mlx.chat.tokenizer import Tokenizer
    from gptoss_mlx.sampling import SamplingParams

REASONING_MODES = ("hidden", "dim", "full")
F = TypeVar("F", bound=Callable[..., Any])


def _effort(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from gptoss_mlx.chat.harmony import normalize_effort

    try:
        return normalize_effort(value)
    except ValueError as e:
        raise click.ClickException(str(e)) from None


class FiniteFloatRange(click.FloatRange):
    """A FloatRange that also refuses nan and inf (nan passes every bound comparison)."""

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        """The float, or a usage error naming the expected range."""
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{rv} is not a finite number in the range {self._describe_range()}.",
                      param, ctx)
        return rv


def model_option(f: F) -> F:
    """The `-m/--model DIR|REPO` option (the `model_path` argument)."""
    return click.option(
        "-m", "--model", "model_path", required=True, metavar="DIR|REPO",
        help="Converted MLX model folder, released checkpoint folder (root layout or "
             "original/), or Hugging Face repo id (downloaded once).")(f)


def dtype_option(f: F) -> F:
    """The `--dtype` option: activations and non-quantized weights (`load`'s `dtype`)."""
    from gptoss_mlx.memory import DTYPE_SIZES

    return click.option(
        "--dtype", type=click.Choice(list(DTYPE_SIZES)), default="bfloat16",
        help="Activations, KV cache and non-quantized weights (attention, embedding, lm_head): "
             "bfloat16 as released; float32 to verify against a float32 reference, and for "
             "speed on MLX's CPU backend (Linux), whose float32 matmuls go to BLAS (fast with "
             "OpenBLAS: LD_PRELOAD=.../openblas-pthread/libopenblas.so.0) while bfloat16 ones "
             "run a generic loop. The memory plan counts these at this dtype (float32: twice "
             "bfloat16's).")(f)


def max_context_option(f: F) -> F:
    """The `--max-context N` click option (None: the model's full context)."""
    return click.option(
        "--max-context",
        type=click.IntRange(min=1),
        default=None,
        show_default="the model's full context",
        help="Longest context (prompt + answer) to plan and allow; a smaller one needs less "
        "memory for the KV cache.",
    )(f)


def model_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by `generate` and `chat`: model, dtype, harmony system/developer,
    sampling."""
    decorators = [
        model_option,
        dtype_option,
        click.option("--system", default=None,
                     help="Replace the system message's identity line "
                          "('You are ChatGPT, a large language model trained by OpenAI.')."),
        click.option("--developer", default=None,
                     help="Developer instructions (what other tools call the system prompt)."),
        click.option("--reasoning-effort", default="medium", callback=_effort,
                     metavar="low|medium|high", help="Reasoning effort in the system message."),
        click.option("--max-tokens", type=click.IntRange(min=1), default=None,
                     help="Stop after this many tokens [default: until the model stops or the "
                          "context ends]."),
        click.option("--temperature", type=FiniteFloatRange(min=0), default=1.0,
                     help="Sampling temperature (0: greedy)."),
        click.option("--top-p", type=FiniteFloatRange(0, 1, min_open=True), default=1.0,
                     help="Nucleus sampling: keep the most likely tokens up to this mass."),
        click.option("--top-k", type=click.IntRange(min=0), default=0,
                     help="Keep only the k most likely tokens (0: off)."),
        click.option("--min-p", type=FiniteFloatRange(0, 1, max_open=True), default=0.0,
                     help="Drop tokens below this fraction of the top probability."),
        click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=None,
                     help="Random seed for reproducible runs."),
        click.option("--show-reasoning", type=click.Choice(REASONING_MODES), default="dim",
                     help="Reasoning on stderr: hidden, dimmed on a terminal, or plain."),
        max_context_option,
    ]
    for decorator in reversed(decorators):
        f = decorator(f)
    return f


def check_instructions(opts: dict[str, Any]) -> None:
    """Fail with one line when --system or --developer is not UTF-8."""
    for name in ("system", "developer"):
        if opts[name] is not None:
            utf8_text(opts[name], f"--{name}")


def sampling_params(opts: dict[str, Any]) -> SamplingParams:
    """SamplingParams from the parsed command-line options."""
    from gptoss_mlx.sampling import SamplingParams

    return SamplingParams(temperature=opts["temperature"], top_p=opts["top_p"],
                          top_k=opts["top_k"], min_p=opts["min_p"], seed=opts["seed"])


def system_options(opts: dict[str, Any]) -> SystemOptions:
    """The harmony SystemOptions the command-line options ask for (date: today)."""
    from gptoss_mlx.chat.harmony import DEFAULT_IDENTITY, SystemOptions, today

    return SystemOptions(reasoning_effort=opts["reasoning_effort"], current_date=today(),
                         model_identity=opts["system"] or DEFAULT_IDENTITY)


@contextlib.contextmanager
def _one_line() -> Iterator[None]:
    from gptoss_mlx.loading import LoadError

    try:
        yield
    except LoadError as e:
        raise click.ClickException(str(e)) from None


def check_model(model_path: str, max_context: int | None = None,
                dtype: str = "bfloat16", prefill_chunk: int | None = None) -> Path:
    """`gptoss_mlx.loading.check_model` (the local folder, its memory plan at `dtype` checked),
    its errors as one-line click errors. Under `mlx.launch` the ranks join first and rank 0
    prints each rank's plan."""
    from gptoss_mlx import distributed, loading

    ranks = join_ranks()
    with _one_line():
        path = loading.check_model(model_path, max_context, dtype, prefill_chunk)
    if ranks > 1 and not distributed.is_follower():
        print_rank_plans(path, ranks, max_context, dtype)
    return path


def print_rank_plans(path: Path, ranks: int, max_context: int | None,
                     dtype: str = "bfloat16") -> None:
    """The memory plan of each rank of a model split across `ranks`, one line each (stderr)."""
    from gptoss_mlx.memory import folder_specs, plan_per_rank
    from gptoss_mlx.model.weights import open_weights

    try:
        plans = plan_per_rank(open_weights(path).config, folder_specs(path), ranks, max_context,
                              dtype=dtype)
    except (OSError, ValueError) as e:
        raise click.ClickException(f"cannot split {path} across {ranks} ranks: {e}") from None
    for plan in plans:
        click.echo(plan.summary(), err=True)


def join_ranks() -> int:
    """Join the other ranks when `mlx.launch` (or mpirun) started this process; the number of
    ranks (1: a single process). Followers never come back from `load_checked_model`."""
    from gptoss_mlx import distributed

    try:
        return distributed.setup()
    except ValueError as e:
        raise click.ClickException(str(e)) from None


def size_value(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """A click callback: `16MiB`, `48GB` or a byte count as bytes (None stays None)."""
    from gptoss_mlx.memory import parse_bytes

    if value is None:
        return None
    try:
        return parse_bytes(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def load_checked_model(path: Path, dtype: str = "bfloat16") -> tuple[Any, Tokenizer]:
    """Load the folder `check_model` returned, in `dtype` (errors: one line)."""
    from gptoss_mlx import distributed
    from gptoss_mlx.loading import load_checked

    if sys.stderr.isatty() and not distributed.is_follower():
        click.echo(f"loading {path} ...", err=True)
    with _one_line():
        return load_checked(path, dtype)


def load_model(model_path: str, max_context: int | None = None,
               dtype: str = "bfloat16") -> tuple[Any, Tokenizer]:
    """`check_model`, then `load_checked_model`."""
    return load_checked_model(check_model(model_path, max_context, dtype), dtype)
