"""One model on several processes (Macs) through `mx.distributed`: rank 0 leads, the rest follow.

    mlx.launch --hostfile hosts.json -- gptoss-mlx generate -m DIR -p "..."

Every command runs as usual on rank 0, which alone reads the console and binds the HTTP port.
The model it uses is a `Leader`: before each model call it broadcasts one message (fixed-size
pieces) with an `all_sum` to which only rank 0 contributes. The other ranks never leave `follow`:
they receive each message and make the same model call on their copies of the same caches, so
those hold what rank 0's hold and a sharded model's collectives pair up. A message says:
- the call: its token ids, `last_only`, and its cache: a per-sequence KV cache (by id, with the
  tokens it holds before the call: a follower trims its copy as rank 0 did, or makes it when
  new) or a batch (`BatchCache`, by id, with each row's tokens, checked);
- the log of what rank 0 did to its caches since the last message, replayed in order first:
  FREE id (a cache or batch dropped), ADD batch cache tokens (a sequence's caches joined a
  batch), KEEP batch rows (`BatchCache.keep`), EXTRACT batch row cache (a row taken back as
  per-sequence caches, known by a new id). Rank 0's batches are `MirroredBatch`es (from
  `Leader.make_batch_cache`, which the scheduler uses), whose add, keep and extract log
  themselves; so continuous batching runs across ranks as on one, row for row.
Tokens are sampled on rank 0 only and reach the others inside the next message, so sampling is
identical everywhere whatever the floating-point differences.

Failure, never a hang (MLX's collectives alone may wait forever for a dead peer):
- a rank that dies, however it dies, closes its TCP links to its neighbours (`liveness`): they
  end with one error line and exit status 1 (`fail`), and so on around the ring, within a
  second; a Mac that vanishes (power, cable) is noticed by TCP keepalive within about 10 s;
- a rank that stops answering: rank 0 waits at most `$GPTOSS_MLX_PEER_TIMEOUT` seconds
  (default 30) for a message to go through, and a follower as long for a model call to finish;
- a rank that cannot connect: `setup` gives up after `$GPTOSS_MLX_CONNECT_TIMEOUT` seconds
  (default 30). MLX's `init` holds the interpreter lock while it waits, so the guard is a small
  child process that kills its parent, not a thread.
A normal end: rank 0 sends EXIT (`finish`, also at exit) and every rank says goodbye on its links.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

import mlx.core as mx
import numpy as np

from gptoss_mlx.liveness import Liveness, links, peer_addresses
from gptoss_mlx.model.batch_cache import BatchCache
from gptoss_mlx.model.cache import COMPACT_STEP, DEFAULT_SLACK, SlidingKVCache, trim_to
from gptoss_mlx.model.cache import offset as cache_offset
from gptoss_mlx.model.sharding import Shard

CONNECT_TIMEOUT_ENV = "GPTOSS_MLX_CONNECT_TIMEOUT"
PEER_TIMEOUT_ENV = "GPTOSS_MLX_PEER_TIMEOUT"
DEFAULT_TIMEOUT = 30.0
LINK_GRACE = 2.0  # seconds a collective's error waits for the links to name the lost rank

# The message: a header, then its payload in pieces of CAPACITY ids (more messages carry the
# rest): the call's token ids [BATCH * LENGTH]; for a batch, each row's tokens before the call
# [BATCH]; then N_LOG ids of the log of cache changes (see the module docstring).
OP, STATUS, CACHE, OFFSET, BATCH, LENGTH, LAST_ONLY, SLACK, COMPACT, BATCHED, N_LOG = range(11)
HEADER = 11
CAPACITY = 512
FORWARD, EXIT = 1, 2
NO_CACHE = 0
FREE, ADD, KEEP, EXTRACT = 1, 2, 3, 4  # the log's entries (the module docstring)

# Errors MLX's collectives raise when a peer is gone (by backend).
_PEER_ERRORS = ("[ring]", "[jaccl]", "[mpi]", "[nccl]", "[distributed]")


class _State:
    group: Any = None  # the mx.distributed group when more than one rank runs
    liveness: Liveness | None = None
    leader: Leader | None = None  # rank 0's model until `finish`


_state = _State()
_failing = threading.Lock()  # taken by the one `fail` that writes its line


def rank() -> int:
    """This process's rank (0 without a distributed launch)."""
    return _state.group.rank() if _state.group is not None else 0


def size() -> int:
    """How many ranks run the model (1 without a distributed launch)."""
    return _state.group.size() if _state.group is not None else 1


