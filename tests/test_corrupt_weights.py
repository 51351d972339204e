"""Corrupt weights: a load-time scan of the expert scales, and generation that stops on nan or
inf logits with one error line instead of printing garbage."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from gptoss_mlx.generate import NonFiniteLogitsError, stream
from gptoss_mlx.model.loader import MAX_EXPERT_SCALE, ModelLoadError, load_model
from gptoss_mlx.sampling import NON_FINITE, SamplingParams, flag_non_finite, make_sampler, token_ids

SCALES = "model.layers.1.mlp.experts.down_proj.scales"


def edited_copy(src: Path, dst: Path, edit: Callable[[dict[str, np.ndarray]], None]) -> Path:
    """`src` with its tensors changed by `edit` (a dict of numpy arrays, floats as float32)."""
    dst.mkdir()
    tensors: dict[str, np.ndarray] = {}
    for f in sorted(src.glob("model*.safetensors")):
        tensors.update({n: np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a)
                        for n, a in mx.load(str(f)).items()})
    edit(tensors)
    mx.save_safetensors(str(dst / "model.safetensors"),
                        {n: mx.array(a) for n, a in tensors.items()}, metadata={"format": "mlx"})
    for f in src.iterdir():
        if not f.name.startswith("model"):
            (dst / f.name).symlink_to(f)
    return dst


def expert_scales(tensors: dict[str, np.ndarray]) -> list[str]:
    return sorted(n for n in tensors if ".experts." in n and n.endswith(".scales"))


def set_all_scales_ff(tensors: dict[str, np.ndarray]) -> None:
    for n in expert_scales(tensors):
        tensors[n][...] = 0xFF


def flip_bit7_in_500_scales(tensors: dict[str, np.ndarray]) -> None:
    rng = np.random.default_rng(0)
    names = expert_scales(tensors)
    for _ in range(500):
        flat = tensors[names[rng.integers(len(names))]].reshape(-1)
        flat[rng.integers(flat.size)] ^= 0x80


@pytest.mark.parametrize("edit,needle", [
    (set_all_scales_ff, "holds the MXFP4 scale byte 255 (nan in E8M0) (and 11 more tensors)"),
    (flip_bit7_in_500_scales, "holds the MXFP4 scale byte 2"),
])
def test_corrupt_expert_scales_are_refused_at_load(tiny_model_dir: Path, tmp_path: Path,
                                                   edit: Callable, needle: str) -> None:
    folder = edited_copy(tiny_model_dir, tmp_path / "bad", edit)
    with pytest.raises(ModelLoadError) as info:
        load_model(folder, experts="mlx")
    message = str(info.value)
    assert message.startswith(f"{folder}: model.layers.") and ".scales " in message, message
    assert needle in message and "corrupt" in message and "\n" not in message


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_refused_weights_are_one_line_naming_the_folder_once(tiny_model_dir: Path,
                                                            tmp_path: Path, command: str) -> None:
    folder = edited_copy(tiny_model_dir, tmp_path / "bad", set_all_scales_ff)
    args = ["-p", "hello"] if command == "generate" else ["-p", "8", "-n", "4", "-d", ""]
    proc = subprocess.run([sys.executable, "-m", "gptoss_mlx", command, "-m", str(folder), *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stdout == "", proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert line.startswith(f"Error: {folder}: model.layers.") and line.count(str(folder)) == 1
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("byte,ok", [(MAX_EXPERT_SCALE, True), (MAX_EXPERT_SCALE + 1, False)])
def test_the_scale_bound_is_exact(tiny_model_dir: Path, tmp_path: Path, byte: int,
                                  ok: bool) -> None:
    def one_byte(tensors: dict[str, np.ndarray]) -> None:
        tensors[SCALES][2, 5, 1] = byte

    folder = edited_copy(tiny_model_dir, tmp_path / "edge", one_byte)
    if ok:
        load_model(folder, experts="mlx")
    else:
        with pytest.raises(ModelLoadError, match=rf"{SCALES} holds the MXFP4 scale byte {byte} "
                                                 r"\(a scale of 2\^17\), where no trained "
                                                 r"model goes above 143: "):
            load_model(folder, experts="mlx")


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_generation_stops_on_nan_logits_with_one_line(tiny_model_dir: Path, tmp_path: Path,
                                                      command: str) -> None:
    """A nan weight the scale scan cannot see (the final norm): no garbage on stdout, one error
    line naming the folder, exit 1 (chat ends: every turn would fail alike)."""
    def nan_norm(tensors: dict[str, np.ndarray]) -> None:
        tensors["model.norm.weight"][3] = np.nan

    folder = edited_copy(tiny_model_dir, tmp_path / "nan", nan_norm)
    args = ["-p", "hello"] if command == "generate" else []
    proc = subprocess.run([sys.executable, "-m", "gptoss_mlx", command, "-m", str(folder), *args,
                           "--max-tokens", "8"], input="hello\n", capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    lines = [line.removeprefix(">>> ") for line in proc.stderr.splitlines()]  # chat's prompt
    errors = [line for line in lines if line.startswith("Error:")]
    assert errors == [f"Error: {folder}: the model computed non-finite logits (nan or inf) for "
                      "output token 1; its weights are likely corrupt: convert the released "
                      "checkpoint again"], proc.stderr
    assert "Traceback" not in proc.stderr


class NanFrom:
    """The real model, whose logits turn nan from decode step `step` on."""

    def __init__(self, model, step: int):
        self.model, self.step, self.config, self.fed = model, step, model.config, []

    def make_cache(self):
        return self.model.make_cache()

    def __call__(self, tokens: mx.array, cache=None, last_only: bool = False) -> mx.array:
        logits = self.model(tokens, cache=cache, last_only=last_only)
        if tokens.shape[1] == 1:
            self.fed.append(tokens.item())
            if len(self.fed) >= self.step:
                logits = logits * mx.array(float("nan"), dtype=logits.dtype)
        return logits


def test_stream_raises_on_the_first_non_finite_step(tiny_model_dir: Path) -> None:
    """The decode is pipelined: the flagged token was already fed to the next step, as a valid
    id (no out-of-range read), and the error comes before it is yielded."""
    from gptoss_mlx import load

    model, tokenizer = load(tiny_model_dir, experts="mlx")
    nan = NanFrom(model, step=3)
    got = []
    with pytest.raises(NonFiniteLogitsError, match="output token 4"):
        for event in stream(nan, tokenizer, [200006, 1000, 2000], max_tokens=20,
                            stop_tokens=frozenset(), sampling=SamplingParams(temperature=0)):
            got.append(event.token)
    assert len(got) == 3 and got == nan.fed[:3]
    assert all(0 <= t < model.config.vocab_size for t in nan.fed)


@pytest.mark.parametrize("params", [SamplingParams(temperature=0), SamplingParams(seed=1),
                                    SamplingParams(seed=1, top_p=0.5, top_k=5)])
def test_flag_marks_exactly_the_non_finite_rows(params: SamplingParams) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 1000)).astype(np.float32)
    logits[1] = np.nan
    logits[2] = np.inf
    logits[3, :] = -np.inf
    logits[3, 7] = np.inf  # the top logit is inf: it is the one sampled
    flagged = flag_non_finite(make_sampler(params))(mx.array(logits))
    values = np.array(flagged).astype(np.int64)
    assert [bool(v & NON_FINITE) for v in values] == [False, True, True, True]
    ids = np.array(token_ids(flagged))
    assert ids.max() < 1000
    if params.temperature == 0:
        assert ids[0] == logits[0].argmax()
