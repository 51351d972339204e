"""The `gptoss-mlx` command: a click group with one module per subcommand in this package."""

from typing import Any

import click

from gptoss_mlx import __version__


class _Group(click.Group):
    """The command group; under `mlx.launch`, a lost rank ends this one with one line (not with
    the traceback of whatever failed first)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise  # the command's own end
        except Exception as e:
            from gptoss_mlx.distributed import before_crash

            before_crash(e)
            raise


@click.group(cls=_Group,
             context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="gptoss-mlx")
def main() -> None:
    """Run OpenAI's gpt-oss models on Apple Silicon through MLX."""


# Subcommands register here, one line each; their modules keep heavy imports inside the command.
from gptoss_mlx.cli.convert import convert_command  # noqa: E402

main.add_command(convert_command)
from gptoss_mlx.cli.generate import generate_command  # noqa: E402

main.add_command(generate_command)
from gptoss_mlx.cli.chat import chat_command  # noqa: E402

main.add_command(chat_command)
from gptoss_mlx.cli.synthesize import synthesize_command  # noqa: E402

main.add_command(synthesize_command)
from gptoss_mlx.cli.serve import serve_command  # noqa: E402

main.add_command(serve_command)
from gptoss_mlx.cli.bench import bench_command  # noqa: E402

main.add_command(bench_command)
from gptoss_mlx.cli.plan import plan_command  # noqa: E402

main.add_command(plan_command)
