"""The experts autotune: the fastest backend per phase from injected timings (the Metal paths run
on the CPU MSL emulator for their self-checks), the user cache and its invalidation, a failing
kernel never chosen, and the no-op without Metal."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from msl_emulator import make_factory

import gptoss_mlx
from gptoss_mlx.convert import convert
from gptoss_mlx.convert.synthetic import tiny_config, write_checkpoint
from gptoss_mlx.kernels import autotune as at
from gptoss_mlx.kernels.moe import moe as kernels_moe
from gptoss_mlx.model import loader
from gptoss_mlx.model.experts import ENV_VAR, moe

pytestmark = pytest.mark.skipif(shutil.which("g++") is None,
                                reason="the MSL emulator needs g++")
E, H, INTER, K = 6, 64, 96, 4
# seconds per call: size -> candidate -> time (metal-gemv is not timed at 512 tokens)
TIMES = {1: {"mlx": 10.0, "metal-gemv": 3.0, "metal-fma": 8.0, "metal-mma": 9.0},
         4: {"mlx": 10.0, "metal-gemv": 5.0, "metal-fma": 6.0, "metal-mma": 4.0},
         16: {"mlx": 10.0, "metal-gemv": 12.0, "metal-fma": 11.0, "metal-mma": 9.0},
         512: {"mlx": 30.0, "metal-fma": 60.0, "metal-mma": 40.0}}
WANT = {1: "metal-gemv", 4: "metal-mma", 16: "metal-mma", 512: "mlx"}


@functools.cache
def experts() -> tuple[tuple[mx.array, ...], ...]:
    rng = np.random.default_rng(0)

    def q(out: int, inp: int) -> tuple[mx.array, ...]:
        w = rng.integers(0, 2**32, size=(E, out, inp // 8), dtype=np.uint64).astype(np.uint32)
        s = rng.integers(120, 125, size=(E, out, inp // 32)).astype(np.uint8)
        return mx.array(w), mx.array(s), mx.array(rng.normal(size=(E, out)).astype(np.float32))

    return q(INTER, H), q(INTER, H), q(H, INTER)


def emulated(**factory_kw: Any) -> Any:
    return functools.partial(kernels_moe, kernel_factory=make_factory(**factory_kw))


class Timer:
    """Injected timings; records the calls and runs each candidate once for small sizes."""

    def __init__(self, times: dict[int, dict[str, float]] = TIMES) -> None:
        self.times, self.calls = times, []

    def __call__(self, name: str, n: int, run: Any) -> float:
        self.calls.append((name, n))
        if n <= 4:
            assert np.isfinite(np.array(run().astype(mx.float32))).all()
        return self.times[n][name]


def never(name: str, n: int, run: Any) -> float:
    raise AssertionError(f"measured {name} at {n} tokens")


@pytest.fixture
def mac(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Pretend Metal exists, on a fixed chip, with the user cache under tmp_path."""
    monkeypatch.setattr(at, "metal_available", lambda: True)
    monkeypatch.setattr(at, "chip", lambda: "Apple M9 test")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "gptoss-mlx" / "autotune.json"


def tune(metal_fn: Any, timer: Any) -> at.Choice:
    gate, up, down = experts()
    return at.autotune(metal_fn, gate, up, down, K, mx.float32, timer=timer)


def test_fastest_candidate_per_size_is_chosen_and_dispatched(mac: Path) -> None:
    timer = Timer()
    choice = tune(emulated(), timer)
    assert choice.table == WANT and not choice.rejected
    assert sorted(timer.calls) == sorted((c, n) for n in TIMES for c in TIMES[n])
    assert [choice.candidate(n) for n in (1, 2, 4, 5, 16, 17, 512, 4096)] == [
        "metal-gemv", "metal-mma", "metal-mma", "metal-mma", "metal-mma", "mlx", "mlx", "mlx"]
    assert choice.margin(1) == pytest.approx(10 / 3) and choice.margin(512) == 1.0
    assert "1 tok: metal-gemv (3.33x vs mlx)" in choice.describe()
    # the installed function runs each call on its size's candidate, with the same result
    gate, up, down = experts()
    rng = np.random.default_rng(1)
    for n in (1, 3, 20):
        x = mx.array(rng.normal(size=(n, H)).astype(np.float32))
        idx = mx.array(np.argsort(rng.random((n, E)), axis=1)[:, :K].astype(np.uint32))
        w = mx.softmax(mx.array(rng.normal(size=(n, K)).astype(np.float32)), axis=-1)
        got = at.tuned(choice, emulated())(x, idx, w, gate, up, down)
        want = moe(x, idx, w, gate, up, down)
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-4)


def test_choice_is_stored_in_the_user_cache_and_reused(mac: Path) -> None:
    first = tune(emulated(), Timer())
    assert mac.is_file()
    entry = next(iter(json.loads(mac.read_text()).values()))
    assert entry["key"]["chip"] == "Apple M9 test" and entry["key"]["shape"] == [E, H, INTER, K]
    assert entry["key"]["mlx"] == mx.__version__
    assert tune(emulated(), never) == first


