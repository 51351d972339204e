"""Forced tool calls, honest finish reasons and the Responses event stream, over loopback HTTP.

The real server runs the random tiny model (`server` from test_server.py); the official `openai`
client sends the requests, its types validate every body, chunk and event, and openai-harmony
parses the token ids the model generated. Random weights never call a tool, end a message or
write JSON by themselves, so every call here comes from the forcing; its arguments, constrained to
the tool's schema (tools are strict by default), either validate or are cut off by the limit.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai_harmony as oh
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter
from test_server import Server, run_server

from gptoss_mlx.chat.harmony import SystemOptions
from gptoss_mlx.generate import TokenEvent
from gptoss_mlx.server.engine import Engine, Job

EVENT = TypeAdapter(ResponseStreamEvent)
FUNCTIONS = ["get_weather", "get_time", "search"]
CHOICES = {  # tool_choice, the functions offered, the ones a call may go to
    "required-one": ("required", FUNCTIONS[:1], FUNCTIONS[:1]),
    "required-several": ("required", FUNCTIONS, FUNCTIONS),
    "named": ("get_time", FUNCTIONS, ["get_time"]),
}
QUESTION = "What is the weather in Paris?"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[Server]:
    with run_server(tiny_model_dir) as running:
        yield running


PARAMETERS = {"type": "object", "properties": {"q": {"type": "string"}}}


def chat_tools(names: list[str]) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {
        "name": n, "description": f"The {n} tool.", "parameters": PARAMETERS}}
        for n in names]


def responses_tools(names: list[str]) -> list[dict[str, Any]]:
    return [{"type": "function", **t["function"]} for t in chat_tools(names)]


@contextlib.contextmanager
def generated_ids(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[list[int]]]:
    """The token ids of each job submitted inside the block, in the order they were submitted.

    Jobs are taken at `Engine.submit`, not at their first event: a previous test's streamed job
    may still be ending (its `_END` comes after the client has read the last chunk)."""
    runs: list[tuple[Job, list[int]]] = []  # holding the jobs keeps their ids unique
    submit, emit = Engine.submit, Job.emit

    def take(engine: Engine, *args: Any, **kwargs: Any) -> Job:
        job = submit(engine, *args, **kwargs)
        runs.append((job, []))
        return job

    def tap(job: Job, item: Any) -> None:
        if isinstance(item, TokenEvent):
            for mine, ids in runs:
                if mine is job:
                    ids.append(item.token)
        emit(job, item)

    ordered: list[list[int]] = []
    with monkeypatch.context() as m:
        m.setattr(Engine, "submit", take)
        m.setattr(Job, "emit", tap)
        yield ordered
    ordered += [ids for _, ids in runs]


def harmony_call(server: Server, ids: list[int]) -> tuple[str, str]:
    """openai-harmony's reading of a forced turn: reasoning, then one call it ends inside or
    with `<|call|>`; returns the call's (function name, arguments so far)."""
    parser = oh.StreamableParser(server.tokenizer.harmony, oh.Role.ASSISTANT)
    for token in ids:
        parser.process(token)
    messages = [(m.channel, m.recipient, m.content_type, m.content[0].text)
                for m in parser.messages]
    if parser.current_role is not None:
        messages.append((parser.current_channel, parser.current_recipient,
                         parser.current_content_type, parser.current_content))
    *reasoning, (channel, recipient, content_type, arguments) = messages
    assert all(m[:3] == ("analysis", None, None) for m in reasoning), reasoning
    assert (channel, content_type) == ("commentary", "<|constrain|>json")
    assert recipient is not None and recipient.startswith("functions.")
    return recipient.removeprefix("functions."), arguments


# -- the Responses stream against OpenAI's documented event sequence --------------------------

_ITEM_EVENTS = {  # an item's events between output_item.added and output_item.done
    "message": ("response.content_part.added", "response.output_text.delta",
                "response.output_text.done", "response.content_part.done"),
    "reasoning": ("response.content_part.added", "response.reasoning_text.delta",
                  "response.reasoning_text.done", "response.content_part.done"),
    "function_call": (None, "response.function_call_arguments.delta",
                      "response.function_call_arguments.done", None),
}


