"""Decode step time against the batch size: B sequences advancing in one forward pass.

    python benchmarks/batch_decode.py [--model DIR ...] [--batch 1 2 4 8 16] [--context 128]
                                      [--steps 16] [--dtype bfloat16]

For each model (default: a tiny random one, and one with the released 20b's dimensions but 2
layers, vocabulary included, written to a temporary folder), prefills `max(--batch)` sequences of
different lengths around `--context` on their own caches, then for each B adds the first B to a
`BatchCache` and times `--steps` greedy decode steps (median). Prints per B the step time, tokens
per second (B per step) and their ratio to B=1; the first row, `own`, is one sequence decoding on
its own per-sequence caches (what `generate` does), the baseline for B=1. Table on stdout,
progress on stderr. The real-dims model takes ~4 GB: run it under `flock /tmp/bigmem.lock`
on a shared machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

from gptoss_mlx.bench import random_prompt
from gptoss_mlx.convert.synthetic import preset_config, tiny_config, write_checkpoint
from gptoss_mlx.model.batch_cache import BatchCache
from gptoss_mlx.model.cache import LayerCache
from gptoss_mlx.model.loader import load_model

WARMUP = 2


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def synthetic(workdir: Path) -> dict[str, Path]:
    """The default models: tiny, and the 20b's dimensions with 2 layers."""
    real = preset_config("20b")
    real.update(num_hidden_layers=2, layer_types=real["layer_types"][:2])
    return {"tiny": write_checkpoint(workdir / "tiny", tiny_config(), seed=0),
            "20b dims, 2 layers": write_checkpoint(workdir / "real", real, seed=0)}


def time_steps(step: Callable[[], None], steps: int) -> float:
    """Median seconds of `step` over `steps` runs after a warm-up."""
    for _ in range(WARMUP):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def prefilled(model, prompt: list[int]) -> list[LayerCache]:
    cache = model.make_cache()
    mx.eval(model(mx.array([prompt]), cache=cache, last_only=True), [c.state for c in cache])
    return cache


def bench(model, batches: list[int], context: int, steps: int) -> list[tuple[str, float, int]]:
    """(label, seconds per step, tokens per step) for one own-cache sequence and each B."""
    count = max(batches)
    lengths = [max(1, context - 7 * i) for i in range(count)]  # rows need their padding masks
    caches = []
    for i, n in enumerate(lengths):
        log(f"  prefill {i + 1}/{count}: {n} tokens")
        caches.append(prefilled(model, random_prompt(n, seed=i)))
    token = mx.zeros((1, 1), dtype=mx.int32)

    own = prefilled(model, random_prompt(lengths[0], seed=0))

    def own_step() -> None:
        logits = model(token, cache=own, last_only=True)
        mx.eval(mx.argmax(logits[:, -1], axis=-1), [c.state for c in own])

    rows = [("own", time_steps(own_step, steps), 1)]
    for b in batches:
        batch = BatchCache(model)
        for cache in caches[:b]:
            batch.add(cache)
        tokens = mx.zeros((b, 1), dtype=mx.int32)

        def batch_step(batch: BatchCache = batch, tokens: mx.array = tokens) -> None:
            logits = model(tokens, cache=batch, last_only=True)
            mx.eval(mx.argmax(logits[:, -1], axis=-1), batch.state)

        rows.append((f"B={b}", time_steps(batch_step, steps), b))
        log(f"  B={b}: {rows[-1][1] * 1e3:.1f} ms/step")
    return rows


def table(name: str, rows: list[tuple[str, float, int]]) -> str:
    base = next(b / t for label, t, b in rows if label == "B=1")
    lines = [f"{name}", f"| {'batch':>5} | {'ms/step':>8} | {'tok/s':>8} | {'vs B=1':>6} |",
             f"|{'-' * 7}|{'-' * 10}|{'-' * 10}|{'-' * 8}|"]
    for label, t, b in rows:
        lines.append(f"| {label:>5} | {t * 1e3:8.2f} | {b / t:8.1f} | {b / t / base:5.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, nargs="*", default=None,
                    help="model folders (default: synthetic tiny and 20b-dims 2-layer models)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--context", type=int, default=128, help="tokens of the longest sequence")
    ap.add_argument("--steps", type=int, default=16, help="timed decode steps per batch size")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--experts", default="auto", help="experts backend (see gptoss-mlx bench)")
    args = ap.parse_args()
    if 1 not in args.batch or min(args.batch) < 1:
        ap.error("--batch sizes must be >= 1 and include 1 (the ratios' baseline)")
    with tempfile.TemporaryDirectory(prefix="gptoss-batch-") as tmp:
        models = ({p.name: p for p in args.model} if args.model
                  else synthetic(Path(tmp)))
        for name, path in models.items():
            log(f"{name}: loading {path}")
            model = load_model(path, dtype=args.dtype, experts=args.experts)
            rows = bench(model, sorted(args.batch), args.context, args.steps)
            print(table(f"{name} ({args.dtype}, {model.experts_backend} experts, "
                        f"context ~{args.context})", rows), flush=True)
            del model


if __name__ == "__main__":
    main()
