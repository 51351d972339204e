"""Serving under load on the tiny model: `gptoss-mlx serve` against `mlx_lm.server` (issue #14).

    python benchmarks/serve_load.py                     # 1, 2, 4, 8, 16 clients, 3 rounds each
    python benchmarks/serve_load.py -r 2 --json out.json   # any `gptoss-mlx bench --serve` option

    # Linux: MLX's CPU wheel calls netlib's reference BLAS, and its bfloat16 matmuls no BLAS at
    # all, so a batch's lm_head costs B times one row's. With OpenBLAS (apt install
    # libopenblas0-pthread) preloaded and our server in float32, batches amortize:
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
        python benchmarks/serve_load.py -r 1 --dtype float32

Writes the tiny random checkpoint (`--vocab`: o200k_base.tiktoken, default ../shared/tokenizer),
converts it, derives its line model (`gptoss_mlx.serve_bench.line_model`: the same work per
token, but every token streams as its own chunk and none ends the stream), then runs
`gptoss-mlx bench --serve --compare` on it: a table per server and the ratios on stdout,
progress on stderr. The first line says each server's dtype (`--dtype` is ours; mlx_lm.server
computes in the folder's, bfloat16) and the BLAS MLX calls (LD_PRELOAD reaches both servers).
For a real model run `gptoss-mlx bench --serve --compare -m DIR` directly.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from gptoss_mlx.cli import main as cli
from gptoss_mlx.convert import convert
from gptoss_mlx.convert.synthetic import tiny_config, write_checkpoint
from gptoss_mlx.serve_bench import line_model

VOCAB = Path(__file__).resolve().parents[1].parent / "shared" / "tokenizer" / "o200k_base.tiktoken"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=Path, default=VOCAB)
    args, bench_args = ap.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(Path(tmp) / "ckpt", tiny_config(), seed=0, vocab=args.vocab)
        convert(ckpt, Path(tmp) / "tiny", progress=False)
        folder = line_model(Path(tmp) / "tiny", Path(tmp) / "tiny-lines")
        cli(["bench", "--serve", "--compare", "-m", str(folder), *bench_args])


if __name__ == "__main__":
    main()
