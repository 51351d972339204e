"""The vocabulary travels into the converted folder, verified by its sha256: from the source's
o200k_base.tiktoken or tokenizer.json, --vocab, or tiktoken's cache."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from gptoss_mlx.cli import main
from gptoss_mlx.convert import ConvertError, convert
from gptoss_mlx.convert.synthetic import tiny_config, write_checkpoint
from gptoss_mlx.convert.vocab import VOCAB_URL, vocab_from_tokenizer_json

VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"


@pytest.fixture
def ckpt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # An empty tiktoken cache, so that nothing on this machine is found by accident.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    return write_checkpoint(tmp_path / "ck", tiny_config(num_hidden_layers=2))  # 201088 tokens


def vocab_sha(folder: Path) -> str:
    return hashlib.sha256((folder / "o200k_base.tiktoken").read_bytes()).hexdigest()


def test_from_source_folder(ckpt: Path, vocab_path: Path, tmp_path: Path) -> None:
    shutil.copyfile(vocab_path, ckpt / "o200k_base.tiktoken")
    convert(ckpt, tmp_path / "out", progress=False)
    assert vocab_sha(tmp_path / "out") == VOCAB_SHA256


def test_from_tiktoken_cache(ckpt: Path, vocab_path: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copyfile(vocab_path, cache / hashlib.sha1(VOCAB_URL.encode()).hexdigest())
    convert(ckpt, tmp_path / "out", progress=False)
    assert vocab_sha(tmp_path / "out") == VOCAB_SHA256


def test_explicit_wrong_file_is_refused(ckpt: Path, tmp_path: Path) -> None:
    bad = tmp_path / "fake.tiktoken"
    bad.write_text("aGVsbG8= 0\n")
    with pytest.raises(ConvertError, match="not the o200k_base vocabulary"):
        convert(ckpt, tmp_path / "out", vocab=bad, progress=False)
    assert not (tmp_path / "out").exists()


def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """tiktoken's download fails at once: its HTTPS requests go to a closed local port."""
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)


def test_missing_vocab_is_one_line_naming_both_remedies(
        ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    offline(monkeypatch)
    (ckpt / "o200k_base.tiktoken").write_text("not it\n")  # found but wrong: skipped
    result = CliRunner().invoke(main, ["convert", str(ckpt), str(tmp_path / "out")])
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1 and len(errors) == 1, result.output
    for needle in ("tokenizer.json", "o200k_base.tiktoken", "--vocab PATH", "wrong sha256",
                   "could not download", str(ckpt)):
        assert needle in errors[0], needle
    assert not (tmp_path / "out").exists()


def test_vocab_from_tokenizer_json_is_byte_identical(tiny_checkpoint: Path,
                                                     vocab_path: Path) -> None:
    assert not (tiny_checkpoint / "o200k_base.tiktoken").exists()
    derived = vocab_from_tokenizer_json(tiny_checkpoint / "tokenizer.json")
    assert derived == vocab_path.read_bytes()


def test_a_tokenizer_json_of_another_vocabulary_is_refused(
        ckpt: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    tok = json.loads((tiny_checkpoint / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["hello"], vocab["world"] = vocab["world"], vocab["hello"]
    (ckpt / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ConvertError, match="tokenizer.json: its vocabulary is not o200k_base"):
        convert(ckpt, tmp_path / "out", progress=False)
    (ckpt / "tokenizer.json").write_text("{}")
    with pytest.raises(ConvertError, match="not a Hugging Face tokenizer.json"):
        convert(ckpt, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
