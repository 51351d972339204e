"""POST /v1/responses: the Responses API as Codex CLI uses it, streamed or whole.

Input items (messages, `function_call`, `function_call_output`, `reasoning`) become OpenAI chat
messages for the chat package's renderer. A stream sends `response.created`,
`response.in_progress`, then per output item `response.output_item.added`, its content part and
text/reasoning/arguments deltas and their `.done` events, `response.output_item.done`, and at
last `response.completed` (`response.incomplete` when max_output_tokens or the context window
cut it, `response.failed` on an error). Event and field names follow the official `openai`
client types.
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
from gptoss_mlx.server.errors import APIError, bad_request
from gptoss_mlx.server.output import Generation, Item, OutputBuilder, OutputEvent, new_id
from gptoss_mlx.server.prompting import (
    answer_schema,
    function_tools,
    render_prompt,
    sampling_params,
    turn_constraint,
)
from gptoss_mlx.server.schemas import ContentPart, InputItem, ResponsesRequest
from gptoss_mlx.server.transport import event_stream, sse

_TEXT_PARTS = ("input_text", "output_text", "text", "reasoning_text", "summary_text")


def _parts_text(content: str | list[ContentPart] | None, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.type in _TEXT_PARTS:
            texts.append(part.text or "")
        elif part.type != "refusal":
            raise bad_request(f"{where}: only text content is supported, got {part.type!r}",
                              param=where)
    return "".join(texts)


def input_messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's instructions and input items as OpenAI chat messages."""
    messages: list[dict[str, Any]] = []
    if body.instructions:
        messages.append({"role": "developer", "content": body.instructions})
    if isinstance(body.input, str):
        return [*messages, {"role": "user", "content": body.input}]
    calls: set[str] = set()
    for i, item in enumerate(body.input):
        where = f"input[{i}]"
        if item.type == "function_call_output" and item.call_id not in calls:
            raise bad_request(f"{where}: no function_call with call_id {item.call_id!r} "
                              "comes before this output", param=f"{where}.call_id")
        if item.type == "function_call" and item.call_id is not None:
            calls.add(item.call_id)
        messages.append(_chat_message(item, where))
    return messages


def _chat_message(item: InputItem, where: str) -> dict[str, Any]:
    if item.type == "message":
        if item.role is None:
            raise bad_request(f"{where}: a message needs a role", param=f"{where}.role")
        return {"role": item.role, "content": _parts_text(item.content, f"{where}.content")}
    if item.type == "function_call":
        if not item.name or item.call_id is None:
            raise bad_request(f"{where}: a function_call needs name and call_id", param=where)
        call = {"id": item.call_id, "function": {"name": item.name,
                                                 "arguments": item.arguments or "{}"}}
        return {"role": "assistant", "tool_calls": [call]}
    if item.type == "function_call_output":
        output = _parts_text(item.output, f"{where}.output")
        return {"role": "tool", "tool_call_id": item.call_id, "content": output}
    if item.type == "reasoning":
        text = _parts_text(item.content, f"{where}.content") or _parts_text(
            item.summary, f"{where}.summary"
        )
        return {"role": "assistant", "reasoning_content": text}
    raise bad_request(
        f"{where}: unsupported input item type {item.type!r}; expected message, function_call, "
        "function_call_output or reasoning",
        param=f"{where}.type",
    )


def _item_json(item: Item, added: bool = False) -> dict[str, Any]:
    """An output item as the Responses API writes it; `added`: as `response.output_item.added`
    shows it, in progress and empty (the text follows in deltas), however far it has got."""
    done = item.done and not added
    status = "in_progress" if not done else "incomplete" if item.truncated else "completed"
    if item.kind == "reasoning":
        return {"type": "reasoning", "id": item.id, "summary": [], "status": status,
                "content": [{"type": "reasoning_text", "text": item.text}] if done else []}
    if item.kind == "tool_call":
        return {"type": "function_call", "id": item.id, "call_id": item.call_id,
                "name": item.name, "arguments": item.text if done else "", "status": status}
    return {"type": "message", "id": item.id, "role": "assistant", "status": status,
            "phase": "final_answer" if item.channel in (None, "final") else "commentary",
            "content": [_text_part(item)] if done else []}


