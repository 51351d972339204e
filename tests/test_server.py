"""The OpenAI-compatible server on the tiny model, driven over loopback HTTP.

A real uvicorn server runs in a thread on 127.0.0.1; the official `openai` client is the oracle
for the wire format (its types validate every body and stream event), openai-harmony is the
oracle for the prompts the server renders. Random weights never call a tool by themselves, so
tool-call paths run with `ScriptedModel`, which forces the tokens a test writes out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import openai
import openai_harmony as oh
import pytest
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter
from serving import HOST, running

from gptoss_mlx.chat.tokenizer import Tokenizer
from gptoss_mlx.generate import common_prefix
from gptoss_mlx.server import transport
from gptoss_mlx.server.app import create_app, default_model_id
from gptoss_mlx.server.engine import Engine

API_KEY = "test-key"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
REASONING = "The user wants the weather. I should call the tool."
ANALYSIS = f"<|channel|>analysis<|message|>{REASONING}<|end|>"
CALL = (
    "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
    '<|message|>{"city": "Paris"}<|call|>'
)
FINAL = "<|channel|>final<|message|>It is sunny in Paris, 21 degrees.<|return|>"


class ScriptedModel:
    """Test-only stand-in: the real model (so caches and prefill are real), but after a prompt
    ending in `<|start|>assistant` the logits force the next script's tokens one by one (a call
    that does not feed back the token just forced starts a new request).

    Also records the number of tokens fed in each call, and can shrink the context window.
    """

    def __init__(self, model: Any, assistant_token: int, context: int | None,
                 fail_after: int | None = None):
        self.model = model
        self.fail_after = fail_after  # raise on this call, as a broken model would
        self.assistant_token = assistant_token
        self.config = dataclasses.replace(
            model.config, max_position_embeddings=context or model.config.max_position_embeddings)
        self.scripts: list[list[int]] = []
        self.active: list[int] = []  # what is left of the script being forced
        self.forced: int | None = None  # the token forced last (fed back on the next call)
        self.fed: list[int] = []

    def make_cache(self) -> list[Any]:
        return self.model.make_cache()

    def __call__(self, tokens: mx.array, cache: Any = None, last_only: bool = False) -> mx.array:
        if self.fail_after is not None and len(self.fed) >= self.fail_after:
            raise RuntimeError("the model broke")
        logits = self.model(tokens, cache=cache, last_only=last_only)
        self.fed.append(tokens.shape[1])
        ids = tokens[0].tolist()
        if ids != [self.forced]:  # not fed back what was forced: a new request's prefill
            starts = ids[-1] == self.assistant_token and self.scripts
            self.active = self.scripts.pop(0) if starts else []
        self.forced = self.active.pop(0) if self.active else None
        if self.forced is not None:
            token = self.forced
            vocab = mx.arange(logits.shape[-1])
            forced = mx.where(vocab == token, 0.0, -mx.inf).astype(logits.dtype)
            logits = mx.concatenate([logits[:, :-1, :], forced[None, None, :]], axis=1)
        return logits


@dataclasses.dataclass
class Server:
    port: int
    engine: Engine
    tokenizer: Tokenizer
    base_model: Any
    model_id: str

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    def client(self, **kwargs: Any) -> openai.OpenAI:
        kwargs.setdefault("api_key", API_KEY)
        return openai.OpenAI(base_url=self.base_url, max_retries=0, timeout=120, **kwargs)

    @contextlib.contextmanager
    def scripted(self, *scripts: str, context: int | None = 2048,
                 fail_after: int | None = None) -> Iterator[ScriptedModel]:
        """Serve through a ScriptedModel forcing `scripts` (harmony text) on the next requests.

        The small default context bounds a generation a script failed to end; None keeps the
        model's.
        """
        assistant = self.engine.renderer.assistant_start()[-1]
        model = ScriptedModel(self.base_model, assistant, context, fail_after)
        model.scripts = [self.tokenizer.encode(s, allow_special=True) for s in scripts]
        self.engine.model = model
        try:
            yield model
        finally:
            self.engine.model = self.base_model

    @contextlib.contextmanager
    def recording_prompts(self) -> Iterator[list[list[int]]]:
        """Collect the prompt ids of the requests made meanwhile."""
        prompts: list[list[int]] = []
        submit = self.engine.submit

        def record(prompt: Any, **kwargs: Any) -> Any:
            prompts.append(list(prompt))
            return submit(prompt, **kwargs)

        self.engine.submit = record  # type: ignore[method-assign]
        try:
            yield prompts
        finally:
            del self.engine.submit

    def raw(self, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        """One plain HTTP request; returns (status, JSON body)."""
        conn = http.client.HTTPConnection(HOST, self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers={
                "Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json",
                **(headers or {})})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()


@contextlib.contextmanager
def run_server(tiny_model_dir: Path) -> Iterator[Server]:
    """The server on the tiny model, in a thread on a free loopback port."""
    from gptoss_mlx import load

    model, tokenizer = load(tiny_model_dir)
    engine = Engine(model, tokenizer, current_date="2025-08-05")
    model_id = default_model_id(tiny_model_dir, model.config.num_hidden_layers)
    app = create_app(engine, model_id, api_key=API_KEY)
    with running(app) as port:
        yield Server(port, engine, tokenizer, model, model_id)


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[Server]:
    with run_server(tiny_model_dir) as running:
        yield running


# -- oracle: openai-harmony renders the conversation the server should have rendered ---------

def harmony_prompt(server: Server, messages: list[oh.Message], tools: bool,
                   effort: str = "medium") -> list[int]:
    system = (oh.SystemContent.new()
              .with_reasoning_effort(oh.ReasoningEffort(effort.capitalize()))
              .with_conversation_start_date(server.engine.current_date))
    head = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]
    if tools:
        fn = WEATHER_TOOL["function"]
        developer = oh.DeveloperContent.new().with_function_tools(
            [oh.ToolDescription.new(fn["name"], fn["description"], parameters=fn["parameters"])])
        head.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, developer))
    convo = oh.Conversation.from_messages(head + messages)
    return list(server.tokenizer.harmony.render_conversation_for_completion(
        convo, oh.Role.ASSISTANT))


def weather_turns(reasoning: bool) -> list[oh.Message]:
    """User question, (reasoning), the tool call and its result, as harmony messages."""
    out = [oh.Message.from_role_and_content(oh.Role.USER, "Weather in Paris?")]
    if reasoning:
        out.append(oh.Message.from_role_and_content(
            oh.Role.ASSISTANT, REASONING)
            .with_channel("analysis"))
    out.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, '{"city": "Paris"}')
               .with_channel("commentary").with_recipient("functions.get_weather")
               .with_content_type("<|constrain|>json"))
    out.append(oh.Message.from_author_and_content(
        oh.Author.new(oh.Role.TOOL, "functions.get_weather"), '{"temp_c": 21}')
        .with_channel("commentary").with_recipient("assistant"))
    return out


# -- models and health ---------------------------------------------------------------------------

def test_models_and_health(server: Server) -> None:
    models = server.client().models.list()
    assert [m.id for m in models.data] == [server.model_id]
    assert "gpt-oss" in server.model_id
    assert server.client().models.retrieve(server.model_id).id == server.model_id
    conn = http.client.HTTPConnection(HOST, server.port, timeout=10)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200


def test_default_model_id() -> None:
    assert default_model_id("/models/gpt-oss-20b") == "gpt-oss-20b"
    assert default_model_id("/models/converted", 24) == "gpt-oss-20b"
    assert default_model_id("/models/converted", 36) == "gpt-oss-120b"
    assert default_model_id("/models/tiny", 4) == "gpt-oss-tiny"


# -- chat completions -----------------------------------------------------------------------------

def test_chat_completion_with_reasoning_and_usage(server: Server) -> None:
    script = ANALYSIS + "<|start|>assistant" + FINAL
    with server.scripted(script):
        r = server.client().chat.completions.create(
            model=server.model_id, messages=[{"role": "user", "content": "Weather in Paris?"}])
    msg = r.choices[0].message
    assert msg.content == "It is sunny in Paris, 21 degrees."
    reasoning = REASONING
    assert msg.model_extra["reasoning"] == msg.model_extra["reasoning_content"] == reasoning
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len(server.tokenizer.encode(script, allow_special=True))
    # the analysis message from <|message|> through <|end|>
    assert r.usage.completion_tokens_details.reasoning_tokens == len(
        server.tokenizer.encode(reasoning)) + 2
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_deltas_and_usage(server: Server) -> None:
    script = ANALYSIS + "<|start|>assistant" + FINAL
    with server.scripted(script):
        chunks = list(server.client().chat.completions.create(
            model=server.model_id, messages=[{"role": "user", "content": "Weather in Paris?"}],
            stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    content = "".join(d.content or "" for d in deltas)
    reasoning = "".join((d.model_extra or {}).get("reasoning_content", "") for d in deltas)
    assert content == "It is sunny in Paris, 21 degrees."
    assert reasoning == REASONING
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert deltas[0].role == "assistant"
    assert len({c.id for c in chunks}) == 1
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.completion_tokens == len(server.tokenizer.encode(script, allow_special=True))


def test_chat_random_weights_respect_max_tokens(server: Server) -> None:
    client = server.client()
    r = client.chat.completions.create(model=server.model_id, max_completion_tokens=6, seed=3,
                                       messages=[{"role": "user", "content": "Hi"}])
    assert r.usage.completion_tokens <= 6
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 6
    for text in (r.choices[0].message.content or "", r.choices[0].message.model_extra["reasoning"]
                 or ""):
        assert "<|" not in text


def test_chat_tool_call_round_trip(server: Server) -> None:
    client = server.client()
    question = [{"role": "user", "content": "Weather in Paris?"}]
    with server.scripted(ANALYSIS + CALL, "<|channel|>final<|message|>Sunny, 21 C.<|return|>"), \
            server.recording_prompts() as prompts:
        chunks = list(client.chat.completions.create(
            model=server.model_id, messages=question, tools=[WEATHER_TOOL], stream=True))
        calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
        assert calls, "no tool call was streamed"
        call_id = calls[0].id
        assert call_id and all(tc.id == call_id and tc.index == 0 for tc in calls)
        assert calls[0].function.name == "get_weather"
        arguments = "".join(tc.function.arguments or "" for tc in calls)
        assert json.loads(arguments) == {"city": "Paris"}
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning", "")
                            for c in chunks)

        history = question + [
            {"role": "assistant", "content": None, "reasoning": reasoning,
             "tool_calls": [{"id": call_id, "type": "function",
                             "function": {"name": "get_weather", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": call_id, "content": '{"temp_c": 21}'},
        ]
        r = client.chat.completions.create(model=server.model_id, messages=history,
                                           tools=[WEATHER_TOOL])
    assert r.choices[0].message.content == "Sunny, 21 C."
    assert r.choices[0].finish_reason == "stop"
    # reasoning of the open tool chain is kept, the result goes back as functions.get_weather
    assert prompts[1] == harmony_prompt(server, weather_turns(reasoning=True), tools=True)
    assert r.usage.prompt_tokens_details.cached_tokens >= len(prompts[0]) - 1


def test_chat_non_stream_tool_call(server: Server) -> None:
    with server.scripted(CALL.removeprefix("<|start|>assistant")):
        r = server.client().chat.completions.create(
            model=server.model_id, tools=[WEATHER_TOOL], tool_choice="auto",
            messages=[{"role": "user", "content": "Weather in Paris?"}])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_reasoning_effort_from_each_field(server: Server) -> None:
    client = server.client()
    messages = [{"role": "user", "content": "Hi"}]
    expected = harmony_prompt(
        server, [oh.Message.from_role_and_content(oh.Role.USER, "Hi")], tools=False,
        effort="high")
    with server.recording_prompts() as prompts:
        client.chat.completions.create(model=server.model_id, messages=messages, max_tokens=1,
                                       reasoning_effort="high")
        client.chat.completions.create(model=server.model_id, messages=messages, max_tokens=1,
                                       extra_body={"reasoning": {"effort": "high"}})
        client.chat.completions.create(
            model=server.model_id, messages=messages, max_tokens=1,
            extra_body={"chat_template_kwargs": {"reasoning_effort": "high"}})
    assert prompts == [expected] * 3


def test_past_reasoning_is_dropped_after_a_final_answer(server: Server) -> None:
    history = [
        {"role": "developer", "content": "Answer in one line."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "reasoning_content": "Greet back."},
        {"role": "user", "content": "Bye"},
    ]
    with server.recording_prompts() as prompts:
        server.client().chat.completions.create(model=server.model_id, messages=history,
                                                max_tokens=1)
    system = (oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort.MEDIUM)
              .with_conversation_start_date(server.engine.current_date))
    convo = oh.Conversation.from_messages([
        oh.Message.from_role_and_content(oh.Role.SYSTEM, system),
        oh.Message.from_role_and_content(
            oh.Role.DEVELOPER, oh.DeveloperContent.new().with_instructions("Answer in one line.")),
        oh.Message.from_role_and_content(oh.Role.USER, "Hi"),
        oh.Message.from_role_and_content(oh.Role.ASSISTANT, "Hello!").with_channel("final"),
        oh.Message.from_role_and_content(oh.Role.USER, "Bye"),
    ])
    expected = server.tokenizer.harmony.render_conversation_for_completion(convo, oh.Role.ASSISTANT)
    assert prompts == [list(expected)]


def test_stop_strings(server: Server) -> None:
    script = "<|channel|>final<|message|>Hello there. Goodbye now.<|return|>"
    with server.scripted(script, script):
        client = server.client()
        kwargs: dict[str, Any] = dict(model=server.model_id, stop=[". Good"],
                                      messages=[{"role": "user", "content": "Hi"}])
        r = client.chat.completions.create(**kwargs)
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert r.choices[0].message.content == "Hello there"
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == "Hello there"
    assert chunks[-1].choices[0].finish_reason == "stop"


# -- Responses API ----------------------------------------------------------------------------

EVENT = TypeAdapter(ResponseStreamEvent)


def test_responses_stream_event_order(server: Server) -> None:
    script = ANALYSIS + "<|start|>assistant" + FINAL
    with server.scripted(script):
        events = list(server.client().responses.create(
            model=server.model_id, input="Weather in Paris?", instructions="Be brief.",
            stream=True))
    for e in events:  # every event validates against the official types, not just parses
        EVENT.validate_python(e.to_dict())
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    squeezed = [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]]
    assert squeezed == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.reasoning_text.delta", "response.reasoning_text.done",
        "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done",
        "response.completed",
    ]
    done = events[-1].response
    assert done.status == "completed"
    reasoning, message = done.output
    assert reasoning.type == "reasoning"
    assert reasoning.content[0].text == REASONING
    assert message.type == "message" and done.output_text == "It is sunny in Paris, 21 degrees."
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == \
        done.output_text
    assert {e.item_id for e in events if e.type == "response.output_text.delta"} == {message.id}
    usage = done.usage
    assert usage.output_tokens == len(server.tokenizer.encode(script, allow_special=True))
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens_details.reasoning_tokens > 0


def test_responses_function_call_round_trip(server: Server) -> None:
    client = server.client()
    tools = [{"type": "function", **WEATHER_TOOL["function"]},
             {"type": "web_search"}]  # not a function: ignored, not rejected
    with server.scripted(ANALYSIS + CALL, "<|channel|>final<|message|>Sunny.<|return|>"), \
            server.recording_prompts() as prompts:
        events = list(client.responses.create(model=server.model_id, input="Weather in Paris?",
                                              tools=tools, stream=True))
        for e in events:
            EVENT.validate_python(e.to_dict())
        first = events[-1].response
        call = first.output[-1]
        assert call.type == "function_call" and call.name == "get_weather"
        assert json.loads(call.arguments) == {"city": "Paris"}
        args = "".join(e.delta for e in events
                       if e.type == "response.function_call_arguments.delta")
        assert args == call.arguments
        second = client.responses.create(
            model=server.model_id, tools=tools,
            input=[{"role": "user", "content": "Weather in Paris?"},
                   *[item.to_dict() for item in first.output],
                   {"type": "function_call_output", "call_id": call.call_id,
                    "output": '{"temp_c": 21}'}])
    assert second.status == "completed" and second.output_text == "Sunny."
    assert prompts[1] == harmony_prompt(server, weather_turns(reasoning=True), tools=True)
    assert second.usage.input_tokens_details.cached_tokens >= len(prompts[0]) - 1


def test_responses_incomplete_at_max_output_tokens(server: Server) -> None:
    with server.scripted(FINAL):
        r = server.client().responses.create(model=server.model_id, input="Hi",
                                             max_output_tokens=5)
    assert r.status == "incomplete"
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 5
    assert r.output[-1].status == "incomplete"


# -- prompt cache -----------------------------------------------------------------------------

def test_prompt_cache_reuses_the_shared_prefix(server: Server) -> None:
    client = server.client()
    system = " ".join(f"Rule {i}: keep answers short and precise." for i in range(60))
    first = [{"role": "system", "content": system}, {"role": "user", "content": "First question"}]
    second = [{"role": "system", "content": system}, {"role": "user", "content": "Other one"}]
    with server.recording_prompts() as prompts, server.scripted() as model:
        client.chat.completions.create(model=server.model_id, messages=first, max_tokens=3)
        model.fed.clear()
        r = client.chat.completions.create(model=server.model_id, messages=second, max_tokens=3)
    shared = common_prefix(prompts[0], prompts[1])
    assert shared > 500  # the system message is long
    assert r.usage.prompt_tokens == len(prompts[1])
    assert r.usage.prompt_tokens_details.cached_tokens == shared
    assert model.fed[0] == len(prompts[1]) - shared  # prefill fed only the new tokens


# -- queueing, concurrency, disconnects ---------------------------------------------------------

def test_four_concurrent_streams_complete(server: Server) -> None:
    results: dict[int, tuple[str | None, int]] = {}

    def run(i: int) -> None:
        stream = server.client().chat.completions.create(
            model=server.model_id, messages=[{"role": "user", "content": f"Client {i}"}],
            max_tokens=8, stream=True, stream_options={"include_usage": True}, seed=i)
        chunks = list(stream)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        results[i] = (finish, chunks[-1].usage.completion_tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == [0, 1, 2, 3]
    for finish, tokens in results.values():
        assert finish in ("stop", "length", "tool_calls") and 0 < tokens <= 8


def test_concurrent_generations_take_turns(server: Server) -> None:
    """Two streams run at once (one per cache slot): each starts before the other ends."""
    times: dict[int, list[float]] = {}
    clients = [server.client() for _ in range(2)]
    barrier = threading.Barrier(2)

    def run(i: int) -> None:
        barrier.wait()
        stream = clients[i].chat.completions.create(
            model=server.model_id, messages=[{"role": "user", "content": f"Story {i}"}],
            max_tokens=150, stream=True, seed=i)
        arrivals = [time.monotonic() for _ in stream]
        times[i] = [arrivals[1], arrivals[-1]]  # after the role chunk: first token, last chunk

    assert server.engine.caches.size >= 2
    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    (first_a, end_a), (first_b, end_b) = times[0], times[1]
    assert first_a < end_b and first_b < end_a


def _open(server: Server, body: dict[str, Any], path: str = "/v1/chat/completions",
          until: bytes = b"data:") -> tuple[socket.socket, bytes]:
    """Send a request on a raw socket and read until `until` arrives (b"" reads nothing)."""
    sock = socket.create_connection((HOST, server.port), timeout=30)
    data = json.dumps(body).encode()
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    received = b""
    while until not in received:
        chunk = sock.recv(4096)
        assert chunk, f"the server closed the connection before sending {until!r}"
        received += chunk
    return sock, received


def _kill(sock: socket.socket) -> None:
    """Close abruptly (RST), as a killed client does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def _wait_until_idle(model: ScriptedModel) -> int:
    """Wait until the worker stops feeding the model; return how many calls it made."""
    deadline = time.monotonic() + 30
    while True:
        before = len(model.fed)
        time.sleep(0.6)
        if len(model.fed) == before:
            return before
        assert time.monotonic() < deadline, "generation went on after the client left"


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_client_killed_mid_generation_cancels_it(server: Server, stream: bool) -> None:
    with server.scripted(context=None) as model:
        sock, _ = _open(server, {"messages": [{"role": "user", "content": "Go on forever"}],
                                 "stream": stream, "max_tokens": 100000},
                        until=b"data:" if stream else b"")
        deadline = time.monotonic() + 30  # the role chunk goes out before the worker starts
        while not model.fed:
            assert time.monotonic() < deadline, "the generation never started"
            time.sleep(0.01)
        _kill(sock)
        calls = _wait_until_idle(model)
        assert 0 < calls < 1000  # the request allowed 100000 tokens
        r = server.client().chat.completions.create(
            model=server.model_id, messages=[{"role": "user", "content": "Still there?"}],
            max_tokens=2)
    assert r.usage.completion_tokens <= 2


