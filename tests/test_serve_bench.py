"""`gptoss-mlx bench --serve`: the line model streams one chunk per token, and the driver's
tables and JSON hold the servers' own counts for both servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from gptoss_mlx import load
from gptoss_mlx.bench import cpu_blas
from gptoss_mlx.cli import main
from gptoss_mlx.generate import TokenEvent, stream
from gptoss_mlx.sampling import SamplingParams
from gptoss_mlx.serve_bench import (
    LINE_TOKENS,
    Level,
    Stream,
    line_model,
    percentile,
    prompt_text,
)


@pytest.fixture(scope="module")
def line_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return line_model(tiny_model_dir, tmp_path_factory.mktemp("lines") / "tiny-lines")


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model_dir: Path) -> Any:
    """The release's tokenizer.json through Hugging Face tokenizers: the oracle for token ids."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))


def test_line_tokens_are_line_ends(hf_tokenizer: Any) -> None:
    assert [hf_tokenizer.decode([t]) for t in LINE_TOKENS] == [".\n", ",\n"]


def test_prompt_words_are_one_token_each(hf_tokenizer: Any) -> None:
    def count(text: str) -> int:
        return len(hf_tokenizer.encode(text, add_special_tokens=False).ids)

    head = count("Request 5:")
    assert [count(prompt_text(n, seed=5)) - head for n in (1, 100, 4000)] == [1, 100, 4000]


def test_line_model_says_only_line_ends(line_dir: Path, tiny_model_dir: Path) -> None:
    model, tokenizer = load(line_dir, experts="mlx")
    prompt = tokenizer.encode(prompt_text(40, seed=3))
    events = stream(model, tokenizer, prompt, sampling=SamplingParams(temperature=0),
                    max_tokens=12, stop_tokens=frozenset())
    tokens = [e.token for e in events if isinstance(e, TokenEvent)]
    assert len(tokens) == 12 and set(tokens) <= set(LINE_TOKENS)
    # only the lm_head's file is new; the rest is the source folder's
    linked = {f.name for f in line_dir.iterdir() if f.is_symlink()}
    assert linked == {f.name for f in tiny_model_dir.iterdir()} - {
        json.loads((tiny_model_dir / "model.safetensors.index.json").read_text())
        ["weight_map"]["lm_head.weight"]}


