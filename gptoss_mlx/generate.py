"""Streaming generation: chunked prefill, KV-cache reuse by common prefix, pipelined decode.

    cache = PromptCache(model)                     # keep it to reuse the prefix next time
    for event in stream(model, tokenizer, prompt_ids, cache=cache, sampling=SamplingParams()):
        if isinstance(event, TokenEvent):
            for p in event.parsed:                 # harmony messages as they stream
                if p.kind == "delta": print(p.message.channel, p.text)
        else:                                      # the last event: Done
            print(event.stats.summary(), event.messages, event.tool_calls)

`stream` trims the cache to the longest common prefix of the tokens it holds and the new prompt,
prefills only the rest (in chunks, computing logits for the last position only), then decodes
one token per step while the next step is already queued (`mx.async_eval`), as mlx-lm does.
Logits processors (`f(generated_ids, logits) -> logits`, as mlx-lm's `logits_processors`) see
every token before the next is sampled, so with any of them the step is queued only once the
token is read.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import mlx.core as mx

from gptoss_mlx.chat.messages import Message, ToolCall
from gptoss_mlx.chat.parser import HarmonyStreamParser, ParseEvent
from gptoss_mlx.chat.tokenizer import CALL, Tokenizer
from gptoss_mlx.model.cache import trim_to as trim_layers
from gptoss_mlx.sampling import (
    NON_FINITE,
    SamplingParams,
    flag_non_finite,
    make_sampler,
    token_ids,
)

DEFAULT_PREFILL_CHUNK = 512
_STREAM = mx.new_thread_local_stream(mx.default_device())


class ContextLengthError(ValueError):
    """The prompt leaves no room in the model's context."""


class NonFiniteLogitsError(RuntimeError):
    """The model computed nan or inf logits: its weights are almost surely corrupt."""

    def __init__(self, position: int):
        super().__init__(
            f"the model computed non-finite logits (nan or inf) for output token {position + 1}; "
            "its weights are likely corrupt: convert the released checkpoint again")


def context_length(model: Any) -> int:
    """The model's context window in tokens (`max_position_embeddings`)."""
    return int(model.config.max_position_embeddings)


def context_limit(model: Any, max_context: int | None = None) -> int:
    """The tokens prompt and answer may fill: the model's context, or `max_context` if smaller."""
    ctx = context_length(model)
    return ctx if max_context is None else min(ctx, max_context)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


# (n, f): the next prefill calls f(cache) once the cache holds the prompt's first n tokens
Checkpoint = tuple[int, Callable[["PromptCache"], None]]


class PromptCache:
    """A model's per-layer KV caches together with the exact token ids they hold."""

    def __init__(self, model: Any):
        self.model = model
        self.layers: list[Any] = model.make_cache()
        self.tokens: list[int] = []
        self.checkpoint: Checkpoint | None = None  # see `prefill` (the prompt store sets it)

    def __len__(self) -> int:
        return len(self.tokens)

    def reset(self) -> None:
        """Forget everything."""
        self.layers = self.model.make_cache()
        self.tokens = []

    def trim_to(self, n: int) -> None:
        """Keep the first `n` tokens (resetting when a layer cannot go back that far)."""
        n = max(0, min(n, len(self.tokens)))
        if trim_layers(self.layers, n):
            del self.tokens[n:]
        else:
            self.reset()

    def reuse(self, prompt: Sequence[int]) -> int:
        """Trim to the common prefix with `prompt` (leaving at least one token to prefill).

        Returns how many prompt tokens the cache still holds.
        """
        self.sync()
        self.trim_to(min(common_prefix(self.tokens, prompt), len(prompt) - 1))
        return len(self.tokens)

    def sync(self) -> None:
        """Make the layers and `tokens` agree after an interrupted step."""
        offsets = {layer.offset for layer in self.layers}
        if offsets != {len(self.tokens)}:
            self.trim_to(min(offsets | {len(self.tokens)}))


