"""The demo model through our MLX runtime: the issue-13 acceptance table over held-out
conversations, greedy and at temperature 1.

    python benchmarks/demo_model.py [--weights FILE] [-n 200] [--vocab PATH] [--temperatures 0 1]

Expands the compact demo weights (default: the packaged ones) to the released layout, converts
them, and scores `n` held-out conversations (`gptoss_mlx.convert.demo_eval`): strict harmony
parse, analysis then final, the right tool when one fits, argument values, answers that repeat
the tool's result, calls made when no offered tool fits; then the largest probability any
position of 10 conversations gives to vocabulary the corpus never uses. Table on stdout.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from safetensors.numpy import load_file

from gptoss_mlx import load
from gptoss_mlx.convert import convert
from gptoss_mlx.convert.demo import DEMO_WEIGHTS, write_demo
from gptoss_mlx.convert.demo_eval import evaluate, rates, unused_mass

VOCAB = Path(__file__).resolve().parents[1].parent / "shared" / "tokenizer" / "o200k_base.tiktoken"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, default=DEMO_WEIGHTS)
    ap.add_argument("-n", type=int, default=200)
    ap.add_argument("--vocab", type=Path, default=VOCAB)
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_demo(Path(tmp) / "ckpt", vocab=args.vocab, weights=args.weights)
        convert(Path(tmp) / "ckpt", Path(tmp) / "mlx", progress=False)
        model, tokenizer = load(Path(tmp) / "mlx")
        table(model, tokenizer, args.n, args.weights, args.temperatures)


def table(model, tokenizer, n: int, weights: Path, temperatures: list[float]) -> None:
    """Print the acceptance table for `n` conversations."""
    keys = list(rates([]))
    print(f"{'sampling':<10}" + "".join(f"{k:>20}" for k in keys) + f"{'seconds':>9}")
    for temperature in temperatures:
        started = time.perf_counter()
        r = rates(evaluate(model, tokenizer, n, temperature))
        name = "greedy" if temperature == 0 else f"T={temperature:g}"
        print(f"{name:<10}" + "".join(f"{r[k]:>20.1%}" for k in keys)
              + f"{time.perf_counter() - started:>9.0f}", flush=True)
    used = load_file(str(weights))["used_ids"]
    print(f"largest unused-vocabulary probability (T=1, 10 conversations): "
          f"{unused_mass(model, tokenizer, used, n=10):.2e}")
    print(f"{n} conversations; right tool over those with a fitting tool; arguments and "
          "honest answers over right calls", file=sys.stderr)


if __name__ == "__main__":
    main()
