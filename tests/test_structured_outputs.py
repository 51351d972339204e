"""Structured outputs and strict tool calls on the random tiny model, over loopback HTTP.

Random weights never write JSON (nor end their reasoning) by themselves, so every answer that
parses here was made to by the constraint. The oracles: `jsonschema` validates each answer and
each call's arguments against the request's schema, the official client's types validate every
body and stream event (`LoopbackServer.check`), and its `parse` helpers turn answers into
Pydantic objects.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Literal

import jsonschema
import openai
import pytest
from loopback import LoopbackServer, served
from pydantic import BaseModel, Field

SCHEMA = {  # nested object, array, enum, required fields, numbers, a string with a pattern
    "type": "object",
    "properties": {
        "city": {"type": "string", "pattern": "^[A-Z][a-z]{1,5}$"},
        "temp": {"type": "number", "minimum": -40, "maximum": 50, "multipleOf": 0.5},
        "days": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 7},
                 "minItems": 1, "maxItems": 2},
        "wind": {"type": "object", "properties": {
            "kmh": {"type": "integer", "minimum": 0, "maximum": 99},
            "dir": {"enum": ["N", "S"]}},
            "required": ["kmh", "dir"], "additionalProperties": False},
    },
    "required": ["city", "temp", "days", "wind"],
    "additionalProperties": False,
}
PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "pattern": "^[A-Z][a-z]{1,5}$"},
                   "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
# Reasoning gets at most half of it; the answer (at most ~32 tokens here) the rest.
MAX_TOKENS = 80
RESPONSES = 50  # per endpoint and mode
QUESTION = "What is the weather in Paris?"


class Wind(BaseModel):
    kmh: int = Field(ge=0, le=99)
    dir: Literal["N", "S"]


class Weather(BaseModel):
    city: str = Field(pattern="^[A-Z][a-z]{1,5}$")
    temp: float = Field(ge=-40, le=50, multiple_of=0.5)
    days: list[Annotated[int, Field(ge=1, le=7)]] = Field(min_length=1, max_length=2)
    wind: Wind


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[LoopbackServer]:
    from gptoss_mlx import load

    model, tokenizer = load(tiny_model_dir)
    with served(model, tokenizer) as running:
        yield running


def chat_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "weather", "schema": schema,
                                                   "strict": True}}


def responses_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"format": {"type": "json_schema", "name": "weather", "schema": schema,
                       "strict": True}}


def chat_answer(server: LoopbackServer, stream: bool, seed: int, max_tokens: int,
                **kwargs: Any) -> tuple[str, str]:
    """(content, finish_reason) of one chat completion."""
    client = server.client()
    kwargs = dict(model=server.model_id, messages=[{"role": "user", "content": QUESTION}],
                  seed=seed, max_completion_tokens=max_tokens, **kwargs)
    if not stream:
        (choice,) = client.chat.completions.create(**kwargs).choices
        return choice.message.content or "", choice.finish_reason
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return content, chunks[-1].choices[0].finish_reason


def responses_answer(server: LoopbackServer, stream: bool, seed: int, max_tokens: int,
                     **kwargs: Any) -> tuple[str, Any]:
    """(output text, Response) of one Responses request."""
    client = server.client()
    kwargs = dict(model=server.model_id, input=QUESTION, max_output_tokens=max_tokens,
                  extra_body={"seed": seed}, **kwargs)
    if stream:
        r = list(client.responses.create(stream=True, **kwargs))[-1].response
    else:
        r = client.responses.create(**kwargs)
    return r.output_text, r


def run_all(fn: Any, n: int) -> list[Any]:
    """`fn(seed)` for `n` seeds, several requests in flight (the engine takes turns)."""
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(fn, range(n)))


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("endpoint", ["chat", "responses"])
def test_every_answer_parses_and_validates(server: LoopbackServer, endpoint: str,
                                           stream: bool) -> None:
    if endpoint == "chat":
        results = run_all(lambda seed: chat_answer(
            server, stream, seed, MAX_TOKENS, response_format=chat_format(SCHEMA)), RESPONSES)
        assert [reason for _, reason in results] == ["stop"] * RESPONSES
    else:
        results = run_all(lambda seed: responses_answer(
            server, stream, seed, MAX_TOKENS, text=responses_format(SCHEMA)), RESPONSES)
        assert [r.status for _, r in results] == ["completed"] * RESPONSES
    for text, _ in results:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert server.check() >= RESPONSES


@pytest.mark.parametrize("endpoint", ["chat", "responses"])
def test_json_object_mode_answers_an_object(server: LoopbackServer, endpoint: str) -> None:
    """Any JSON object; random weights write them without end, so the limit cuts most: what
    finishes is an object."""
    for seed in range(3):
        if endpoint == "chat":
            text, reason = chat_answer(server, False, seed, 40,
                                       response_format={"type": "json_object"})
            done = reason == "stop"
        else:
            text, r = responses_answer(server, False, seed, 40,
                                       text={"format": {"type": "json_object"}})
            done = r.status == "completed"
        assert text.startswith("{")
        if done:
            assert isinstance(json.loads(text), dict)
    server.check()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("endpoint", ["chat", "responses"])
def test_strict_tool_call_arguments_validate(server: LoopbackServer, endpoint: str,
                                             stream: bool) -> None:
    tool = {"name": "get_weather", "description": "Weather in a city.",
            "parameters": PARAMETERS, "strict": True}
    if endpoint == "chat":
        def call(seed: int) -> tuple[str, str]:
            client = server.client()
            kwargs = dict(model=server.model_id, seed=seed, max_completion_tokens=MAX_TOKENS,
                          messages=[{"role": "user", "content": QUESTION}],
                          tools=[{"type": "function", "function": tool}],
                          tool_choice="required")
            if not stream:
                (choice,) = client.chat.completions.create(**kwargs).choices
                (tc,) = choice.message.tool_calls
                return tc.function.name, tc.function.arguments, choice.finish_reason
            chunks = list(client.chat.completions.create(stream=True, **kwargs))
            calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
            args = "".join(tc.function.arguments or "" for tc in calls if tc.function)
            return calls[0].function.name, args, chunks[-1].choices[0].finish_reason
    else:
        def call(seed: int) -> tuple[str, str]:
            _, r = responses_answer(server, stream, seed, MAX_TOKENS,
                                    tools=[{"type": "function", **tool}], tool_choice="required")
            (fc,) = [o for o in r.output if o.type == "function_call"]
            return fc.name, fc.arguments, "tool_calls" if r.status == "completed" else r.status
    results = run_all(call, 10)
    for name, arguments, reason in results:
        assert (name, reason) == ("get_weather", "tool_calls")
        jsonschema.validate(json.loads(arguments), PARAMETERS)
    server.check()


def test_pydantic_models_parse_through_the_official_client(server: LoopbackServer) -> None:
    client = server.client()
    chat = client.chat.completions.parse(
        model=server.model_id, messages=[{"role": "user", "content": QUESTION}],
        response_format=Weather, max_completion_tokens=MAX_TOKENS, seed=1)
    assert isinstance(chat.choices[0].message.parsed, Weather)
    response = client.responses.parse(model=server.model_id, input=QUESTION, text_format=Weather,
                                      max_output_tokens=MAX_TOKENS, extra_body={"seed": 2})
    assert isinstance(response.output_parsed, Weather)
    server.check()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("endpoint", ["chat", "responses"])
def test_json_cut_by_the_limit_is_length_never_complete(server: LoopbackServer, endpoint: str,
                                                        stream: bool) -> None:
    """No room to reason: the answer opens at once and the limit cuts it mid-JSON."""
    if endpoint == "chat":
        text, reason = chat_answer(server, stream, 0, 12, response_format=chat_format(SCHEMA))
        assert reason == "length"
    else:
        text, r = responses_answer(server, stream, 0, 12, text=responses_format(SCHEMA))
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
        assert [o.status for o in r.output] == ["incomplete"]
    assert text.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    server.check()


def test_the_official_parse_refuses_a_cut_answer(server: LoopbackServer) -> None:
    with pytest.raises(openai.LengthFinishReasonError):
        server.client().chat.completions.parse(
            model=server.model_id, messages=[{"role": "user", "content": QUESTION}],
            response_format=Weather, max_completion_tokens=12)


@pytest.mark.parametrize("schema,feature", [
    ({"type": "object", "not": {"required": ["a"]}}, "not"),
    ({"type": "string", "pattern": "(?<=a)b"}, "look-around"),
    ({"type": "integer", "minimum": 5, "maximum": 2}, "minimum (5) is greater than maximum (2)"),
    ({"type": "string", "format": "no-such-format"}, "no-such-format"),
])
@pytest.mark.parametrize("where", ["chat", "responses", "strict tool"])
def test_a_schema_that_cannot_be_enforced_is_a_400_naming_it(
        server: LoopbackServer, where: str, schema: dict[str, Any], feature: str) -> None:
    client = server.client()
    with pytest.raises(openai.BadRequestError) as caught:
        if where == "chat":
            client.chat.completions.create(
                model=server.model_id, messages=[{"role": "user", "content": QUESTION}],
                response_format=chat_format(schema))
        elif where == "responses":
            client.responses.create(model=server.model_id, input=QUESTION,
                                    text=responses_format(schema))
        else:
            client.responses.create(model=server.model_id, input=QUESTION, tools=[{
                "type": "function", "name": "f", "parameters": schema, "strict": True}])
    error = caught.value.body
    assert feature in error["message"], error
    assert error["param"] == {"chat": "response_format.json_schema.schema",
                              "responses": "text.format.schema",
                              "strict tool": "tools[0].parameters"}[where]


@pytest.mark.parametrize("strict_tools", [True, False], ids=["default", "no-strict-tools"])
def test_tools_are_strict_by_default_and_no_strict_tools_frees_them(
        server: LoopbackServer, strict_tools: bool) -> None:
    """A tool that does not say `strict`: its arguments start as a JSON object by default; with
    `serve --no-strict-tools` they are the random model's free text (it never writes JSON)."""
    app = server.capture.app
    app.state.strict_tools = strict_tools
    try:
        for seed in range(3):
            (choice,) = server.client().chat.completions.create(
                model=server.model_id, messages=[{"role": "user", "content": QUESTION}],
                tools=[{"type": "function", "function": {"name": "get_weather",
                                                         "parameters": PARAMETERS}}],
                tool_choice="required", seed=seed, max_completion_tokens=MAX_TOKENS).choices
            (call,) = choice.message.tool_calls
            if strict_tools:
                assert choice.finish_reason == "tool_calls"
                jsonschema.validate(json.loads(call.function.arguments), PARAMETERS)
            else:
                assert not call.function.arguments.startswith("{")
    finally:
        app.state.strict_tools = True
    server.check()