def test_percentile_is_numpys_linear() -> None:
    values = [0.3, 0.1, 0.9, 0.5, 0.7, 0.2]
    for q in (0, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_decoding_aggregate_leaves_out_the_time_before_the_first_token() -> None:
    """Two streams sent at 0 s: 3 tokens at 1.0, 1.5, 2.0 s and 2 tokens at 1.2, 3.0 s: 5
    tokens in 3 s in all, 3 of them after a first token in the 2 s from 1.0 to 3.0."""
    a = Stream(sent=0.0, chunks=[1.0, 1.5, 2.0], end=2.1)
    b = Stream(sent=0.0, chunks=[1.2, 3.0], end=3.0)
    level = Level(2, rounds=[[a, b]])
    assert level.aggregate_tps == pytest.approx(5 / 3)
    assert level.decode_aggregate_tps == pytest.approx(3 / 2)


def test_serve_bench_against_both_servers(line_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    result = CliRunner().invoke(main, [
        "bench", "--serve", "--compare", "-m", str(line_dir), "--clients", "1,2", "-r", "1",
        "--stream-tokens", "4", "--stream-prompt", "16", "--long-prompt", "200",
        "--prefill-chunk", "32", "--json", str(out), "--dtype", "float32"])
    assert result.exit_code == 0, result.output + result.stderr
    blas = cpu_blas()
    assert result.stdout.splitlines()[0] == (
        "gptoss-mlx: float32; mlx_lm.server: bfloat16 (the folder's)"
        + (f"; BLAS: {blas}" if blas else ""))
    runs = json.loads(out.read_text())
    assert [r["server"] for r in runs] == ["gptoss-mlx", "mlx_lm.server"]
    assert [r["dtype"] for r in runs] == ["float32", "bfloat16 (the folder's)"]
    # our prompt cache held all of the long prompt but its last chunk while that was timed
    lp = runs[0]["long_prompt"]
    assert lp["prompt_tokens"] - 32 <= lp["chunk_cached"] < lp["prompt_tokens"]
    for run in runs:
        assert [lv["clients"] for lv in run["levels"]] == [1, 2]
        for lv in run["levels"]:
            # the server's usage: the line model never stops, each token is its own chunk
            assert lv["failed"] == 0
            assert lv["tokens"] == lv["chunks"] == 4 * lv["clients"]
            assert lv["aggregate_tps"] > 0 and lv["stream_tps"] > 0
            # decoding leaves out the time before the first token, and one token per stream
            assert lv["decode_aggregate_tps"] > 0
            assert 0 < lv["ttft_p50"] <= lv["ttft_p99"]
        lp = run["long_prompt"]
        assert lp["prompt_tokens"] > 200  # the server's count of the long prompt
        assert lp["worst_gap"] >= lp["usual_gap"] > 0 and lp["long_ttft"] > 0
    ours, theirs, ratio = tables(result.stdout)
    assert [row[:2] for row in ours[1:]] == [["gptoss-mlx", "1"], ["gptoss-mlx", "2"]]
    assert [row[:2] for row in theirs[1:]] == [["mlx_lm.server", "1"], ["mlx_lm.server", "2"]]
    for row, a, b in zip(ratio[1:], runs[0]["levels"], runs[1]["levels"], strict=True):
        assert row[1] == f"{a['aggregate_tps'] / b['aggregate_tps']:.2f}x"
        assert row[2] == f"{a['decode_aggregate_tps'] / b['decode_aggregate_tps']:.2f}x"
    for row, a in zip(ratio[1:], runs[0]["levels"], strict=True):
        first = runs[0]["levels"][0]
        assert row[6] == (f"{a['aggregate_tps'] / first['aggregate_tps']:.2f}x / "
                          f"{a['decode_aggregate_tps'] / first['decode_aggregate_tps']:.2f}x")
    assert result.stdout.count("prompt arriving while 4 streams decode") == 2


def tables(text: str) -> list[list[list[str]]]:
    """The markdown tables in `text`: their header and rows as cells, without the rule."""
    out: list[list[list[str]]] = []
    previous = ""
    for line in text.splitlines():
        if line.startswith("| "):
            if not previous.startswith("| "):
                out.append([])
            if not set(line) <= set("|-: "):
                out[-1].append([c.strip() for c in line.split("|")[1:-1]])
        previous = line
    return out


def test_serve_bench_names_a_server_that_does_not_start(tiny_model_dir: Path,
                                                         tmp_path: Path) -> None:
    folder = tmp_path / "no-weights"
    folder.mkdir()
    for name in ("config.json", "o200k_base.tiktoken"):
        (folder / name).symlink_to(tiny_model_dir / name)
    result = CliRunner().invoke(main, ["bench", "--serve", "-m", str(folder), "--clients", "1"])
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1 and len(errors) == 1, result.output
    assert "gptoss-mlx did not start" in errors[0] and "safetensors" in errors[0]


def _blas_in_child(**env: str) -> str:
    """`cpu_blas()` in a fresh Python that imported MLX, with `env` added."""
    code = "import mlx.core, gptoss_mlx.bench as b; print(b.cpu_blas())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env={**os.environ, **env}, timeout=120).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_cpu_blas_names_the_library_mlx_calls() -> None:
    """Without LD_PRELOAD: the mlx-cpu wheel's own BLAS; with OpenBLAS preloaded: OpenBLAS,
    whose cblas_sgemm the dynamic linker binds libmlx's reference to."""
    import ctypes.util

    own = Path(_blas_in_child(LD_PRELOAD=""))
    assert own.parent.name == "mlx_cpu.libs" and own.name.startswith("libblas")
    assert ctypes.CDLL(str(own)).cblas_sgemm  # it exports the function
    name = ctypes.util.find_library("openblas")
    if name is None:
        pytest.skip("needs OpenBLAS (apt install libopenblas0) to check a preloaded BLAS")
    preloaded = _blas_in_child(LD_PRELOAD=name)
    assert "openblas" in Path(preloaded).name and Path(preloaded).is_file()


def test_cpu_blas_is_none_off_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    assert cpu_blas() is None
