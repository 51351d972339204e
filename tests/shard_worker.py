"""One rank of a sharded model under `mlx.launch` (tests/test_sharded_model.py), and the
single-process reference: a prompt forward and greedy decode steps, logits in float32.

    python shard_worker.py MODEL OUT_PREFIX [--experts mlx|emulated]

Each rank writes `OUT_PREFIX.RANK.npz`: the logits of every step, the bytes of each of its
parameters and the collectives the forwards called. `launch(n, args)` runs the script on n
local ranks (ring backend, CPU).
"""

from __future__ import annotations

import contextlib
import functools
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from gptoss_mlx.model.local_ranks import launch_command

PROMPT = 20  # > DECODE_MAX_TOKENS (16) and, with BATCH * top-4, >= 64 pairs: the prefill paths
BATCH = 2
DECODE_STEPS = 1
FORWARDS = 1 + DECODE_STEPS
HERE = Path(__file__).resolve().parent


def experts_backend(name: str) -> Any:
    """`mlx`, or the Metal kernels run by the CPU MSL emulator (`emulated`)."""
    if name == "mlx":
        return "mlx"
    from msl_emulator import make_factory

    from gptoss_mlx.kernels.moe import moe as kernels_moe

    return functools.partial(kernels_moe, kernel_factory=make_factory("random", seed=3))


def logits_trace(model_dir: str | Path, experts: str = "mlx",
                 group: mx.distributed.Group | None = None) -> tuple[list[np.ndarray], Any]:
    """(logits of the prompt, then of each greedy decode step; the model)."""
    from gptoss_mlx.model import load_model

    model = load_model(model_dir, dtype="float32", experts=experts_backend(experts), group=group)
    vocab = model.config.vocab_size
    tokens = mx.array(np.random.default_rng(7).integers(0, vocab, size=(BATCH, PROMPT)),
                      dtype=mx.int32)
    cache = model.make_cache()
    logits = model(tokens, cache=cache)
    out = [np.array(logits)]
    for _ in range(DECODE_STEPS):
        logits = model(mx.argmax(logits[:, -1:], axis=-1).astype(mx.int32), cache=cache)
        out.append(np.array(logits))
    return out, model


def launch(ranks: int, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run this script on `ranks` local ranks through `mlx.launch` (ring backend)."""
    cmd = launch_command(ranks, [str(Path(__file__).resolve()), *args])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE)


@contextlib.contextmanager
def counting_collectives() -> Iterator[dict[str, int]]:
    """Counts the calls of `mx.distributed.all_sum` and `all_gather` inside the block."""
    calls = {"all_sum": 0, "all_gather": 0}
    originals = {name: getattr(mx.distributed, name) for name in calls}

    def counting(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return originals[name](*args, **kwargs)
        return call

    try:
        for name in calls:
            setattr(mx.distributed, name, counting(name))
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(mx.distributed, name, fn)


def main() -> None:
    model_dir, prefix = sys.argv[1], sys.argv[2]
    experts = sys.argv[4] if len(sys.argv) > 4 and sys.argv[3] == "--experts" else "mlx"
    sys.path.insert(0, str(HERE))
    group = mx.distributed.init(strict=True)
    with counting_collectives() as counted:
        steps, model = logits_trace(model_dir, experts, group)
    params = {f"bytes:{n}": np.array(a.nbytes) for n, a in tree_flatten(model.parameters())}
    calls = {f"calls:{n}": np.array(c) for n, c in counted.items()}
    np.savez(f"{prefix}.{group.rank()}.npz", *steps, **params, **calls)


if __name__ == "__main__":
    main()
