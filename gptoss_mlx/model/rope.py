"""YaRN rotary embeddings exactly as OpenAI's PyTorch reference computes them.

The correction range is NOT rounded (mlx-lm floors/ceils it, which changes dims 9..17 of the
released model); the YaRN concentration `0.1 ln(factor) + 1` multiplies cos and sin, so it
scales every q.k product by its square: `attention_scale` folds that into the softmax scale.
"""

from __future__ import annotations

import math

import mlx.core as mx

from gptoss_mlx.config import ModelConfig


def yarn_inv_freq(cfg: ModelConfig) -> list[float]:
    """The per-pair inverse frequencies (`head_dim / 2` values) of the model's YaRN RoPE."""
    dim, base, rs = cfg.head_dim, cfg.rope_theta, cfg.rope_scaling
    freq = [base ** (2 * i / dim) for i in range(dim // 2)]
    if rs.factor <= 1.0:
        return [1.0 / f for f in freq]

    def correction_dim(rotations: float) -> float:
        ctx = rs.original_max_position_embeddings
        return dim * math.log(ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rs.beta_fast), correction_dim(rs.beta_slow)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0.0), min(high, dim - 1.0)
    if high == low:
        high += 0.001
    out = []
    for i, f in enumerate(freq):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)  # 0: extrapolate, 1: interpolate
        out.append(ramp / (rs.factor * f) + (1.0 - ramp) / f)
    return out


def concentration(cfg: ModelConfig) -> float:
    """The YaRN factor that multiplies cos and sin: `0.1 ln(factor) + 1` (1 without scaling)."""
    factor = cfg.rope_scaling.factor
    return 0.1 * math.log(factor) + 1.0 if factor > 1.0 else 1.0


def attention_scale(cfg: ModelConfig) -> float:
    """Softmax scale with the YaRN concentration folded in: `concentration^2 / sqrt(head_dim)`."""
    return concentration(cfg) ** 2 / math.sqrt(cfg.head_dim)


class YarnRope:
    """Half-split RoPE at the YaRN frequencies, on `mx.fast.rope` (without the concentration)."""

    def __init__(self, cfg: ModelConfig):
        self.dims = cfg.head_dim
        # mx.fast.rope takes the periods (1 / inv_freq) in float32.
        self.periods = mx.array([1.0 / f for f in yarn_inv_freq(cfg)], dtype=mx.float32)

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        """Rotate `x` [B, heads, T, head_dim] whose first token sits at position `offset`
        (an int, or an int32 array [B] of one position per row)."""
        return mx.fast.rope(x, self.dims, traditional=False, base=None, scale=1.0,
                            offset=offset, freqs=self.periods)
