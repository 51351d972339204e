"""The real app served by uvicorn in a thread on 127.0.0.1, with every /v1 exchange captured and
checked against the `openai` SDK's types (the oracle for the wire format) and the stream order
the Responses API documents.

    with served(model, tokenizer) as server:   # a LoopbackServer
        ...                                     # clients talk to server.base_url
        server.check()                          # each body / event validates; order holds
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from typing import Any

from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter
from serving import HOST, running

EVENT = TypeAdapter(ResponseStreamEvent)


@dataclasses.dataclass
class Exchange:
    """One /v1 request and the response the client received."""

    path: str
    request: bytes
    status: int = 0
    body: bytes = b""

    @property
    def request_json(self) -> Any:
        return json.loads(self.request or b"null")


class Capture:
    """ASGI wrapper recording the /v1 POST exchanges that pass through (bodies as sent)."""

    def __init__(self, app: Any):
        self.app = app
        self.exchanges: list[Exchange] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/") \
                or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        exchange = Exchange(scope["path"], b"")
        self.exchanges.append(exchange)

        async def recording_receive() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "http.request":
                exchange.request += message.get("body", b"")
            return message

        async def recording_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
            elif message["type"] == "http.response.body":
                exchange.body += message.get("body", b"")
            await send(message)

        await self.app(scope, recording_receive, recording_send)


@dataclasses.dataclass
class LoopbackServer:
    """A running server: its port, model id, captured exchanges and the model it serves."""

    port: int
    model_id: str
    capture: Capture
    model: Any

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    @property
    def exchanges(self) -> list[Exchange]:
        return self.capture.exchanges

    def client(self, **kwargs: Any) -> Any:
        """The official client (no retries: a failure shows at once)."""
        import openai

        kwargs.setdefault("api_key", "unused")
        return openai.OpenAI(base_url=self.base_url, max_retries=0, timeout=120, **kwargs)

    def check(self) -> int:
        """Validate the exchanges since the last check (see `check_exchanges`), then forget
        them; returns how many bodies and events were checked."""
        try:
            return check_exchanges(self.exchanges)
        finally:
            self.exchanges.clear()


@contextlib.contextmanager
def served(model: Any, tokenizer: Any, model_id: str = "gpt-oss-20b") -> Iterator[LoopbackServer]:
    """`serve`'s app (engine, routes) on `model` over loopback, exchanges captured. The id
    starts with gpt-oss, which Codex CLI keys its gpt-oss behaviour on."""
    from gptoss_mlx.server.app import create_app
    from gptoss_mlx.server.engine import Engine

    engine = Engine(model, tokenizer, current_date="2025-08-05")
    capture = Capture(create_app(engine, model_id))
    with running(capture) as port:
        yield LoopbackServer(port, model_id, capture, model)


def sse(body: bytes) -> list[tuple[str | None, str]]:
    """The (event name, data) pairs of a server-sent event stream (comments skipped)."""
    out = []
    for block in body.decode().replace("\r\n", "\n").split("\n\n"):
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
        if data:
            out.append((name, "\n".join(data)))
    return out


def check_exchanges(exchanges: list[Exchange]) -> int:
    """Validate every successful exchange; returns how many bodies and events were checked."""
    checked = 0
    for ex in exchanges:
        assert ex.status, f"{ex.path}: no response"
        if ex.status != 200:
            continue
        stream = bool(ex.request_json.get("stream"))
        if ex.path == "/v1/chat/completions":
            checked += check_chat_stream(ex.body) if stream else _one(ChatCompletion, ex.body)
        elif ex.path == "/v1/responses":
            checked += check_responses_stream(ex.body) if stream else _one(Response, ex.body)
    return checked


def _one(kind: Any, body: bytes) -> int:
    kind.model_validate_json(body)
    return 1


def check_chat_stream(body: bytes) -> int:
    """Chunks validate as ChatCompletionChunk, end with [DONE]; one finish_reason, last."""
    events = sse(body)
    assert events and events[-1][1] == "[DONE]", "the chat stream does not end with [DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(data) for _, data in events[:-1]]
    assert chunks[0].choices and chunks[0].choices[0].delta.role == "assistant"
    finishes = [i for i, c in enumerate(chunks) for ch in c.choices if ch.finish_reason]
    assert len(finishes) == 1, f"finish_reason in chunks {finishes}"
    assert all(not c.choices for c in chunks[finishes[0] + 1:]), "choices after the finish"
    return len(chunks)


_ADDED_EMPTY = {"message": ("content", []), "reasoning": ("content", []),
                "function_call": ("arguments", "")}
_TEXT_EVENTS = {  # delta event -> (done event, field the done event carries the whole text in)
    "response.output_text.delta": ("response.output_text.done", "text"),
    "response.reasoning_text.delta": ("response.reasoning_text.done", "text"),
    "response.function_call_arguments.delta": ("response.function_call_arguments.done",
                                               "arguments"),
}


def check_responses_stream(body: bytes) -> int:
    """Events validate by their `type`; numbered in order; created, in_progress first and a
    terminal event last; `output_item.added` carries an empty in-progress item; text arrives
    only in deltas, which add up to each done event and to the final response's items; a
    response holding an incomplete item is incomplete."""
    pairs = sse(body)
    events = [EVENT.validate_json(data) for _, data in pairs]
    assert [name for name, _ in pairs] == [e.type for e in events], "event: names differ"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"], kinds[:2]
    assert kinds[-1] in ("response.completed", "response.incomplete", "response.failed")
    assert all(k not in kinds[:-1] for k in ("response.completed", "response.incomplete"))
    deltas: dict[tuple[str, str, int], str] = {}
    done_items = []
    for e in events:
        if e.type == "response.output_item.added":
            assert e.item.status == "in_progress", e.item
            empty = _ADDED_EMPTY.get(e.item.type)
            if empty:
                assert (getattr(e.item, empty[0]) or type(empty[1])()) == empty[1], \
                    f"output_item.added carries {e.item.type} {empty[0]}: {e.item}"
        elif e.type == "response.content_part.added":
            assert e.part.text == "", f"content_part.added carries text: {e.part}"
        elif e.type in _TEXT_EVENTS:
            key = (_TEXT_EVENTS[e.type][0], e.item_id, getattr(e, "content_index", 0))
            deltas[key] = deltas.get(key, "") + e.delta
        elif any(e.type == done for done, _ in _TEXT_EVENTS.values()):
            field = next(f for d, f in _TEXT_EVENTS.values() if d == e.type)
            key = (e.type, e.item_id, getattr(e, "content_index", 0))
            assert deltas.get(key, "") == getattr(e, field), f"{e.type}: deltas differ"
        elif e.type == "response.output_item.done":
            done_items.append(e.item)
    final = events[-1].response
    assert [i.model_dump() for i in final.output] == [i.model_dump() for i in done_items]
    if any(getattr(i, "status", None) == "incomplete" for i in final.output):
        assert final.status == "incomplete", "an incomplete item in a response said complete"
    return len(events)
