"""Continuous batching (issue 14) on the tiny converted model: every generation in a batch must
compute what it computes alone (`generate.stream`, decoding on its own caches), logits and tokens,
while others join, leave, stop, fail or are cancelled around it."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from gptoss_mlx.chat.tokenizer import Tokenizer
from gptoss_mlx.generate import Done, NonFiniteLogitsError, PromptCache, TokenEvent, stream
from gptoss_mlx.sampling import SamplingParams
from gptoss_mlx.scheduler import BatchGenerator, Generation

GREEDY = SamplingParams(temperature=0)
NO_STOPS: frozenset[int] = frozenset()
CHUNK = 32


class Tight:
    """The model with sliding caches that keep nothing beyond their window, so they drop
    positions while a batch decodes; records each forward's batch size and tokens' shape."""

    def __init__(self, model: Any):
        self.model = model
        self.config = model.config
        self.batch_sizes: list[int] = []
        self.shapes: list[tuple[int, ...]] = []

    def make_cache(self) -> list[Any]:
        return self.model.make_cache(slack=0, compact_step=8)

    def __call__(self, tokens: mx.array, cache: Any = None, last_only: bool = False) -> mx.array:
        self.batch_sizes.append(tokens.shape[0])
        self.shapes.append(tuple(tokens.shape))
        return self.model(tokens, cache=cache, last_only=last_only)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> tuple[Tight, Tokenizer]:
    from gptoss_mlx import load

    model, tok = load(tiny_model_dir, dtype="float32")
    assert tok is not None and model.config.sliding_window == 16
    return Tight(model), tok


class Recorder:
    """A logits processor that keeps the logits it sees (float32 numpy) and changes nothing."""

    def __init__(self) -> None:
        self.logits: list[np.ndarray] = []

    def __call__(self, generated: list[int], logits: mx.array) -> mx.array:
        self.logits.append(np.array(logits[0].astype(mx.float32)))
        return logits


def prompt_of(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 100000) for _ in range(length)]


def solo(model: Any, tok: Tokenizer, prompt: list[int], **kw: Any) -> tuple[list[int], Done]:
    events = list(stream(model, tok, prompt, prefill_chunk=CHUNK, **kw))
    *tokens, done = events
    assert isinstance(done, Done) and done.tokens == [e.token for e in tokens]
    return done.tokens, done


def run(batch: BatchGenerator, schedule: dict[int, list[tuple[Any, dict[str, Any]]]],
        ) -> dict[Any, tuple[list[int], Done | Exception]]:
    """Step `batch` until idle, submitting schedule[step]'s (key, submit kwargs) before step
    `step`; returns each key's tokens and its Done (or error)."""
    keys: dict[Generation, Any] = {}
    out: dict[Any, tuple[list[int], Done | Exception]] = {}
    tokens: dict[Any, list[int]] = {}
    step = 0
    while batch.busy or step <= max(schedule):
        for key, kw in schedule.get(step, []):
            keys[batch.submit(**kw)] = key
            tokens[key] = []
        for generation, event in batch.step():
            key = keys[generation]
            assert key not in out, "an event after the end"
            if isinstance(event, TokenEvent):
                tokens[key].append(event.token)
            else:
                out[key] = (tokens[key], event)
        step += 1
    return out


# (prompt length, sampling, max_tokens, stop on the solo run's token at this index)
REQUESTS = [
    (3, GREEDY, 40, None),
    (9, SamplingParams(temperature=0.8, seed=1), 30, 5),
    (15, SamplingParams(temperature=1.0, top_p=0.9, seed=2), 30, None),
    (16, GREEDY, 40, 17),
    (17, SamplingParams(temperature=0.7, top_k=40, seed=3), 36, None),
    (33, SamplingParams(temperature=1.0, min_p=0.05, seed=4), 25, 9),
    (80, GREEDY, 30, None),
    (300, SamplingParams(temperature=0.6, seed=5), 36, None),
]


