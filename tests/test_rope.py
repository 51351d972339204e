"""YaRN RoPE against transformers' yarn (truncate false) and the reference doc's numbers."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest
import transformers

from gptoss_mlx.config import ModelConfig
from gptoss_mlx.convert.synthetic import preset_config, tiny_config
from gptoss_mlx.model.rope import YarnRope, attention_scale, concentration, yarn_inv_freq


def hf_yarn(config: dict) -> tuple[np.ndarray, float]:
    """transformers' (inv_freq, attention_factor) for a Hugging Face config dict."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = transformers.GptOssConfig.from_dict(config)
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    return inv_freq.double().numpy(), float(factor)


@pytest.mark.parametrize("config", [preset_config("20b"), tiny_config(head_dim=32),
                                    tiny_config(head_dim=64)], ids=["20b", "hd32", "hd64"])
def test_inv_freq_and_concentration_match_transformers(config: dict) -> None:
    cfg = ModelConfig.from_dict(config)
    want, factor = hf_yarn(config)
    np.testing.assert_allclose(np.array(yarn_inv_freq(cfg)), want, rtol=1e-6)
    assert concentration(cfg) == pytest.approx(factor, rel=1e-12)
    assert attention_scale(cfg) == pytest.approx(factor**2 / math.sqrt(cfg.head_dim))


def test_released_config_gives_the_documented_yarn(shared_dir) -> None:
    raw = json.loads((shared_dir / "configs" / "gpt-oss-20b.json").read_text())
    cfg = ModelConfig.from_dict(raw)
    want, _ = hf_yarn(raw)
    np.testing.assert_allclose(np.array(yarn_inv_freq(cfg)), want, rtol=1e-6)
    assert concentration(cfg) == pytest.approx(1.3466, abs=1e-4)


def test_correction_range_is_not_rounded() -> None:
    """Reference doc: low = 8.0928, high = 17.3980 unrounded; rounding them (to 8 and 18, as
    mlx-lm does) changes exactly dims 9..17."""
    cfg = ModelConfig.from_dict(preset_config("20b"))
    theta, factor = cfg.rope_theta, cfg.rope_scaling.factor
    low, high = 8.0928, 17.3980
    ours = np.array(yarn_inv_freq(cfg))
    for i, got in enumerate(ours):
        freq = theta ** (2 * i / 64)
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        assert got == pytest.approx(ramp / (factor * freq) + (1 - ramp) / freq, rel=1e-4)
    from mlx_lm.models.rope_utils import YarnRoPE

    rounded = 1.0 / np.array(YarnRoPE(64, base=theta, scaling_factor=factor)._freqs)
    differs = np.flatnonzero(~np.isclose(ours, rounded, rtol=1e-5))
    assert differs.tolist() == list(range(9, 18))


@pytest.mark.parametrize("dtype,tol", [(mx.float32, 1e-5), (mx.bfloat16, 2e-2)])
def test_rotation_is_half_split_at_each_offset(dtype: mx.Dtype, tol: float) -> None:
    """mx.fast.rope with our periods rotates dim i with dim i + D/2 by position * inv_freq."""
    cfg = ModelConfig.from_dict(tiny_config(head_dim=32))
    rope = YarnRope(cfg)
    inv = np.array(yarn_inv_freq(cfg))
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 32)).astype(np.float32)
    for offset in (0, 7, 4000):
        got = np.array(rope(mx.array(x).astype(dtype), offset).astype(mx.float32))
        ang = (np.arange(offset, offset + 5)[:, None] * inv[None, :])
        cos, sin = np.cos(ang), np.sin(ang)
        a, b = x[..., :16], x[..., 16:]
        want = np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
        # float32 angles (as in transformers) carry ~offset * 6e-8 rad of rounding
        np.testing.assert_allclose(got, want, atol=tol * 4 + offset * 1.5e-7, rtol=tol)
