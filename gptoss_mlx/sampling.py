"""Token sampling: temperature, top-k, top-p, min-p and a seed, as MLX ops on the logits.

The filters apply in transformers' order: temperature, then top-k, then top-p (the smallest set
of most likely tokens whose probability reaches p), then min-p (drop tokens below min_p times
the top probability). Temperature 0 is greedy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

FLOAT32_MAX = 3.4028234663852886e38
NON_FINITE = 1 << 31  # the bit `flag_non_finite` sets in a token sampled from nan or inf logits


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. The defaults (1.0 / 1.0) are OpenAI's for gpt-oss."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (0 <= self.temperature < math.inf, "temperature must be finite and >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0 (0 disables it)"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.seed is None or 0 <= self.seed < 2**64, "seed must be in [0, 2**64)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message}, got {self}")

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax (also for a temperature so small that float32
        cannot hold its inverse: argmax is the limit)."""
        return self.temperature * FLOAT32_MAX < 1 or self.top_k == 1


def scaled_logits(logits: mx.array, inv_temp: float) -> mx.array:
    """float32 `logits / temperature`, the top logit subtracted first (softmax is unchanged): a
    small temperature then sends the others to -inf instead of the top to +inf."""
    x = logits.astype(mx.float32)
    return (x - mx.max(x, axis=-1, keepdims=True)) * inv_temp


def filtered_logprobs(logits: mx.array, params: SamplingParams) -> mx.array:
    """Log-probabilities after temperature and the top-k/top-p/min-p filters.

    `logits` is [B, V]; removed tokens get -inf; the rest are renormalised. Needs temperature > 0.
    """
    x = scaled_logits(logits, 1.0 / params.temperature)
    vocab = x.shape[-1]
    if 0 < params.top_k < vocab:
        kth = mx.partition(x, vocab - params.top_k, axis=-1)[:, vocab - params.top_k][:, None]
        x = mx.where(x >= kth, x, -mx.inf)
    if params.top_p < 1.0:
        order = mx.argsort(-x, axis=-1)
        sorted_logprobs = mx.take_along_axis(x, order, axis=-1)
        sorted_probs = mx.softmax(sorted_logprobs, axis=-1)
        # Keep a token when the mass strictly before it is still below top_p; the most likely
        # one always (a top_p below float32's smallest would otherwise keep none).
        before = mx.cumsum(sorted_probs, axis=-1) - sorted_probs
        keep_sorted = (before < params.top_p) | (mx.arange(vocab) == 0)
        keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
        x = mx.where(keep, x, -mx.inf)
    x = x - mx.logsumexp(x, axis=-1, keepdims=True)
    if params.min_p > 0:
        top = mx.max(x, axis=-1, keepdims=True)
        x = mx.where(x >= top + math.log(params.min_p), x, -mx.inf)
        x = x - mx.logsumexp(x, axis=-1, keepdims=True)
    return x


def make_sampler(params: SamplingParams) -> Callable[[mx.array], mx.array]:
    """A function from logits [B, V] to token ids [B] (uint32), seeded by `params.seed`.

    With a seed the sampler draws from its own key chain, so a run is reproducible no matter
    what else uses MLX's global random state.
    """
    if params.greedy:
        return lambda logits: mx.argmax(logits, axis=-1)
    key = mx.random.key(params.seed) if params.seed is not None else None
    filtered = params.top_k > 0 or params.top_p < 1 or params.min_p > 0
    inv_temp = 1.0 / params.temperature

    def sample(logits: mx.array) -> mx.array:
        nonlocal key
        if filtered:
            logprobs = filtered_logprobs(logits, params)
        else:  # categorical normalises by itself
            logprobs = scaled_logits(logits, inv_temp)
        if key is None:
            return mx.random.categorical(logprobs, axis=-1)
        key, sub = mx.random.split(key)
        return mx.random.categorical(logprobs, axis=-1, key=sub)

    return sample


def flag_non_finite(sampler: Callable[[mx.array], mx.array]) -> Callable[[mx.array], mx.array]:
    """`sampler`, with the NON_FINITE bit set in a token whose own logit is nan or inf.

    Corrupt weights turn the hidden state nan or inf, and the final norm and lm_head spread that
    over every logit of the row, so the sampled one tells. Reading one logit costs nothing (a sum
    over the 201k logits costs as much as the argmax on a CPU), and it is part of the sampled
    token's graph: reading the token, which generation does anyway, tells it without another
    synchronisation. `token_ids` clears the bit for feeding the token back to the model."""

    def sample(logits: mx.array) -> mx.array:
        token = sampler(logits).astype(mx.uint32)
        picked = mx.take_along_axis(logits, token[:, None], axis=-1)[:, 0]
        return token | ((~mx.isfinite(picked)).astype(mx.uint32) << 31)

    return sample


def token_ids(flagged: mx.array) -> mx.array:
    """The token ids of `flag_non_finite`'s samples (NON_FINITE cleared: always in range)."""
    return flagged & (NON_FINITE - 1)
