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
every token before the next is sampled. It is `gptoss_mlx.scheduler.BatchGenerator` (the
server's continuous batching) with one sequence; this module holds what both share: the prompt
cache, prefill, the events and the stats.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import mlx.core as mx

from gptoss_mlx.chat.messages import Message, ToolCall
from gptoss_mlx.chat.parser import ParseEvent
from gptoss_mlx.chat.tokenizer import Tokenizer
from gptoss_mlx.model.cache import trim_to as trim_layers
from gptoss_mlx.sampling import SamplingParams

DEFAULT_PREFILL_CHUNK = 512
STREAM = mx.new_thread_local_stream(mx.default_device())  # where the model runs


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
        self.checkpoint: Checkpoint | None = None  # see `prefill_chunks` (the prompt store sets it)

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


def prefill_chunks(
    model: Any, cache: PromptCache, prompt: Sequence[int], chunk: int = DEFAULT_PREFILL_CHUNK,
) -> Iterator[mx.array]:
    """Feed the part of `prompt` after the tokens `cache` holds (a prefix of it: see
    `PromptCache.reuse`), `chunk` tokens per step; yield the last logits [1, V] after each."""
    if not prompt:
        raise ValueError("the prompt is empty")
    reused = len(cache.tokens)
    checkpoint, cache.checkpoint = cache.checkpoint, None
    split = checkpoint[0] if checkpoint and reused < checkpoint[0] < len(prompt) else None
    for start, end in _chunks(reused, len(prompt), chunk, split):
        piece = list(prompt[start:end])
        with mx.stream(STREAM):
            logits = model(mx.array([piece], dtype=mx.int32), cache=cache.layers, last_only=True)
        mx.eval(logits, [layer.state for layer in cache.layers])
        cache.tokens += piece
        if end == split and checkpoint is not None:
            checkpoint[1](cache)
        yield logits[:, -1, :]


def prefill(
    model: Any,
    cache: PromptCache,
    prompt: Sequence[int],
    chunk: int = DEFAULT_PREFILL_CHUNK,
    progress: Progress | None = None,
) -> tuple[mx.array, int]:
    """Feed the part of `prompt` the cache lacks; return (last logits [1, V], reused count).

    `progress(done, total)` is called after each chunk with prompt tokens in the cache so far.
    """
    if not prompt:
        raise ValueError("the prompt is empty")
    reused = cache.reuse(prompt)
    last = None
    for logits in prefill_chunks(model, cache, prompt, chunk):
        last = logits
        if progress is not None:
            progress(len(cache.tokens), len(prompt))
    assert last is not None
    return last, reused


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
    on each step's logits (e.g. `chat.forcing.TurnConstraint`); the token is sampled from what
    they return.

    This is the batch scheduler (`gptoss_mlx.scheduler`) running one sequence.
    """
    from gptoss_mlx.scheduler import BatchGenerator  # it builds on this module

    batch = BatchGenerator(model, tokenizer, prefill_chunk=prefill_chunk)
    generation = batch.submit(
        prompt, cache=cache, sampling=sampling, max_tokens=max_tokens, stop_tokens=stop_tokens,
        max_context=max_context, progress=progress, logits_processors=logits_processors)
    try:
        while True:
            for _, event in batch.step():
                if isinstance(event, Exception):
                    raise event
                yield event
                if isinstance(event, Done):
                    return
    finally:
        batch.cancel(generation)  # leaves the cache consistent with its tokens
