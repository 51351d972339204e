"""`gptoss-mlx plan`: will a model fit on a set of machines? Each rank's memory plan, no loading.

    gptoss-mlx plan -m openai/gpt-oss-120b --ranks 2 --memory-per-rank 48GB --max-context 32768

Exit status 0 when every rank fits its budget, 1 when one does not (saying what would fit).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from gptoss_mlx.cli.options import dtype_option, max_context_option, size_value

if TYPE_CHECKING:
    from gptoss_mlx.config import ModelConfig
    from gptoss_mlx.convert.safetensors_io import TensorSpec

MAX_RANKS = 16  # the most ranks `plan` suggests


@click.command("plan")
@click.option("-m", "--model", "model_path", required=True, metavar="DIR|REPO",
              help="Converted MLX model folder, released checkpoint folder (root layout or "
                   "original/), or Hugging Face repo id (only its headers are read).")
@click.option("--ranks", type=click.IntRange(min=1), default=1,
              help="Machines (mlx.launch ranks) the model is split across.")
@click.option("--memory-per-rank", default=None, callback=size_value, metavar="SIZE",
              help="GPU memory each machine offers (e.g. 48GB: Metal's recommended working "
                   "set, about 3/4 of a Mac's RAM) [default: this machine's working set, or "
                   "$GPTOSS_MLX_WORKING_SET].")
@max_context_option
@dtype_option
def plan_command(model_path: str, ranks: int, memory_per_rank: int | None,
                 max_context: int | None, dtype: str) -> None:
    """Print the memory plan of each rank of MODEL split across --ranks machines and whether it
    fits --memory-per-rank (exit status 1 when it does not). Nothing is loaded."""
    from gptoss_mlx.memory import (
        MemoryPlanError,
        check_fits,
        gb,
        plan_per_rank,
        working_set_limit,
    )
    from gptoss_mlx.model.weights import ModelLoadError, open_weights

    try:
        weights = open_weights(model_path)
        cfg, specs = weights.config, weights.specs()
        plans = plan_per_rank(cfg, specs, ranks, max_context, dtype=dtype)
    except ModelLoadError as e:
        raise click.ClickException(str(e)) from None
    except (OSError, ValueError) as e:  # ShardingError is a ValueError
        raise click.ClickException(f"{model_path}: {e}") from None
    budget = working_set_limit(memory_per_rank)
    for plan in plans:
        click.echo(plan.summary())
    if budget is None:
        click.echo("fits: no memory limit applies here (no Metal); give --memory-per-rank")
        return
    over = [p for p in plans if p.total > budget]
    if not over:
        click.echo(f"fits: {ranks} rank{'s' * (ranks > 1)} of {gb(budget)} "
                   f"(largest rank {gb(max(p.total for p in plans))})")
        return
    worst = max(over, key=lambda p: p.total)
    enough = next((n for n in range(ranks + 1, MAX_RANKS + 1)
                   if _fits(cfg, specs, n, max_context, dtype, budget)), None)
    try:
        check_fits(worst, budget)
    except MemoryPlanError as e:
        advice = str(e)
    where = f" on rank {worst.shard.rank}" if worst.shard and ranks > 1 else ""
    more = f"{enough} ranks of {gb(budget)} would fit; or: " if enough else ""
    raise click.ClickException(f"does not fit{where}: {more}{advice}")


def _fits(cfg: ModelConfig, specs: list[TensorSpec], ranks: int, max_context: int | None,
          dtype: str, budget: int) -> bool:
    """Whether the model split across `ranks` fits `budget` on every rank (False when it does
    not split that way)."""
    from gptoss_mlx.memory import plan_per_rank

    try:
        return all(p.total <= budget
                   for p in plan_per_rank(cfg, specs, ranks, max_context, dtype=dtype))
    except ValueError:
        return False
