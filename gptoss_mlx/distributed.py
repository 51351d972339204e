"""One model on several processes (Macs) through `mx.distributed`: rank 0 leads, the rest follow.

    mlx.launch --hostfile hosts.json -- gptoss-mlx generate -m DIR -p "..."

Every command runs as usual on rank 0, which alone reads the console and binds the HTTP port.
The model it uses is a `Leader`: before each model call it broadcasts one fixed-size message
(which KV cache, how many tokens it must hold before the call, the token ids, `last_only`) with an
`all_sum` to which only rank 0 contributes. The other ranks never leave `follow`: they receive
each message, bring their copy of that KV cache to the same length (trimming as rank 0 did) and
make the same model call, so their caches hold what rank 0's hold and a sharded model's
collectives pair up. Tokens are sampled on rank 0 only and reach the others inside the next
message, so sampling is identical everywhere whatever the floating-point differences.

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
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import mlx.core as mx
import numpy as np

from gptoss_mlx.liveness import Liveness, links, peer_addresses
from gptoss_mlx.model.cache import COMPACT_STEP, DEFAULT_SLACK, trim_to
from gptoss_mlx.model.cache import offset as cache_offset
from gptoss_mlx.model.sharding import Shard

CONNECT_TIMEOUT_ENV = "GPTOSS_MLX_CONNECT_TIMEOUT"
PEER_TIMEOUT_ENV = "GPTOSS_MLX_PEER_TIMEOUT"
DEFAULT_TIMEOUT = 30.0
LINK_GRACE = 2.0  # seconds a collective's error waits for the links to name the lost rank

# The message: header fields, then up to CAPACITY token ids (larger calls continue in more).
OP, STATUS, CACHE, OFFSET, BATCH, LENGTH, LAST_ONLY, SLACK, COMPACT, N_FREED = range(10)
FREED = slice(10, 26)  # ids of KV caches rank 0 dropped since the last message
HEADER = 26
CAPACITY = 512
FORWARD, EXIT = 1, 2
NO_CACHE = 0

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


class Leader:
    """Rank 0's model: broadcasts each call (see the module docstring), then makes it.

    Attributes other than the call and `make_cache` are the wrapped model's.
    """

    def __init__(self, model: Any):
        self.model = model
        self._lock = threading.Lock()
        # each cache's first layer -> (id, slack, compact_step)
        self._ids: weakref.WeakKeyDictionary[Any, tuple[int, int, int]] = (
            weakref.WeakKeyDictionary())
        self._next_id = NO_CACHE + 1
        self._freed: list[int] = []
        self._watchdog = _Watchdog(_timeout(PEER_TIMEOUT_ENV))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def make_cache(self, slack: int = DEFAULT_SLACK,
                   compact_step: int = COMPACT_STEP) -> list[Any]:
        """The model's fresh per-layer caches, known to the followers by a new id."""
        layers = self.model.make_cache(slack=slack, compact_step=compact_step)
        with self._lock:
            cid, self._next_id = self._next_id, self._next_id + 1
        self._ids[layers[0]] = (cid, slack, compact_step)
        weakref.finalize(layers[0], self._freed.append, cid)
        return layers

    def __call__(self, tokens: mx.array, cache: list[Any] | None = None,
                 last_only: bool = False) -> mx.array:
        ids = np.array(tokens, dtype=np.int32, copy=True)
        if ids.ndim != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {ids.shape}")
        head = np.zeros(HEADER, np.int32)
        head[OP] = FORWARD
        head[BATCH], head[LENGTH] = ids.shape
        head[LAST_ONLY] = int(last_only)
        if cache is not None:
            made = self._ids.get(cache[0]) if isinstance(cache, list) and cache else None
            if made is None:  # e.g. a batch's caches: not mirrored (yet)
                raise ValueError("distributed: the KV cache was not made by this model's "
                                 "make_cache(), so the other ranks cannot mirror it")
            head[CACHE], head[SLACK], head[COMPACT] = made
            head[OFFSET] = cache_offset(cache)
        self._send(head, ids.reshape(-1))
        return self.model(tokens, cache=cache, last_only=last_only)

    def finish(self, status: int = 0) -> None:
        """Tell the followers to exit with `status` (once, after the last model call)."""
        head = np.zeros(HEADER, np.int32)
        head[OP], head[STATUS] = EXIT, status
        self._send(head, np.zeros(0, np.int32))

    def _send(self, head: np.ndarray, payload: np.ndarray) -> None:
        with self._lock, self._watchdog.bounded("sending a model call to the other ranks"):
            room = FREED.stop - FREED.start
            freed, self._freed[:] = self._freed[:room], self._freed[room:]
            head[N_FREED] = len(freed)
            head[FREED.start:FREED.start + len(freed)] = freed
            for start in range(0, max(len(payload), 1), CAPACITY):
                message = np.zeros(HEADER + CAPACITY, np.int32)
                message[:HEADER] = head
                piece = payload[start:start + CAPACITY]
                message[HEADER:HEADER + len(piece)] = piece
                _exchange(message)


def follow(model: Any, caches: dict[int, list[Any]] | None = None) -> int:
    """A follower's whole life: mirror rank 0's model calls until it says exit; returns the
    exit status rank 0 sent. `caches` receives the mirrored KV caches by rank 0's id. A lost rank
    or a stalled call ends the process (see `fail`)."""
    watchdog = _Watchdog(_timeout(PEER_TIMEOUT_ENV))
    caches = {} if caches is None else caches
    while True:
        try:
            message = _exchange(None)  # waits as long as rank 0 is idle
        except RuntimeError as exc:
            exit_if_peer_lost(exc)
            raise
        head = message[:HEADER]
        for cid in head[FREED][: head[N_FREED]]:
            caches.pop(int(cid), None)
        if head[OP] == EXIT:
            return int(head[STATUS])
        if head[OP] != FORWARD:  # zeros: what a failed collective may return
            _lost(f"lost rank 0 (message {int(head[OP])} instead of a model call); ending")
        with watchdog.bounded("mirroring a model call"):
            n = int(head[BATCH] * head[LENGTH])
            ids = [message[HEADER:HEADER + min(n, CAPACITY)]]
            for _ in range(CAPACITY, n, CAPACITY):
                ids.append(_exchange(None)[HEADER:][: n - CAPACITY * len(ids)])
            tokens = mx.array(np.concatenate(ids).reshape(int(head[BATCH]), int(head[LENGTH])))
            layers = None
            if head[CACHE] != NO_CACHE:
                cid = int(head[CACHE])
                if cid not in caches:
                    caches[cid] = model.make_cache(slack=int(head[SLACK]),
                                                   compact_step=int(head[COMPACT]))
                layers = caches[cid]
                want = int(head[OFFSET])
                if cache_offset(layers) != want and not trim_to(layers, want):
                    fail(f"KV cache {cid} holds {cache_offset(layers)} tokens, rank 0's {want}: "
                         "the ranks went out of step")
            out = model(tokens, cache=layers, last_only=bool(head[LAST_ONLY]))
            mx.eval(out, [layer.state for layer in layers or []])


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
