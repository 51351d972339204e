"""Peak memory of the real 20b shape at a 4k context, next to the 12 GB a 16 GB Mac can give it.

    python benchmarks/memory_20b.py [--workdir DIR] [--context 4096] [--prompt-tokens N]

Writes a random checkpoint of gpt-oss-20b's exact shape (~13 GB; or takes one with --src),
converts it (with `--dense-bits 8` by default; the report says which),
deletes the checkpoint it wrote, prints the memory plan, loads the folder (CPU on Linux),
prefills a prompt and decodes a few tokens greedily, then prints MLX's peak memory and the
process's peak RSS next to the plan and the 12 GB target. Needs ~27 GB of free disk at its peak;
everything is deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from gptoss_mlx import load
from gptoss_mlx.bench import bytes_per_token, random_prompt
from gptoss_mlx.convert import convert
from gptoss_mlx.convert.synthetic import preset_config, write_checkpoint
from gptoss_mlx.convert.vocab import find_vocab
from gptoss_mlx.generate import DEFAULT_PREFILL_CHUNK, PromptCache, prefill
from gptoss_mlx.memory import gb, plan_memory

TARGET = 12e9  # what a 16 GB Mac can give the model (10.5-12 GB working set)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build(workdir: Path, dense_bits: int | None, src: Path | None) -> tuple[Path, str]:
    """The converted 20b-shape folder and a word on how it was converted; the checkpoint is
    `src` when given (left in place), else a random one written and deleted here."""
    ckpt, dst = src or workdir / "ckpt", workdir / "mlx"
    if not dst.exists():
        if src is None:
            t = time.perf_counter()
            # The release's tokenizer files, from the shared/ vocabulary or tiktoken's.
            vocab = find_vocab([Path(__file__).resolve().parents[2] / "shared" / "tokenizer"])
            write_checkpoint(ckpt, preset_config("20b"), layout="hf", vocab=vocab, progress=True)
            log(f"checkpoint written in {time.perf_counter() - t:.0f} s")
        t = time.perf_counter()
        convert(ckpt, dst, dense_bits=dense_bits)
        log(f"converted in {time.perf_counter() - t:.0f} s")
        if src is None:
            shutil.rmtree(ckpt)
        (dst / "HOW").write_text(f"dense_bits={dense_bits or 'lossless'}\n")
    how = (dst / "HOW").read_text().strip() if (dst / "HOW").exists() else "unknown"
    return dst, how


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=None, help="default: a fresh temporary folder")
    ap.add_argument("--context", type=int, default=4096, help="context the memory plan uses")
    ap.add_argument("--prompt-tokens", type=int, default=None,
                    help="prompt length to prefill [default: 4000 on Metal, 16 on the CPU, where "
                         "MLX's quantized expert matmuls run at ~0.1 GB/s: a 512-token chunk of "
                         "the 20b takes hours]")
    ap.add_argument("--gen-tokens", type=int, default=4, help="tokens to decode")
    ap.add_argument("--max-prefill-seconds", type=float, default=1800,
                    help="stop prefilling (at a chunk boundary) after this long")
    ap.add_argument("--dense-bits", type=int, default=8, choices=[0, 4, 8],
                    help="convert with --dense-bits (0: lossless)")
    ap.add_argument("--src", type=Path, default=None,
                    help="an existing 20b-shape checkpoint to convert (default: write one)")
    ap.add_argument("--keep", action="store_true", help="keep the converted folder")
    args = ap.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gptoss-20b-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        folder, how = build(workdir, args.dense_bits or None, args.src)
        plan = plan_memory(folder, args.context)
        log(plan.table())
        per_token = sum(bytes_per_token(plan.config, plan.specs).values())

        t = time.perf_counter()
        model, _ = load(folder)
        log(f"loaded in {time.perf_counter() - t:.0f} s: {gb(mx.get_active_memory())} active")
        cache = PromptCache(model)
        n_prompt = args.prompt_tokens or (4000 if mx.metal.is_available() else 16)
        prompt = random_prompt(n_prompt, seed=0)
        t = time.perf_counter()
        for end in range(DEFAULT_PREFILL_CHUNK, len(prompt) + DEFAULT_PREFILL_CHUNK,
                         DEFAULT_PREFILL_CHUNK):  # the cache keeps what earlier calls fed
            logits, _ = prefill(model, cache, prompt[:end])
            log(f"prefilled {len(cache)} tokens, {time.perf_counter() - t:.0f} s")
            if time.perf_counter() - t > args.max_prefill_seconds:
                log("stopping the prefill early (--max-prefill-seconds)")
                break
        t = time.perf_counter()
        for _ in range(args.gen_tokens):
            y = mx.argmax(logits, axis=-1).reshape(1, 1).astype(mx.int32)
            logits = model(y, cache=cache.layers, last_only=True)[:, -1, :]
            mx.eval(logits)
        log(f"decoded {args.gen_tokens} tokens in {time.perf_counter() - t:.0f} s")

        peak = mx.get_peak_memory()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        print(f"20b shape, {how}, {args.context}-token plan, {len(cache)}-token context "
              f"+ {args.gen_tokens} decoded, device {mx.default_device()}")
        print(f"weights {gb(plan.weights_total)}; decode reads {per_token / 1e9:.2f} GB/token")
        print(f"peak MLX memory {gb(peak)} | plan {gb(plan.total)} | target {gb(TARGET)} | "
              f"{'fits' if peak <= TARGET else 'over'} the target by {gb(abs(TARGET - peak))}")
        print(f"peak process RSS {gb(rss)}")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
