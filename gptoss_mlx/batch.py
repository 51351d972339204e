"""Offline batches of chat-completions requests (`gptoss-mlx generate --prompts FILE.jsonl`).

Each line is one request body as `POST /v1/chat/completions` takes it (`messages`, `tools`,
`tool_choice`, `max_tokens`/`max_completion_tokens`, `temperature`, `top_p`, `seed`, `stop`,
`reasoning_effort`, ...): the server's schema validates it and its code renders it, every line
before anything is generated. Each result is the request's assistant message as the server
returns it, with its finish reason and usage.

    bodies = parse_requests(lines, source="prompts.jsonl")   # BatchInputError: line, field
    requests = prepare_requests(bodies, BatchContext.of(model, tokenizer), source=...)
    for index, feed in run_requests(model, tokenizer, [r.generation for r in requests]):
        print(json.dumps(result(requests[index], feed)))
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from gptoss_mlx.chat.harmony import HarmonyRenderer, today
from gptoss_mlx.chat.tokenizer import Tokenizer
from gptoss_mlx.generate import Done, context_limit
from gptoss_mlx.memory import MAX_BATCH
from gptoss_mlx.scheduler import BatchGenerator, Generation
from gptoss_mlx.server.chat_completions import assistant_message, prepare, usage
from gptoss_mlx.server.errors import APIError, validation_error
from gptoss_mlx.server.output import OutputBuilder, OutputFeed
from gptoss_mlx.server.prompting import GenerationRequest, PromptContext
from gptoss_mlx.server.schemas import ChatCompletionRequest


class BatchInputError(ValueError):
    """A request line that is not a valid chat-completions request: one line naming the file,
    the line number and the field."""


@dataclass(frozen=True)
class BatchContext:
    """What rendering needs (`server.prompting.PromptContext`), for a model served offline."""

    tokenizer: Tokenizer
    renderer: HarmonyRenderer
    current_date: str
    context_length: int

    @classmethod
    def of(cls, model: Any, tokenizer: Tokenizer, max_context: int | None = None) -> BatchContext:
        """The context of `model` (its window, or `max_context` if smaller), dated today."""
        return cls(tokenizer, HarmonyRenderer(tokenizer), today(),
                   context_limit(model, max_context))


@dataclass(frozen=True)
class LineRequest:
    """One request of the batch and the line it came from (1-based)."""

    line: int
    generation: GenerationRequest


def parse_requests(lines: Iterable[str], *, source: str,
                   defaults: Mapping[str, Any] | None = None
                   ) -> list[tuple[int, ChatCompletionRequest]]:
    """(line number, request) for each non-blank line, validated by the server's schema.

    `defaults` fill fields a line leaves out (`reasoning_effort` only when the line sets no
    effort anywhere, `max_tokens` only without `max_completion_tokens`).
    """
    out = []
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        where = f"{source}: line {number}"
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise BatchInputError(f"{where}: not JSON ({e.msg} at column {e.colno}); expected "
                                  "one chat-completions request object per line") from None
        if not isinstance(data, dict):
            raise BatchInputError(f"{where}: expected a JSON object (a chat-completions "
                                  f"request), not {type(data).__name__}")
        try:
            body = ChatCompletionRequest.model_validate(data)
        except ValidationError as e:
            raise BatchInputError(f"{where}: {validation_error(e).message}") from None
        out.append((number, _with_defaults(body, defaults or {})))
    if not out:
        raise BatchInputError(f"{source}: no requests; expected one JSON object per line")
    return out


def _with_defaults(body: ChatCompletionRequest,
                   defaults: Mapping[str, Any]) -> ChatCompletionRequest:
    given = {"reasoning_effort": body.effort,
             "max_tokens": body.max_completion_tokens or body.max_tokens}
    update = {k: v for k, v in defaults.items()
              if v is not None and given.get(k, getattr(body, k)) is None}
    return body.model_copy(update=update) if update else body


def prepare_requests(bodies: Sequence[tuple[int, ChatCompletionRequest]],
                     context: PromptContext, *, source: str) -> list[LineRequest]:
    """Every request rendered and checked as the server does (tools, tool_choice, the context
    window); BatchInputError names the first bad line and field."""
    out = []
    for number, body in bodies:
        try:
            out.append(LineRequest(number, prepare(context, body)))
        except APIError as e:
            field = f"{e.param}: " if e.param and f"'{e.param}'" not in e.message else ""
            raise BatchInputError(f"{source}: line {number}: {field}{e.message}") from None
    return out


def run_requests(model: Any, tokenizer: Tokenizer, requests: Sequence[GenerationRequest], *,
                 max_context: int | None = None,
                 max_batch: int = MAX_BATCH) -> Iterator[tuple[int, OutputFeed]]:
    """Generate every request; yield (its index in `requests`, its output) as each ends.

    They run together on the batched scheduler, at most `max_batch` at once (the next starts as
    one ends, in input order), so results come in the order they finish. A stop string ends its
    request's generation; a generation that fails raises its error.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    batch = BatchGenerator(model, tokenizer)
    todo = deque(enumerate(requests))
    feeds: dict[Generation, tuple[int, OutputFeed]] = {}
    while todo or batch.busy:
        while todo and len(feeds) < max_batch:
            index, request = todo.popleft()
            generation = batch.submit(
                request.prompt, sampling=request.sampling, max_tokens=request.max_tokens,
                max_context=max_context,
                logits_processors=[request.forcing] if request.forcing else ())
            feeds[generation] = (index, OutputFeed(OutputBuilder(request.stop)))
        for generation, event in batch.step():
            if isinstance(event, Exception):
                raise event
            if generation not in feeds:  # a stop string ended it earlier in this step
                continue
            index, feed = feeds[generation]
            feed.push(event)
            if feed.builder.stopped and not isinstance(event, Done):
                batch.cancel(generation)
            if feed.builder.stopped or isinstance(event, Done):
                del feeds[generation]
                feed.close()
                yield index, feed


def result(request: LineRequest, feed: OutputFeed) -> dict[str, Any]:
    """One output line: the input line number, the assistant message (content, reasoning, tool
    calls) as chat completions return it, the finish reason and the usage."""
    cached = feed.done.stats.cached_tokens if feed.done else 0
    return {
        "line": request.line,
        "message": assistant_message(feed.builder),
        "finish_reason": feed.finish_reason,
        "usage": usage(len(request.generation.prompt), cached, feed),
    }