def _item_text(item: Any) -> str:
    if item.type == "function_call":
        return item.arguments
    return "".join(part.text for part in item.content)


def check_responses_stream(events: list[Any]) -> Response:
    """Every event validates against the SDK's types and the sequence is OpenAI's: created,
    in_progress, then per item `output_item.added` (the empty in-progress item), its content
    part, deltas, `.done` events with the full text and `output_item.done`, and last
    `response.completed` or `response.incomplete`. Returns the final Response."""
    for e in events:
        EVENT.validate_python(e.to_dict())
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert all(e.response.status == "in_progress" and e.response.output == []
               for e in events[:2])
    last = events[-1]
    assert last.type in ("response.completed", "response.incomplete")
    assert last.response.status == last.type.removeprefix("response.")
    body, done_items = events[2:-1], []
    while body:
        added, *rest = body
        k = len(done_items)
        assert added.type == "response.output_item.added" and added.output_index == k
        item = added.item
        assert item.status == "in_progress" and _item_text(item) == "", added
        if item.type == "reasoning":
            assert item.content == [] and item.summary == []
        end = next(i for i, e in enumerate(rest) if e.type == "response.output_item.done")
        inner, done, body = rest[:end], rest[end], rest[end + 1:]
        part_added, delta, text_done, part_done = _ITEM_EVENTS[item.type]
        kinds = [e.type for e in inner]
        deltas = [e for e in inner if e.type == delta]
        assert kinds == [k for k in (part_added,) if k] + [delta] * len(deltas) + [
            k for k in (text_done, part_done) if k]
        assert all(e.item_id == item.id and e.output_index == k for e in inner)
        text = "".join(e.delta for e in deltas)
        if part_added:
            assert inner[0].part.text == "" and inner[-1].part.text == text
        finished = inner[len(inner) - (2 if part_done else 1)]
        assert (finished.arguments if item.type == "function_call" else finished.text) == text
        assert done.output_index == k and done.item.id == item.id
        assert done.item.status in ("completed", "incomplete") and _item_text(done.item) == text
        done_items.append(done.item)
    response = last.response
    assert [o.to_dict() for o in response.output] == [o.to_dict() for o in done_items]
    return response


# -- forced calls: always a call to an offered function -------------------------------------

def forced_chat(server: Server, choice: str, stream: bool, seed: int,
                max_tokens: int) -> tuple[str, str, str]:
    tool_choice, offered, _ = CHOICES[choice]
    if tool_choice != "required":
        tool_choice = {"type": "function", "function": {"name": tool_choice}}
    kwargs: dict[str, Any] = dict(
        model=server.model_id, messages=[{"role": "user", "content": QUESTION}],
        tools=chat_tools(offered), tool_choice=tool_choice, seed=seed)
    if max_tokens:
        kwargs["max_completion_tokens"] = max_tokens
    client = server.client()
    if not stream:
        raw = client.chat.completions.with_raw_response.create(**kwargs)
        r = ChatCompletion.model_validate(raw.http_response.json())
        (choice_,) = r.choices
        (call,) = choice_.message.tool_calls
        assert not choice_.message.content
        return call.function.name, call.function.arguments, choice_.finish_reason
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    for c in chunks:
        ChatCompletionChunk.model_validate(c.to_dict())
    deltas = [c.choices[0].delta for c in chunks]
    assert not "".join(d.content or "" for d in deltas)
    calls = [tc for d in deltas for tc in d.tool_calls or ()]
    assert {(tc.index, tc.id) for tc in calls} == {(0, calls[0].id)}
    names = [tc.function.name for tc in calls if tc.function and tc.function.name]
    assert len(names) == 1
    arguments = "".join(tc.function.arguments or "" for tc in calls if tc.function)
    return names[0], arguments, chunks[-1].choices[0].finish_reason


