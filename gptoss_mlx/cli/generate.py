"""`gptoss-mlx generate`: one harmony turn; the answer to stdout, reasoning and stats to stderr.

Also home of what `chat` shares with it: the model/sampling options, model loading with clear
errors, and `ChannelPrinter`, which routes streamed channels to the terminal.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import click

from gptoss_mlx.memory import max_context_option

if TYPE_CHECKING:
    from gptoss_mlx.chat.parser import ParseEvent
    from gptoss_mlx.chat.tokenizer import Tokenizer
    from gptoss_mlx.sampling import SamplingParams

REASONING_MODES = ("hidden", "dim", "full")
DIM, RESET = "\x1b[2m", "\x1b[0m"


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


def interruptible(f: Callable[..., Any]) -> Callable[..., Any]:
    """Ctrl-C ends the command with status 130 (128 + SIGINT), not click's "Aborted!" and 1; a
    closed pipe with 141 (128 + SIGPIPE), as `head` expects; an output error (a full disk) is one
    line."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except KeyboardInterrupt:
            click.echo(err=True)
            sys.exit(130)
        except OSError as e:
            if e.errno == errno.EPIPE:  # the reader left (`| head`): end as SIGPIPE would
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # quiet exit flush
                sys.exit(128 + signal.SIGPIPE)
            if e.filename is not None:  # only stream writes here
                raise
            raise click.ClickException(f"cannot write the output: {e.strerror or e}") from None

    return wrapper


