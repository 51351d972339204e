"""The wire checks the client tests rely on accept what the server sends and reject streams
that break the documented order (so a green client test means something)."""

from __future__ import annotations

import json

import pytest
from loopback import LoopbackServer, check_chat_stream, check_responses_stream, sse
from scripted_model import Turn, final


@pytest.fixture
def captured(scripted_server: LoopbackServer) -> dict[str, bytes]:
    """One streamed chat completion and one streamed response, as the server sent them."""
    scripted_server.model.script([Turn("", final("Hello there.", reasoning="Greet."))])
    scripted_server.exchanges.clear()
    client = scripted_server.client()
    list(client.chat.completions.create(model=scripted_server.model_id, stream=True,
                                        messages=[{"role": "user", "content": "Hi"}]))
    list(client.responses.create(model=scripted_server.model_id, input="Hi", stream=True))
    chat, responses = scripted_server.exchanges
    scripted_server.exchanges.clear()
    return {"chat": chat.body, "responses": responses.body}


def _rebuild(events: list[tuple[str | None, str]]) -> bytes:
    return "".join((f"event: {name}\n" if name else "") + f"data: {data}\n\n"
                   for name, data in events).encode()


def test_what_the_server_sends_passes(captured: dict[str, bytes]) -> None:
    assert check_chat_stream(captured["chat"]) > 3
    assert check_responses_stream(captured["responses"]) > 10


def test_text_in_output_item_added_is_rejected(captured: dict[str, bytes]) -> None:
    events = sse(captured["responses"])
    for i, (name, data) in enumerate(events):
        event = json.loads(data)
        if name == "response.output_item.added" and event["item"]["type"] == "message":
            event["item"]["content"] = [{"type": "output_text", "text": "Hello there.",
                                         "annotations": []}]
            events[i] = (name, json.dumps(event))
    with pytest.raises(AssertionError, match="output_item.added carries message"):
        check_responses_stream(_rebuild(events))


def test_a_missing_delta_is_rejected(captured: dict[str, bytes]) -> None:
    events = sse(captured["responses"])
    first = next(i for i, (name, _) in enumerate(events) if name == "response.output_text.delta")
    kept = events[:first] + events[first + 1:]
    renumbered = [(n, json.dumps({**json.loads(d), "sequence_number": i}))
                  for i, (n, d) in enumerate(kept)]
    with pytest.raises(AssertionError, match="deltas differ"):
        check_responses_stream(_rebuild(renumbered))


def test_a_second_finish_reason_is_rejected(captured: dict[str, bytes]) -> None:
    events = sse(captured["chat"])
    finish = next(d for _, d in events if '"finish_reason":"' in d.replace(" ", ""))
    with pytest.raises(AssertionError, match="finish_reason in chunks"):
        check_chat_stream(_rebuild(events[:-1] + [(None, finish)] + events[-1:]))
