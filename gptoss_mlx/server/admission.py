"""Admission control on the event loop: how many generations run, how many requests wait.

At most `max_active` requests hold a ticket (each ticket is one generation with its own KV cache,
all of them decoding as one batch on the model thread); up to `max_queue` more wait for a ticket in
arrival order, none longer than `timeout` seconds. A request that finds the queue full, or waits
too long, gets a 429 with `Retry-After`, so a few endless generations can delay new requests but
never hold them indefinitely.

    ticket = await admission.enter()      # raises APIError(429) or, shutting down, (503)
    ...                                   # generate
    ticket.release()                      # on the loop's thread, once the generation ended
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from gptoss_mlx.server.errors import server_busy, shutting_down

RETRY_AFTER_SECONDS = 2


class Ticket:
    """The right to run one generation; `release` (idempotent) hands it to the next waiter."""

    def __init__(self, admission: Admission):
        self._admission = admission
        self._released = False
        self.claimed = False  # a job took it over (the job's end releases it)

    def release(self) -> None:
        """Give the ticket back; call on the event loop's thread."""
        if not self._released:
            self._released = True
            self._admission._leave()


class Admission:
    """Tickets for `max_active` generations, a queue of `max_queue` waiters, `timeout` s each."""

    def __init__(self, max_active: int, max_queue: int, timeout: float):
        if max_active < 1 or max_queue < 0 or not timeout > 0:
            raise ValueError("admission needs max_active >= 1, max_queue >= 0 and timeout > 0")
        self.max_active = max_active
        self.max_queue = max_queue
        self.timeout = timeout
        self.loop: asyncio.AbstractEventLoop | None = None  # the loop tickets live on
        self._active = 0
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._closed = False

    @property
    def active(self) -> int:
        """Tickets held now."""
        return self._active

    @property
    def waiting(self) -> int:
        """Requests waiting for a ticket."""
        return sum(not f.done() for f in self._waiting)

    def open(self) -> None:
        """Accept requests (again)."""
        self._closed = False

    async def enter(self) -> Ticket:
        """A ticket, at once or after waiting in line; APIError 429 when the line is full or
        the wait exceeds `timeout`, 503 when the server is shutting down."""
        self.loop = asyncio.get_running_loop()
        if self._closed:
            raise shutting_down()
        if self._active < self.max_active and not self.waiting:
            self._active += 1
            return Ticket(self)
        if self.waiting >= self.max_queue:
            raise server_busy(
                f"The server is busy: {self._active} generations are running and "
                f"{self.waiting} requests are waiting; retry shortly.", RETRY_AFTER_SECONDS)
        turn = self.loop.create_future()
        self._waiting.append(turn)
        try:
            async with asyncio.timeout(self.timeout):
                await turn
        except BaseException as exc:
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                self._leave()  # the ticket came just as the wait ended: pass it on
            with contextlib.suppress(ValueError):
                self._waiting.remove(turn)
            if isinstance(exc, TimeoutError):
                raise server_busy(
                    f"The server is busy: no generation slot became free within "
                    f"{self.timeout:g} s ({self._active} generations are running); "
                    "retry shortly.", RETRY_AFTER_SECONDS) from None
            raise
        return Ticket(self)

    def close(self) -> None:
        """Refuse new requests and fail the waiting ones with 503 (the server is stopping)."""
        self._closed = True
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_exception(shutting_down())

    def _leave(self) -> None:
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)  # the ticket passes to the first waiter
                return
        self._active -= 1
