"""Terminal input and output the commands share: UTF-8 checks on what the user typed, exit codes
for Ctrl-C and closed pipes, prefill progress, and `ChannelPrinter`, which routes streamed
harmony channels (the answer to stdout, reasoning and tool calls to stderr)."""

from __future__ import annotations

import errno
import functools
import os
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

import click

if TYPE_CHECKING:
    from gptoss_mlx.chat.parser import ParseEvent

DIM, RESET = "\x1b[2m", "\x1b[0m"


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
