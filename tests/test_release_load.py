"""A released checkpoint runs as it is (issue 11, item 4): loading the root layout, `original/`,
or a hub id gives the model its converted folder gives (the oracle: the converter, itself checked
byte for byte against the release), the same memory plan, and the same greedy text."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

import gptoss_mlx
from gptoss_mlx.cli import main
from gptoss_mlx.convert import convert
from gptoss_mlx.convert.synthetic import tiny_config, write_checkpoint
from gptoss_mlx.memory import plan_memory
from gptoss_mlx.model import ModelLoadError

IDS = [200006, 1428, 200008, 12194, 11, 3, 77, 200007, 200006, 173781, 200005, 35644]
GREEDY = ("-p", "Hello there", "--max-tokens", "10", "--temperature", "0", "--raw")


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory, vocab_path: Path) -> dict[str, Path]:
    """Tiny releases of the same weights: the root layout beside original/ ("both"), original/
    alone (the model folder is the release root, or original/ itself), and their conversion.
    Like the real release they carry tokenizer.json and no o200k_base.tiktoken."""
    root = tmp_path_factory.mktemp("release")
    cfg = tiny_config()
    both = write_checkpoint(root / "both", cfg, layout="both", seed=3, vocab=vocab_path)
    orig = write_checkpoint(root / "orig", cfg, layout="original", seed=3, vocab=vocab_path)
    convert(both, root / "mlx", progress=False)
    return {"both": both, "original": orig, "original/": orig / "original",
            "converted": root / "mlx"}


def params(model) -> dict[str, np.ndarray]:
    return {k: np.array(v.astype(mx.float32) if v.dtype == mx.bfloat16 else v)
            for k, v in tree_flatten(model.parameters())}


@pytest.mark.parametrize("layout", ["both", "original", "original/"])
def test_release_loads_as_its_converted_folder(releases: dict[str, Path], layout: str) -> None:
    ours, tokenizer = gptoss_mlx.load(releases[layout], experts="mlx")
    theirs, _ = gptoss_mlx.load(releases["converted"], experts="mlx")
    assert tokenizer is not None  # the vocabulary beside original/ is found too
    want = params(theirs)
    got = params(ours)
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name].dtype == value.dtype and np.array_equal(got[name], value), name

    ours32, _ = gptoss_mlx.load(releases[layout], dtype="float32", experts="mlx")
    theirs32, _ = gptoss_mlx.load(releases["converted"], dtype="float32", experts="mlx")
    ids = mx.array([IDS], dtype=mx.int32)
    assert np.array_equal(np.array(ours32(ids)), np.array(theirs32(ids)))


@pytest.mark.parametrize("layout", ["both", "original"])
def test_memory_plan_of_a_release(releases: dict[str, Path], layout: str) -> None:
    release = plan_memory(releases[layout], 4096, fused_attention=True)
    converted = plan_memory(releases["converted"], 4096, fused_attention=True)
    assert release.weights == converted.weights and release.total == converted.total
    assert sorted(release.specs, key=lambda s: s.name) == sorted(converted.specs,
                                                                 key=lambda s: s.name)


def run_generate(model: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gptoss_mlx", "generate", "-m", model, *GREEDY],
                          capture_output=True, text=True, timeout=300)


def test_generate_cli_on_a_release_writes_the_converted_folder_text(
        releases: dict[str, Path]) -> None:
    want = run_generate(str(releases["converted"]))
    assert want.returncode == 0 and want.stdout.strip(), want.stderr
    for layout in ("both", "original"):
        got = run_generate(str(releases[layout]))
        assert got.returncode == 0, got.stderr
        assert got.stdout == want.stdout, layout


def test_a_hub_id_is_downloaded_once_then_read_as_it_is(
        releases: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from gptoss_mlx.convert import source

    calls = []

    def download(repo_id: str) -> Path:  # huggingface_hub's snapshot, here a local release
        calls.append(repo_id)
        return releases["both"]

    monkeypatch.setattr(source, "download", download)
    runner = CliRunner()
    got = runner.invoke(main, ["generate", "-m", "acme/gpt-oss-tiny", *GREEDY])
    assert got.exit_code == 0, got.output + got.stderr
    assert calls == ["acme/gpt-oss-tiny"]
    want = runner.invoke(main, ["generate", "-m", str(releases["converted"]), *GREEDY])
    assert got.stdout == want.stdout


def test_bench_on_a_release_counts_the_converted_bytes(releases: dict[str, Path]) -> None:
    def size_column(folder: Path) -> str:
        result = CliRunner().invoke(main, ["bench", "-m", str(folder), "-p", "8", "-n", "",
                                           "-d", "", "-r", "1", "--experts", "mlx"])
        assert result.exit_code == 0, result.output + result.stderr
        row = [line for line in result.stdout.splitlines() if line.startswith("|")][2]
        return row.split("|")[2].strip()

    assert size_column(releases["original"]) == size_column(releases["converted"])


def test_a_broken_release_is_one_line_naming_file_and_tensor(
        releases: dict[str, Path], tmp_path: Path) -> None:
    folder = shutil.copytree(releases["both"], tmp_path / "r", ignore=shutil.ignore_patterns(
        "original"))
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] *= 2  # the stored expert tensors no longer match
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as e:
        gptoss_mlx.load(folder, experts="mlx")
    msg = str(e.value)
    assert "\n" not in msg and str(folder) in msg
    assert "model.layers.0.mlp.experts.gate_up_proj_blocks" in msg and "expected" in msg


def test_no_vocabulary_beside_the_release(releases: dict[str, Path], tmp_path: Path) -> None:
    folder = shutil.copytree(releases["original"], tmp_path / "r",
                             ignore=shutil.ignore_patterns("*.tiktoken", "tokenizer.json"))
    r = run_generate(str(folder))
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "o200k_base.tiktoken" in lines[0] and str(folder) in lines[0]


def test_vocabulary_derived_from_tokenizer_json(
        releases: dict[str, Path], vocab_path: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A release carries tokenizer.json, not o200k_base.tiktoken: the runtime derives it."""
    from gptoss_mlx.chat import tokenizer as tok

    folder = releases["original"]
    assert not list(folder.rglob("*.tiktoken")) and (folder / "tokenizer.json").is_file()
    monkeypatch.setattr(tok, "DERIVED_VOCAB", tmp_path / "cache" / tok.VOCAB_FILENAME)
    loaded = tok.load_tokenizer(folder / "original", folder)
    assert loaded is not None
    assert loaded.vocab_path.read_bytes() == vocab_path.read_bytes()
