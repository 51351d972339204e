"""Sampling filters against transformers' logits warpers (applied in transformers' order), and
the sampled frequencies against the filtered distribution."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from gptoss_mlx.sampling import SamplingParams, filtered_logprobs, make_sampler


def oracle_probs(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    scores = torch.tensor(logits, dtype=torch.float32)
    ids = torch.zeros((logits.shape[0], 1), dtype=torch.long)
    warpers = [TemperatureLogitsWarper(p.temperature)]
    if p.top_k:
        warpers.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1:
        warpers.append(TopPLogitsWarper(p.top_p))
    if p.min_p:
        warpers.append(MinPLogitsWarper(p.min_p))
    for w in warpers:
        scores = w(ids, scores)
    return torch.softmax(scores, dim=-1).numpy()


CASES = [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(temperature=1.0, top_p=0.6),
    SamplingParams(temperature=0.8, min_p=0.1),
    SamplingParams(temperature=1.5, top_k=20, top_p=0.9, min_p=0.05),
    SamplingParams(temperature=1.0, top_p=1e-9),  # below any probability: the top token stays
    SamplingParams(temperature=1.0, top_p=5e-324),  # 0 in float32 (a fuzzer sent it)
]


@pytest.mark.parametrize("params", CASES, ids=str)
def test_filters_match_transformers(params: SamplingParams) -> None:
    logits = np.random.default_rng(0).normal(0, 3, size=(3, 64)).astype(np.float32)
    ours = np.exp(np.array(filtered_logprobs(mx.array(logits), params)))
    np.testing.assert_allclose(ours, oracle_probs(logits, params), atol=1e-6)


@pytest.mark.parametrize(
    "params", [SamplingParams(temperature=1.0, top_k=4, seed=1),
               SamplingParams(temperature=0.5, seed=2)], ids=str)
def test_sampled_frequencies_follow_the_filtered_distribution(params: SamplingParams) -> None:
    logits = np.array([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0]], dtype=np.float32)
    expected = oracle_probs(logits, params)[0]
    sample = make_sampler(params)
    n = 4000
    draws = np.array([sample(mx.array(logits)).item() for _ in range(n)])
    freq = np.bincount(draws, minlength=6) / n
    if params.top_k:
        assert freq[params.top_k:].sum() == 0  # outside the top-k: never drawn
    # 5 standard deviations of a binomial frequency.
    assert np.all(np.abs(freq - expected) <= 5 * np.sqrt(expected * (1 - expected) / n) + 1e-9)


def test_seed_reproduces_and_differs() -> None:
    logits = mx.array(np.random.default_rng(1).normal(size=(1, 1000)).astype(np.float32))

    def run(seed: int) -> list[int]:
        sample = make_sampler(SamplingParams(seed=seed))
        return [sample(logits).item() for _ in range(20)]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_greedy() -> None:
    logits = mx.array([[0.1, 3.0, 2.9], [5.0, -1.0, 4.0]])
    assert make_sampler(SamplingParams(temperature=0))(logits).tolist() == [1, 0]
    assert make_sampler(SamplingParams(top_k=1, seed=0))(logits).tolist() == [1, 0]


@pytest.mark.parametrize("temperature", [1e-30, 1e-45])
def test_tiny_temperature_tends_to_greedy(temperature: float) -> None:
    """logits / 1e-45 overflows float32: the limit, argmax, is what must come out."""
    logits = np.random.default_rng(2).normal(0, 3, size=(4, 1000)).astype(np.float32)
    sample = make_sampler(SamplingParams(temperature=temperature, seed=0))
    assert sample(mx.array(logits)).tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2}, {"min_p": 1},
     {"temperature": float("nan")}, {"temperature": float("inf")}, {"seed": -1},
     {"seed": 2**64}],
)
def test_bad_params(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
