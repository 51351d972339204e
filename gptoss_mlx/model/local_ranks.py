"""Run a Python command on several ranks of this machine through `mlx.launch` (ring backend):
how the tests and benchmarks exercise a sharded model without a cluster.

Note: `mlx.launch` exits 0 even when a rank fails; check each rank's own output.
"""

from __future__ import annotations

import socket
import sys

_LAUNCH = "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"


def free_ports(n: int, host: str = "127.0.0.1") -> int:
    """A port p with p..p+n-1 free on `host` (the ring backend listens on one per rank)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((host, 0))
            base = s.getsockname()[1]
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + n):
                socks.append(socket.socket())
                socks[-1].bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"found no {n} consecutive free ports on {host}")


def launch_command(ranks: int, argv: list[str]) -> list[str]:
    """The command running `python argv...` on `ranks` local ranks (`mlx.launch -n ranks
    --backend ring`, on free ports, with this interpreter)."""
    return [sys.executable, "-c", _LAUNCH, "-n", str(ranks), "--backend", "ring",
            "-p", str(free_ports(ranks)), "--", sys.executable, *argv]
