"""Streaming generation on the tiny converted model: cached, chunked, pipelined decoding must
pick what an uncached full forward picks; stop tokens, limits, prefix reuse and stats."""

from __future__ import annotations

import dataclasses
from typing import Any

import mlx.core as mx
import pytest

from gptoss_mlx.chat.harmony import HarmonyRenderer, SystemOptions
from gptoss_mlx.chat.tokenizer import Tokenizer
from gptoss_mlx.generate import (
    ContextLengthError,
    Done,
    PromptCache,
    TokenEvent,
    common_prefix,
    stream,
)
from gptoss_mlx.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0)
OPTIONS = SystemOptions(current_date="2025-08-05")


class ScriptedModel:
    """The real model, with decode logits pushed onto `script` (generated token i = script[i]).

    Also records each call's input ids and logits, and can shrink the context window.
    """

    def __init__(self, model: Any, script: list[int] | None = None, context: int | None = None):
        self.model = model
        self.script = script or []
        self.config = model.config
        if context is not None:
            self.config = dataclasses.replace(model.config, max_position_embeddings=context)
        self.prompt_len = 0
        self.calls: list[tuple[list[int], mx.array]] = []

    def make_cache(self) -> list[Any]:
        return self.model.make_cache()

    def __call__(self, tokens: mx.array, cache: Any = None, last_only: bool = False) -> mx.array:
        logits = self.model(tokens, cache=cache, last_only=last_only)
        self.calls.append((tokens[0].tolist(), logits))
        step = cache[0].offset - self.prompt_len
        if 0 <= step < len(self.script):
            bias = mx.zeros((logits.shape[-1],)).at[self.script[step]].add(1e4)
            logits = logits + bias.astype(logits.dtype)
        return logits


def prompt_for(tok: Tokenizer, text: str) -> list[int]:
    return HarmonyRenderer(tok).render_chat([{"role": "user", "content": text}], options=OPTIONS)


def run(model: Any, tok: Tokenizer, prompt: list[int], **kw: Any) -> tuple[list[int], Done]:
    tokens, done = [], None
    for ev in stream(model, tok, prompt, **kw):
        if isinstance(ev, TokenEvent):
            tokens.append(ev.token)
        else:
            done = ev
    assert done is not None and done.tokens == tokens
    return tokens, done


def test_greedy_stream_matches_uncached_forward(loaded) -> None:
    model, tok = loaded
    prompt = prompt_for(tok, "Tell me about the sea.")
    gen, done = run(model, tok, prompt, sampling=GREEDY, max_tokens=12, prefill_chunk=16)
    assert len(gen) == 12 and done.stats.finish_reason == "length"
    for i, token in enumerate(gen):
        logits = model(mx.array([prompt + gen[:i]], dtype=mx.int32), last_only=True)[0, -1]
        assert int(mx.argmax(logits).item()) == token, f"step {i}"


def script_ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, allow_special=True)


def test_runs_through_end_and_stops_on_return(loaded) -> None:
    model, tok = loaded
    script = script_ids(
        tok,
        "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final"
        "<|message|>Hi there!<|return|>",
    )
    scripted = ScriptedModel(model, script + script_ids(tok, " more"))
    prompt = prompt_for(tok, "Hi")
    scripted.prompt_len = len(prompt)
    cache = PromptCache(scripted)
    gen, done = run(scripted, tok, prompt, cache=cache, sampling=GREEDY)
    assert gen == script
    assert done.stats.finish_reason == "stop"
    assert [(m.channel, m.content) for m in done.messages] == [
        ("analysis", "Think."), ("final", "Hi there!")]
    assert done.text("final") == "Hi there!"
    # The cache holds every token fed to the model, the pipelined stop token included.
    assert cache.tokens == prompt + script
    assert all(layer.offset == len(cache.tokens) for layer in cache.layers)


@pytest.mark.parametrize("stop,reason", [("<|call|>", "tool_calls"), ("<|endoftext|>", "stop")])
def test_call_and_endoftext_stop(loaded, stop: str, reason: str) -> None:
    model, tok = loaded
    header = "<|channel|>commentary to=functions.lookup <|constrain|>json<|message|>"
    script = script_ids(tok, header + '{"a": 1}' + stop)
    scripted = ScriptedModel(model, script + script_ids(tok, " extra"))
    prompt = prompt_for(tok, "Look it up")
    scripted.prompt_len = len(prompt)
    gen, done = run(scripted, tok, prompt, sampling=GREEDY)
    assert gen == script and done.stats.finish_reason == reason
    [call] = done.tool_calls
    assert (call.name, call.arguments) == ("lookup", '{"a": 1}')


def test_max_tokens_leaves_last_token_unfed(loaded) -> None:
    model, tok = loaded
    prompt = prompt_for(tok, "Count")
    cache = PromptCache(model)
    gen, done = run(model, tok, prompt, cache=cache, sampling=SamplingParams(seed=3), max_tokens=5)
    assert len(gen) == 5 and done.stats.finish_reason == "length"
    assert cache.tokens == prompt + gen[:4]
    assert all(layer.offset == len(prompt) + 4 for layer in cache.layers)