def test_batched_equals_solo(loaded) -> None:
    """8 requests (prompts across the sliding window, greedy and seeded sampling, stops by
    max_tokens and stop tokens) join a batch at different steps: each one's logits at every step
    match its solo run within 1e-4 relative (float32), and its tokens and texts are the same."""
    model, tok = loaded
    requests = []
    for i, (length, sampling, max_tokens, stop_at) in enumerate(REQUESTS):
        prompt = prompt_of(length, i)
        stops = NO_STOPS
        if stop_at is not None:
            unstopped, _ = solo(model, tok, prompt, sampling=sampling, max_tokens=max_tokens,
                                stop_tokens=NO_STOPS)
            stops = frozenset({unstopped[stop_at]})
        requests.append(dict(prompt=prompt, sampling=sampling, max_tokens=max_tokens,
                             stop_tokens=stops))
    expected = []
    for kw in requests:
        recorder = Recorder()
        tokens, done = solo(model, tok, logits_processors=[recorder], **kw)
        expected.append((tokens, done, recorder.logits))
    reasons = [done.stats.finish_reason for _, done, _ in expected]
    assert reasons.count("stop") == 3 and reasons.count("length") == 5

    for with_processors in (True, False):  # processors sample after the read; the rest ahead
        recorders = [Recorder() for _ in requests]
        schedule: dict[int, list[tuple[Any, dict[str, Any]]]] = {0: [], 3: [], 7: []}
        for i, kw in enumerate(requests):
            kw = dict(kw, logits_processors=[recorders[i]] if with_processors else [])
            schedule[(0, 3, 7)[i % 3]].append((i, kw))
        model.batch_sizes.clear()
        got = run(BatchGenerator(model, tok, prefill_chunk=CHUNK), schedule)
        assert max(model.batch_sizes) >= 6  # they really decoded together
        for i, (tokens, done, logits) in enumerate(expected):
            batched, batched_done = got[i]
            assert isinstance(batched_done, Done), batched_done
            assert batched == tokens, f"request {i}"
            assert batched_done.stats.finish_reason == done.stats.finish_reason
            assert [(m.channel, m.content) for m in batched_done.messages] == \
                [(m.channel, m.content) for m in done.messages]
            if with_processors:
                assert len(recorders[i].logits) == len(logits)
                for step, (a, b) in enumerate(zip(recorders[i].logits, logits, strict=True)):
                    err = np.abs(a - b).max() / np.abs(b).max()
                    assert err <= 1e-4, f"request {i}, step {step}: relative error {err:.2e}"


def test_a_prompt_joins_the_step_after_its_last_chunk(loaded) -> None:
    """No step both prefills a chunk and grows the batch: the step with a prompt's last chunk
    decodes the running generations only; the next prefills nothing, and the new generation
    decodes with them there (its first token comes then). Alone, one joins at once."""
    model, tok = loaded
    batch = BatchGenerator(model, tok, prefill_chunk=CHUNK)
    kw = dict(sampling=GREEDY, max_tokens=40, stop_tokens=NO_STOPS)
    first = batch.submit(prompt_of(10, 1), **kw)
    model.shapes.clear()
    assert [g for g, _ in batch.step()] == [first]  # alone: its first token at once
    assert model.shapes == [(1, 10), (1, 1)]
    second = batch.submit(prompt_of(10, 2), **kw)
    long = batch.submit(prompt_of(3 * CHUNK - 5, 3), **kw)
    steps = []
    while not long.generated:
        model.shapes.clear()
        emitted = [g for g, _ in batch.step()]
        steps.append((list(model.shapes), emitted))
    assert steps == [
        ([(1, 10), (1, 1)], [first]),  # the second's prompt; the first decodes alone
        ([(2, 1)], [first, second]),  # the second joins: no chunk
        ([(1, CHUNK), (2, 1)], [first, second]),
        ([(1, CHUNK), (2, 1)], [first, second]),
        ([(1, CHUNK - 5), (2, 1)], [first, second]),  # the long prompt's last chunk
        ([(3, 1)], [first, second, long]),  # it joins: no chunk
    ]


def test_a_burst_of_short_prompts_prefills_in_one_step(loaded) -> None:
    """After the oldest prompt's chunk, each next prompt that fits whole in the rest of the
    chunk's tokens is fed in the same step: with nothing running they all decode at once, else
    they join together the next step; one that does not fit waits for the next chunk step."""
    model, tok = loaded
    batch = BatchGenerator(model, tok, prefill_chunk=CHUNK)
    kw = dict(sampling=GREEDY, max_tokens=40, stop_tokens=NO_STOPS)
    a, b, c = (batch.submit(prompt_of(n, 20 + n), **kw) for n in (10, 12, CHUNK - 22))
    model.shapes.clear()
    assert [g for g, _ in batch.step()] == [a, b, c]
    assert model.shapes == [(1, 10), (1, 12), (1, CHUNK - 22), (3, 1)]
    d, e, f = (batch.submit(prompt_of(n, 30 + n), **kw) for n in (CHUNK - 12, 12, 1))
    steps = []
    for _ in range(3):
        model.shapes.clear()
        emitted = [g for g, _ in batch.step()]
        steps.append((list(model.shapes), emitted))
    assert steps == [
        ([(1, CHUNK - 12), (1, 12), (3, 1)], [a, b, c]),  # f does not fit: the chunk is full
        ([(5, 1)], [a, b, c, d, e]),  # d and e join together
        ([(1, 1), (5, 1)], [a, b, c, d, e]),
    ]