def forced_responses(server: Server, choice: str, stream: bool, seed: int,
                     max_tokens: int) -> tuple[str, str, Response]:
    tool_choice, offered, _ = CHOICES[choice]
    if tool_choice != "required":
        tool_choice = {"type": "function", "name": tool_choice}
    kwargs: dict[str, Any] = dict(model=server.model_id, input=QUESTION,
                                  tools=responses_tools(offered), tool_choice=tool_choice,
                                  extra_body={"seed": seed})
    if max_tokens:
        kwargs["max_output_tokens"] = max_tokens
    client = server.client()
    if stream:
        r = check_responses_stream(list(client.responses.create(stream=True, **kwargs)))
    else:
        raw = client.responses.with_raw_response.create(**kwargs)
        r = Response.model_validate(raw.http_response.json())
    assert not [o for o in r.output if o.type == "message"]
    (call,) = [o for o in r.output if o.type == "function_call"]
    return call.name, call.arguments, r


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("choice", list(CHOICES))
@pytest.mark.parametrize("endpoint", ["chat", "responses"])
def test_forced_calls_always_call_an_offered_function(
        server: Server, monkeypatch: pytest.MonkeyPatch, endpoint: str, choice: str,
        stream: bool) -> None:
    """From no room to reason (16 tokens: the call's header and a few argument tokens) to some
    reasoning first; a call the limit cuts off is reported as such, a finished one holds
    arguments that validate against the tool's schema."""
    allowed = CHOICES[choice][2]
    with generated_ids(monkeypatch) as runs:
        results = []
        for seed in range(4):
            max_tokens = 16 + 5 * seed
            if endpoint == "chat":
                name, arguments, reason = forced_chat(server, choice, stream, seed, max_tokens)
                results.append((name, arguments))
                finished = reason == "tool_calls"
                assert finished or reason == "length"
            else:
                name, arguments, r = forced_responses(server, choice, stream, seed, max_tokens)
                results.append((name, arguments))
                finished = r.status == "completed"
                if not finished:
                    assert r.status == "incomplete"
                    assert r.incomplete_details.reason == "max_output_tokens"
                    assert r.output[-1].status == "incomplete"
                    assert r.usage.output_tokens == max_tokens
            if finished:
                jsonschema.validate(json.loads(arguments), PARAMETERS)
    for (name, arguments), ids in zip(results, runs, strict=True):
        assert name in allowed
        assert harmony_call(server, ids) == (name, arguments)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("endpoint", ["chat", "responses"])
def test_call_cut_off_by_the_context_is_incomplete_without_max_output_tokens(
        server: Server, monkeypatch: pytest.MonkeyPatch, endpoint: str, stream: bool) -> None:
    """No max_tokens sent: the context window ends the call. Chat says `length`; Responses
    says incomplete with a null reason (not `max_output_tokens`, which was not sent)."""
    prompt = server.engine.renderer.render_chat(
        [{"role": "user", "content": QUESTION}], tools=chat_tools(FUNCTIONS[:1]),
        options=SystemOptions(current_date=server.engine.current_date))
    room = 24
    monkeypatch.setattr(server.engine, "max_context", len(prompt) + room)
    with generated_ids(monkeypatch) as runs:
        if endpoint == "chat":
            name, arguments, reason = forced_chat(server, "required-one", stream, 1, 0)
            assert reason == "length"
        else:
            name, arguments, r = forced_responses(server, "required-one", stream, 1, 0)
            assert r.status == "incomplete" and r.incomplete_details is not None
            assert r.incomplete_details.reason is None
            assert r.usage.input_tokens == len(prompt) and r.usage.output_tokens == room
    (ids,) = runs
    assert len(ids) == room
    assert name == FUNCTIONS[0] and harmony_call(server, ids) == (name, arguments)


# -- the Responses stream with short outputs -----------------------------------------------------

@pytest.mark.parametrize("max_output_tokens", [1, 12, 60])
def test_short_responses_stream_adds_empty_items(server: Server, max_output_tokens: int) -> None:
    """Random tokens cut short. Before 48 of them the parser still reads a header, which the
    limit cuts: no item. Past it, the tokens become a text item whose first delta already holds
    them all, yet `output_item.added` is the empty in-progress item and the text comes only in
    deltas."""
    items = []
    for seed in range(2):
        events = list(server.client().responses.create(
            model=server.model_id, input="Hi", max_output_tokens=max_output_tokens,
            stream=True, extra_body={"seed": seed}))
        r = check_responses_stream(events)
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
        assert r.usage.output_tokens == max_output_tokens
        assert all(item.status == "incomplete" for item in r.output[-1:])
        items += r.output
    if max_output_tokens > 48:
        assert any(item.type == "message" and item.content[0].text for item in items)


