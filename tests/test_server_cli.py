"""`gptoss-mlx serve` as a user runs it: a subprocess on loopback, driven by the openai client."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def test_serve_command(tiny_model_dir: Path) -> None:
    port = _free_port()
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


def test_serve_needs_a_model_folder(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gptoss_mlx", "serve", "-m", str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "no such folder" in proc.stderr