def group() -> Any:
    """The `mx.distributed` group the model is split over, or None in a single process."""
    return _state.group


def shard() -> Shard | None:
    """This rank's share of the model, or None in a single process."""
    return Shard(rank(), size()) if _state.group is not None else None


def is_follower() -> bool:
    """True on ranks other than 0: they print nothing on stdout and bind no port."""
    return rank() != 0


def launched() -> str | None:
    """The backend a launcher (`mlx.launch`, mpirun) set this process up for, else None."""
    env = os.environ
    if env.get("MLX_JACCL_COORDINATOR") or env.get("MLX_IBV_DEVICES"):
        return "jaccl"
    hostfile = env.get("MLX_HOSTFILE")
    if hostfile and os.path.isfile(hostfile) and os.path.getsize(hostfile) > 1:
        return "ring"
    if env.get("OMPI_COMM_WORLD_SIZE", "1") != "1":
        return "mpi"
    return None


def _timeout(name: str) -> float:
    value = os.environ.get(name)
    if not value:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"${name}={value!r}: expected a number of seconds > 0")
    return seconds


def fail(message: str) -> NoReturn:
    """End this rank at once with one error line and status 1 (no cleanup that could block on a
    collective; stdout is not flushed: another thread may hold its lock). Only the first
    caller writes: another thread that fails at the same time waits for the exit."""
    if not _failing.acquire(blocking=False):
        while True:
            time.sleep(60)
    os.write(2, f"error: rank {rank()} of {size()}: {message}\n".encode())
    os._exit(1)


def is_peer_error(exc: BaseException) -> bool:
    """Whether `exc` is a collective failing because another rank is gone."""
    return isinstance(exc, RuntimeError) and str(exc).startswith(_PEER_ERRORS)


def exit_if_peer_lost(exc: BaseException) -> None:
    """`fail` when `exc` says another rank is gone; otherwise nothing (the caller goes on)."""
    if _state.group is not None and is_peer_error(exc):
        _lost(f"lost the connection to another rank ({exc}); ending every rank")


def before_crash(exc: BaseException) -> None:
    """Called with an error about to end the process: when another rank is gone, end with the
    one line that names it (a collective may fail in other ways than `is_peer_error` knows,
    just before the links see why)."""
    if _state.group is None:
        return
    exit_if_peer_lost(exc)
    if _state.liveness is not None:
        time.sleep(LINK_GRACE)  # a link's reader ends the process meanwhile if a rank is gone


def _lost(message: str) -> NoReturn:
    """`fail` with `message`, unless the links name the rank that is gone first (they usually
    see it within milliseconds of MLX)."""
    if _state.liveness is not None:
        time.sleep(LINK_GRACE)  # a link's reader ends the process meanwhile
    fail(message)


def setup() -> int:
    """Join the distributed group when a launcher started this process (idempotent); returns the
    number of ranks. Followers stop printing on stdout and ignore Ctrl-C (rank 0 ends them).
    Raises ValueError (one line) for a bad timeout variable or a group MLX cannot set up."""
    if _state.group is not None:
        return size()
    backend = launched()
    if backend is None:
        return 1
    connect = _timeout(CONNECT_TIMEOUT_ENV)
    _timeout(PEER_TIMEOUT_ENV)  # a bad value fails now, on every rank alike
    me = os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "?"))
    with _connect_guard(connect, f"error: rank {me}: could not connect to the other ranks "
                                 f"within {connect:g} s (backend {backend}); is every rank "
                                 f"started, and the hostfile right? (${CONNECT_TIMEOUT_ENV})\n"):
        try:
            group = mx.distributed.init(strict=True, backend=backend)
        except RuntimeError as e:
            raise ValueError(f"rank {me}: cannot join the other ranks (backend {backend}): "
                             f"{e}") from None
    if group.size() == 1:
        return 1
    _state.group = group
    _state.liveness = _link(backend, connect)
    if group.rank() != 0:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return group.size()


def _link(backend: str, timeout: float) -> Liveness | None:
    """The TCP links that end every rank when one ends (none for MPI: mpirun does that)."""
    me, n = rank(), size()
    addresses = peer_addresses(backend, n)
    if not addresses:
        return None
    live = Liveness(on_lost=lambda why: fail(f"{why}; ending every rank"))
    ports = np.zeros(HEADER + CAPACITY, np.int32)
    ports[me] = live.port
    ports = _exchange(ports)  # every rank contributes its own port
    dial, accept = links(backend, me, n)
    try:
        live.connect([(p, addresses[p], int(ports[p])) for p in dial], accept, me, timeout)
    except OSError as e:
        fail(f"cannot link to the other ranks ({e}); ending")
    return live


