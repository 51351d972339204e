"""How long a long prompt arriving mid-batch delays the streams already decoding (issue 14).

    python benchmarks/batch_prefill_delay.py [--streams 4] [--prompt-tokens 4000] [--chunk 512]

Writes and converts a small random model (or takes a converted folder with --model), starts
`--streams` generations, lets them decode, then submits a `--prompt-tokens` prompt. Prints the
time between consecutive tokens of the running streams before and while the prompt prefills, next
to the time the same prompt's chunks take alone: each step while it prefills should cost one
decode step plus at most one chunk, never the whole prompt.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from gptoss_mlx import load
from gptoss_mlx.bench import random_prompt
from gptoss_mlx.convert import convert
from gptoss_mlx.convert.synthetic import tiny_config, write_checkpoint
from gptoss_mlx.convert.vocab import find_vocab
from gptoss_mlx.generate import PromptCache, prefill_chunks
from gptoss_mlx.sampling import SamplingParams
from gptoss_mlx.scheduler import BatchGenerator

SMALL = dict(num_hidden_layers=8, num_local_experts=16, hidden_size=512, intermediate_size=512,
             head_dim=64, num_attention_heads=8, num_key_value_heads=2, sliding_window=128)


def small_model(workdir: Path) -> Path:
    """A converted random model of the SMALL shape (the real vocabulary)."""
    dst = workdir / "mlx"
    if not dst.exists():
        vocab = find_vocab([Path(__file__).resolve().parents[2] / "shared" / "tokenizer"])
        write_checkpoint(workdir / "ckpt", tiny_config(**SMALL), vocab=vocab)
        convert(workdir / "ckpt", dst, progress=False)
    return dst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a converted model folder")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=4000)
    parser.add_argument("--chunk", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model, tok = load(args.model or small_model(Path(tmp)))
        greedy, never = SamplingParams(temperature=0), frozenset()
        long_prompt = random_prompt(args.prompt_tokens, seed=99)

        alone = []  # the long prompt's chunks, prefilled with nothing else running
        cache = PromptCache(model)
        t = time.perf_counter()
        for _ in prefill_chunks(model, cache, long_prompt, args.chunk):
            alone.append(time.perf_counter() - t)
            t = time.perf_counter()

        batch = BatchGenerator(model, tok, prefill_chunk=args.chunk)
        streams = [batch.submit(random_prompt(64, seed=i), sampling=greedy, stop_tokens=never)
                   for i in range(args.streams)]

        def timed_step() -> tuple[float, int]:
            t = time.perf_counter()
            events = batch.step()
            return time.perf_counter() - t, sum(g in streams for g, _ in events)

        for _ in range(args.streams + 8):  # prefill them, warm up
            timed_step()
        before = [timed_step() for _ in range(16)]
        newcomer = batch.submit(long_prompt, sampling=greedy, max_tokens=4, stop_tokens=never)
        during = []
        while newcomer.pending is None and newcomer in batch.generations:
            during.append(timed_step())
        for g in streams:
            batch.cancel(g)

    assert all(n == args.streams for _, n in before + during), "a stream missed a step"
    decode = statistics.median(t for t, _ in before)
    print(f"{args.streams} streams decoding: {decode * 1e3:.1f} ms per step (median of 16)")
    print(f"{args.prompt_tokens}-token prompt alone: {len(alone)} chunks of {args.chunk}, "
          f"{sum(alone):.2f} s in all")
    print("step  with the prompt's chunk (ms)  = decode + chunk alone (ms)  excess (ms)")
    for i, ((t, _), chunk) in enumerate(zip(during, alone, strict=True)):
        print(f"{i:4d}  {t * 1e3:27.1f}  {(decode + chunk) * 1e3:26.1f}  "
              f"{(t - decode - chunk) * 1e3:11.1f}")
    worst = max(t for t, _ in during)
    print(f"worst delay between two tokens of a running stream: {worst * 1e3:.1f} ms; "
          f"one decode step + the longest chunk alone: {(decode + max(alone)) * 1e3:.1f} ms; "
          f"the whole prompt at once would have cost {(decode + sum(alone)) * 1e3:.0f} ms",
          file=sys.stdout)
    mx.clear_cache()


if __name__ == "__main__":
    main()
