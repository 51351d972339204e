"""The one thread that runs the model, for all the requests it serves at once.

MLX must not evaluate graphs from several threads at once, so every request becomes a `Job` on
one first-come first-served queue, and a single worker thread drives one `BatchGenerator`
(continuous batching, see gptoss_mlx.scheduler): each step prefills a chunk of the oldest new
prompt and advances every running generation by one token in one forward pass, each with its own
KV cache (a prompt-cache slot when one is free, a fresh cache otherwise). Jobs join and leave
between steps. How many run at once and how many requests wait is bounded on the event loop by
`Admission` (a 429 beyond that). The event loop reads a job's events through `Job.events()`;
cancelling a job (the client went away, a stop string matched) ends its generation before the
worker's next step, freeing its place; `shutdown` ends them all.

    async with engine.admitted():         # a generation slot, or APIError 429/503
        job = engine.submit(prompt_ids, sampling=SamplingParams(), max_tokens=None)
    try:
        async for event in job.events():      # TokenEvent ..., then Done
            ...
    finally:
        job.cancel()
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import queue
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

from gptoss_mlx.chat.forcing import TurnConstraint
from gptoss_mlx.chat.harmony import HarmonyRenderer, today
from gptoss_mlx.chat.tokenizer import Tokenizer
from gptoss_mlx.distributed import exit_if_peer_lost
from gptoss_mlx.generate import (
    DEFAULT_PREFILL_CHUNK,
    Done,
    GenerationStats,
    TokenEvent,
    context_limit,
)
from gptoss_mlx.prompt_store import PromptStore
from gptoss_mlx.sampling import SamplingParams
from gptoss_mlx.scheduler import BatchGenerator, Event, Generation
from gptoss_mlx.server.admission import Admission, Ticket
from gptoss_mlx.server.errors import shutting_down
from gptoss_mlx.server.prompt_cache import PromptCachePool

_END = object()
log = logging.getLogger("gptoss_mlx.server")
# The ticket of the request being handled; `submit` hands it to the job, whose end releases it.
_TICKET: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar("ticket", default=None)


class Job:
    """One queued generation; its events reach the event loop that submitted it."""

    def __init__(
        self,
        prompt: Sequence[int],
        sampling: SamplingParams,
        max_tokens: int | None,
        loop: asyncio.AbstractEventLoop,
        forcing: TurnConstraint | None = None,
    ):
        self.prompt = list(prompt)
        self.sampling = sampling
        self.max_tokens = max_tokens
        self.forcing = forcing
        self.cancelled = threading.Event()
        self.cached_tokens = 0  # the prefix the prompt cache supplies (set when it starts)
        self.ticket: Ticket | None = None
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue()

    def cancel(self) -> None:
        """Stop generating (safe to call from any thread, any number of times)."""
        self.cancelled.set()

    async def events(self) -> AsyncIterator[TokenEvent | Done]:
        """The job's events: TokenEvents, then one Done (errors from the worker are raised)."""
        while True:
            item = await self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def emit(self, item: Any) -> None:
        """Hand an event to the job's loop (called by the worker thread)."""
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def end(self) -> None:
        """Close the event stream and give the generation slot back (worker thread)."""
        self.emit(_END)
        if self.ticket is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self.ticket.release)