@dataclass
class GenerationStats:
    """Numbers about one generation; times in seconds, memory in bytes."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    time_to_first_token: float = 0.0
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    peak_memory: int = 0
    finish_reason: str = ""

    def summary(self) -> str:
        """One line for stderr."""
        cached = f" ({self.cached_tokens} cached)" if self.cached_tokens else ""
        # decode speed is over the tokens after the first, which prefill's time covers
        decode = f" at {self.decode_tps:.1f} tok/s" if self.generated_tokens > 1 else ""
        return (
            f"prompt: {self.prompt_tokens} tokens{cached}, "
            f"time to first token: {self.time_to_first_token:.3f} s, "
            f"prefill: {self.prefill_tps:.1f} tok/s, "
            f"decode: {self.generated_tokens} tokens{decode}, "
            f"peak memory: {self.peak_memory / 1e9:.3f} GB"
        )

    def to_dict(self) -> dict[str, Any]:
        """The stats as a JSON-ready dict."""
        return asdict(self)


@dataclass
class TokenEvent:
    """One generated token and the harmony parse events it caused."""

    token: int
    parsed: list[ParseEvent] = field(default_factory=list)


@dataclass
class Done:
    """The last event: parsed messages, generated token ids and stats.

    finish_reason: "stop" (`<|return|>`/`<|endoftext|>`), "tool_calls" (`<|call|>`),
    "length" (max_tokens) or "context" (the context window is full); the server adds
    "interrupted" for a generation it ends at shutdown.
    """

    messages: list[Message]
    tokens: list[int]
    stats: GenerationStats

    @property
    def tool_calls(self) -> list[ToolCall]:
        """Tool calls among the generated messages."""
        return [ToolCall.from_message(m) for m in self.messages if m.is_tool_call]

    def text(self, channel: str | None = "final") -> str:
        """All content on `channel` (tool calls excluded)."""
        return "".join(
            m.content for m in self.messages if m.channel == channel and not m.is_tool_call
        )


Progress = Callable[[int, int], None]
# (the ids generated so far, the logits [1, V] for the next token) -> the logits to sample from
LogitsProcessor = Callable[[Sequence[int], mx.array], mx.array]


def prefill(
    model: Any,
    cache: PromptCache,
    prompt: Sequence[int],
    chunk: int = DEFAULT_PREFILL_CHUNK,
    progress: Progress | None = None,
) -> tuple[mx.array, int]:
    """Feed the part of `prompt` the cache lacks; return (last logits [1, V], reused count).

    `progress(done, total)` is called after each chunk with prompt tokens in the cache so far.
    A `cache.checkpoint` (n, f) inside the part prefilled ends a chunk at n and calls f(cache)
    there; it is used up either way.
    """
    if not prompt:
        raise ValueError("the prompt is empty")
    reused = cache.reuse(prompt)
    checkpoint, cache.checkpoint = cache.checkpoint, None
    split = checkpoint[0] if checkpoint and reused < checkpoint[0] < len(prompt) else None
    logits = None
    for start, end in _chunks(reused, len(prompt), chunk, split):
        piece = list(prompt[start:end])
        with mx.stream(_STREAM):
            logits = model(mx.array([piece], dtype=mx.int32), cache=cache.layers, last_only=True)
        mx.eval(logits, [layer.state for layer in cache.layers])
        cache.tokens += piece
        if end == split and checkpoint is not None:
            checkpoint[1](cache)
        if progress is not None:
            progress(end, len(prompt))
    assert logits is not None
    return logits[:, -1, :], reused


def _chunks(start: int, stop: int, chunk: int, split: int | None) -> Iterator[tuple[int, int]]:
    """(start, end) pieces of [start, stop) of at most `chunk` tokens, one ending at `split`."""
    edges = [start, *([split] if split is not None else []), stop]
    for a, b in zip(edges, edges[1:], strict=False):
        for s in range(a, b, chunk):
            yield s, min(s + chunk, b)


def stream(
    model: Any,
    tokenizer: Tokenizer,
    prompt: Sequence[int],
    *,
    cache: PromptCache | None = None,
    sampling: SamplingParams | None = None,
    max_tokens: int | None = None,
    stop_tokens: frozenset[int] | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    progress: Progress | None = None,
    max_context: int | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
) -> Iterator[TokenEvent | Done]:
    """Generate after `prompt` (harmony ids ending in `<|start|>assistant`), one event per token.

    `cache` is reused by common prefix and left holding every token fed to the model; without
    one a fresh cache is used. Generation stops on a stop token (default `<|return|>`,
    `<|call|>`, `<|endoftext|>`, never `<|end|>`), after `max_tokens` (None: no limit) or when
    the context is full (the model's, or `max_context` tokens if smaller). Raises
    ContextLengthError when the prompt fills the context.
    `progress(done, total)` reports the prefill chunk by chunk. `logits_processors` run in order
    on each step's logits (e.g. `chat.forcing.ToolCallForcing`); the token is sampled from what
    they return.
    """
    ctx = context_limit(model, max_context)
    limited = ctx < context_length(model)
    holds = f"the context is limited to {ctx}" if limited else f"the model's context holds {ctx}"
    if len(prompt) >= ctx:
        raise ContextLengthError(
            f"the prompt has {len(prompt)} tokens but {holds}; "
            "shorten it to leave room for an answer"
        )
    limit = ctx - len(prompt)
    if max_tokens is not None:
        limit = min(limit, max_tokens)
    stops = tokenizer.stop_tokens if stop_tokens is None else stop_tokens
    sampler = flag_non_finite(make_sampler(sampling or SamplingParams()))
    cache = cache if cache is not None else PromptCache(model)
    parser = HarmonyStreamParser(tokenizer)
    stats = GenerationStats(prompt_tokens=len(prompt))
    generated: list[int] = []

    lookahead = not logits_processors  # a processor must see each token first

    def sample(logits: mx.array) -> mx.array:
        for processor in logits_processors:
            logits = processor(generated, logits)
        return sampler(logits)

    def step(token: mx.array) -> mx.array:
        with mx.stream(_STREAM):
            logits = model(token_ids(token).reshape(1, 1), cache=cache.layers, last_only=True)
            return sample(logits[:, -1, :])

    mx.reset_peak_memory()
    start = time.perf_counter()
    try:
        if limit <= 0:
            stats.finish_reason = "length"
            yield Done([], [], stats)
            return
        logits, stats.cached_tokens = prefill(model, cache, prompt, prefill_chunk, progress)
        with mx.stream(_STREAM):
            y = sample(logits)
        mx.async_eval(y)
        decode_start = start
        while True:
            fed = len(generated) + 1 < limit
            if fed and lookahead:  # queue the next step before reading this token
                next_y = step(y)
                mx.async_eval(next_y)
            token = int(y.item())
            if token & NON_FINITE:
                raise NonFiniteLogitsError(len(generated))
            if not generated:
                decode_start = time.perf_counter()
                stats.time_to_first_token = decode_start - start
            generated.append(token)
            if fed:
                cache.tokens.append(token)
                if not lookahead:
                    next_y = step(y)
                    mx.async_eval(next_y)
            last = token in stops or not fed
            parsed = parser.feed(token)
            if last:
                parsed += parser.finish()  # closes a message cut off by the limit
            yield TokenEvent(token, parsed)
            if last:
                break
            y = next_y
            if len(generated) % 256 == 0:
                mx.clear_cache()
        end = time.perf_counter()
        final_token = generated[-1]
        if final_token in stops:
            stats.finish_reason = "tool_calls" if final_token == CALL else "stop"
        else:
            stats.finish_reason = "length" if limit == max_tokens else "context"
        stats.generated_tokens = len(generated)
        prefilled = len(prompt) - stats.cached_tokens
        stats.prefill_tps = prefilled / max(stats.time_to_first_token, 1e-9)
        if len(generated) > 1:
            stats.decode_tps = (len(generated) - 1) / max(end - decode_start, 1e-9)
        stats.peak_memory = mx.get_peak_memory()
        yield Done(parser.messages, generated, stats)
    finally:
        cache.sync()