def test_queued_stream_gets_keepalives(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "KEEPALIVE_SECONDS", 0.05)
    long = {"messages": [{"role": "user", "content": "Go on forever"}], "stream": True,
            "max_tokens": 100000}
    short = {"messages": [{"role": "user", "content": "Short"}], "stream": True, "max_tokens": 2}
    with server.scripted(context=None) as model:
        busy = [_open(server, long)[0] for _ in range(server.engine.caches.size)]
        # it waits for its first token behind the others' turns
        waiting, head = _open(server, short, until=b": keep-alive")
        assert b"data: [DONE]" not in head
        _kill(busy.pop())
        waiting.settimeout(30)
        tail = b""
        while b"data: [DONE]" not in head + tail:
            chunk = waiting.recv(4096)
            assert chunk, "the queued stream never finished"
            tail += chunk
        waiting.close()
        for sock in busy:
            _kill(sock)
        _wait_until_idle(model)


# -- failures during generation ------------------------------------------------------------

def test_model_failure_is_reported_and_the_server_recovers(server: Server) -> None:
    client = server.client()
    messages = [{"role": "user", "content": "Hi"}]
    with server.scripted(fail_after=3):
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model=server.model_id, messages=messages)
        assert info.value.code == "server_error" and "the model broke" in info.value.message
    with server.scripted(fail_after=3):
        with pytest.raises(openai.APIError, match="the model broke"):
            list(client.chat.completions.create(model=server.model_id, messages=messages,
                                                stream=True))
    with server.scripted(fail_after=3):
        events = list(client.responses.create(model=server.model_id, input="Hi", stream=True))
    for e in events:
        EVENT.validate_python(e.to_dict())
    assert events[-1].type == "response.failed"
    assert events[-1].response.status == "failed"
    assert "the model broke" in events[-1].response.error.message
    r = client.chat.completions.create(model=server.model_id, messages=messages, max_tokens=2)
    assert 0 < r.usage.completion_tokens <= 2