class Engine:
    """Owns the model, its tokenizer and prompt caches, and the worker thread that uses them.

    `model` may be replaced between requests (tests wrap it); the worker takes it up when no
    generation runs.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Tokenizer,
        *,
        cache_slots: int = 2,
        max_batch: int = 8,
        max_queue: int = 16,
        queue_timeout: float = 30.0,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        current_date: str | None = None,
        max_context: int | None = None,
        prompt_store: PromptStore | None = None,
    ):
        """`cache_slots` prompt caches are kept between requests (and long instruction
        prefixes in `prompt_store` on disk); up to `max_batch` generations run at once,
        decoding as one batch (each with its own KV cache: plan the memory for it), up to
        `max_queue` requests wait for a place, each at most `queue_timeout` seconds; prompts are
        prefilled `prefill_chunk` tokens per step."""
        self.model = model
        self.max_context = max_context
        self.tokenizer = tokenizer
        self.renderer = HarmonyRenderer(tokenizer)
        self.caches = PromptCachePool(model, cache_slots, prompt_store)
        self.admission = Admission(max_batch, max_queue, queue_timeout)
        self.prefill_chunk = prefill_chunk
        # One date for the server's lifetime keeps rendered system prompts, and so the cached
        # prefixes, identical across requests.
        self.current_date = current_date or today()
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._batch = BatchGenerator(model, tokenizer, prefill_chunk)  # the worker's
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def context_length(self) -> int:
        """The context window in tokens: the model's, or `max_context` when smaller."""
        return context_limit(self.model, self.max_context)

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        if self._thread is None or not self._thread.is_alive():
            self._stopping.clear()
            self.admission.open()
            waiting = []  # jobs without the wake-ups a shutdown left behind
            with contextlib.suppress(queue.Empty):
                while True:
                    waiting.append(self._jobs.get_nowait())
            for job in waiting:
                if job is not None:
                    self._jobs.put(job)
            self._thread = threading.Thread(target=self._work, name="gptoss-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        """Refuse new requests and end the running generations now, each with a last Done as if
        a length limit cut it (safe to call from a signal handler or any thread)."""
        self._stopping.set()
        self._jobs.put(None)  # wakes a worker waiting for work
        loop = self.admission.loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(self.admission.close)

    def stop(self, timeout: float | None = 10.0) -> None:
        """`shutdown`, then wait for the worker to exit."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join(timeout)
            self._thread = None

    @contextlib.asynccontextmanager
    async def admitted(self) -> AsyncIterator[None]:
        """Hold a generation slot while the block runs (APIError 429 when none comes in time,
        503 while shutting down); a job `submit` creates in the block keeps it until it ends."""
        ticket = await self.admission.enter()
        token = _TICKET.set(ticket)
        try:
            yield
        finally:
            _TICKET.reset(token)
            if not ticket.claimed:
                ticket.release()

    def submit(
        self, prompt: Sequence[int], *, sampling: SamplingParams, max_tokens: int | None,
        forcing: TurnConstraint | None = None,
    ) -> Job:
        """Queue a generation; call from a coroutine (events go to the running loop), inside
        `admitted()` to count against the limits. `forcing` makes the answer a function call
        (tool_choice "required" or named)."""
        if self._stopping.is_set():
            raise shutting_down()
        job = Job(prompt, sampling, max_tokens, asyncio.get_running_loop(), forcing)
        ticket = _TICKET.get()
        if ticket is not None and not ticket.claimed:
            ticket.claimed = True
            job.ticket = ticket
        self._jobs.put(job)
        return job

    def _work(self) -> None:
        jobs: dict[Generation, Job] = {}
        while True:
            for generation, job in list(jobs.items()):
                if job.cancelled.is_set():
                    log.info("generation ended early after %d tokens (client gone or stop "
                             "string)", len(generation.generated))
                    self._batch.cancel(generation)
                    del jobs[generation]
                    job.end()
            if self._stopping.is_set() or not self._admit(jobs):
                for generation, job in jobs.items():
                    self._interrupt(generation, job)
                self._drain()
                return
            for generation, event in self._step(jobs):
                job = jobs[generation]
                if isinstance(event, Exception):
                    exit_if_peer_lost(event)  # ... when another rank of a distributed run is gone
                job.emit(event)
                if isinstance(event, Exception):
                    log.error("generation failed", exc_info=event)
                elif isinstance(event, Done):
                    log.info("%s; finish: %s", event.stats.summary(), event.stats.finish_reason)
                else:
                    continue
                del jobs[generation]
                job.end()

    def _step(self, jobs: dict[Generation, Job]) -> list[tuple[Generation, Event]]:
        """The batch's next step; should it fail as a whole, every job gets the error, the
        caches are emptied, and a new batch serves the next requests."""
        try:
            return self._batch.step()
        except Exception as exc:
            exit_if_peer_lost(exc)
            log.exception("the batch failed")
            for generation in self._batch.generations:
                generation.cache.reset()
            self._batch = BatchGenerator(self.model, self.tokenizer, self.prefill_chunk)
            return [(generation, exc) for generation in jobs]

    def _admit(self, jobs: dict[Generation, Job]) -> bool:
        """Submit every queued job to the batch, blocking only when nothing runs (the admission
        on the event loop bounds how many there are). Returns False when `shutdown` asked the
        worker to exit."""
        while True:
            try:
                job = self._jobs.get(block=not self._batch.busy)
            except queue.Empty:
                return True
            if job is None:
                return False
            if job.cancelled.is_set():
                job.end()
                continue
            batch = self._batch
            if not batch.busy and batch.model is not self.model:  # a test swapped the model
                batch = self._batch = BatchGenerator(self.model, self.tokenizer,
                                                     self.prefill_chunk)
            cache = self.caches.acquire(job.prompt, busy=[g.cache for g in batch.generations])
            try:
                generation = batch.submit(
                    job.prompt, cache=cache, sampling=job.sampling, max_tokens=job.max_tokens,
                    max_context=self.max_context,
                    logits_processors=[job.forcing] if job.forcing else ())
            except Exception as exc:  # reported to the request; the worker keeps serving
                log.exception("generation failed")
                job.emit(exc)
                job.end()
                continue
            job.cached_tokens = generation.stats.cached_tokens
            jobs[generation] = job

    def _interrupt(self, generation: Generation, job: Job) -> None:
        """End a generation the server stops: a Done cut off ("interrupted")."""
        self._batch.cancel(generation)
        if not job.cancelled.is_set():
            stats = GenerationStats(prompt_tokens=len(job.prompt),
                                    cached_tokens=job.cached_tokens,
                                    generated_tokens=len(generation.generated),
                                    finish_reason="interrupted")
            job.emit(Done([], list(generation.generated), stats))
        job.end()

    def _drain(self) -> None:
        """End the jobs still queued when the worker stops (nothing generated for them)."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.emit(Done([], [], GenerationStats(prompt_tokens=len(job.prompt),
                                                      finish_reason="interrupted")))
                job.end()