def _text_part(item: Item, text: str | None = None) -> dict[str, Any]:
    text = item.text if text is None else text
    if item.kind == "reasoning":
        return {"type": "reasoning_text", "text": text}
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class ResponseWriter:
    """Builds the Response object and the numbered stream events of one request."""

    def __init__(self, body: ResponsesRequest, model_id: str, tools: list[dict[str, Any]]):
        self.body = body
        self.model_id = model_id
        self.tools = tools
        self.id = new_id("resp")
        self.created_at = int(time.time())
        self.sequence = 0

    def response(
        self, status: str, gen: Generation | None = None, error: APIError | None = None
    ) -> dict[str, Any]:
        """The Response object in its current state."""
        body = self.body
        out: dict[str, Any] = {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": self.model_id,
            "output": [],
            "instructions": body.instructions,
            "tools": self.tools,
            "tool_choice": _tool_choice_json(body.tool_choice),
            "parallel_tool_calls": body.parallel_tool_calls,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "max_output_tokens": body.max_output_tokens,
            "previous_response_id": None,
            "reasoning": {"effort": body.reasoning.effort if body.reasoning else None,
                          "summary": None},
            "metadata": body.metadata or {},
            "text": {"format": _format_json(body)},
            "error": None,
            "incomplete_details": None,
            "usage": None,
        }
        if gen is not None:
            out["output"] = [_item_json(i) for i in gen.builder.items]
            out["usage"] = _usage(gen)
            if status == "incomplete":
                out["incomplete_details"] = {"reason": _incomplete_reason(gen)}
        if error is not None:
            out["error"] = {"code": "server_error", "message": error.message}
        return out

    def event(self, type: str, **fields: Any) -> str:
        """One numbered SSE event."""
        data = {"type": type, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return sse(data, event=type)

    def item_events(self, event: OutputEvent) -> list[str]:
        """The stream events for one item event."""
        item = event.item
        at = {"item_id": item.id, "output_index": item.index}
        if event.kind == "start":
            out = [self.event("response.output_item.added", output_index=item.index,
                              item=_item_json(item, added=True))]
            if item.kind != "tool_call":
                out.append(self.event("response.content_part.added", **at, content_index=0,
                                      part=_text_part(item, "")))
            return out
        if event.kind == "delta":
            if not event.text:
                return []
            if item.kind == "tool_call":
                return [self.event("response.function_call_arguments.delta", **at,
                                   delta=event.text)]
            if item.kind == "reasoning":
                return [self.event("response.reasoning_text.delta", **at, content_index=0,
                                   delta=event.text)]
            return [self.event("response.output_text.delta", **at, content_index=0,
                               delta=event.text, logprobs=[])]
        if item.kind == "tool_call":
            out = [self.event("response.function_call_arguments.done", **at, name=item.name,
                              arguments=item.text)]
        else:
            if item.kind == "reasoning":
                out = [self.event("response.reasoning_text.done", **at, content_index=0,
                                  text=item.text)]
            else:
                out = [self.event("response.output_text.done", **at, content_index=0,
                                  text=item.text, logprobs=[])]
            out.append(self.event("response.content_part.done", **at, content_index=0,
                                  part=_text_part(item)))
        out.append(self.event("response.output_item.done", output_index=item.index,
                              item=_item_json(item)))
        return out


def _incomplete_reason(gen: Generation) -> str | None:
    """"max_output_tokens" when that limit cut the output; None when the context window did
    (the Responses API has no reason for it: "max_output_tokens", "max_messages",
    "content_filter" and "steered" would all be untrue, and clients read a null reason as
    "unknown")."""
    return "max_output_tokens" if gen.generation_reason == "length" else None


def _format_json(body: ResponsesRequest) -> dict[str, Any]:
    """The request's `text.format` as the Response object echoes it."""
    fmt = body.text.format if body.text else None
    if fmt is None:
        return {"type": "text"}
    out = fmt.model_dump(by_alias=True, exclude_none=True)
    if fmt.type == "json_schema":
        out.setdefault("name", "response")  # the Response object's format names its schema
    return out


def _tool_choice_json(choice: Any) -> Any:
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        return choice
    return {"type": "function", "name": choice.function_name}


def _usage(gen: Generation) -> dict[str, Any]:
    return {
        "input_tokens": gen.prompt_tokens,
        "input_tokens_details": {
            "cached_tokens": gen.cached_tokens,
            "cache_write_tokens": gen.prompt_tokens - gen.cached_tokens,
        },
        "output_tokens": gen.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": gen.builder.reasoning_tokens},
        "total_tokens": gen.prompt_tokens + gen.completion_tokens,
    }


def _echo_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The function tools as the Response object lists them."""
    return [
        {"type": "function", "name": t["name"], "description": t.get("description"),
         "parameters": t.get("parameters"), "strict": t.get("strict", False)}
        for t in tools
    ]


async def responses(
    request: Request, body: ResponsesRequest, engine: Engine, model_id: str
) -> JSONResponse | StreamingResponse:
    """Handle one Responses API request."""
    if body.previous_response_id:
        raise bad_request(
            "previous_response_id is not supported: this server stores no responses; "
            "send the whole conversation in `input`",
            param="previous_response_id",
            code="previous_response_not_found",
        )
    tools = function_tools(body.tools, body.tool_choice)
    for i, tool in enumerate(tools):
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise bad_request(f"tools[{i}]: a function tool needs a name", param=f"tools[{i}]")
    effort = body.reasoning.effort if body.reasoning else None
    fmt = body.text.format if body.text else None
    answer = answer_schema(fmt.type if fmt else None, fmt.schema_ if fmt else None,
                           "text.format.schema")
    prompt = await run_in_threadpool(
        render_prompt, engine, input_messages(body), tools=tools, effort=effort, param="input",
        response_format=response_format_section(fmt.name, fmt.description, answer) if fmt else None,
    )
    constraint = await run_in_threadpool(
        lambda: turn_constraint(engine, tools, body.tool_choice, prompt, body.max_output_tokens,
                                answer=answer, strict_tools=request.app.state.strict_tools))
    job = engine.submit(prompt, sampling=sampling_params(body), max_tokens=body.max_output_tokens,
                        forcing=constraint)
    gen = Generation(job, OutputBuilder())
    writer = ResponseWriter(body, model_id, _echo_tools(tools))
    if body.stream:
        return event_stream(_stream(gen, writer), job)
    await gen.run(request)
    status = "incomplete" if gen.finish_reason == "length" else "completed"
    return JSONResponse(writer.response(status, gen))


async def _stream(gen: Generation, writer: ResponseWriter) -> AsyncIterator[str]:
    yield writer.event("response.created", response=writer.response("in_progress"))
    yield writer.event("response.in_progress", response=writer.response("in_progress"))
    try:
        async for event in gen.events():
            yield "".join(writer.item_events(event))
    except APIError as exc:  # the stream has begun: report the error in it
        yield writer.event("response.failed", response=writer.response("failed", gen, exc))
        return
    status = "incomplete" if gen.finish_reason == "length" else "completed"
    yield writer.event(f"response.{status}", response=writer.response(status, gen))
