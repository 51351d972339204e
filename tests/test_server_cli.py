"""`gptoss-mlx serve` as a user runs it: a subprocess on loopback, driven by the openai client."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionChunk
from serving import HOST, free_port, open_stream, read_response, request_head


def test_serve_command(tiny_model_dir: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptoss_mlx", "serve", "-m", str(tiny_model_dir),
         "--port", str(port), "--api-key", "secret", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=5) as r:
                    assert r.status == 200
                    break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
        base = f"http://{HOST}:{port}/v1"
        client = openai.OpenAI(base_url=base, api_key="secret", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["gpt-oss-tiny"]
        r = client.chat.completions.create(model="gpt-oss-tiny", max_tokens=2,
                                           messages=[{"role": "user", "content": "Hi"}])
        assert 0 < r.usage.completion_tokens <= 2
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base, api_key="nope", max_retries=0).models.list()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert f"serving gpt-oss-tiny at http://{HOST}:{port}/v1" in err
    assert re.search(r"^memory plan: batch of \d+: weights .* KV caches x ", err, re.M), err


def test_serve_needs_a_model_folder(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gptoss_mlx", "serve", "-m", str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "no such folder" in proc.stderr


# -- faults: busy port, oversized bodies, SIGTERM mid-stream (issue 12) -------------------------

def _start(model_dir: Path, port: int, *extra: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptoss_mlx", "serve", "-m", str(model_dir), "--port", str(port),
         "--log-level", "warning", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=5):
                return proc
        except (urllib.error.URLError, ConnectionError):
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.fixture(scope="module")
def keyed_server(tiny_model_dir: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    port = free_port()
    proc = _start(tiny_model_dir, port, "--api-key", "secret")
    yield proc, port
    proc.terminate()
    proc.communicate(timeout=30)


def test_busy_port_fails_before_loading(tiny_model_dir: Path,
                                        keyed_server: tuple[subprocess.Popen[str], int]) -> None:
    _, port = keyed_server
    proc = subprocess.run(
        [sys.executable, "-m", "gptoss_mlx", "serve", "-m", str(tiny_model_dir), "--port",
         str(port)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot listen on {HOST}:{port}" in lines[0], proc.stderr
    assert "serving" not in proc.stderr


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to read RSS")
def test_50mb_bodies_get_413_and_leave_no_memory_behind(
        keyed_server: tuple[subprocess.Popen[str], int]) -> None:
    proc, port = keyed_server
    idle = _rss(proc.pid)
    body = b'{"messages": [{"role": "user", "content": "' + b"x" * (50 * 2**20) + b'"}]}'
    for headers, status in ((AUTH_HEADER, 413), ({}, 401)):
        for _ in range(2):
            got, _, error = _post_all(port, body, headers)
            assert got == status and set(error["error"]) == {"message", "type", "param", "code"}
    got, _, error = _post_all(port, body, AUTH_HEADER, chunked=True)
    assert got == 413 and error["error"]["code"] == "request_too_large"
    assert _rss(proc.pid) - idle < 200 * 2**20
    client = openai.OpenAI(base_url=f"http://{HOST}:{port}/v1", api_key="secret", max_retries=0)
    r = client.chat.completions.create(model="gpt-oss-tiny", max_tokens=1,
                                       messages=[{"role": "user", "content": "Hi"}])
    assert r.usage.completion_tokens == 1


AUTH_HEADER = {"Authorization": "Bearer secret"}


def _post_all(port: int, body: bytes, headers: dict[str, str],
              chunked: bool = False) -> tuple[int, dict[str, str], Any]:
    """POST `body` from a thread while the answer is read (the server may answer first)."""
    framing = {"Transfer-Encoding": "chunked"} if chunked else {"Content-Length": str(len(body))}
    sock = socket.create_connection((HOST, port), timeout=30)

    def send() -> None:
        with contextlib.suppress(OSError):  # the server answered and stopped reading
            sock.sendall(request_head("POST", "/v1/chat/completions", {
                "Content-Type": "application/json", **framing, **headers}))
            step = 2**20
            for i in range(0, len(body), step):
                piece = body[i:i + step]
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            if chunked:
                sock.sendall(b"0\r\n\r\n")

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    with sock:
        status, head, data = read_response(sock)
    sender.join(30)
    return status, head, json.loads(data)


def test_sigterm_mid_stream_ends_the_streams_and_exits(tiny_model_dir: Path) -> None:
    port = free_port()
    proc = _start(tiny_model_dir, port)
    try:
        chat = open_stream(port, {"messages": [{"role": "user", "content": "Go on"}],
                                  "stream": True}, {})
        responses = open_stream(port, {"input": "Go on", "stream": True}, {},
                                path="/v1/responses")
        time.sleep(0.5)
        start = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        tails = [_read_to_end(chat), _read_to_end(responses)]
        proc.wait(10)
        exited = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)
    assert exited < 5
    chat_events = [line[6:] for line in tails[0].decode().splitlines()
                   if line.startswith("data: ")]
    assert chat_events[-1] == "[DONE]"
    last = ChatCompletionChunk.model_validate_json(chat_events[-2])
    assert last.choices[0].finish_reason == "length"
    events = [json.loads(line[6:]) for line in tails[1].decode().splitlines()
              if line.startswith("data: ")]
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"]["reason"] is None  # not max_output_tokens


def _read_to_end(sock: socket.socket) -> bytes:
    data = b""
    with sock:
        sock.settimeout(10)
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_max_batch_is_planned_against_memory(tiny_model_dir: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Each sequence of the batch has its own KV cache: the default runs as many as fit beside
    the weights and buffers, and a --max-batch that does not fit is refused in one line before
    the model loads (--max-concurrent, its former name, alike)."""
    from gptoss_mlx.cli.serve import plan_serving_batch
    from gptoss_mlx.memory import plan_memory

    plan = plan_memory(tiny_model_dir, 4096)
    room_for_three = plan.weights_total + plan.buffers_total + 3 * plan.kv_cache + 1000
    monkeypatch.setenv("GPTOSS_MLX_WORKING_SET", str(room_for_three))
    model = str(tiny_model_dir)
    assert plan_serving_batch(model, 4096, 2, None).batch == 3
    assert plan_serving_batch(model, 4096, 1, 2).batch == 2
    for flag in ("--max-batch", "--max-concurrent"):
        proc = subprocess.run(
            [sys.executable, "-m", "gptoss_mlx", "serve", "-m", model, "--max-context", "4096",
             "--port", str(free_port()), flag, "4"],
            capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1
        assert proc.stderr.startswith("Error: 4 KV caches (a batch of 4, 2 kept")
        assert proc.stderr.count("\n") == 1 and "fits: --max-batch 3" in proc.stderr


def test_prefill_chunk_is_planned_against_memory(tiny_model_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """--prefill-chunk's activations count in the plan: a budget with room for the default
    chunk's buffers and three KV caches holds none at a 4096-token chunk, and serve refuses it
    in one line before loading."""
    from gptoss_mlx.cli.serve import plan_serving_batch
    from gptoss_mlx.memory import plan_memory

    plan = plan_memory(tiny_model_dir, 4096)
    room_for_three = plan.weights_total + plan.buffers_total + 3 * plan.kv_cache + 1000
    assert plan_memory(tiny_model_dir, 4096, prefill_chunk=4096).buffers_total > room_for_three
    monkeypatch.setenv("GPTOSS_MLX_WORKING_SET", str(room_for_three))
    assert plan_serving_batch(str(tiny_model_dir), 4096, 2, None).batch == 3
    proc = subprocess.run(
        [sys.executable, "-m", "gptoss_mlx", "serve", "-m", str(tiny_model_dir),
         "--max-context", "4096", "--port", str(free_port()), "--prefill-chunk", "4096"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("Error: The model needs about") and "buffers" in proc.stderr
    assert proc.stderr.count("\n") == 1