def test_context_end(loaded) -> None:
    model, tok = loaded
    prompt = prompt_for(tok, "Go on")
    small = ScriptedModel(model, context=len(prompt) + 3)
    gen, done = run(small, tok, prompt, sampling=SamplingParams(seed=0))
    assert len(gen) == 3 and done.stats.finish_reason == "context"
    with pytest.raises(ContextLengthError, match=f"the prompt has {len(prompt)} tokens but the "
                                                 f"model's context holds {len(prompt)}"):
        next(stream(ScriptedModel(model, context=len(prompt)), tok, prompt))
    gen, done = run(model, tok, prompt, sampling=SamplingParams(seed=0),
                    max_context=len(prompt) + 2)
    assert len(gen) == 2 and done.stats.finish_reason == "context"
    with pytest.raises(ContextLengthError, match="the context is limited to 10"):
        next(stream(model, tok, prompt, max_context=10))


def test_prefix_reuse(loaded) -> None:
    model, tok = loaded
    first, second = prompt_for(tok, "The capital of France"), prompt_for(tok, "The capital of Peru")
    cache = PromptCache(model)
    run(model, tok, first, cache=cache, sampling=GREEDY, max_tokens=4)
    held = list(cache.tokens)
    reused, done = run(model, tok, second, cache=cache, sampling=GREEDY, max_tokens=6)
    assert done.stats.cached_tokens == common_prefix(held, second) > 0
    assert done.stats.prompt_tokens == len(second)
    fresh, _ = run(model, tok, second, sampling=GREEDY, max_tokens=6)
    assert reused == fresh
    # The same prompt again: everything but the last prompt token is reused.
    _, again = run(model, tok, second, cache=cache, sampling=GREEDY, max_tokens=2)
    assert again.stats.cached_tokens == len(second) - 1


def test_seed_reproduces(loaded) -> None:
    model, tok = loaded
    prompt = prompt_for(tok, "Random")
    a, _ = run(model, tok, prompt, sampling=SamplingParams(seed=11), max_tokens=8)
    b, _ = run(model, tok, prompt, sampling=SamplingParams(seed=11), max_tokens=8)
    c, _ = run(model, tok, prompt, sampling=SamplingParams(seed=12), max_tokens=8)
    assert a == b and a != c


def test_abandoned_stream_leaves_cache_consistent(loaded) -> None:
    model, tok = loaded
    prompt = prompt_for(tok, "Stop early")
    cache = PromptCache(model)
    events = stream(model, tok, prompt, cache=cache, sampling=GREEDY)
    taken = [next(events).token for _ in range(3)]
    events.close()
    assert all(layer.offset == len(cache.tokens) for layer in cache.layers)
    assert cache.tokens[: len(prompt)] == prompt
    assert cache.tokens[len(prompt):] == taken[: len(cache.tokens) - len(prompt)]
    gen, done = run(model, tok, prompt, cache=cache, sampling=GREEDY, max_tokens=3)
    assert gen == taken and done.stats.cached_tokens == len(prompt) - 1


def test_stats(loaded) -> None:
    model, tok = loaded
    prompt = prompt_for(tok, "Stats please")
    _, done = run(model, tok, prompt, sampling=GREEDY, max_tokens=4)
    s = done.stats
    assert (s.prompt_tokens, s.cached_tokens, s.generated_tokens) == (len(prompt), 0, 4)
    assert s.time_to_first_token > 0 and s.prefill_tps > 0 and s.decode_tps > 0
    assert s.peak_memory > 0
    line = s.summary()
    for part in ("prompt:", "time to first token", "prefill:", "decode: 4 tokens at ",
                 "peak memory"):
        assert part in line
    one = dataclasses.replace(s, generated_tokens=1, decode_tps=0.0).summary()
    assert "decode: 1 tokens, peak memory" in one  # no speed from a single token


class NoSlackModel(ScriptedModel):
    """Sliding layers keep no extra positions, so they soon cannot be trimmed far."""

    def make_cache(self) -> list[Any]:
        return self.model.make_cache(slack=0, compact_step=8)


def test_untrimmable_cache_falls_back_to_full_prefill(loaded) -> None:
    model, tok = loaded
    first = prompt_for(tok, "alpha " * 40)
    second = prompt_for(tok, "alpha " * 10 + "beta")
    small = NoSlackModel(model)
    cache = PromptCache(small)
    run(small, tok, first, cache=cache, sampling=GREEDY, max_tokens=2)
    assert common_prefix(cache.tokens, second) > 0
    gen, done = run(small, tok, second, cache=cache, sampling=GREEDY, max_tokens=4)
    assert done.stats.cached_tokens == 0  # the sliding layers could not go back: started over
    fresh, _ = run(model, tok, second, sampling=GREEDY, max_tokens=4)
    assert gen == fresh


def test_prefill_progress(loaded) -> None:
    model, tok = loaded
    prompt = prompt_for(tok, "Progress")
    seen: list[tuple[int, int]] = []
    run(model, tok, prompt, sampling=GREEDY, max_tokens=1, prefill_chunk=16,
        progress=lambda done, total: seen.append((done, total)))
    n = len(prompt)
    assert seen == [(min(i, n), n) for i in range(16, n + 16, 16)]
