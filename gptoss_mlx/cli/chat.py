"""`gptoss-mlx chat`: a multi-turn harmony chat in the terminal, its KV cache reused per turn."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from gptoss_mlx.cli.options import (
    check_instructions,
    load_model,
    model_options,
    sampling_params,
    system_options,
)
from gptoss_mlx.cli.prompt_cache import open_prompt_store, prompt_cache_options
from gptoss_mlx.cli.terminal import ChannelPrinter, PrefillProgress, interruptible, utf8_text

HELP = """commands:
  /effort [low|medium|high]  show or set the reasoning effort
  /system [TEXT]             set the system identity line (no TEXT: the default)
  /developer [TEXT]          set the developer instructions (no TEXT: none)
  /clear                     forget the conversation
  /exit                      leave (Ctrl-D works too)
input: end a line with \\ to continue it; or wrap several lines in \"\"\" ... \"\"\".
Ctrl-C stops an answer (the turn is dropped) and keeps the session."""


class LineReader:
    """Reads one (possibly multi-line) user message with readline editing and history."""

    def __init__(self, history_file: Path | None):
        self.history_file = history_file
        try:
            import readline
        except ImportError:  # e.g. Windows: plain input() still works
            self._readline = None
            return
        self._readline = readline
        if history_file is not None and history_file.is_file():
            try:
                readline.read_history_file(history_file)
            except OSError:
                pass

    def read(self) -> str:
        """The next message; raises EOFError on Ctrl-D and KeyboardInterrupt on Ctrl-C."""
        line = self._input(">>> ")
        if line.strip() == '"""':
            lines = []
            while (line := self._input("... ")).strip() != '"""':
                lines.append(line)
            return "\n".join(lines)
        lines = []
        while line.endswith("\\"):
            lines.append(line[:-1])
            line = self._input("... ")
        lines.append(line)
        return "\n".join(lines)

    @staticmethod
    def _input(prompt: str) -> str:
        """input() with readline on a terminal; otherwise the prompt goes to stderr (as Python's
        REPL does) so that stdout holds only the answers."""
        if sys.stdin.isatty() and sys.stdout.isatty():
            return input(prompt)
        sys.stderr.write(prompt)
        sys.stderr.flush()
        return input()

    def save(self) -> None:
        """Write the history file (best effort)."""
        if self._readline is None or self.history_file is None:
            return
        try:
            self.history_file.parent.mkdir(parents=True, exist_ok=True)
            self._readline.write_history_file(self.history_file)
        except OSError:
            pass


def _history_file() -> Path:
    default = Path.home() / ".cache" / "gptoss-mlx" / "chat_history"
    return Path(os.environ.get("GPTOSS_MLX_HISTORY", default))


def _command(session: Any, line: str) -> bool:
    """Run a /command; return False to leave the chat."""
    from gptoss_mlx.chat.harmony import DEFAULT_IDENTITY, normalize_effort

    name, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return False
    if name == "/effort":
        if not arg:
            click.echo(f"reasoning effort: {session.options.reasoning_effort}", err=True)
        else:
            try:
                effort = normalize_effort(arg)
            except ValueError as e:
                click.echo(str(e), err=True)
            else:
                session.set_options(reasoning_effort=effort)
                click.echo(f"reasoning effort: {effort}", err=True)
    elif name == "/system":
        session.set_options(model_identity=arg or DEFAULT_IDENTITY)
        click.echo("system identity updated", err=True)
    elif name == "/developer":
        session.set_instructions(arg or None)
        click.echo("developer instructions updated", err=True)
    elif name == "/clear":
        session.clear()
        click.echo("conversation cleared", err=True)
    elif name == "/help":
        click.echo(HELP, err=True)
    else:
        click.echo(f"unknown command {name}; /help lists them", err=True)
    return True


def _turn(session: Any, text: str, printer: ChannelPrinter, opts: dict[str, Any]) -> None:
    """Stream one answer; Ctrl-C stops it and the session forgets the turn."""
    from gptoss_mlx.generate import ContextLengthError, Done, NonFiniteLogitsError

    events = session.send(text, sampling=sampling_params(opts), max_tokens=opts["max_tokens"],
                          progress=PrefillProgress())
    done = None
    try:
        for event in events:
            if isinstance(event, Done):
                done = event
            else:
                for parsed in event.parsed:
                    printer(parsed)
    except KeyboardInterrupt:
        events.close()
        printer.close()
        click.echo("[stopped; this turn was dropped]", err=True)
        return
    except ContextLengthError as e:
        printer.close()
        hint = "; /clear starts over" if session.messages else ""  # the turn itself is gone
        click.echo(f"error: {e}{hint}", err=True)
        return
    except NonFiniteLogitsError:  # every turn would fail alike: chat_command ends the chat
        printer.close()
        raise
    printer.close()
    if done is not None:
        click.echo(done.stats.summary(), err=True)


@click.command("chat")
@model_options
@prompt_cache_options
@interruptible
def chat_command(model_path: str, **opts: Any) -> None:
    """Chat with a gpt-oss model (the KV cache is reused across turns)."""
    from gptoss_mlx.generate import NonFiniteLogitsError, context_limit
    from gptoss_mlx.session import ChatSession

    check_instructions(opts)
    model, tokenizer = load_model(model_path, opts["max_context"], opts["dtype"])
    store = open_prompt_store(opts["prompt_cache_dir"], opts["prompt_cache_bytes"], model,
                              tokenizer)
    session = ChatSession(model, tokenizer, instructions=opts["developer"],
                          options=system_options(opts), max_context=opts["max_context"],
                          store=store)
    header, limit = len(session.prompt()), context_limit(model, opts["max_context"])
    if header >= limit:
        raise click.ClickException(
            f"the system and developer messages alone take {header} tokens of the "
            f"{limit}-token context; raise --max-context or shorten --developer")
    reader = LineReader(_history_file())
    if hasattr(sys.stdin, "reconfigure"):  # bad bytes reach utf8_text, the next line survives
        sys.stdin.reconfigure(errors="surrogateescape")
    click.echo(f"chatting with {model_path}; /help for commands, Ctrl-D to leave", err=True)
    try:
        while True:
            try:
                text = utf8_text(reader.read(), "that message")
            except EOFError:
                click.echo(err=True)
                break
            except KeyboardInterrupt:
                click.echo(err=True)
                continue
            except click.ClickException as e:
                click.echo(f"error: {e.message}", err=True)
                continue
            if text.startswith("/"):
                if not _command(session, text):
                    break
            elif text.strip():
                _turn(session, text, ChannelPrinter(opts["show_reasoning"]), opts)
    except NonFiniteLogitsError as e:
        raise click.ClickException(f"{model_path}: {e}") from None
    finally:
        reader.save()
