"""`gptoss-mlx convert ORG/NAME DST` through huggingface_hub, offline: a local HTTP server answers
the Hub's file API for a synthetic release (root layout, original/, a fake metal/model.bin), and
the test checks which files were fetched and that DST is complete."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gptoss_mlx.convert.release_files import RELEASE_FILES, TOKENIZER_FILES

REPO_ID = "test-org/gpt-oss-tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Hub(http.server.ThreadingHTTPServer):
    """Answers `/api/models/{repo}/revision/{rev}`, `/api/models/{repo}/tree/{rev}` and HEAD/GET
    `/{repo}/resolve/{rev}/{path}` for the files of one repo; notes every file fetched."""

    def __init__(self, files: dict[str, Path | bytes]):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.files = files
        self.fetched: list[str] = []

    def data(self, name: str) -> bytes:
        f = self.files[name]
        return f if isinstance(f, bytes) else f.read_bytes()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class HubHandler(http.server.BaseHTTPRequestHandler):
    server: Hub

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self.answer(body=False)

    def do_GET(self) -> None:
        self.answer(body=True)

    def answer(self, body: bool) -> None:
        path = self.path.split("?")[0]
        files = self.server.files
        if path in (f"/api/models/{REPO_ID}/revision/{rev}" for rev in ("main", COMMIT)):
            return self.send(json.dumps({"id": REPO_ID, "sha": COMMIT, "private": False,
                                         "siblings": [{"rfilename": n} for n in files]}).encode(),
                             "application/json", body)
        if path == f"/api/models/{REPO_ID}/tree/{COMMIT}":
            entries = [{"type": "file", "path": n, "size": len(self.server.data(n)),
                        "oid": hashlib.sha1(n.encode()).hexdigest()} for n in files]
            return self.send(json.dumps(entries).encode(), "application/json", body)
        prefix = f"/{REPO_ID}/resolve/{COMMIT}/"
        if path.startswith(prefix) and path[len(prefix):] in files:
            name = path[len(prefix):]
            data = self.server.data(name)
            if body:
                self.server.fetched.append(name)
            return self.send(data, "application/octet-stream", body,
                             {"ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                              "X-Repo-Commit": COMMIT})
        self.send(json.dumps({"error": "not found"}).encode(), "application/json", body,
                  status=404)

    def send(self, data: bytes, kind: str, body: bool, headers: dict[str, str] | None = None,
             status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(data)


def release_files(folder: Path) -> dict[str, Path | bytes]:
    """A release repo: the synthetic folder's files plus a fake metal/model.bin and a README."""
    files: dict[str, Path | bytes] = {
        str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}
    files["metal/model.bin"] = b"\0" * 4096
    files["README.md"] = b"# gpt-oss-tiny\n"
    return files


@contextlib.contextmanager
def serving(files: dict[str, Path | bytes]) -> Iterator[Hub]:
    server = Hub(files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def run_convert(endpoint: str, dst: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """The CLI in a child process (huggingface_hub reads HF_ENDPOINT at import); tiktoken's own
    download goes to a closed port, as offline."""
    env = dict(os.environ, HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1",
               TIKTOKEN_CACHE_DIR=str(tmp_path / "tiktoken"),
               HTTPS_PROXY="http://127.0.0.1:9", NO_PROXY="127.0.0.1,localhost")
    return subprocess.run([sys.executable, "-m", "gptoss_mlx", "convert", REPO_ID, str(dst)],
                          env=env, capture_output=True, text=True, timeout=300)


def one_error(proc: subprocess.CompletedProcess[str]) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


@pytest.fixture
def release(tiny_checkpoint: Path) -> dict[str, Path | bytes]:
    return release_files(tiny_checkpoint)


def test_hub_download_fetches_only_what_dst_needs(release: dict[str, Path | bytes],
                                                  tmp_path: Path, vocab_path: Path) -> None:
    dst = tmp_path / "dst"
    with serving(release) as server:
        proc = run_convert(server.url, dst, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fetched = sorted(server.fetched)
    root_weights = sorted(n for n in release if "/" not in n and n.endswith(".safetensors"))
    assert fetched == sorted(["config.json", "model.safetensors.index.json", *root_weights,
                              *RELEASE_FILES])
    assert not any(n.startswith(("metal/", "original/")) for n in fetched)
    for name in RELEASE_FILES:
        assert (dst / name).read_bytes() == release[name].read_bytes(), name
    assert (dst / "o200k_base.tiktoken").read_bytes() == vocab_path.read_bytes()
    assert json.loads((dst / "config.json").read_text())["quantization"]["mode"] == "mxfp4"


def test_hub_release_without_tokenizer_offline_is_one_line(
        release: dict[str, Path | bytes], tmp_path: Path) -> None:
    """A repo without tokenizer.json, and tiktoken cannot download: what is missing, both
    remedies, nothing written."""
    files = {n: f for n, f in release.items() if n not in TOKENIZER_FILES}
    with serving(files) as server:
        error = one_error(run_convert(server.url, tmp_path / "dst", tmp_path))
    for needle in ("no o200k_base vocabulary", "tokenizer.json", "o200k_base.tiktoken",
                   "could not download", "--vocab PATH"):
        assert needle in error, needle
    assert not (tmp_path / "dst").exists()


def test_hub_unreachable_is_one_line(tmp_path: Path) -> None:
    error = one_error(run_convert("http://127.0.0.1:9", tmp_path / "dst", tmp_path))
    assert REPO_ID in error and "cannot download" in error
    assert not (tmp_path / "dst").exists()