@contextmanager
def _connect_guard(seconds: float, message: str) -> Iterator[None]:
    """Kill this process with `message` on stderr unless the block ends within `seconds`."""
    code = ("import os, select, sys\n"
            "ready, _, _ = select.select([sys.stdin], [], [], float(sys.argv[2]))\n"
            "if not ready:\n"
            "    os.write(2, sys.argv[3].encode()); os.kill(int(sys.argv[1]), 9)\n")
    guard = subprocess.Popen([sys.executable, "-c", code, str(os.getpid()), str(seconds), message],
                             stdin=subprocess.PIPE)
    try:
        yield
    finally:
        assert guard.stdin is not None
        guard.stdin.close()  # end of file: the guard exits
        guard.wait()


class _Watchdog:
    """A thread that ends the rank when a wait it was told about outlasts the peer timeout."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._since: float | None = None
        self._what = ""
        threading.Thread(target=self._watch, name="gptoss-distributed-watchdog",
                         daemon=True).start()

    @contextmanager
    def bounded(self, what: str) -> Iterator[None]:
        """Time the block; a collective failing in it ends the rank with one line."""
        self._what, self._since = what, time.monotonic()
        try:
            yield
        except RuntimeError as exc:
            exit_if_peer_lost(exc)
            raise
        finally:
            self._since = None

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.seconds / 4))
            since = self._since
            if since is not None and time.monotonic() - since > self.seconds:
                fail(f"no answer from the other ranks for {self.seconds:g} s while {self._what} "
                     f"(a rank stopped responding?; ${PEER_TIMEOUT_ENV}); ending every rank")


def _exchange(message: np.ndarray | None) -> np.ndarray:
    """One broadcast from rank 0: its `message`, the zeros of the others, summed (at setup
    every rank contributes its own field)."""
    data = mx.array(message) if message is not None else mx.zeros(HEADER + CAPACITY, mx.int32)
    total = mx.distributed.all_sum(data, group=_state.group, stream=mx.cpu)
    return np.array(total, copy=True)


def _sliding_params(layers: Sequence[Any]) -> tuple[int, int]:
    """(slack, compact_step) the caches were made with (`make_cache`'s defaults when no layer
    slides)."""
    sliding = next((c for c in layers if isinstance(c, SlidingKVCache)), None)
    return (DEFAULT_SLACK, COMPACT_STEP) if sliding is None else (sliding.slack,
                                                                  sliding.compact_step)


class Leader:
    """Rank 0's model: broadcasts each call (see the module docstring), then makes it.

    Attributes other than the call, `make_cache` and `make_batch_cache` are the wrapped model's.
    """

    def __init__(self, model: Any):
        self.model = model
        self._lock = threading.Lock()
        # each per-sequence cache's first layer -> its id (batches hold theirs: `.id`)
        self._ids: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self._counter = itertools.count(NO_CACHE + 1)
        self._log: deque[tuple[int, ...]] = deque()  # cache changes since the last message
        self._watchdog = _Watchdog(_timeout(PEER_TIMEOUT_ENV))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def make_cache(self, slack: int = DEFAULT_SLACK,
                   compact_step: int = COMPACT_STEP) -> list[Any]:
        """The model's fresh per-layer caches, known to the followers by a new id."""
        layers = self.model.make_cache(slack=slack, compact_step=compact_step)
        self._name(layers)
        return layers

    def make_batch_cache(self) -> BatchCache:
        """A `BatchCache` whose changes (add, keep, extract) the followers make to theirs."""
        return MirroredBatch(self)

    def _new_id(self, owner: Any) -> int:
        """A new id for a cache or batch, freed on the followers once `owner` is dropped."""
        cid = next(self._counter)  # atomic: a count's next holds the interpreter lock
        weakref.finalize(owner, self.note, FREE, cid)
        return cid

    def _name(self, layers: list[Any]) -> int:
        """Give these per-layer caches a new id (the key: their first layer)."""
        self._ids[layers[0]] = cid = self._new_id(layers[0])
        return cid

    def id_of(self, layers: Any) -> int:
        """The followers' id for these per-layer caches; ValueError if they have none."""
        cid = self._ids.get(layers[0]) if isinstance(layers, list) and layers else None
        if cid is None:
            raise ValueError("distributed: the KV cache was not made by this model's "
                             "make_cache(), so the other ranks cannot mirror it")
        return cid

    def note(self, *entry: int) -> None:
        """Log a change to the caches for the next message (any thread, even a finalizer's)."""
        self._log.append(entry)

    def __call__(self, tokens: mx.array, cache: list[Any] | BatchCache | None = None,
                 last_only: bool = False) -> mx.array:
        ids = np.array(tokens, dtype=np.int32, copy=True)
        if ids.ndim != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {ids.shape}")
        head = np.zeros(HEADER, np.int32)
        head[OP] = FORWARD
        head[BATCH], head[LENGTH] = ids.shape
        head[LAST_ONLY] = int(last_only)
        payload = [ids.reshape(-1)]
        if isinstance(cache, MirroredBatch) and cache.leader is self:
            head[CACHE], head[BATCHED] = cache.id, 1
            payload.append(np.array(cache.offsets, np.int32))
        elif isinstance(cache, BatchCache):
            raise ValueError("distributed: the batch was not made by this model's "
                             "make_batch_cache(), so the other ranks cannot mirror it")
        elif cache is not None:
            head[CACHE] = self.id_of(cache)
            head[OFFSET] = cache_offset(cache)
            head[SLACK], head[COMPACT] = _sliding_params(cache)
        self._send(head, payload)
        return self.model(tokens, cache=cache, last_only=last_only)

    def finish(self, status: int = 0) -> None:
        """Tell the followers to exit with `status` (once, after the last model call)."""
        head = np.zeros(HEADER, np.int32)
        head[OP], head[STATUS] = EXIT, status
        self._send(head, [])

    def _send(self, head: np.ndarray, payload: list[np.ndarray]) -> None:
        with self._lock, self._watchdog.bounded("sending a model call to the other ranks"):
            log: list[int] = []
            while self._log:  # only this (locked) loop takes entries: popleft cannot fail
                log.extend(self._log.popleft())
            head[N_LOG] = len(log)
            data = np.concatenate([*payload, np.array(log, np.int32)]).astype(np.int32)
            for start in range(0, max(len(data), 1), CAPACITY):
                message = np.zeros(HEADER + CAPACITY, np.int32)
                message[:HEADER] = head
                piece = data[start:start + CAPACITY]
                message[HEADER:HEADER + len(piece)] = piece
                _exchange(message)


