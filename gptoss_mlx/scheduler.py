"""Continuous batching: the running generations advance together, one forward pass per step.

    batch = BatchGenerator(model, tokenizer)
    a = batch.submit(prompt_a, sampling=SamplingParams(seed=1), max_tokens=100)
    b = batch.submit(prompt_b, cache=prompt_cache)        # reused by common prefix
    while batch.busy:
        for generation, event in batch.step():  # per generation: TokenEvents, then Done (or an
            ...                                 # exception: that generation failed)
    batch.cancel(a)                             # leaves at once, its cache consistent

A step prefills up to `prefill_chunk` prompt tokens: one chunk of the oldest generation still
waiting (first come, first served), then each next prompt that fits whole in the rest. Then it
runs one decode forward for every running generation: tokens [B, 1] over a `BatchCache`, which
keeps each row's own offsets, positions, windows and masks. So a long prompt delays the running
streams by one chunk per step. A generation whose prompt is in samples its first token from the
prompt's last logits and joins: at once when none runs, else at the next step, which prefills
nothing (its caches join the batch, which may grow to its length, and its first decode runs
there), so no step carries both a chunk and the batch growing. A finished or cancelled one leaves
at once, its caches going back to its `PromptCache` (whose `tokens` stay those the caches hold).
A generation running alone decodes on its own caches; once a second joins, the running ones
move into a `BatchCache`, which serves until it empties.

Each generation has its own sampler (its own seeded key chain), logits processors, limits, stop
tokens and harmony parser. One without logits processors samples its next token as soon as the
forward is queued, before its current token is read (a step ahead, as mlx-lm); one with
processors samples after its token is read, while the forward runs, since they must see it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from gptoss_mlx.chat.parser import HarmonyStreamParser
from gptoss_mlx.chat.tokenizer import CALL, Tokenizer
from gptoss_mlx.generate import (
    DEFAULT_PREFILL_CHUNK,
    STREAM,
    ContextLengthError,
    Done,
    GenerationStats,
    LogitsProcessor,
    NonFiniteLogitsError,
    Progress,
    PromptCache,
    TokenEvent,
    context_length,
    context_limit,
    prefill_chunks,
)
from gptoss_mlx.model.batch_cache import BatchCache
from gptoss_mlx.sampling import (
    NON_FINITE,
    SamplingParams,
    flag_non_finite,
    make_sampler,
    token_ids,
)

Event = TokenEvent | Done | Exception  # what `step` reports for a generation (an error ends it)


@dataclass(eq=False)
class Generation:
    """One generation in a `BatchGenerator`: its settings, cache and progress."""

    prompt: list[int]
    cache: PromptCache
    sample: Callable[[mx.array], mx.array]  # logits [1, V] -> token [1], flagged if non-finite
    processors: Sequence[LogitsProcessor]
    limit: int  # tokens it may generate
    max_tokens: int | None
    stops: frozenset[int]
    parser: HarmonyStreamParser
    progress: Progress | None
    stats: GenerationStats
    start: float = field(default_factory=time.perf_counter)
    generated: list[int] = field(default_factory=list)
    prefill: Any = None  # the iterator over its prompt's chunks
    pending: mx.array | None = None  # the token sampled and not yet read
    upcoming: mx.array | None = None  # the token sampled after it (during a step)
    decode_start: float = 0.0

    @property
    def fed(self) -> bool:
        """Whether the pending token goes through the model (not when it is the last allowed)."""
        return len(self.generated) + 1 < self.limit


class BatchGenerator:
    """Runs many generations over one model, one prefill chunk and one decode step at a time.

    Use from one thread only (MLX must not run graphs from several at once).
    """

    def __init__(self, model: Any, tokenizer: Tokenizer,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model = model
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk
        self._waiting: deque[Generation] = deque()  # to prefill, oldest first
        self._joining: list[Generation] = []  # prefilled, decoding from the next step
        self._running: list[Generation] = []  # decoding
        self._batch: BatchCache | None = None
        self._rows: list[Generation] = []  # the generations in `_batch`, row by row
        self._steps = 0

    @property
    def busy(self) -> bool:
        """Whether any generation is waiting or running."""
        return bool(self._waiting or self._joining or self._running)

    @property
    def generations(self) -> list[Generation]:
        """The generations running, then those prefilled, then those waiting (oldest first)."""
        return [*self._running, *self._joining, *self._waiting]

    def submit(
        self,
        prompt: Sequence[int],
        *,
        cache: PromptCache | None = None,
        sampling: SamplingParams | None = None,
        max_tokens: int | None = None,
        stop_tokens: frozenset[int] | None = None,
        max_context: int | None = None,
        progress: Progress | None = None,
        logits_processors: Sequence[LogitsProcessor] = (),
    ) -> Generation:
        """Queue a generation after `prompt` (see `generate.stream` for the arguments); its
        events come from `step`. `cache` (reused by common prefix) must not serve another
        generation meanwhile. Raises ContextLengthError when the prompt fills the context."""
        if not prompt:
            raise ValueError("the prompt is empty")
        ctx = context_limit(self.model, max_context)
        if len(prompt) >= ctx:
            holds = (f"the context is limited to {ctx}" if ctx < context_length(self.model)
                     else f"the model's context holds {ctx}")
            raise ContextLengthError(
                f"the prompt has {len(prompt)} tokens but {holds}; "
                "shorten it to leave room for an answer")
        limit = ctx - len(prompt)
        if max_tokens is not None:
            limit = min(limit, max_tokens)
        if not self.busy:
            mx.reset_peak_memory()
        cache = cache if cache is not None else PromptCache(self.model)
        stats = GenerationStats(prompt_tokens=len(prompt), cached_tokens=cache.reuse(prompt))
        generation = Generation(
            prompt=list(prompt), cache=cache,
            sample=flag_non_finite(make_sampler(sampling or SamplingParams())),
            processors=tuple(logits_processors), limit=limit, max_tokens=max_tokens,
            stops=self.tokenizer.stop_tokens if stop_tokens is None else stop_tokens,
            parser=HarmonyStreamParser(self.tokenizer), progress=progress, stats=stats)
        generation.prefill = prefill_chunks(self.model, cache, generation.prompt,
                                            self.prefill_chunk)
        self._waiting.append(generation)
        return generation

    def cancel(self, generation: Generation) -> None:
        """End `generation` now, without further events (nothing happens if it is over)."""
        if generation in self._running:
            self._leave([generation])
            return
        for queue in (self._waiting, self._joining):
            if generation in queue:
                queue.remove(generation)
                generation.cache.sync()

    def step(self) -> list[tuple[Generation, Event]]:
        """Up to one prefill chunk's tokens of waiting prompts, or the prompts prefilled last
        step joining, and one decode step; the events they produced, in order."""
        events: list[tuple[Generation, Event]] = []
        with mx.stream(STREAM):
            if self._joining:
                self._running += self._joining
                self._joining = []
            else:
                self._prefill_step(events)
            if self._running:
                self._decode_step(events)
        self._steps += 1
        if self._steps % 256 == 0:
            mx.clear_cache()
        return events

    def _prefill_step(self, events: list[tuple[Generation, Event]]) -> None:
        """Feed one chunk of the oldest waiting prompt, then each next prompt that fits whole in
        what is left of `prefill_chunk` tokens (a burst of short prompts prefills in one step).
        A prompt all in has its first token sampled and joins the running generations: now if
        none ran when the step began, else next step."""
        alone = not self._running
        budget, oldest = self.prefill_chunk, True
        while self._waiting:
            generation = self._waiting[0]
            if generation.limit <= 0:  # max_tokens=0: nothing to do
                self._waiting.popleft()
                generation.stats.finish_reason = "length"
                events.append((generation, Done([], [], generation.stats)))
                continue
            unfed = self._unfed(generation)
            if oldest:
                oldest, budget = False, budget - min(unfed, budget)
                if self._prefill_chunk(generation, events, alone):
                    return
            elif unfed <= budget:
                budget -= unfed
                while self._prefill_chunk(generation, events, alone):
                    pass
            else:
                return

    @staticmethod
    def _unfed(generation: Generation) -> int:
        return len(generation.prompt) - len(generation.cache)

    def _prefill_chunk(self, generation: Generation, events: list[tuple[Generation, Event]],
                       alone: bool) -> bool:
        """Feed the next prompt chunk of `generation`, the oldest waiting; True while its
        prompt is not all in."""
        try:
            logits = next(generation.prefill)
            if generation.progress is not None:
                generation.progress(len(generation.cache), len(generation.prompt))
            if self._unfed(generation) > 0:
                return True
            first = self._sample(generation, logits)
        except Exception as exc:  # the model or a processor failed: only this generation ends
            self._waiting.popleft()
            generation.cache.sync()
            events.append((generation, exc))
            return False
        self._waiting.popleft()
        generation.prefill = None
        generation.pending = first
        mx.async_eval(first)
        (self._running if alone else self._joining).append(generation)
        return False

    def _sample(self, generation: Generation, logits: mx.array) -> mx.array:
        for processor in generation.processors:
            logits = processor(generation.generated, logits)
        return generation.sample(logits)

    def _decode_step(self, events: list[tuple[Generation, Event]]) -> None:
        """Feed every running generation its pending token in one forward, sample the next
        tokens, read the pending ones and emit them; finished generations leave."""
        fed = [g for g in self._running if g.fed]
        logits = None
        try:
            if fed:
                fed = self._arrange(fed)
                logits = self._forward(fed)
                for i, generation in enumerate(fed):
                    if not generation.processors:  # a step ahead: sampled before the read
                        generation.upcoming = generation.sample(logits[i : i + 1])
                queued = [g.upcoming for g in fed if not g.processors]
                mx.async_eval(queued if len(queued) == len(fed) else [*queued, logits])
            running = list(self._running)
            tokens = mx.concatenate([g.pending for g in running]).tolist()
        except Exception as exc:  # the model failed: every generation in the step ends
            self._fail(list(self._running), exc, events)
            return
        done = []
        for generation, token in zip(running, tokens, strict=True):
            if token & NON_FINITE:
                events.append((generation, NonFiniteLogitsError(len(generation.generated))))
                done.append(generation)
            elif self._emit(generation, token, events):
                done.append(generation)
        if done:
            self._leave(done)
        later = [(i, g) for i, g in enumerate(fed) if g.processors and g in self._running]
        failed = []
        for i, generation in later:  # processors see the token just read
            try:
                generation.upcoming = self._sample(generation, logits[i : i + 1])
            except Exception as exc:  # a processor failed: only its generation ends
                events.append((generation, exc))
                failed.append(generation)
        if failed:
            self._leave(failed)
        if later:
            mx.async_eval([g.upcoming for _, g in later if g not in failed])
        for generation in self._running:
            generation.pending, generation.upcoming = generation.upcoming, None

    def _emit(self, generation: Generation, token: int,
              events: list[tuple[Generation, Event]]) -> bool:
        """Record a generated token and add its event (and Done); True when it was the last."""
        now = time.perf_counter()
        stats = generation.stats
        if not generation.generated:
            generation.decode_start = now
            stats.time_to_first_token = now - generation.start
        fed = generation.fed
        generation.generated.append(token)
        if fed:
            generation.cache.tokens.append(token)
        last = token in generation.stops or not fed
        parsed = generation.parser.feed(token)
        if last:
            parsed += generation.parser.finish()  # closes a message cut off by the limit
        events.append((generation, TokenEvent(token, parsed)))
        if last:
            if token in generation.stops:
                stats.finish_reason = "tool_calls" if token == CALL else "stop"
            else:
                stats.finish_reason = ("length" if generation.limit == generation.max_tokens
                                       else "context")
            n = stats.generated_tokens = len(generation.generated)
            prefilled = stats.prompt_tokens - stats.cached_tokens
            stats.prefill_tps = prefilled / max(stats.time_to_first_token, 1e-9)
            if n > 1:
                stats.decode_tps = (n - 1) / max(now - generation.decode_start, 1e-9)
            stats.peak_memory = mx.get_peak_memory()
            events.append((generation, Done(generation.parser.messages,
                                            list(generation.generated), stats)))
        return last

    def _arrange(self, fed: list[Generation]) -> list[Generation]:
        """Make the decode caches hold exactly `fed`; returns them in row order."""
        if self._batch is None and len(fed) == 1:
            return fed  # alone: its own caches
        if self._batch is None:  # a distributed Leader makes batches the other ranks mirror
            make = getattr(self.model, "make_batch_cache", None)
            self._batch = make() if make is not None else BatchCache(self.model)
        wanted = set(fed)
        self._take_back([g for g in self._rows if g not in wanted])
        for generation in fed:
            if generation not in self._rows:
                self._batch.add(generation.cache.layers)
                self._rows.append(generation)
        return list(self._rows)

    def _forward(self, rows: list[Generation]) -> mx.array:
        """The logits [B, V] after each row's pending token."""
        tokens = token_ids(mx.concatenate([g.pending for g in rows])).reshape(len(rows), 1)
        cache = rows[0].cache.layers if self._batch is None else self._batch
        return self.model(tokens, cache=cache, last_only=True)[:, -1, :]

    def _take_back(self, generations: list[Generation]) -> None:
        """Move these generations' caches out of the batch into their PromptCaches."""
        if not generations or self._batch is None:
            return
        for generation in generations:
            generation.cache.layers = self._batch.extract(self._rows.index(generation))
        keep = [i for i, g in enumerate(self._rows) if g not in generations]
        self._batch.keep(keep)
        self._rows = [self._rows[i] for i in keep]
        if not self._rows:
            self._batch = None

    def _leave(self, generations: list[Generation]) -> None:
        """Generations end: out of the running ones and the batch, their caches consistent."""
        self._take_back([g for g in generations if g in self._rows])
        for generation in generations:
            self._running.remove(generation)
            generation.cache.sync()

    def _fail(self, generations: list[Generation], exc: Exception,
              events: list[tuple[Generation, Event]]) -> None:
        """The model failed during a step: these generations end with `exc`, their caches
        emptied (the batch's state is unknown)."""
        self._batch, self._rows = None, []
        for generation in generations:
            self._running.remove(generation)
            generation.cache.reset()
            events.append((generation, exc))
