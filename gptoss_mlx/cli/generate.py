"""`gptoss-mlx generate`: one harmony turn; the answer to stdout, reasoning and stats to stderr."""

from __future__ import annotations

import json
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
from gptoss_mlx.cli.terminal import (
    ChannelPrinter,
    PrefillProgress,
    interruptible,
    read_stdin,
    utf8_text,
)


@click.command("generate")
@model_options
@click.option("-p", "--prompt", default=None, help="The user message ('-' reads stdin).")
@click.option("--raw", is_flag=True, help="Print the generated harmony text, markup included.")
@click.option("--json", "as_json", is_flag=True,
              help="Print channels, tool calls and stats as one JSON object (with --json-schema, "
                   "the answer parsed under 'answer').")
@click.option("--json-schema", "schema_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, metavar="FILE",
              help="Make the answer JSON that follows the JSON schema in FILE (reasoning stays "
                   "free).")
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, metavar="FILE.jsonl",
              help="Instead of -p: one chat-completions request body per line (messages, tools, "
                   "tool_choice, max_tokens, temperature, stop, ...; the sampling options, "
                   "--max-tokens and --reasoning-effort fill what a line leaves out); prints one "
                   "JSON result per line, in input order.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --prompts: write the results to this file (all or nothing) instead of "
                   "stdout.")
@interruptible
def generate_command(model_path: str, prompt: str | None, raw: bool, as_json: bool,
                     schema_file: Path | None, prompts: Path | None, output: Path | None,
                     **opts: Any) -> None:
    """Answer one prompt, or a file of chat-completions requests, with a gpt-oss model."""
    if prompts is not None:
        if (prompt is not None or raw or as_json or schema_file or opts["system"]
                or opts["developer"]):
            raise click.UsageError("--prompts reads each request (messages, response_format) "
                                   "from its line; -p, --raw, --json, --json-schema, --system "
                                   "and --developer do not apply")
        from gptoss_mlx.cli.batch import run_batch

        return run_batch(model_path, prompts, output, opts)
    if output is not None:
        raise click.UsageError("--output goes with --prompts")
    if prompt is None:
        raise click.UsageError("Missing option '-p' / '--prompt' (or --prompts FILE.jsonl).")
    if raw and as_json:
        raise click.UsageError("--raw and --json both print on stdout; choose one")
    from gptoss_mlx.chat.harmony import HarmonyRenderer, response_format_section
    from gptoss_mlx.chat.messages import Message
    from gptoss_mlx.distributed import launched
    from gptoss_mlx.generate import (
        ContextLengthError,
        Done,
        NonFiniteLogitsError,
        context_limit,
        stream,
    )

    if prompt == "-" and launched():
        raise click.UsageError("-p - cannot read stdin under mlx.launch, which never closes the "
                               "ranks' stdin; give the prompt itself: -p \"$(cat FILE)\"")
    prompt = read_stdin("the prompt on stdin") if prompt == "-" else utf8_text(prompt, "--prompt")
    if not prompt.strip():
        raise click.ClickException("the prompt is empty; expected some text to answer")
    check_instructions(opts)
    schema = read_schema(schema_file) if schema_file is not None else None
    model, tokenizer = load_model(model_path, opts["max_context"], opts["dtype"])
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
