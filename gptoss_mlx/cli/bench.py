"""`gptoss-mlx bench`: llama-bench style speed table, experts A/B, side by side with mlx-lm."""

from __future__ import annotations

from pathlib import Path

import click

from gptoss_mlx.cli.options import dtype_option
from gptoss_mlx.generate import DEFAULT_PREFILL_CHUNK


def _sizes(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    try:
        sizes = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated token counts") from None
    if any(s < 0 for s in sizes):
        raise click.BadParameter(f"{value!r}: token counts must be >= 0")
    return [s for s in sizes if s > 0]


@click.command("bench")
@click.option("-m", "--model", "source", required=True, metavar="DIR|REPO",
              help="Converted MLX model folder, released checkpoint folder (root layout or "
                   "original/), or Hugging Face repo id (downloaded once).")
@dtype_option
@click.option("-p", "--n-prompt", default="512,2048", callback=_sizes, metavar="N[,N...]",
              help="Prefill tests (ppN): prompt sizes, comma-separated; empty for none.")
@click.option("-n", "--n-gen", default="128", callback=_sizes, metavar="N[,N...]",
              help="Decode tests (tgN): tokens to decode, comma-separated; empty for none.")
@click.option("-d", "--depth", default="4096", callback=_sizes, metavar="N[,N...]",
              help="Also run each decode test after this many tokens of context "
                   "(comma-separated; empty for none).")
@click.option("-r", "--repetitions", type=click.IntRange(min=1), default=3,
              help="Runs of each test (interleaved across runtimes); the table shows mean ± sd.")
@click.option("--experts", "experts", multiple=True,
              type=click.Choice(["auto", "mlx", "metal"]),
              help="Experts backends to A/B on one loaded model (repeatable); auto is the "
                   "autotuned choice, printed with its measured margin [default: auto and mlx "
                   "on a Mac, mlx elsewhere].")
@click.option("--compare", is_flag=True,
              help="Also run mlx-lm (mlx_lm.stream_generate) on the same folder; print the "
                   "speed ratios ours / mlx-lm. mlx-lm loads its own copy of the weights.")
@click.option("--serve", is_flag=True,
              help="Benchmark the server instead: start `gptoss-mlx serve` (and with --compare "
                   "`mlx_lm.server`, continuous batching on), one at a time, and drive each with "
                   "--clients concurrent streaming chat completions; -r rounds per concurrency.")
@click.option("--clients", default="1,2,4,8,16", callback=_sizes, metavar="N[,N...]",
              show_default=True, help="--serve: concurrent clients, comma-separated.")
@click.option("--stream-tokens", type=click.IntRange(min=2), default=64, show_default=True,
              help="--serve: max_tokens of each stream.")
@click.option("--stream-prompt", type=click.IntRange(min=1), default=128, show_default=True,
              help="--serve: words (one token each) in each client's prompt.")
@click.option("--long-prompt", type=click.IntRange(min=0), default=4000, show_default=True,
              help="--serve: words (one token each) of the prompt that arrives while 4 "
                   "streams decode; 0 skips that probe.")
@click.option("--prefill-chunk", type=click.IntRange(min=1), default=DEFAULT_PREFILL_CHUNK,
              show_default=True,
              help="--serve: both servers' prefill chunk (gptoss-mlx serve's --prefill-chunk, "
                   "mlx_lm.server's --prefill-step-size), whose time at the long prompt's full "
                   "depth bounds the streams' delay.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True),
              default=None, help="--serve: also write the results to this JSON file.")
@click.option("--schema-tokens", type=click.IntRange(min=0), default=128, show_default=True,
              help="Tokens of a JSON-schema answer to time the constraint's cost per token on, "
                   "against as many without one, -r times (0: skip).")
def bench_command(source: str, dtype: str, n_prompt: list[int], n_gen: list[int], depth: list[int],
                  repetitions: int, experts: tuple[str, ...], compare: bool, serve: bool,
                  clients: list[int], stream_tokens: int, stream_prompt: int, long_prompt: int,
                  prefill_chunk: int, json_path: str | None, schema_tokens: int) -> None:
    """Benchmark prefill and decode on MODEL: tokens per second, time to first token, peak
    memory and decode's share of the chip's memory bandwidth. The table goes to stdout, progress
    and ratios to stderr. With --serve, the server under concurrent streaming clients."""
    import mlx.core as mx

    from gptoss_mlx import bench, distributed, load
    from gptoss_mlx.cli.options import join_ranks
    from gptoss_mlx.memory import MemoryPlanError, ensure_fits
    from gptoss_mlx.model.weights import ModelLoadError, locate

    tests = bench.llama_bench_tests(n_prompt, n_gen, depth)
    if not tests and not serve:
        raise click.UsageError("nothing to run: give at least one --n-prompt or --n-gen size")
    try:
        model_path = locate(source)  # a repo id: its local copy (downloaded once)
    except ModelLoadError as e:
        raise click.ClickException(str(e)) from None
    if serve:
        if not clients:
            raise click.UsageError("--clients: give at least one concurrency")
        serve_bench(model_path, dtype, clients, repetitions, stream_prompt, stream_tokens,
                    long_prompt, prefill_chunk, compare, json_path)
        return
    longest = max(t.n_prompt + t.depth + t.n_gen + 1 for t in tests)
    ranks = join_ranks()
    backends = list(dict.fromkeys(experts)) or (
        ["auto", "mlx"] if mx.metal.is_available() else ["mlx"]
    )
    if ranks > 1 and (compare or len(experts) > 1):
        raise click.UsageError("across several ranks, bench runs one experts backend (the "
                               "other ranks keep theirs) and no --compare (mlx-lm runs whole)")
    backends = backends[:1] if ranks > 1 else backends
    try:
        plan = ensure_fits(model_path, longest, dtype=dtype, shard=distributed.shard())
    except MemoryPlanError as e:
        raise click.ClickException(str(e)) from None
    except (OSError, ValueError) as e:
        raise click.ClickException(f"cannot plan {model_path}: {e}") from None
    if not distributed.is_follower():
        click.echo(plan.summary(), err=True)

    try:
        model, tokenizer = load(model_path, dtype=dtype,
                                experts="auto" if "auto" in backends else backends[0],
                                group=distributed.group())
        model = distributed.distribute(model)  # the other ranks follow it there until the end
        runtimes: list[bench.Runtime] = [
            bench.OurRuntime(model, tokenizer, f"gptoss-mlx {name}", experts=name)
            for name in backends
        ]
    except ModelLoadError as e:  # its message names the folder already
        raise click.ClickException(str(e)) from None
    except (ValueError, OSError, RuntimeError) as e:
        raise click.ClickException(f"cannot load {model_path}: {e}") from None
    if tokenizer is None:
        raise click.ClickException(f"{model_path}: no o200k_base.tiktoken, cannot benchmark")
    if "auto" in backends:
        choice = getattr(model.moe_fn, "choice", None)
        click.echo(f"experts auto: {model.experts_backend}"
                   + (f", autotuned per tokens per call: {choice.describe()}" if choice else ""),
                   err=True)
    if compare:
        try:
            runtimes.append(bench.MlxLmRuntime(model_path))
        except (ValueError, OSError, KeyError, RuntimeError) as e:  # e.g. an original/ release
            raise click.ClickException(f"mlx-lm cannot load {model_path}: {e}") from None

    cfg, specs = plan.config, plan.specs
    device, bandwidth = bench.device_bandwidth()
    blas = bench.cpu_blas()
    click.echo(f"device: {device}, spec bandwidth: "
               f"{f'{bandwidth:g} GB/s' if bandwidth else 'n/a (CPU)'}, dtype: {dtype}"
               + (f", BLAS: {blas}" if blas else ""), err=True)
    results = bench.run_tests(runtimes, tests, repetitions,
                              progress=lambda line: click.echo(line, err=True))

    def decode_bytes(test: bench.Test) -> int:  # the mean context over the decoded tokens
        return sum(bench.bytes_per_token(cfg, specs, test.depth + test.n_gen // 2,
                                         dtype).values())

    size = sum(s.nbytes for s in specs)
    click.echo(bench.format_table(results, Path(source).name, size, decode_bytes, bandwidth))
    for test in tests:
        if test.n_gen:
            click.echo(f"{test.name}: {decode_bytes(test) / 1e9:.3f} GB read per token", err=True)
    ours = [r.name for r in runtimes if isinstance(r, bench.OurRuntime)]
    for a, b in zip(ours, ours[1:], strict=False):
        click.echo(bench.format_ratios(results, a, b), err=True)
    if compare:
        for a in ours:
            click.echo(bench.format_ratios(results, a, "mlx-lm"), err=True)
    if schema_tokens:
        click.echo(str(bench.constraint_cost(model, tokenizer, schema_tokens,
                                                  repetitions)), err=True)


def serve_bench(model_path: Path, dtype: str, clients: list[int], rounds: int,
                prompt_words: int, max_tokens: int, long_words: int, chunk_tokens: int,
                compare: bool, json_path: str | None) -> None:
    """`bench --serve`: the conditions (dtypes, BLAS), each server's table, then the ratios
    (stdout); progress on stderr."""
    import json

    from gptoss_mlx import serve_bench as sb
    from gptoss_mlx.bench import cpu_blas

    room = max(*clients, sb.LONG_PROMPT_STREAMS + 1 if long_words else 1)  # generations at once
    servers = [sb.ours(model_path, room, chunk_tokens, dtype)]
    if compare:
        servers.append(sb.mlx_lm(model_path, room, chunk_tokens))
    blas = cpu_blas()  # the servers inherit this process's environment (LD_PRELOAD)
    click.echo("; ".join(f"{s.name}: {s.dtype}" for s in servers)
               + (f"; BLAS: {blas}" if blas else "") + "\n")
    runs = []
    for server in servers:
        try:
            runs.append(sb.bench_server(
                server, clients, rounds=rounds, prompt_words=prompt_words, max_tokens=max_tokens,
                long_words=long_words, chunk_tokens=chunk_tokens,
                progress=lambda line: click.echo(line, err=True)))
        except RuntimeError as e:
            raise click.ClickException(str(e)) from None
        click.echo(sb.format_run(runs[-1]) + "\n")
    if compare:
        click.echo(f"{runs[0].server} / {runs[1].server}:")
        click.echo(sb.format_ratios(runs[0], runs[1]) + "\n")
    for run in runs:
        if run.long_prompt is not None:
            click.echo(f"{run.server}: {sb.describe_long_prompt(run.long_prompt)}")
        elif run.long_prompt_error:
            click.echo(f"{run.server}: the long-prompt probe failed: {run.long_prompt_error}")
    if json_path:
        Path(json_path).write_text(json.dumps([run.to_json() for run in runs], indent=1))
