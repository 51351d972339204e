"""Load time and peak memory of a real-shape gpt-oss model, and its first two generated tokens.

    python benchmarks/load.py                 # synthetic 20b: write, convert, measure, delete
    python benchmarks/load.py --preset 120b   # the same at the 120b shape (~65 GB on disk)
    python benchmarks/load.py --release       # the synthetic release loaded as it is, beside
                                              # its converted folder (twice the disk)
    python benchmarks/load.py --model DIR     # an existing converted or released folder

The synthetic checkpoint (random weights, released layout and shapes) is written with
`write_checkpoint`, converted with `gptoss_mlx.convert.convert`, then loaded in a fresh
process so that its peak RSS counts loading and generation only. Results go to stdout,
progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GiB = 1024**3


def weights_bytes(folder: Path) -> int:
    """Bytes of the model's tensors (a release's: those it loads)."""
    from gptoss_mlx.memory import folder_specs

    return sum(s.nbytes for s in folder_specs(folder))


def measure(folder: Path, experts: str) -> dict:
    """Load `folder`, generate 2 tokens greedily; return timings and peak memory."""
    import mlx.core as mx

    import gptoss_mlx

    mx.reset_peak_memory()
    t0 = time.perf_counter()
    model, _ = gptoss_mlx.load(folder, experts=experts, progress=True)
    load_s = time.perf_counter() - t0
    load_peak = mx.get_peak_memory()
    load_rss = peak_rss()

    cache = model.make_cache()
    vocab = model.config.vocab_size
    prompt = mx.array([[t % vocab for t in (200006, 1428, 200008, 12194)]], dtype=mx.int32)
    times = []
    tokens = prompt
    for _ in range(2):
        t = time.perf_counter()
        logits = model(tokens, cache=cache, last_only=True)
        tokens = mx.argmax(logits[:, -1, :], axis=-1, keepdims=True).astype(mx.int32)
        mx.eval(tokens)
        times.append(time.perf_counter() - t)
        print(f"token {len(times)}: {tokens.item()} in {times[-1]:.2f} s", file=sys.stderr)
    return {
        "folder": str(folder),
        "experts_backend": model.experts_backend,
        "weights_gb": weights_bytes(folder) / GiB,
        "load_s": load_s,
        "mlx_peak_after_load_gb": load_peak / GiB,
        "mlx_peak_gb": mx.get_peak_memory() / GiB,
        "peak_rss_after_load_gb": load_rss / GiB,
        "peak_rss_gb": peak_rss() / GiB,
        "first_token_s": times[0],
        "second_token_s": times[1],
    }


def peak_rss() -> int:
    """The process's peak resident set in bytes (ru_maxrss: KiB on Linux, bytes on macOS)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (
        1 if sys.platform == "darwin" else 1024)


def build(preset: str, work: Path, keep_release: bool) -> tuple[Path, Path | None]:
    """Write a synthetic checkpoint of `preset`'s shape and convert it; returns the MLX folder
    and the released one (None: deleted after converting)."""
    from gptoss_mlx.convert import convert
    from gptoss_mlx.convert.synthetic import preset_config, write_checkpoint
    from gptoss_mlx.convert.vocab import find_vocab

    src, dst = work / "src", work / "mlx"
    t = time.perf_counter()
    # The release's tokenizer files, from the project's shared/ vocabulary or tiktoken's.
    vocab = find_vocab([Path(__file__).resolve().parents[2] / "shared" / "tokenizer"])
    write_checkpoint(src, preset_config(preset), layout="hf", seed=0, vocab=vocab, progress=True)
    print(f"wrote the synthetic {preset} checkpoint in {time.perf_counter() - t:.0f} s",
          file=sys.stderr)
    t = time.perf_counter()
    convert(src, dst)
    print(f"converted in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    if keep_release:
        return dst, src
    shutil.rmtree(src)
    return dst, None


def report(r: dict) -> None:
    print(f"weights           {r['weights_gb']:.2f} GiB ({r['folder']})")
    print(f"experts backend   {r['experts_backend']}")
    print(f"load time         {r['load_s']:.1f} s")
    print(f"MLX peak memory   {r['mlx_peak_after_load_gb']:.2f} GiB after load, "
          f"{r['mlx_peak_gb']:.2f} GiB after 2 tokens")
    print(f"process peak RSS  {r['peak_rss_after_load_gb']:.2f} GiB after load, "
          f"{r['peak_rss_gb']:.2f} GiB after 2 tokens")
    print(f"token 1 (prefill of 4) {r['first_token_s']:.2f} s, token 2 {r['second_token_s']:.2f} s")


def run(folder: Path, experts: str) -> dict:
    """`measure` in a fresh process (so that its peak RSS is this folder's alone)."""
    out = subprocess.run(
        [sys.executable, __file__, "--measure-only", "--model", str(folder), "--experts", experts],
        check=True, stdout=subprocess.PIPE, text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="an existing converted or released folder (or a Hugging "
                    "Face repo id) to measure")
    ap.add_argument("--preset", default="20b", choices=["20b", "120b"])
    ap.add_argument("--release", action="store_true", help="also load the synthetic release as "
                    "it is and compare its peak memory with the converted folder's")
    ap.add_argument("--workdir", type=Path, help="where to write the synthetic model "
                    "(default: a temporary folder, deleted afterwards)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic model")
    ap.add_argument("--experts", default="auto", choices=["auto", "mlx", "metal"])
    ap.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.measure_only:  # the child process: print the JSON result
        print(json.dumps(measure(args.model, args.experts)))
        return

    work = None
    folder, release = args.model, None
    if folder is None:
        work = Path(tempfile.mkdtemp(prefix="gptoss-load-", dir=args.workdir))
        folder, release = build(args.preset, work, keep_release=args.release)
    try:
        converted = run(folder, args.experts)
        report(converted)
        if release is not None:
            print()
            released = run(release, args.experts)
            report(released)
            for key, what in (("mlx_peak_after_load_gb", "MLX peak after load"),
                              ("peak_rss_after_load_gb", "peak RSS after load")):
                print(f"release / converted, {what}: {released[key]:.2f} / "
                      f"{converted[key]:.2f} GiB = {released[key] / converted[key]:.3f}")
    finally:
        if work is not None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
            print(f"deleted {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