class MirroredBatch(BatchCache):
    """Rank 0's `BatchCache` (from `Leader.make_batch_cache`): each change it goes through is
    logged for the followers, who make the same change to their copy, so row r of theirs holds
    what row r of this one does. A row extracted is a new cache with its own id."""

    def __init__(self, leader: Leader) -> None:
        super().__init__(leader.model)
        self.leader = leader
        self.id = leader._new_id(self)

    def add(self, layers: Sequence[Any]) -> int:
        cid = self.leader.id_of(layers)
        row = super().add(layers)
        self.leader.note(ADD, self.id, cid, cache_offset(layers), *_sliding_params(layers))
        return row

    def keep(self, rows: Sequence[int]) -> None:
        rows = list(rows)
        super().keep(rows)
        self.leader.note(KEEP, self.id, len(rows), *rows)

    def extract(self, row: int) -> list[Any]:
        layers = super().extract(row)
        self.leader.note(EXTRACT, self.id, row, self.leader._name(layers))
        return layers


class _Mirror:
    """A follower's copies of rank 0's per-sequence KV caches and batches, by rank 0's ids."""

    def __init__(self, model: Any, caches: dict[int, list[Any]]):
        self.model = model
        self.caches = caches
        self.batches: dict[int, BatchCache] = {}

    def cache(self, cid: int, offset: int, slack: int, compact_step: int) -> list[Any]:
        """Cache `cid` holding its first `offset` tokens (made empty if new), as rank 0's."""
        layers = self.caches.get(cid)
        if layers is None:
            layers = self.caches[cid] = self.model.make_cache(slack=slack,
                                                              compact_step=compact_step)
        if cache_offset(layers) != offset and not trim_to(layers, offset):
            fail(f"KV cache {cid} holds {cache_offset(layers)} tokens, rank 0's {offset}: "
                 "the ranks went out of step")
        return layers

    def batch(self, bid: int, offsets: list[int]) -> BatchCache:
        """Batch `bid`, whose rows must hold `offsets` tokens as rank 0's do."""
        batch = self._batch(bid)
        if batch.offsets != offsets:
            fail(f"batch {bid} holds rows of {batch.offsets} tokens, rank 0's {offsets}: the "
                 "ranks went out of step")
        return batch

    def _batch(self, bid: int) -> BatchCache:
        if bid not in self.batches:
            fail(f"rank 0 used batch {bid}, which this rank does not hold: the ranks went out "
                 "of step")
        return self.batches[bid]

    def replay(self, log: list[int]) -> None:
        """Make the changes rank 0 logged (see the module docstring), in order."""
        entries = iter(log)
        take = functools.partial(itertools.islice, entries)
        for kind in entries:
            if kind == FREE:
                (gone,) = take(1)
                self.caches.pop(gone, None)
                self.batches.pop(gone, None)
            elif kind == ADD:
                bid, cid, offset, slack, compact_step = take(5)
                if bid not in self.batches:
                    self.batches[bid] = BatchCache(self.model)
                self.batches[bid].add(self.cache(cid, offset, slack, compact_step))
            elif kind == KEEP:
                bid, n = take(2)
                self._batch(bid).keep(list(take(n)))
            elif kind == EXTRACT:
                bid, row, cid = take(3)
                self.caches[cid] = self._batch(bid).extract(row)
            else:
                fail(f"unknown cache change {kind} from rank 0: the ranks went out of step")


