"""Shared fixtures: the ../shared folder, the real vocabulary, tiny synthetic checkpoints.

Outside CI a test whose prerequisite is absent (the shared/ folder, the vocabulary, g++) is
skipped with the reason. In CI (`$CI` set and not "false"/"0", as .ci/run sets it) every skip
is a failure naming that reason: a checkout without its prerequisites must not look green.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from loopback import LoopbackServer, served
from scripted_model import ScriptedModel

from gptoss_mlx.convert.synthetic import tiny_config, write_checkpoint

if TYPE_CHECKING:
    from gptoss_mlx.chat.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent.parent


def in_ci() -> bool:
    """Whether the suite runs as CI (`$CI`, as CI services and .ci/run set it)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """In CI, a skipped test (setup or call) is reported as failed, with the skip's reason."""
    report = (yield).get_result()
    _skip_fails_in_ci(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """In CI, a module skipped at import (`pytest.importorskip`, `allow_module_level`) fails."""
    report = (yield).get_result()
    _skip_fails_in_ci(report)


def _skip_fails_in_ci(report: pytest.TestReport | pytest.CollectReport) -> None:
    if not (report.skipped and in_ci()) or hasattr(report, "wasxfail"):
        return
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    reason = reason.removeprefix("Skipped: ")
    report.outcome = "failed"
    report.longrepr = f"skipped in CI, which must run every test: {reason}"


def find_shared() -> Path | None:
    """`$GPTOSS_SHARED` when set (only it), else the `shared/` folder beside the checkout."""
    env = os.environ.get("GPTOSS_SHARED")
    candidate = Path(env) if env else REPO.parent / "shared"
    return candidate if (candidate / "docs" / "gpt-oss-reference.md").is_file() else None


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    path = find_shared()
    if path is None:
        where = (f"$GPTOSS_SHARED={os.environ['GPTOSS_SHARED']}" if os.environ.get("GPTOSS_SHARED")
                 else f"{REPO.parent / 'shared'} ($GPTOSS_SHARED unset)")
        pytest.skip(f"needs the shared/ folder with docs/gpt-oss-reference.md: not at {where}")
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


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> tuple[Any, Tokenizer]:
    """The tiny model in float32 and its tokenizer, loaded once per test module (modules that
    need another build define their own `loaded`)."""
    from gptoss_mlx import load

    model, tok = load(tiny_model_dir, dtype="float32")
    assert tok is not None
    return model, tok


@pytest.fixture(scope="session")
def scripted_server(vocab_path: Path) -> Iterator[LoopbackServer]:
    """`serve`'s real app over loopback on a ScriptedModel (no turns yet: tests set them)."""
    from gptoss_mlx.chat.tokenizer import Tokenizer

    tokenizer = Tokenizer(vocab_path)
    with served(ScriptedModel(tokenizer), tokenizer) as server:
        yield server


@pytest.fixture(scope="session")
def demo_model_dir(vocab_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model (trained, speaks harmony; see convert/demo.py), written in the released
    layout with the release's tokenizer files and converted to an MLX folder."""
    from gptoss_mlx.convert import convert
    from gptoss_mlx.convert.demo import write_demo

    ckpt = write_demo(tmp_path_factory.mktemp("demo-ckpt"), vocab=vocab_path)
    dst = tmp_path_factory.mktemp("demo-mlx") / "demo"
    convert(ckpt, dst, progress=False)
    return dst