# -- bad requests --------------------------------------------------------------------------

def _error(status: int, body: dict[str, Any], code: str | None = None,
           param: str | None = None) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    if param is not None:
        assert body["error"]["param"] == param


def test_malformed_json_is_a_400(server: Server) -> None:
    status, body = server.raw("POST", "/v1/chat/completions", b'{"messages": [')
    assert status == 400
    _error(status, body, code="invalid_json")
    status, body = server.raw("POST", "/v1/responses", b"not json")
    assert status == 400
    _error(status, body, code="invalid_json")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
        ({"messages": [{"role": "user", "content": "hi"}], "reasoning_effort": "max"},
         "reasoning_effort"),
        ({"messages": [{"role": "tool", "content": "1", "tool_call_id": "nope"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}],
          "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
        ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
         "tools[0]"),
        ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"},
         "tool_choice"),
    ],
)
def test_bad_chat_fields_are_400s(server: Server, body: dict[str, Any], param: str) -> None:
    status, data = server.raw("POST", "/v1/chat/completions", json.dumps(body).encode())
    assert status == 400
    _error(status, data, param=param)


def test_client_sees_openai_errors(server: Server) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        server.client().chat.completions.create(
            model=server.model_id, messages=[{"role": "user", "content": "hi"}], top_p=7)
    assert info.value.status_code == 400
    assert info.value.param == "top_p" and info.value.code == "invalid_value"
    assert info.value.type == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": 3}, "input"),
        ({"input": [{"type": "function_call_output", "call_id": "zz", "output": "1"}]},
         "input[0].call_id"),
        ({"input": [{"type": "input_image", "image_url": "x"}]}, "input[0].type"),
        ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
    ],
)
def test_bad_responses_fields_are_400s(server: Server, body: dict[str, Any], param: str) -> None:
    status, data = server.raw("POST", "/v1/responses", json.dumps(body).encode())
    assert status == 400
    _error(status, data, param=param)


