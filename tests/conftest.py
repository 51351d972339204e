"""Shared fixtures: the ../shared folder, the real vocabulary, tiny synthetic checkpoints."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from gptoss_mlx.convert.synthetic import tiny_config, write_checkpoint

REPO = Path(__file__).resolve().parent.parent


def find_shared() -> Path | None:
    """`$GPTOSS_SHARED`, else the `shared/` folder beside the checkout."""
    env = os.environ.get("GPTOSS_SHARED")
    for candidate in ([Path(env)] if env else []) + [REPO.parent / "shared"]:
        if (candidate / "docs" / "gpt-oss-reference.md").is_file():
            return candidate
    return None


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    path = find_shared()
    if path is None:
        pytest.skip("needs the shared/ folder (GPTOSS_SHARED, or shared/ beside the checkout)")
    return path


@pytest.fixture(scope="session")
def vocab_path(shared_dir: Path) -> Path:
    path = shared_dir / "tokenizer" / "o200k_base.tiktoken"
    if not path.is_file():
        pytest.skip(f"needs the real vocabulary at {path}")
    return path


@pytest.fixture(scope="session", autouse=True)
def empty_tiktoken_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """tiktoken's cache in an empty folder, so that no test finds this machine's copy of the
    vocabulary by accident (a test needing the vocabulary says so with `vocab_path`)."""
    folder = tmp_path_factory.mktemp("tiktoken-cache")
    previous = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        del os.environ["TIKTOKEN_CACHE_DIR"]
    else:
        os.environ["TIKTOKEN_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, vocab_path: Path) -> Path:
    """A tiny random release in both layouts (root and original/) with the release's tokenizer
    and generation files, and, as the release, no o200k_base.tiktoken."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"), tiny_config(), layout="both", seed=0,
                            vocab=vocab_path)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny release converted to an MLX folder (vocabulary from its tokenizer.json)."""
    from gptoss_mlx.convert import convert

    dst = tmp_path_factory.mktemp("mlx") / "tiny"
    convert(tiny_checkpoint, dst, progress=False)
    return dst