def _payload(message: np.ndarray) -> np.ndarray:
    """The whole payload of the message whose first piece is `message` (the rest follow)."""
    head = message[:HEADER]
    n = int(head[BATCH] * head[LENGTH] + head[BATCH] * head[BATCHED] + head[N_LOG])
    pieces = [message[HEADER:HEADER + min(n, CAPACITY)]]
    for start in range(CAPACITY, n, CAPACITY):
        pieces.append(_exchange(None)[HEADER:HEADER + min(n - start, CAPACITY)])
    return np.concatenate(pieces)


def follow(model: Any, caches: dict[int, list[Any]] | None = None) -> int:
    """A follower's whole life: mirror rank 0's model calls until it says exit; returns the
    exit status rank 0 sent. `caches` receives the mirrored per-sequence KV caches by rank 0's
    id. A lost rank or a stalled call ends the process (see `fail`)."""
    watchdog = _Watchdog(_timeout(PEER_TIMEOUT_ENV))
    mirror = _Mirror(model, {} if caches is None else caches)
    while True:
        try:
            message = _exchange(None)  # waits as long as rank 0 is idle
        except RuntimeError as exc:
            exit_if_peer_lost(exc)
            raise
        head = message[:HEADER]
        if head[OP] not in (FORWARD, EXIT):  # zeros: what a failed collective may return
            _lost(f"lost rank 0 (message {int(head[OP])} instead of a model call); ending")
        with watchdog.bounded("mirroring a model call"):
            payload = _payload(message)
            b, t = int(head[BATCH]), int(head[LENGTH])
            offsets = payload[b * t:b * t + b].tolist() if head[BATCHED] else []
            mirror.replay(payload[b * t + len(offsets):].tolist())
            if head[OP] == EXIT:
                return int(head[STATUS])
            tokens = mx.array(payload[:b * t].reshape(b, t))
            cache: list[Any] | BatchCache | None = None
            if head[BATCHED]:
                cache = mirror.batch(int(head[CACHE]), offsets)
            elif head[CACHE] != NO_CACHE:
                cache = mirror.cache(int(head[CACHE]), int(head[OFFSET]), int(head[SLACK]),
                                     int(head[COMPACT]))
            out = model(tokens, cache=cache, last_only=bool(head[LAST_ONLY]))
            state = cache.state if isinstance(cache, BatchCache) else [
                layer.state for layer in cache or []]
            mx.eval(out, state)


def lead(model: Any) -> Leader:
    """Rank 0's side of `follow`: the model wrapped, and the followers told to exit when this
    process ends normally (a failure ends them through the lost connection instead)."""
    leader = Leader(model)
    _state.leader = leader
    atexit.register(finish)
    return leader


def finish() -> None:
    """On rank 0: let the other ranks exit (status 0) and drop the links; call once the last
    model call is over (also runs at exit; later calls do nothing)."""
    leader, _state.leader = _state.leader, None
    if leader is None:
        return
    try:
        leader.finish(0)
    except RuntimeError:
        pass  # they are gone already
    _say_goodbye()


def _say_goodbye() -> None:
    if _state.liveness is not None:
        _state.liveness.close()


def distribute(model: Any) -> Any:
    """In a distributed run: on rank 0 the `Leader` around `model`; on the others, `follow` it
    and exit with the status rank 0 sends. Without one: `model` itself."""
    if _state.group is None:
        return model
    if rank() == 0:
        return lead(model)
    status = follow(model)
    _say_goodbye()
    sys.stderr.flush()
    os._exit(status)  # skip atexit and the command's own cleanup: rank 0 did it all
