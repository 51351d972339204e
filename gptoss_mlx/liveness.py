"""Plain TCP links between the ranks of a distributed run, so that one rank's end is seen at once.

MLX's collectives do not reliably report a peer that died: the ring backend sometimes raises,
sometimes returns zeros, sometimes waits forever. So every rank also holds a TCP connection to
its neighbours (the ring's next and previous rank, whose addresses the hostfile gives; with
JACCL every rank to rank 0, the coordinator), and a thread per connection blocks reading it. The
kernel closes a process's sockets when it dies however it dies, and TCP keepalive probes notice
a machine that vanished (power, cable) within about `KEEPALIVE_SECONDS`; either way the reader
calls `on_lost` (which ends the rank). A rank that ends normally first sends `BYE`, so its
neighbours let it go.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable

BYE = b"x"
KEEPALIVE_SECONDS = 10  # idle 4 s, then 6 probes 1 s apart


def _keepalive(sock: socket.socket) -> None:
    """Probe an idle connection so that a vanished peer ends it within ~KEEPALIVE_SECONDS."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle = getattr(socket, "TCP_KEEPIDLE", getattr(socket, "TCP_KEEPALIVE", None))  # macOS
    for option, value in ((idle, 4), (getattr(socket, "TCP_KEEPINTVL", None), 1),
                          (getattr(socket, "TCP_KEEPCNT", None), 6)):
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


def peer_addresses(backend: str, ranks: int) -> list[list[str]]:
    """Each rank's addresses as the launcher's environment gives them (the ring's hostfile: one
    or more per rank, tried in order; JACCL: rank 0's, the coordinator); empty when it gives
    none (MPI)."""
    if backend == "ring":
        with open(os.environ["MLX_HOSTFILE"]) as f:
            hosts = json.load(f)
        return [list(dict.fromkeys(a.rsplit(":", 1)[0] for a in h)) for h in hosts]
    if backend == "jaccl":
        coordinator = os.environ.get("MLX_JACCL_COORDINATOR", "").rsplit(":", 1)[0]
        return [[coordinator]] + [[] for _ in range(ranks - 1)]
    return []


def links(backend: str, rank: int, ranks: int) -> tuple[list[int], int]:
    """(the ranks this one dials, how many dial it): ring neighbours, or a star around rank 0."""
    if backend == "ring":
        return [(rank + 1) % ranks], 1
    return ([], ranks - 1) if rank == 0 else ([0], 0)


class Liveness:
    """This rank's links; `on_lost(message)` is called (from a reader thread) when one breaks."""

    def __init__(self, on_lost: Callable[[str], None]):
        self.on_lost = on_lost
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self._socks: list[socket.socket] = []
        self._ending = False

    def connect(self, dial: list[tuple[int, list[str], int]], accept: int, rank: int,
                timeout: float) -> None:
        """Dial each (rank, its addresses, port) at the first address that answers, accept
        `accept` connections; start the readers. Raises OSError when a link cannot be made."""
        for peer, hosts, port in dial:
            sock = _dial(hosts, port, timeout)
            sock.sendall(rank.to_bytes(4, "little"))
            self._watch(sock, peer)
        self.listener.settimeout(timeout)
        for _ in range(accept):
            sock, _ = self.listener.accept()
            sock.settimeout(timeout)
            peer = int.from_bytes(_read_exactly(sock, 4), "little")
            self._watch(sock, peer)
        self.listener.close()

    def _watch(self, sock: socket.socket, peer: int) -> None:
        sock.settimeout(None)
        _keepalive(sock)
        self._socks.append(sock)
        threading.Thread(target=self._read, args=(sock, peer), daemon=True,
                         name=f"gptoss-liveness-{peer}").start()

    def _read(self, sock: socket.socket, peer: int) -> None:
        try:
            data = sock.recv(1)
        except OSError as e:
            data, why = b"", f"its connection failed ({e.strerror or e})"
        else:
            why = "it exited"
        if data == BYE or self._ending:
            return
        self.on_lost(f"rank {peer} is gone ({why})")

    def close(self) -> None:
        """Say goodbye: this rank ends normally, its neighbours should not fail for it."""
        self._ending = True
        for sock in self._socks:
            try:
                sock.sendall(BYE)
            except OSError:
                pass


def _dial(hosts: list[str], port: int, timeout: float) -> socket.socket:
    error: OSError = ConnectionError("no address to reach it at")
    for host in hosts:
        try:
            return socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            error = e
    raise error


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("a rank closed its link before saying who it is")
        data += chunk
    return data
