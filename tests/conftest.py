"""Shared fixtures: the ../shared folder, the real vocabulary, tiny synthetic checkpoints."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random checkpoint in both released layouts (root and original/)."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"), tiny_config(), layout="both", seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_checkpoint: Path, vocab_path: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint converted to an MLX folder, with the real vocabulary."""
    from gptoss_mlx.convert import convert

    dst = tmp_path_factory.mktemp("mlx") / "tiny"
    convert(tiny_checkpoint, dst, vocab=vocab_path)
    return dst


@pytest.fixture(scope="session")
def demo_model_dir(vocab_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model (trained, speaks harmony; see convert/demo.py), written in the released
    layout and converted to an MLX folder with the real vocabulary."""
    from gptoss_mlx.convert import convert
    from gptoss_mlx.convert.demo import write_demo

    ckpt = write_demo(tmp_path_factory.mktemp("demo-ckpt"))
    dst = tmp_path_factory.mktemp("demo-mlx") / "demo"
    convert(ckpt, dst, vocab=vocab_path)
    return dst