def test_context_length_exceeded(server: Server) -> None:
    with server.scripted(context=256):
        with pytest.raises(openai.BadRequestError) as info:
            server.client().chat.completions.create(
                model=server.model_id, messages=[{"role": "user", "content": "word " * 300}])
        status, body = server.raw("POST", "/v1/responses",
                                  json.dumps({"input": "word " * 300}).encode())
    assert info.value.code == "context_length_exceeded"
    assert status == 400
    _error(status, body, code="context_length_exceeded", param="input")


def test_max_context_limits_the_prompt(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve --max-context N` refuses prompts that the model's own context would take."""
    prompt = [{"role": "user", "content": "word " * 300}]
    monkeypatch.setattr(server.engine, "max_context", 200)
    with pytest.raises(openai.BadRequestError) as info:
        server.client().chat.completions.create(model=server.model_id, messages=prompt)
    assert info.value.code == "context_length_exceeded"
    assert "200" in info.value.message
    monkeypatch.setattr(server.engine, "max_context", None)
    reply = server.client().chat.completions.create(model=server.model_id, messages=prompt,
                                                    max_tokens=2)
    assert reply.usage.prompt_tokens > 300


def test_api_key_is_required(server: Server) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        server.client(api_key="wrong").models.list()
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    status, body = server.raw("POST", "/v1/chat/completions",
                              json.dumps({"messages": []}).encode(),
                              headers={"Authorization": ""})
    assert status == 401
    _error(status, body, code="invalid_api_key")


def test_unknown_path_is_an_openai_404(server: Server) -> None:
    status, body = server.raw("GET", "/v1/nothing-here")
    assert status == 404
    _error(status, body)