@pytest.mark.parametrize("script,text", [
    ("Hello there.<|return|>", "Hello there."),  # no header: <|return|> makes it the text
    ("<|channel|>final<|message|>Hi<|return|>", "Hi"),
])
def test_items_opened_and_closed_by_one_token_stream_added_empty(server: Server, script: str,
                                                                 text: str) -> None:
    """An item the parser opens, fills and closes on one token still streams as added (empty),
    delta, done."""
    with server.scripted(script):
        r = check_responses_stream(list(server.client().responses.create(
            model=server.model_id, input="Hi", stream=True)))
    assert r.status == "completed" and r.output_text == text


def test_forced_call_cut_at_its_header_streams_an_empty_item(server: Server) -> None:
    """The call's item opens on the header's last token, the last one allowed."""
    header = len(server.tokenizer.encode(
        "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>",
        allow_special=True))
    _, arguments, r = forced_responses(server, "required-one", True, 0, header)
    assert arguments == "" and r.output[-1].status == "incomplete"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("endpoint", ["chat", "responses"])
def test_no_room_for_the_calls_header_returns_no_call(server: Server, endpoint: str,
                                                      stream: bool) -> None:
    """A limit that cuts the forced header (a name such as `get` for `get_weather` on the way)
    returns no call and no header text as content: an empty, cut-off answer."""
    client = server.client()
    for max_tokens in (1, 5, 7, 11):
        if endpoint == "chat":
            kwargs: dict[str, Any] = dict(
                model=server.model_id, messages=[{"role": "user", "content": QUESTION}],
                tools=chat_tools(FUNCTIONS[:1]), tool_choice="required",
                max_completion_tokens=max_tokens)
            if stream:
                chunks = list(client.chat.completions.create(stream=True, **kwargs))
                for c in chunks:
                    ChatCompletionChunk.model_validate(c.to_dict())
                deltas = [c.choices[0].delta for c in chunks]
                assert not any(d.tool_calls or d.content for d in deltas)
                assert chunks[-1].choices[0].finish_reason == "length"
            else:
                raw = client.chat.completions.with_raw_response.create(**kwargs)
                r = ChatCompletion.model_validate(raw.http_response.json())
                message = r.choices[0].message
                assert not message.tool_calls and not message.content
                assert r.choices[0].finish_reason == "length"
        else:
            kwargs = dict(model=server.model_id, input=QUESTION, tool_choice="required",
                          tools=responses_tools(FUNCTIONS[:1]), max_output_tokens=max_tokens)
            if stream:
                r = check_responses_stream(list(client.responses.create(stream=True, **kwargs)))
            else:
                raw = client.responses.with_raw_response.create(**kwargs)
                r = Response.model_validate(raw.http_response.json())
            assert r.output == [] and r.status == "incomplete"
            assert r.incomplete_details.reason == "max_output_tokens"


@pytest.mark.parametrize("endpoint", ["chat", "responses"])
def test_a_finished_forced_call_is_reported_finished(server: Server, endpoint: str) -> None:
    """A model that reasons and then writes a whole call: forcing leaves its tokens alone."""
    script = ("<|channel|>analysis<|message|>Look it up.<|end|><|start|>assistant<|channel|>"
              'commentary to=functions.get_time <|constrain|>json<|message|>{"q": "Paris"}<|call|>')
    with server.scripted(script):
        if endpoint == "chat":
            name, arguments, reason = forced_chat(server, "named", False, 0, 0)
            assert reason == "tool_calls"
        else:
            name, arguments, r = forced_responses(server, "required-several", True, 0, 0)
            assert r.status == "completed" and r.incomplete_details is None
            assert [o.status for o in r.output] == ["completed", "completed"]
    assert (name, arguments) == ("get_time", '{"q": "Paris"}')
