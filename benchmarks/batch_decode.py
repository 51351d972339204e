"""Decode step time against the batch size: B sequences advancing in one forward pass.

    python benchmarks/batch_decode.py [--model DIR ...] [--synthetic tiny real]
                                      [--batch 1 2 4 8 16] [--context 128] [--steps 16]
                                      [--dtype bfloat16] [--experts auto]

For each model (default: a tiny random one with a 4096-token vocabulary, and one with the
released 20b's dimensions but 2 layers, vocabulary included, written to a temporary folder;
`--synthetic` picks), prefills `max(--batch)` sequences of different lengths around `--context`
on their own caches, then for each B adds the first B to a `BatchCache` and times `--steps`
greedy decode steps. Prints per B the step time (fastest and median), tokens per second (B per
fastest step) and their ratio to B=1; the first row, `own`, is one sequence decoding on its own
per-sequence caches (what `generate` does), the baseline for B=1. Table on stdout, progress on
stderr. The real-dims model takes ~5 GB in float32: on a shared machine run it under
`flock /tmp/bigmem.lock`.
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
import numpy as np

from gptoss_mlx.convert.synthetic import preset_config, tiny_config, write_checkpoint
from gptoss_mlx.model.batch_cache import BatchCache
from gptoss_mlx.model.cache import LayerCache
from gptoss_mlx.model.loader import load_model

WARMUP = 2


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def synthetic(workdir: Path, names: list[str]) -> dict[str, Path]:
    """Random checkpoints: "tiny", and "real" (the 20b's dimensions with 2 layers)."""
    real = preset_config("20b")
    real.update(num_hidden_layers=2, layer_types=real["layer_types"][:2])
    # tiny: a small vocabulary too, so the lm_head does not hide the rest of the step
    configs = {"tiny": tiny_config(vocab_size=4096), "real": real}
    return {name: write_checkpoint(workdir / name, configs[name], seed=0) for name in names}


def time_steps(step: Callable[[], None], steps: int) -> tuple[float, float]:
    """(fastest, median) seconds of `step` over `steps` runs after a warm-up; the fastest is
    the one to compare on a machine shared with other work."""
    for _ in range(WARMUP):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def prefilled(model, n: int, seed: int) -> list[LayerCache]:
    """A sequence's own caches after `n` random prompt tokens."""
    prompt = np.random.default_rng(seed).integers(0, model.config.vocab_size, size=(1, n))
    cache = model.make_cache()
    mx.eval(model(mx.array(prompt, dtype=mx.int32), cache=cache, last_only=True),
            [c.state for c in cache])
    return cache


Row = tuple[str, tuple[float, float], int]  # label, (fastest, median) seconds, tokens per step


def bench(model, batches: list[int], context: int, steps: int) -> list[Row]:
    """One row for a sequence on its own caches, then one for each B."""
    count = max(batches)
    lengths = [max(1, context - 7 * i) for i in range(count)]  # rows need their padding masks
    caches = []
    for i, n in enumerate(lengths):
        log(f"  prefill {i + 1}/{count}: {n} tokens")
        caches.append(prefilled(model, n, seed=i))
    token = mx.zeros((1, 1), dtype=mx.int32)

    own = prefilled(model, lengths[0], seed=0)

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
        log(f"  B={b}: {rows[-1][1][0] * 1e3:.1f} ms/step")
    return rows


def table(name: str, rows: list[Row]) -> str:
    """Markdown: step time (fastest, median), tokens/s and its ratio to B=1 (fastest)."""
    base = next(b / t for label, (t, _), b in rows if label == "B=1")
    lines = [name, "| batch | ms/step | median ms | tok/s | vs B=1 |",
             "|------:|--------:|----------:|------:|-------:|"]
    for label, (t, med), b in rows:
        lines.append(f"| {label} | {t * 1e3:.2f} | {med * 1e3:.2f} | {b / t:.1f} | "
                     f"{b / t / base:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, nargs="*", default=None,
                    help="model folders (default: the --synthetic ones)")
    ap.add_argument("--synthetic", nargs="+", choices=["tiny", "real"], default=["tiny", "real"],
                    help="random models to write: tiny, real (the 20b's dimensions, 2 layers)")
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
                  else synthetic(Path(tmp), args.synthetic))
        for name, path in models.items():
            log(f"{name}: loading {path}")
            model = load_model(path, dtype=args.dtype, experts=args.experts)
            rows = bench(model, sorted(args.batch), args.context, args.steps)
            print(table(f"{name} ({args.dtype}, {model.experts_backend} experts, "
                        f"context ~{args.context})", rows), flush=True)
            del model


if __name__ == "__main__":
    main()
