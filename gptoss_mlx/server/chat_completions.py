"""POST /v1/chat/completions: OpenAI chat completions, streamed as SSE or returned whole.

Reasoning goes out as both `reasoning` and `reasoning_content` (clients read one or the other);
tool calls stream as OpenAI deltas with the call's id on every chunk.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from gptoss_mlx.chat.harmony import response_format_section
from gptoss_mlx.server.engine import Engine
from gptoss_mlx.server.errors import APIError
from gptoss_mlx.server.output import Generation, OutputBuilder, OutputEvent, OutputFeed, new_id
from gptoss_mlx.server.prompting import (
    GenerationRequest,
    PromptContext,
    answer_schema,
    function_tools,
    render_prompt,
    sampling_params,
    turn_constraint,
)
from gptoss_mlx.server.schemas import ChatCompletionRequest
from gptoss_mlx.server.transport import event_stream, sse


def usage(prompt_tokens: int, cached_tokens: int, feed: OutputFeed) -> dict[str, Any]:
    """The chat-completions usage object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": feed.completion_tokens,
        "total_tokens": prompt_tokens + feed.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": feed.builder.reasoning_tokens},
    }


def assistant_message(builder: OutputBuilder) -> dict[str, Any]:
    """The whole answer as a chat-completions assistant message."""
    calls = [
        {"id": i.call_id, "type": "function", "function": {"name": i.name, "arguments": i.text}}
        for i in builder.tool_calls
    ]
    reasoning, text = builder.text("reasoning"), builder.text("text")
    message: dict[str, Any] = {
        "role": "assistant",
        "content": text or (None if calls else ""),
        "reasoning": reasoning or None,
        "reasoning_content": reasoning or None,
    }
    if calls:
        message["tool_calls"] = calls
    return message


def _delta(event: OutputEvent) -> dict[str, Any] | None:
    """The chunk delta for one item event (None when it carries nothing)."""
    item = event.item
    if item.kind == "tool_call":
        call: dict[str, Any] = {"index": item.call_index, "id": item.call_id, "type": "function"}
        if event.kind == "start":
            call["function"] = {"name": item.name, "arguments": ""}
        elif event.kind == "delta" and event.text:
            call["function"] = {"arguments": event.text}
        else:
            return None
        return {"tool_calls": [call]}
    if event.kind != "delta" or not event.text:
        return None
    if item.kind == "reasoning":
        return {"reasoning": event.text, "reasoning_content": event.text}
    return {"content": event.text}


def prepare(context: PromptContext, body: ChatCompletionRequest,
            strict_tools: bool = True) -> GenerationRequest:
    """A chat-completions request rendered and checked (APIError 400 naming the field), with
    the constraint its tool_choice, strict tools (all of them with `strict_tools`) and
    response_format ask for."""
    tools = function_tools([t.model_dump(exclude_none=True) for t in body.tools or ()],
                           body.tool_choice)
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    fmt = body.response_format
    spec = fmt.json_schema if fmt else None
    answer = answer_schema(fmt.type if fmt else None, spec.schema_ if spec else None,
                           "response_format.json_schema.schema")
    prompt = render_prompt(
        context, messages, tools=tools, effort=body.effort, param="messages",
        response_format=response_format_section(spec.name, spec.description, answer)
        if spec else None)
    max_tokens = body.max_completion_tokens or body.max_tokens
    constraint = turn_constraint(context, tools, body.tool_choice, prompt, max_tokens,
                                 answer=answer, strict_tools=strict_tools)
    return GenerationRequest(prompt, sampling_params(body), max_tokens, constraint,
                             tuple(body.stop_strings))


async def chat_completions(
    request: Request, body: ChatCompletionRequest, engine: Engine, model_id: str
) -> JSONResponse | StreamingResponse:
    """Handle one chat-completions request."""
    req = await run_in_threadpool(prepare, engine, body, request.app.state.strict_tools)
    job = engine.submit(req.prompt, sampling=req.sampling, max_tokens=req.max_tokens,
                        forcing=req.forcing)
    gen = Generation(job, OutputBuilder(req.stop))
    completion_id, created = new_id("chatcmpl"), int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return event_stream(_stream(gen, completion_id, created, model_id, include_usage), job)
    await gen.run(request)
    return JSONResponse(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model_id,
            "choices": [
                {"index": 0, "message": assistant_message(gen.builder),
                 "finish_reason": gen.finish_reason,
                 "logprobs": None}
            ],
            "usage": usage(gen.prompt_tokens, gen.cached_tokens, gen.feed),
        }
    )


async def _stream(
    gen: Generation, completion_id: str, created: int, model_id: str, include_usage: bool
) -> AsyncIterator[str]:
    head = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
            "model": model_id}

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return sse({**head, "choices": [choice]})

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for event in gen.events():
            delta = _delta(event)
            if delta is not None:
                yield chunk(delta)
    except APIError as exc:  # the stream has begun: report the error in it
        yield sse(exc.body())
        return
    yield chunk({}, gen.finish_reason)
    if include_usage:
        counts = usage(gen.prompt_tokens, gen.cached_tokens, gen.feed)
        yield sse({**head, "choices": [], "usage": counts})
    yield sse("[DONE]")
