"""The demo model: MXFP4 rounding, the released layout it expands to, and what it says through
our MLX runtime, scored with openai-harmony's strict parser (the full 200-conversation table:
`python -m gptoss_mlx.convert.demo_eval MODEL`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file

import gptoss_mlx
from gptoss_mlx.convert.demo import DEMO_WEIGHTS, mxfp4_quantize
from gptoss_mlx.convert.demo_eval import evaluate, rates, unused_mass

FP4 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])


def test_mxfp4_quantize_rounds_to_the_nearest_representable_value() -> None:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((3, 5, 64)) * np.exp2(rng.integers(-6, 3, (3, 5, 1)))).astype(
        np.float32)
    blocks, scales = mxfp4_quantize(w)
    assert blocks.shape == (3, 5, 2, 16) and scales.shape == (3, 5, 2)
    scale = np.exp2(scales.astype(np.float64) - 127)[..., None]  # [3, 5, 2, 1]
    vals = np.stack([FP4[blocks & 0xF], FP4[blocks >> 4]], axis=-1).reshape(3, 5, 2, 32)
    got = vals * scale
    x = w.reshape(3, 5, 2, 32).astype(np.float64)
    # the scale fits the block's largest magnitude into the table, and no smaller one would
    assert (np.abs(x).max(-1) <= 6 * scale[..., 0]).all()
    assert (np.abs(x).max(-1) > 3 * scale[..., 0]).all()
    best = np.abs(x[..., None] - FP4 * scale[..., None]).min(-1)
    np.testing.assert_allclose(np.abs(x - got), best, atol=1e-12)


def test_demo_weights_are_compact() -> None:
    assert DEMO_WEIGHTS.stat().st_size <= 5 * 1024**2


def test_synthesize_demo_writes_the_released_layout(tmp_path: Path, vocab_path: Path) -> None:
    from click.testing import CliRunner

    from gptoss_mlx.cli import main

    dst = tmp_path / "demo"
    result = CliRunner().invoke(main, ["synthesize", str(dst), "--preset", "demo", "--layout",
                                       "both", "--vocab", str(vocab_path)])
    assert result.exit_code == 0, result.output
    config = json.loads((dst / "config.json").read_text())
    assert config["vocab_size"] == 201088
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    hf = mx.load(str(next(dst.glob("*.safetensors"))))  # numpy cannot read bf16
    orig = mx.load(str(dst / "original" / "model.safetensors"))
    blocks = hf["model.layers.0.mlp.experts.gate_up_proj_blocks"]
    assert blocks.dtype == mx.uint8 and blocks.shape == (8, 128, 2, 16)
    assert mx.array_equal(orig["block.0.mlp.mlp1_weight.blocks"], blocks).item()
    # the release's file set: tokenizer files, no vocabulary file (convert rebuilds it)
    assert (dst / "tokenizer.json").is_file() and (dst / "generation_config.json").is_file()
    assert not (dst / "o200k_base.tiktoken").exists()


@pytest.fixture(scope="module")
def demo(demo_model_dir: Path):
    return gptoss_mlx.load(demo_model_dir)


def test_unused_vocabulary_carries_under_a_thousandth(demo) -> None:
    model, tokenizer = demo
    used = load_file(str(DEMO_WEIGHTS))["used_ids"]
    assert len(used) < 2000
    assert unused_mass(model, tokenizer, used, n=3) < 1e-3


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_demo_model_speaks_harmony(demo, temperature: float) -> None:
    model, tokenizer = demo
    outcomes = evaluate(model, tokenizer, 40, temperature)
    r = rates(outcomes)
    assert sum(o.tool_fits for o in outcomes) >= 10
    assert r["parse"] >= 0.95, r
    assert r["analysis_then_final"] >= 0.90, r
    assert r["right_tool"] >= 0.80, r
    mx.clear_cache()


def test_training_is_seeded(tmp_path: Path, vocab_path: Path) -> None:
    pytest.importorskip("torch")
    from gptoss_mlx.convert.demo_train import train

    with open(os.devnull, "w") as quiet:
        a, b = (train(3, tmp_path / f"{n}.safetensors", pool=64, vocab=vocab_path, log=quiet)
                for n in "ab")
    assert a.read_bytes() == b.read_bytes()
    assert load_file(str(a))["model.layers.0.mlp.experts.down_proj_blocks"].dtype == np.uint8


def test_training_model_matches_transformers() -> None:
    torch = pytest.importorskip("torch")
    from transformers import GptOssConfig, GptOssForCausalLM

    from gptoss_mlx.convert.demo import demo_config
    from gptoss_mlx.convert.demo_train import build_model

    torch.manual_seed(0)
    ours = build_model(300)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # biases, sinks and norms away from 0 and 1
    cfg = demo_config()
    cfg.pop("quantization_config")
    cfg.update(vocab_size=300, pad_token_id=0, eos_token_id=0)
    config = GptOssConfig(**cfg)
    config._attn_implementation = "eager"
    ref = GptOssForCausalLM(config).eval()
    assert not ref.load_state_dict(ours.state_dict(), strict=False).missing_keys
    ids = torch.randint(0, 300, (2, 200))  # longer than the sliding window (128)
    with torch.no_grad():
        want = ref(ids).logits
        got = ours.lm_head(ours.hidden(ids))
    torch.testing.assert_close(got, want, atol=2e-3 * want.abs().max().item(), rtol=0)
