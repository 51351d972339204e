"""The server under load and hostile input (issue 12), over loopback with the tiny model.

Oracles: the official `openai` client's error classes and types, OpenAI's error body shape, the
HTTP status codes the OpenAPI description documents, and schemathesis (a schema-driven fuzzer)
for everything the description allows or forbids.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import jsonschema
import mlx.core as mx
import openai
import pytest
import schemathesis
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance
from serving import HOST, kill, open_stream, post_raw, read_response, request_head, running

from gptoss_mlx.server.app import create_app, default_model_id
from gptoss_mlx.server.engine import Engine

API_KEY = "fault-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
BODY_LIMIT = 2**20
HI = [{"role": "user", "content": "Hi"}]


class NoStop:
    """The model with its stop tokens masked out: a generation runs until its limit (one
    without max_tokens, until its client leaves)."""

    def __init__(self, model: Any, stops: frozenset[int]):
        self.model = model
        self.config = model.config
        mask = [0.0] * model.config.vocab_size
        for token in stops:
            mask[token] = -float("inf")
        self.mask = mx.array(mask)

    def make_cache(self) -> list[Any]:
        return self.model.make_cache()

    def __call__(self, tokens: mx.array, cache: Any = None, last_only: bool = False) -> mx.array:
        logits = self.model(tokens, cache=cache, last_only=last_only)
        return logits + self.mask.astype(logits.dtype)


@dataclasses.dataclass
class Served:
    port: int
    engine: Engine
    model_id: str
    app: Any

    def client(self, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://{HOST}:{self.port}/v1", api_key=API_KEY,
                             max_retries=0, timeout=60, **kwargs)

    def wait_idle(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.engine.admission.active or self.engine.admission.waiting:
            assert time.monotonic() < deadline, "generations went on after their clients left"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path) -> Iterator[Served]:
    from gptoss_mlx import load

    model, tokenizer = load(tiny_model_dir)
    engine = Engine(model, tokenizer, cache_slots=2, max_batch=8, max_queue=4,
                    queue_timeout=10, current_date="2025-08-05")
    model_id = default_model_id(tiny_model_dir, model.config.num_hidden_layers)
    app = create_app(engine, model_id, api_key=API_KEY, max_body_bytes=BODY_LIMIT)
    with running(app) as port:
        yield Served(port, engine, model_id, app)


@pytest.fixture
def endless(served: Served) -> Iterator[Served]:
    """Generations never stop by themselves while the test runs."""
    base = served.engine.model
    served.engine.model = NoStop(base, served.engine.tokenizer.stop_tokens)
    try:
        yield served
    finally:
        served.engine.model = base
        served.wait_idle()


def _openai_error(body: dict[str, Any], code: str | None = None) -> dict[str, Any]:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


# -- item 5: a long generation never blocks new requests indefinitely ------------------------

def test_new_request_under_load_is_answered_or_refused_within_seconds(endless: Served) -> None:
    """Two endless streams and 16 short ones: a new request gets its answer or a 429 at once."""
    never = {"messages": [{"role": "user", "content": "Go on forever"}], "stream": True}
    long_streams = [open_stream(endless.port, never, AUTH) for _ in range(2)]
    outcomes: list[str] = []
    peak = 0

    def short(i: int) -> None:
        try:
            chunks = list(endless.client().chat.completions.create(
                model=endless.model_id, messages=[{"role": "user", "content": f"Client {i}"}],
                max_tokens=8, stream=True, seed=i))
            outcomes.append(chunks[-1].choices[0].finish_reason)
        except openai.RateLimitError:
            outcomes.append("429")

    threads = [threading.Thread(target=short, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and any(t.is_alive() for t in threads):
        peak = max(peak, endless.engine.admission.active)
        time.sleep(0.01)
    start = time.monotonic()
    try:
        r = endless.client().chat.completions.create(model=endless.model_id, messages=HI,
                                                     max_tokens=2)
        assert 0 < r.usage.completion_tokens <= 2
    except openai.RateLimitError as exc:
        assert exc.status_code == 429 and int(exc.response.headers["retry-after"]) > 0
        _openai_error(exc.body if "error" in (exc.body or {}) else {"error": exc.body})
    waited = time.monotonic() - start
    for t in threads:
        t.join(60)
    for sock in long_streams:
        kill(sock)
    assert waited < endless.engine.admission.timeout + 5
    assert sorted(set(outcomes)) <= ["429", "length"] and len(outcomes) == 16
    # more generations ran at once than there are prompt-cache slots
    assert peak > endless.engine.caches.size


def test_full_queue_and_long_wait_are_429s(endless: Served,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    admission = endless.engine.admission
    monkeypatch.setattr(admission, "max_active", 1)
    monkeypatch.setattr(admission, "max_queue", 0)
    busy = open_stream(endless.port, {"messages": HI, "stream": True}, AUTH)
    with pytest.raises(openai.RateLimitError) as full:
        endless.client().chat.completions.create(model=endless.model_id, messages=HI,
                                                 max_tokens=1)
    assert full.value.code == "rate_limit_exceeded"
    assert int(full.value.response.headers["retry-after"]) > 0
    monkeypatch.setattr(admission, "max_queue", 1)
    monkeypatch.setattr(admission, "timeout", 0.5)
    start = time.monotonic()
    with pytest.raises(openai.RateLimitError):
        endless.client().responses.create(model=endless.model_id, input="Hi",
                                          max_output_tokens=1)
    assert 0.5 <= time.monotonic() - start < 5
    kill(busy)  # its slot frees: the next request runs
    endless.wait_idle()
    r = endless.client().chat.completions.create(model=endless.model_id, messages=HI,
                                                 max_tokens=1)
    assert r.usage.completion_tokens == 1


# -- item 7: request size ------------------------------------------------------------------

def _send_head(port: int, headers: dict[str, str], body: bytes = b"") -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=10)
    sock.sendall(request_head("POST", "/v1/chat/completions", headers) + body)
    return sock


def test_oversized_body_is_a_413_before_it_is_read(served: Served) -> None:
    # Content-Length announces 50 MB and nothing follows: an answer proves nothing was awaited
    with _send_head(served.port, {**AUTH, "Content-Type": "application/json",
                                  "Content-Length": str(50 * 2**20)}) as sock:
        status, _, body = read_response(sock)
    assert status == 413
    assert "bytes" in _openai_error(json.loads(body), "request_too_large")["message"]
    # a chunked body is counted as it arrives: the answer comes while the client still sends
    with _send_head(served.port, {**AUTH, "Content-Type": "application/json",
                                  "Transfer-Encoding": "chunked"}) as sock:
        sent_all = threading.Event()
        threading.Thread(target=_send_chunks, args=(sock, 50 * 2**20, sent_all),
                         daemon=True).start()
        status, _, body = read_response(sock)
        assert not sent_all.is_set()
    assert status == 413
    _openai_error(json.loads(body), "request_too_large")


def _send_chunks(sock: socket.socket, total: int, sent_all: threading.Event) -> None:
    chunk = b"x" * 65536
    try:
        for _ in range(total // len(chunk)):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        sock.sendall(b"0\r\n\r\n")
        sent_all.set()
    except OSError:
        pass  # the server stopped reading


def test_api_key_is_checked_before_the_body(served: Served) -> None:
    with _send_head(served.port, {"Content-Type": "application/json",
                                  "Content-Length": str(2**20)}) as sock:
        status, _, body = read_response(sock)
    assert status == 401
    _openai_error(json.loads(body), "invalid_api_key")


def test_huge_prompt_is_refused_before_it_is_all_tokenized(
        served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = served.engine.tokenizer
    encoded: list[int] = []
    encode = tokenizer.encode

    def recording(text: str, allow_special: bool = False) -> list[int]:
        encoded.append(len(text))
        return encode(text, allow_special)

    monkeypatch.setattr(tokenizer, "encode", recording)
    monkeypatch.setattr(served.engine, "max_context", 256)
    text = "The quick brown fox jumps over the lazy dog. " * 20000  # 900k characters
    with pytest.raises(openai.BadRequestError) as info:
        served.client().chat.completions.create(
            model=served.model_id, messages=[{"role": "user", "content": text}])
    assert info.value.code == "context_length_exceeded" and "at least" in info.value.message
    assert encoded and max(encoded) < len(text) // 100
    # the bound never refuses what fits: a prompt just under the context is served
    monkeypatch.setattr(served.engine, "max_context", 4096)
    fits = "The quick brown fox. " * 600  # about 3000 tokens in 12600 characters
    r = served.client().chat.completions.create(
        model=served.model_id, messages=[{"role": "user", "content": fits}], max_tokens=1)
    assert 3000 < r.usage.prompt_tokens < 4096


# -- item 8: bad input is a 400, never a 500 ------------------------------------------------

@pytest.mark.parametrize(("path", "raw", "param"), [
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "seed": '
     f'{2**70}}}', "seed"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "seed": -1}',
     "seed"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\ud800b"}]}',
     "messages[0].content"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", '
     '"text": "\\udfff"}]}]}', "messages[0].content[0].text"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], '
     '"temperature": NaN}', "temperature"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], '
     '"top_p": Infinity}', "top_p"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "n": 1e30}',
     "n"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], '
     '"max_tokens": "ten"}', "max_tokens"),
    ("/v1/chat/completions", '{"messages": "hi"}', "messages"),
    ("/v1/chat/completions", '[1, 2]', None),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], '
     '"tools": [{"type": "function", "function": {"name": "f", "description": "\\ud800"}}]}',
     "tools[0].function.description"),
    ("/v1/responses", '{"input": "\\ud800"}', "input"),
    ("/v1/responses", '{"input": "hi", "metadata": {"k": "\\udc00"}}', "metadata.k"),
    ("/v1/responses", '{"input": "hi", "instructions": "\\ud800", "seed": 18446744073709551616}',
     None),
    ("/v1/responses", '{"input": "hi", "max_output_tokens": 1.5}', "max_output_tokens"),
])
def test_bad_input_is_a_400(served: Served, path: str, raw: str, param: str | None) -> None:
    status, _, body = post_raw(served.port, path, raw.encode(), AUTH)
    assert status == 400, body
    error = _openai_error(body)
    if param is not None:
        assert error["param"] == param, error


def test_too_many_stop_strings_say_so(served: Served) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        served.client().chat.completions.create(model=served.model_id, messages=HI,
                                                stop=["a", "b", "c", "d", "e"])
    assert info.value.param == "stop"
    assert "at most 4" in info.value.message and "valid string" not in info.value.message


# -- item 9: logs, model ids, the docs and the OpenAPI description --------------------------

def test_unknown_model_is_served_by_this_one_and_logged_once(
        served: Served, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gptoss_mlx.server")
    client = served.client()
    replies = [client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=1)
               for _ in range(2)]
    replies.append(client.responses.create(model="gpt-4o-mini", input="Hi",
                                           max_output_tokens=1))
    assert {r.model for r in replies} == {served.model_id}
    time.sleep(0.3)  # the worker logs from its thread
    notes = [r for r in caplog.records if "gpt-4o-mini" in r.getMessage()]
    assert len(notes) == 1 and served.model_id in notes[0].getMessage()
    # completed requests end without a cancellation in the log
    assert not [r for r in caplog.records if "ended early" in r.getMessage()]


def test_docs_and_openapi_need_the_key(served: Served) -> None:
    for path in ("/docs", "/openapi.json", "/redoc"):
        with socket.create_connection((HOST, served.port), timeout=10) as sock:
            sock.sendall(request_head("GET", path, {}))
            status, _, body = read_response(sock)
        assert status == 401, path
        _openai_error(json.loads(body), "invalid_api_key")
    with socket.create_connection((HOST, served.port), timeout=10) as sock:
        sock.sendall(request_head("GET", "/openapi.json", AUTH))
        status, _, body = read_response(sock)
    assert status == 200
    schema = json.loads(body)
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    assert {"400", "401", "413", "429"} <= set(chat["responses"]) and "422" not in chat["responses"]
    assert chat["security"] == [{"bearer": []}]
    with socket.create_connection((HOST, served.port), timeout=10) as sock:
        sock.sendall(request_head("GET", "/health", {}))
        assert read_response(sock)[0] == 200


# -- the OpenAPI description against a schema-driven fuzzer ---------------------------------

FUZZED = [("/v1/chat/completions", "POST", 100), ("/v1/responses", "POST", 100),
          ("/v1/models", "GET", 10), ("/v1/models/{name}", "GET", 20)]


@pytest.mark.parametrize("mode", list(GenerationMode), ids=str)
@pytest.mark.parametrize(("path", "method", "examples"), FUZZED, ids=[f[0] for f in FUZZED])
def test_fuzzed_requests_get_documented_answers(
        served: Served, path: str, method: str, examples: int, mode: GenerationMode,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No 5xx, every status documented, every error body as documented, for requests that fit
    the description (positive) and that break it (negative: they must get a 4xx).

    A request that fits the description may still break a rule across fields that JSON Schema
    cannot state (a tool result after its call, a prompt within the context, a forced tool
    choice with tools): schemathesis's acceptance check would flag those 400s, so it is
    replaced by a sharper one: such a 400 must not come from a field's own validation (code
    `invalid_value`), which the description states (for bodies that do fit it: jsonschema is
    the judge, as the generator strays at times, e.g. integers rounded past a maximum).
    Generated requests get a small output limit (and the context a small size), so that each
    one stays short."""
    monkeypatch.setattr(served.engine, "max_context", 1024)
    schema = schemathesis.openapi.from_url(f"http://{HOST}:{served.port}/openapi.json",
                                           headers=AUTH)
    operation = schema[path][method]
    body_schema = _request_body_schema(served.app.openapi(), path)

    @hypothesis.given(operation.as_strategy(mode))
    @hypothesis.settings(max_examples=examples // 2, deadline=None, database=None,
                         phases=[hypothesis.Phase.generate],  # a failure is reported unshrunk
                         suppress_health_check=list(hypothesis.HealthCheck))
    def fuzz(case: Any) -> None:
        if isinstance(case.body, dict):
            for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
                limit = case.body.get(field)  # a float such as 1e30 is an integer too
                if limit is None or (type(limit) in (int, float) and limit > 3):
                    case.body[field] = 3
        response = case.call(headers=AUTH, timeout=60)
        case.validate_response(response, excluded_checks=[positive_data_acceptance])
        if mode is GenerationMode.POSITIVE and response.status_code == 400 and \
                body_schema is not None and body_schema.is_valid(case.body):
            assert response.json()["error"]["code"] != "invalid_value", (
                "a field rule the description does not state", case.body, response.text)

    fuzz()


def _request_body_schema(description: dict[str, Any], path: str) -> Any:
    """A jsonschema validator for the JSON body of `path`'s POST, None without one."""
    post = description["paths"][path].get("post")
    if post is None:
        return None
    ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    return jsonschema.Draft202012Validator(
        {"$ref": ref, "components": description["components"]})


def test_engine_serves_again_after_a_shutdown(served: Served) -> None:
    """shutdown (the signal) then stop (the lifespan) leave wake-ups in the queue; a restarted
    engine must not take them for a new shutdown."""
    import asyncio

    from gptoss_mlx.sampling import SamplingParams

    engine = Engine(served.engine.model, served.engine.tokenizer)
    prompt = engine.renderer.render_chat(HI)

    async def generate() -> list[Any]:
        async with engine.admitted():
            job = engine.submit(prompt, sampling=SamplingParams(seed=0), max_tokens=2)
        return [event async for event in job.events()]

    for _ in range(2):
        engine.start()
        events = asyncio.run(asyncio.wait_for(generate(), 30))
        assert len(events) == 3  # two tokens, then Done
        engine.shutdown()
        time.sleep(1)  # the worker exits before the lifespan's stop wakes it again
        engine.stop()