def test_cancel_frees_the_row_and_the_others_go_on(loaded) -> None:
    model, tok = loaded
    prompts = [prompt_of(n, 10 + n) for n in (12, 40, 25)]
    expected = [solo(model, tok, p, sampling=GREEDY, max_tokens=16, stop_tokens=NO_STOPS)[0]
                for p in prompts]
    batch = BatchGenerator(model, tok, prefill_chunk=CHUNK)
    caches = [PromptCache(model) for _ in prompts]
    gens = [batch.submit(p, cache=c, sampling=GREEDY, max_tokens=16, stop_tokens=NO_STOPS)
            for p, c in zip(prompts, caches, strict=True)]
    seen: dict[Generation, list[int]] = {g: [] for g in gens}
    while min(len(t) for t in seen.values()) < 4:
        for g, event in batch.step():
            seen[g].append(event.token)
    victim = gens[1]
    batch.cancel(victim)
    assert victim not in batch.generations
    cache = caches[1]  # back with its tokens, consistent with its layers
    assert all(layer.offset == len(cache.tokens) for layer in cache.layers)
    assert cache.tokens[:len(prompts[1])] == prompts[1]
    assert cache.tokens[len(prompts[1]):] == seen[victim][: len(cache.tokens) - len(prompts[1])]
    model.batch_sizes.clear()
    events = batch.step()
    assert model.batch_sizes == [2]  # the next step runs without it
    while True:
        for g, event in events:
            assert g is not victim
            if isinstance(event, TokenEvent):
                seen[g].append(event.token)
        if not batch.busy:
            break
        events = batch.step()
    assert seen[gens[0]] == expected[0] and seen[gens[2]] == expected[2]
    assert seen[victim] == expected[1][: len(seen[victim])]


def test_caches_come_back_reusable(loaded) -> None:
    """After a batched run each PromptCache holds its prompt and answer: a follow-up request
    reuses all of it (cached_tokens) and continues exactly as a fresh cache would."""
    model, tok = loaded
    prompts = [prompt_of(n, 20 + n) for n in (10, 50, 70)]
    caches = [PromptCache(model) for _ in prompts]
    schedule = {0: [(i, dict(prompt=p, cache=c, sampling=GREEDY, max_tokens=12 + 5 * i,
                             stop_tokens=NO_STOPS))
                    for i, (p, c) in enumerate(zip(prompts, caches, strict=True))]}
    got = run(BatchGenerator(model, tok, prefill_chunk=CHUNK), schedule)
    for i, (prompt, cache) in enumerate(zip(prompts, caches, strict=True)):
        tokens, done = got[i]
        assert isinstance(done, Done) and done.stats.cached_tokens == 0
        assert cache.tokens == prompt + tokens[:-1]  # the last token (max_tokens) is not fed
        follow_up = cache.tokens + tokens[-1:] + prompt_of(7, i)
        again, again_done = solo(model, tok, follow_up, cache=cache, sampling=GREEDY,
                                 max_tokens=10, stop_tokens=NO_STOPS)
        assert again_done.stats.cached_tokens == len(prompt) + len(tokens) - 1
        assert again == solo(model, tok, follow_up, sampling=GREEDY, max_tokens=10,
                             stop_tokens=NO_STOPS)[0]


def test_failures_end_only_their_generation(loaded) -> None:
    """Non-finite logits in one row, or a logits processor that raises, end that generation
    only; the others go on as they would alone."""
    model, tok = loaded
    prompts = [prompt_of(n, 30 + n) for n in (8, 20, 14)]
    expected = solo(model, tok, prompts[0], sampling=GREEDY, max_tokens=10,
                    stop_tokens=NO_STOPS)[0]

    def non_finite(generated: list[int], logits: mx.array) -> mx.array:
        return logits * mx.nan if len(generated) == 3 else logits

    def raising(generated: list[int], logits: mx.array) -> mx.array:
        if len(generated) == 2:
            raise RuntimeError("the grammar broke")
        return logits

    schedule = {0: [(i, dict(prompt=p, sampling=GREEDY, max_tokens=10, stop_tokens=NO_STOPS,
                             logits_processors=processors))
                    for i, (p, processors) in enumerate(zip(
                        prompts, ([], [non_finite], [raising]), strict=True))]}
    got = run(BatchGenerator(model, tok, prefill_chunk=CHUNK), schedule)
    tokens, done = got[1]
    assert isinstance(done, NonFiniteLogitsError) and len(tokens) == 3
    assert "output token 4" in str(done)
    tokens, done = got[2]
    assert isinstance(done, RuntimeError) and len(tokens) == 2
    assert got[0][0] == expected and isinstance(got[0][1], Done)


def test_max_tokens_zero_and_an_empty_prompt(loaded) -> None:
    model, tok = loaded
    batch = BatchGenerator(model, tok)
    g = batch.submit(prompt_of(5, 0), max_tokens=0)
    [(same, done)] = batch.step()
    assert same is g and isinstance(done, Done) and done.stats.finish_reason == "length"
    assert not batch.busy
    with pytest.raises(ValueError, match="the prompt is empty"):
        batch.submit([])
