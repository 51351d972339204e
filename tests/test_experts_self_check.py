"""The load-time self-check of a non-portable experts backend against the portable one."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import gptoss_mlx
from gptoss_mlx.convert import convert
from gptoss_mlx.convert.synthetic import tiny_config, write_checkpoint
from gptoss_mlx.kernels import autotune
from gptoss_mlx.model import loader
from gptoss_mlx.model.experts import ENV_VAR, moe
from gptoss_mlx.model.loader import ModelLoadError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("selfcheck")
    src = write_checkpoint(root / "src", tiny_config(vocab_size=1000), layout="hf", seed=5)
    convert(src, root / "mlx", progress=False)
    return root / "mlx"


def does_not_compile(*args, **kwargs):
    raise RuntimeError("[metal_kernel] Unable to build metal library from source")


def swaps_gate_and_up(x, indices, weights, gate, up, down, *args, **kwargs):
    return moe(x, indices, weights, up, gate, down, *args, **kwargs)


@pytest.mark.parametrize("broken", [does_not_compile, swaps_gate_and_up])
def test_an_asked_for_backend_that_fails_is_refused(model_dir: Path, broken) -> None:
    with pytest.raises(ModelLoadError, match="failed its self-check"):
        gptoss_mlx.load(model_dir, experts=broken)


@pytest.mark.parametrize("broken", [does_not_compile, swaps_gate_and_up])
def test_an_automatic_backend_that_fails_falls_back(model_dir: Path, broken,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture,
                                                    tmp_path: Path) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the autotune stores its verdict there
    monkeypatch.setattr(loader, "resolve_backend", lambda experts: ("metal", broken))
    monkeypatch.setattr(autotune, "metal_available", lambda: True)  # every metal path fails
    model, _ = gptoss_mlx.load(model_dir, experts="auto")
    assert "using the portable mlx experts" in capsys.readouterr().err
    assert model.experts_backend == "mlx" and model.moe_fn is moe
    monkeypatch.undo()
    portable, _ = gptoss_mlx.load(model_dir, experts="mlx")
    tokens = mx.array([[1, 2, 3, 4, 5]], dtype=mx.int32)
    np.testing.assert_array_equal(np.array(model(tokens).astype(mx.float32)),
                                  np.array(portable(tokens).astype(mx.float32)))
