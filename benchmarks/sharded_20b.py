"""The real 20b shape split across local ranks: each rank's peak memory next to a quarter of the
weights plus 1.5 GB, and the weight bytes each rank reads per decoded token.

    flock /tmp/bigmem.lock python benchmarks/sharded_20b.py [--ranks 4] [--src CKPT] [--workdir DIR]

Writes a random checkpoint of gpt-oss-20b's exact shape in the released Hugging Face layout
(~13 GB; or takes one with --src), then runs `mlx.launch -n RANKS --backend ring` on this machine:
every rank loads its share straight from the release (no conversion, no rank reads the whole
model), prefills a few tokens and decodes a few greedily, and reports MLX's peak memory and its
peak RSS. The table puts them beside the memory plan (`plan_per_rank`) and the per-rank decode
bytes (`bench.bytes_per_token` over each rank's tensors). The checkpoint it wrote is deleted at
the end unless --keep. On the CPU, MLX's quantized matmuls are slow: keep the token counts small.

Measured (Linux, CPU, 2 cores shared, 4 ranks, bfloat16, 8-token prompt, 2 decoded): weights
13.76 GB whole, bound 4.94 GB per rank; ranks 0-3 hold 3.50/3.50/3.39/3.39 GB (plan), peak MLX
memory 3.51/3.51/3.40/3.40 GB, peak RSS 3.93/3.93/3.77/3.77 GB; decode reads 0.94/0.94/0.92/0.92
GB per token (spread 1.5%); 50 collectives per forward; every rank the same argmax.
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

import mlx.core as mx

from gptoss_mlx.bench import bytes_per_token
from gptoss_mlx.convert.synthetic import preset_config, write_checkpoint
from gptoss_mlx.memory import gb, plan_per_rank
from gptoss_mlx.model.local_ranks import launch_command
from gptoss_mlx.model.sharding import Shard, shard_specs
from gptoss_mlx.model.weights import open_weights

SLACK = 1.5e9  # the acceptance bound: a quarter of the weights plus this, per rank (4 ranks)
BALANCE = 0.05  # decode bytes per rank within 5% of each other


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def worker(folder: str, out: str, prompt_tokens: int, gen_tokens: int) -> None:
    """One rank: load its share, prefill, decode; write its measurements to OUT.RANK.json."""
    from gptoss_mlx import load

    group = mx.distributed.init(strict=True)
    t = time.perf_counter()
    model, _ = load(folder, experts="mlx", group=group)
    loaded = time.perf_counter() - t
    load_peak = mx.get_peak_memory()
    vocab = model.config.vocab_size
    tokens = mx.arange(prompt_tokens, dtype=mx.int32).reshape(1, -1) * 7919 % vocab
    cache = model.make_cache()
    t = time.perf_counter()
    logits = model(tokens, cache=cache, last_only=True)
    mx.eval(logits)
    prefill_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(gen_tokens):
        logits = model(mx.argmax(logits[:, -1:], axis=-1).astype(mx.int32), cache=cache)
        mx.eval(logits)
    decode_s = time.perf_counter() - t
    Path(f"{out}.{group.rank()}.json").write_text(json.dumps({
        "load_s": loaded, "prefill_s": prefill_s, "decode_s": decode_s,
        "load_peak": load_peak, "peak": mx.get_peak_memory(),
        "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        "argmax": int(mx.argmax(logits[0, -1]).item()),
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--src", type=Path, default=None,
                    help="an existing 20b-shape checkpoint (default: write one)")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    ap.add_argument("--prompt-tokens", type=int, default=8)
    ap.add_argument("--gen-tokens", type=int, default=2)
    ap.add_argument("--context", type=int, default=4096, help="context the memory plan uses")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint written")
    ap.add_argument("--worker", nargs=2, metavar=("FOLDER", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker, args.prompt_tokens, args.gen_tokens)
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gptoss-20b-sharded-"))
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = args.src or workdir / "ckpt"
    try:
        if args.src is None and not (ckpt / "config.json").exists():
            t = time.perf_counter()
            write_checkpoint(ckpt, preset_config("20b"), layout="hf", progress=True)
            log(f"checkpoint written in {time.perf_counter() - t:.0f} s")
        weights = open_weights(ckpt)
        cfg, specs = weights.config, weights.specs()
        n = args.ranks
        plans = plan_per_rank(cfg, specs, n, args.context)
        whole = sum(plan.weights_total for plan in plan_per_rank(cfg, specs, 1, args.context))
        decode = [sum(v for k, v in bytes_per_token(cfg, shard_specs(cfg, specs, Shard(r, n)))
                      .items() if k != "kv cache") for r in range(n)]
        out = workdir / "rank"
        cmd = launch_command(n, [str(Path(__file__).resolve()), "--worker", str(ckpt), str(out),
                                 "--prompt-tokens", str(args.prompt_tokens),
                                 "--gen-tokens", str(args.gen_tokens)])
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        files = [Path(f"{out}.{r}.json") for r in range(n)]
        if proc.returncode or not all(f.is_file() for f in files):
            sys.exit(f"a rank failed:\n{proc.stderr[-4000:]}")
        log(f"{n} ranks ran in {time.perf_counter() - t:.0f} s")
        ranks = [json.loads(f.read_text()) for f in files]

        bound = whole / n + SLACK
        print(f"20b shape on {n} local ranks (ring, {mx.default_device()}), bfloat16, straight "
              f"from the release layout; whole model's weights {gb(whole)}; bound per rank "
              f"weights/{n} + {gb(SLACK)} = {gb(bound)}; collectives per forward "
              f"{2 * cfg.num_hidden_layers + 2}")
        print("rank  weights(plan)  plan total  peak MLX (load)     peak RSS   decode bytes/token"
              "   load s  prefill s  decode s/token  argmax")
        for r, (plan, m, d) in enumerate(zip(plans, ranks, decode, strict=True)):
            print(f"{r:>4}  {gb(plan.weights_total):>13}  {gb(plan.total):>10}  "
                  f"{gb(m['peak']):>8} ({gb(m['load_peak'])})  {gb(m['rss']):>10}  "
                  f"{gb(d):>18}   {m['load_s']:>6.0f}  {m['prefill_s']:>9.1f}  "
                  f"{m['decode_s'] / max(1, args.gen_tokens):>14.1f}  {m['argmax']:>6}")
        worst = max(max(m["peak"], m["rss"]) for m in ranks)
        spread = max(decode) / min(decode) - 1
        print(f"largest peak (MLX or RSS) {gb(worst)}: {'within' if worst <= bound else 'OVER'} "
              f"the bound {gb(bound)}; decode bytes per rank spread {100 * spread:.1f}% "
              f"({'within' if spread <= BALANCE else 'OVER'} {100 * BALANCE:.0f}%); every rank's "
              f"argmax the same: {len({m['argmax'] for m in ranks}) == 1}")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