@pytest.mark.parametrize("change", ["kernel sources", "mlx version"])
def test_cache_is_invalidated_by_new_kernels_or_mlx(mac: Path, change: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    tune(emulated(), Timer())
    if change == "kernel sources":
        monkeypatch.setattr(at, "kernel_digest", lambda: "0" * 64)
    else:
        monkeypatch.setattr(at.mx, "__version__", "99.0.0")
    faster_fma = {n: {**t, "metal-fma": 0.5} for n, t in TIMES.items()}
    timer = Timer(faster_fma)
    choice = tune(emulated(), timer)
    assert timer.calls and set(choice.table.values()) == {"metal-fma"}
    assert len(json.loads(mac.read_text())) == 1  # the stale entry is gone


def test_the_real_kernel_digest_covers_the_metal_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    from gptoss_mlx import metal

    digest = at.kernel_digest()
    real_read = Path.read_bytes

    def edited(path: Path) -> bytes:
        data = real_read(path)
        return data + b"// edit" if path.name == "moe_down_mma.metal" else data

    monkeypatch.setattr(Path, "read_bytes", edited)
    assert Path(metal.__file__).with_name("moe_down_mma.metal").is_file()
    assert at.kernel_digest() != digest


def test_a_kernel_failing_its_self_check_is_never_chosen(mac: Path) -> None:
    base = make_factory()

    def broken_mma(name: str, input_names: list[str], output_names: list[str], source: str,
                   header: str = "", **kw: Any) -> Any:  # down weights loaded untransposed
        source = source.replace("ulong2(0, 0), true);", "ulong2(0, 0), false);")
        return base(name, input_names, output_names, source, header, **kw)

    fastest_mma = {n: {**t, "metal-mma": 0.1} for n, t in TIMES.items()}
    timer = Timer(fastest_mma)
    choice = tune(functools.partial(kernels_moe, kernel_factory=broken_mma), timer)
    assert "metal-mma" in choice.rejected and "relative difference" in choice.rejected["metal-mma"]
    assert "metal-mma" not in choice.table.values()
    assert all(name != "metal-mma" for name, _ in timer.calls)
    assert "metal-mma failed its self-check" in choice.describe()


def test_a_kernel_failing_while_timed_is_never_chosen(mac: Path) -> None:
    class FailsAtPrefill(Timer):
        def __call__(self, name: str, n: int, run: Any) -> float:
            if name == "metal-mma" and n == 512:
                raise RuntimeError("[metal] Command buffer execution failed")
            return super().__call__(name, n, run)

    fastest_mma = {n: {**t, "metal-mma": 0.1} for n, t in TIMES.items()}
    choice = tune(emulated(), FailsAtPrefill(fastest_mma))
    assert "RuntimeError: [metal] Command buffer" in choice.rejected["metal-mma"]
    assert choice.table == {1: "metal-gemv", 4: "metal-gemv", 16: "mlx", 512: "mlx"}
    assert all("metal-mma" not in t for t in choice.times.values())


def test_without_metal_the_portable_experts_are_chosen_unmeasured(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(at, "metal_available", lambda: False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    choice = tune(emulated(), never)
    assert set(choice.table.values()) == {"mlx"} and not choice.times
    assert not (tmp_path / "gptoss-mlx").exists()


def test_an_unreadable_cache_is_ignored_and_replaced(mac: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    mac.parent.mkdir(parents=True)
    mac.write_text("{not json")
    assert tune(emulated(), Timer()).table == WANT
    assert "unreadable autotune cache ignored" in capsys.readouterr().err
    assert tune(emulated(), never).table == WANT


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("autotune")
    cfg = tiny_config(vocab_size=1000, hidden_size=H, intermediate_size=INTER, num_local_experts=E,
                      num_experts_per_tok=K, num_hidden_layers=1)
    src = write_checkpoint(root / "src", cfg, layout="hf", seed=3)
    convert(src, root / "mlx", progress=False)
    return root / "mlx"


def test_first_load_tunes_and_installs_the_choice(model_dir: Path, mac: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(loader, "resolve_backend", lambda experts: ("metal", emulated()))
    monkeypatch.setattr(at, "measure", Timer())
    model, _ = gptoss_mlx.load(model_dir, dtype="float32")
    assert model.experts_backend == "auto" and model.moe_fn.choice.table == WANT
    monkeypatch.undo()
    portable, _ = gptoss_mlx.load(model_dir, dtype="float32", experts="mlx")
    tokens = mx.array([[1, 2, 3, 4, 5]], dtype=mx.int32)  # 5 tokens: the metal-mma GEMMs
    got, want = (np.array(m(tokens)) for m in (model, portable))
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_a_forced_backend_is_not_tuned(model_dir: Path, mac: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(at, "measure", never)
    monkeypatch.setenv(ENV_VAR, "mlx")
    model, _ = gptoss_mlx.load(model_dir, dtype="float32")
    assert model.experts_backend == "mlx" and model.moe_fn is moe
    monkeypatch.delenv(ENV_VAR)
    model, _ = gptoss_mlx.load(model_dir, dtype="float32", experts=emulated())
    assert model.moe_fn is not moe and not hasattr(model.moe_fn, "choice")


def test_bench_shows_the_choice_and_its_margin(tiny_model_dir: Path, mac: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from gptoss_mlx.cli import main

    args = ["bench", "-m", str(tiny_model_dir), "-p", "16", "-n", "2", "-d", "", "-r", "1",
            "--experts", "auto"]
    monkeypatch.delenv(ENV_VAR, raising=False)
    result = CliRunner().invoke(main, args)  # no Metal: the portable experts, nothing measured
    assert result.exit_code == 0, result.output + result.stderr
    assert "experts auto: mlx\n" in result.stderr
    monkeypatch.setattr(loader, "resolve_backend", lambda experts: ("metal", emulated()))
    monkeypatch.setattr(at, "measure", Timer())
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output + result.stderr
    assert ("experts auto: auto, autotuned per tokens per call: 1 tok: metal-gemv (3.33x vs "
            "mlx), 4 tok: metal-mma (2.50x vs mlx), 16 tok: metal-mma (1.11x vs mlx), 512 tok: "
            "mlx (1.00x vs mlx)") in result.stderr
    assert "| gptoss-mlx auto |" in result.stdout.replace("  ", " ")
