"""`--dtype` on every command that loads a model: the model computes in it, the memory plan counts
it, and a bad value is click's one-line usage error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from click.testing import CliRunner

from gptoss_mlx.cli import main
from gptoss_mlx.memory import DTYPE_SIZES
from gptoss_mlx.model import loader


class _NoServer:
    """Stands for uvicorn's server: `serve` returns once the model is loaded."""

    def run(self, sockets: Any) -> None:
        for sock in sockets:
            sock.close()


def _commands(model: Path, tmp_path: Path) -> dict[str, tuple[list[str], str | None]]:
    """Each command's arguments for a short run on `model`, and its stdin."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"messages": [{"role": "user", "content": "Hi"}]}\n')
    m = str(model)
    return {
        "generate": (["generate", "-m", m, "-p", "Hi", "--max-tokens", "2"], None),
        "generate --prompts": (["generate", "-m", m, "--prompts", str(prompts),
                                "--max-tokens", "2"], None),
        "chat": (["chat", "-m", m, "--max-tokens", "2"], "Hi\n"),
        "serve": (["serve", "-m", m, "--port", "0", "--max-batch", "1"], None),
        "bench": (["bench", "-m", m, "-p", "8", "-n", "2", "-d", "", "-r", "1",
                   "--schema-tokens", "0"], None),
    }


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_dtype_reaches_the_model_of_each_command(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str) -> None:
    loaded: list[Any] = []
    real = loader.load_model

    def load_model(*args: Any, **kwargs: Any) -> Any:
        loaded.append(real(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(loader, "load_model", load_model)
    monkeypatch.setattr("gptoss_mlx.cli.serve._server", lambda config, engine: _NoServer())
    want = getattr(mx, dtype)
    for name, (args, stdin) in _commands(tiny_model_dir, tmp_path).items():
        loaded.clear()
        result = CliRunner().invoke(main, [*args, "--dtype", dtype], input=stdin)
        assert result.exit_code == 0, (name, result.output, result.exception)
        assert len(loaded) == 1, name
        model = loaded[0]
        assert model.lm_head.weight.dtype == want, name
        assert model.model.layers[0].self_attn.sinks.dtype == want, name
        assert model.model.norm.weight.dtype == want, name


def test_bfloat16_as_released_by_default(tiny_model_dir: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    real = loader.load_model
    monkeypatch.setattr(loader, "load_model",
                        lambda path, dtype="bfloat16", *a, **k: (seen.append(dtype),
                                                                 real(path, dtype, *a, **k))[1])
    args, _ = _commands(tiny_model_dir, tmp_path)["generate"]
    assert CliRunner().invoke(main, args).exit_code == 0
    assert seen == ["bfloat16"]


@pytest.mark.parametrize("command", ["generate", "chat", "serve", "bench", "plan"])
def test_a_bad_dtype_is_one_line(tiny_model_dir: Path, command: str) -> None:
    result = CliRunner().invoke(main, [command, "-m", str(tiny_model_dir), "--dtype", "int8"])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert errors == ["Error: Invalid value for '--dtype': 'int8' is not one of 'bfloat16', "
                      "'float16', 'float32'."], result.output


def test_plan_counts_weights_and_kv_cache_at_the_dtype(tiny_model_dir: Path) -> None:
    """`plan --dtype`: the plan of `plan_memory(dtype=...)`, whose figures test_memory checks
    against the loaded arrays."""
    from gptoss_mlx.memory import gb, plan_memory

    for dtype in DTYPE_SIZES:
        result = CliRunner().invoke(main, ["plan", "-m", str(tiny_model_dir),
                                           "--max-context", "2048", "--dtype", dtype])
        assert result.exit_code == 0, result.output
        plan = plan_memory(tiny_model_dir, 2048, dtype=dtype)
        assert (f"{gb(plan.total)} at a 2048-token context (weights {gb(plan.weights_total)} + "
                f"KV cache {gb(plan.kv_cache)} + ") in result.output.splitlines()[0]
    f32, bf16 = (plan_memory(tiny_model_dir, 2048, dtype=d) for d in ("float32", "bfloat16"))
    assert f32.kv_cache == 2 * bf16.kv_cache
    assert f32.weights_total > bf16.weights_total


def test_serve_plans_its_batch_at_the_dtype(tiny_model_dir: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A working set with room for exactly 3 float32 KV caches beside the float32 weights has
    room for more in bfloat16 (half the bytes each, lighter weights)."""
    from gptoss_mlx.cli.serve import plan_serving_batch
    from gptoss_mlx.memory import plan_memory

    f32 = plan_memory(tiny_model_dir, 4096, dtype="float32")
    monkeypatch.setenv("GPTOSS_MLX_WORKING_SET",
                       str(f32.weights_total + f32.buffers_total + 3 * f32.kv_cache + 1000))
    assert plan_serving_batch(tiny_model_dir, 4096, 1, None, "float32").batch == 3
    assert plan_serving_batch(tiny_model_dir, 4096, 1, None, "bfloat16").batch > 6