def model_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by `generate` and `chat`: model, harmony system/developer, sampling."""
    decorators = [
        click.option("-m", "--model", "model_path", required=True, metavar="DIR|REPO",
                     help="Converted MLX model folder, released checkpoint folder (root "
                          "layout or original/), or Hugging Face repo id (downloaded once)."),
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


def utf8_text(text: str, what: str) -> str:
    """`text` if it is valid Unicode; else one clear error (bytes that were not UTF-8 arrive
    as lone surrogates under Python's surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = ord(text[e.start])
        byte = f"byte 0x{bad - 0xDC00:02x}" if 0xDC80 <= bad <= 0xDCFF else f"U+{bad:04X}"
        raise click.ClickException(
            f"{what} is not valid UTF-8 ({byte} at character {e.start}); expected UTF-8 text"
        ) from None
    return text


def read_stdin(what: str) -> str:
    """All of stdin as text; one clear error when it is not UTF-8."""
    try:
        text = sys.stdin.read()
    except UnicodeDecodeError as e:
        raise click.ClickException(
            f"{what} is not valid UTF-8 (byte 0x{e.object[e.start]:02x} at byte {e.start}); "
            "expected UTF-8 text"
        ) from None
    return utf8_text(text, what)


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


def system_options(opts: dict[str, Any]) -> Any:
    """The harmony SystemOptions the command-line options ask for (date: today)."""
    from gptoss_mlx.chat.harmony import DEFAULT_IDENTITY, SystemOptions, today

    return SystemOptions(reasoning_effort=opts["reasoning_effort"], current_date=today(),
                         model_identity=opts["system"] or DEFAULT_IDENTITY)


def load_model(model_path: str, max_context: int | None = None) -> tuple[Any, Tokenizer]:
    """Check the memory plan at `max_context` (setting Metal's wired limit), then load a model
    (a converted folder, a released checkpoint folder, or a Hugging Face repo id, downloaded
    once into the hub cache) and its tokenizer; fail with one clear line."""
    from gptoss_mlx.chat.tokenizer import TOKENIZER_JSON, VOCAB_FILENAME
    from gptoss_mlx.memory import MemoryPlanError, ensure_fits
    from gptoss_mlx.model.weights import ModelLoadError, open_weights

    try:
        weights = open_weights(model_path)
    except ModelLoadError as e:
        raise click.ClickException(str(e)) from None
    path = weights.folder  # for a repo id, its local copy from here on
    if not any((d / f).is_file() for d in weights.side_folders
               for f in (VOCAB_FILENAME, TOKENIZER_JSON)):
        raise click.ClickException(
            f"{path} has no {VOCAB_FILENAME} (nor a {TOKENIZER_JSON} to derive it from); copy "
            f"{VOCAB_FILENAME} into it, or convert again with --vocab PATH"
        )
    try:
        ensure_fits(path, max_context)
    except MemoryPlanError as e:
        raise click.ClickException(str(e)) from None
    except (OSError, ValueError) as e:
        raise click.ClickException(f"cannot read {path}: {e}") from None
    from gptoss_mlx import load

    if sys.stderr.isatty():
        click.echo(f"loading {path} ...", err=True)
    try:
        model, tokenizer = load(path)
    except (ValueError, OSError, KeyError) as e:
        raise click.ClickException(f"cannot load {path}: {e}") from None
    if tokenizer is None:
        raise click.ClickException(f"{path}: no tokenizer could be loaded")
    return model, tokenizer


def _color(stream: TextIO) -> bool:
    """Whether to dim text on `stream`: a terminal that is not dumb, and no NO_COLOR."""
    return stream.isatty() and os.environ.get("TERM") != "dumb" and "NO_COLOR" not in os.environ


class PrefillProgress:
    """Shows `prefill: done/total tokens` on a terminal while a long prompt is prefilled."""

    def __init__(self, err: TextIO | None = None, min_tokens: int = 2048):
        self.err = err or sys.stderr
        self.min_tokens = min_tokens

    def __call__(self, done: int, total: int) -> None:
        """Report progress (clears the line when done)."""
        if total < self.min_tokens or not self.err.isatty():
            return
        self.err.write(f"\rprefill: {done}/{total} tokens" if done < total else "\r\x1b[K")
        self.err.flush()


class ChannelPrinter:
    """Streams parse events: the answer to `out`, reasoning/preambles/tool calls to `err`."""

    def __init__(self, reasoning: str = "dim", out: TextIO | None = None,
                 err: TextIO | None = None):
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.reasoning = reasoning
        self.dim = reasoning == "dim" and _color(self.err)
        self._line_open = {id(self.out): False, id(self.err): False}

    def __call__(self, event: ParseEvent) -> None:
        """Print one parse event."""
        msg = event.message
        if msg.is_tool_call:
            if event.kind == "start":
                self._side(f"[call {msg.recipient}] ")
            elif event.kind == "delta":
                self._side(event.text)
            else:
                self._side("\n")
        elif msg.channel in ("analysis", "commentary"):
            if event.kind == "delta":
                self._side(event.text)
            elif event.kind == "end":
                self._side("\n")
        elif event.kind == "delta":
            self._write(self.out, event.text)

    def close(self) -> None:
        """End the answer line (if one is open) and flush."""
        for stream in (self.out, self.err):
            if self._line_open[id(stream)]:
                stream.write("\n")
                self._line_open[id(stream)] = False
            stream.flush()

    def _side(self, text: str) -> None:
        if self.reasoning != "hidden":
            self._write(self.err, text, dim=self.dim)

    def _write(self, stream: TextIO, text: str, dim: bool = False) -> None:
        if not text:
            return
        stream.write(f"{DIM}{text}{RESET}" if dim else text)
        stream.flush()
        self._line_open[id(stream)] = not text.endswith("\n")


@click.command("generate")
@model_options
@click.option("-p", "--prompt", required=True, help="The user message ('-' reads stdin).")
@click.option("--raw", is_flag=True, help="Print the generated harmony text, markup included.")
@click.option("--json", "as_json", is_flag=True,
              help="Print channels, tool calls and stats as one JSON object (with --json-schema, "
                   "the answer parsed under 'answer').")
@click.option("--json-schema", "schema_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, metavar="FILE",
              help="Make the answer JSON that follows the JSON schema in FILE (reasoning stays "
                   "free).")
@interruptible
def generate_command(model_path: str, prompt: str, raw: bool, as_json: bool,
                     schema_file: Path | None, **opts: Any) -> None:
    """Answer one prompt with a gpt-oss model."""
    if raw and as_json:
        raise click.UsageError("--raw and --json both print on stdout; choose one")
    from gptoss_mlx.chat.harmony import HarmonyRenderer, response_format_section
    from gptoss_mlx.chat.messages import Message
    from gptoss_mlx.generate import (
        ContextLengthError,
        Done,
        NonFiniteLogitsError,
        context_limit,
        stream,
    )

    prompt = read_stdin("the prompt on stdin") if prompt == "-" else utf8_text(prompt, "--prompt")
    if not prompt.strip():
        raise click.ClickException("the prompt is empty; expected some text to answer")
    check_instructions(opts)
    schema = read_schema(schema_file) if schema_file is not None else None
    model, tokenizer = load_model(model_path, opts["max_context"])
    instructions = "\n\n".join(filter(None, [
        opts["developer"], response_format_section(schema_file and schema_file.stem, None,
                                                   schema)]))
    ids = HarmonyRenderer(tokenizer).render_prompt(
        [Message("user", prompt)], instructions=instructions or None,
        options=system_options(opts)
    )
    processors = []
    if schema is not None:
        from gptoss_mlx.chat.forcing import TurnConstraint, TurnSpec

        budget = context_limit(model, opts["max_context"]) - len(ids)
        if opts["max_tokens"] is not None:
            budget = min(budget, opts["max_tokens"])
        processors.append(TurnConstraint(tokenizer, TurnSpec(answer_schema=schema), budget))

    printer = ChannelPrinter(opts["show_reasoning"])
    raw_decoder = tokenizer.stream_decoder()
    done = None
    try:
        for event in stream(model, tokenizer, ids, sampling=sampling_params(opts),
                            max_tokens=opts["max_tokens"], progress=PrefillProgress(),
                            max_context=opts["max_context"], logits_processors=processors):
            if isinstance(event, Done):
                done = event
            elif raw:
                if tokenizer.is_special(event.token):
                    text = raw_decoder.flush() + tokenizer.decode([event.token])
                else:
                    text = raw_decoder.add(event.token)
                sys.stdout.write(text)
                sys.stdout.flush()
            elif not as_json:
                for parsed in event.parsed:
                    printer(parsed)
    except ContextLengthError as e:
        raise click.ClickException(str(e)) from None
    except NonFiniteLogitsError as e:
        printer.close()
        raise click.ClickException(f"{model_path}: {e}") from None
    if raw:
        sys.stdout.write(raw_decoder.flush() + "\n")
    printer.close()
    assert done is not None
    if as_json:
        result = result_json(done)
        if schema is not None and done.stats.finish_reason == "stop":
            result["answer"] = json.loads(done.text("final"))
        click.echo(json.dumps(result, ensure_ascii=False))
    click.echo(done.stats.summary(), err=True)
    if schema is not None and done.stats.finish_reason != "stop":
        raise click.ClickException(
            f"the answer was cut off ({done.stats.finish_reason}) before its JSON was complete; "
            "raise --max-tokens")


def read_schema(path: Path) -> Any:
    """The JSON schema in `path`, checked to be one the answer can be held to (one error line
    naming the file otherwise)."""
    from gptoss_mlx.chat.forcing import SchemaError, check_schema

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise click.ClickException(f"{path}: cannot read the schema: {e}") from None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise click.ClickException(f"{path}: not JSON ({e}); expected a JSON schema") from None
    try:
        return check_schema(schema, str(path))
    except SchemaError as e:
        raise click.ClickException(str(e)) from None


def result_json(done: Any) -> dict[str, Any]:
    """The `--json` object: per-channel text, messages, tool calls, finish reason, stats."""
    channels: dict[str, str] = {}
    for m in done.messages:
        if not m.is_tool_call:
            key = m.channel or "final"
            channels[key] = channels.get(key, "") + m.content
    return {
        "channels": channels,
        "messages": [
            {k: v for k, v in vars(m).items() if v is not None} for m in done.messages
        ],
        "tool_calls": [vars(c) for c in done.tool_calls],
        "finish_reason": done.stats.finish_reason,
        "stats": done.stats.to_dict(),
    }
