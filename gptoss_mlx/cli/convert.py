"""`gptoss-mlx convert`: a released checkpoint to a lossless MLX model folder."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command("convert")
@click.argument("src")
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--vocab", type=click.Path(path_type=Path),
              help="o200k_base.tiktoken to use (default: rebuilt from SRC's tokenizer.json, "
                   "else SRC's own copy, else tiktoken's cache or download).")
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
@click.option("--dense-bits", type=click.Choice(["8", "4"]), default=None,
              help="Lossy: quantize attention, lm_head and embedding to 8 or 4 bits (MLX affine, "
                   "group 64; router 8 bits); experts untouched. Default: lossless.")
@click.option("--max-shard-gb", type=click.FloatRange(min=0.001), default=5.0,
              help="Largest output shard, in GB.")
def convert_command(src: str, dst: Path, vocab: Path | None, force: bool,
                    dense_bits: str | None, max_shard_gb: float) -> None:
    """Convert SRC (a Hugging Face release folder, its original/ folder, or a repo id such as
    openai/gpt-oss-20b) into the MLX model folder DST, byte for byte, with the release's
    tokenizer and generation files and the o200k_base vocabulary.

    Ctrl-C, SIGTERM and SIGHUP remove the temporary .DST.partial-PID folder and exit with
    130, 143 and 129; a folder left by a killed conversion goes at the next one."""
    from gptoss_mlx.convert import ConvertError, convert

    try:
        convert(src, dst, vocab=vocab, force=force, max_shard_bytes=int(max_shard_gb * 1e9),
                dense_bits=int(dense_bits) if dense_bits else None)
    except ConvertError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:  # the partial folder is gone; no click "Aborted!" and status 1
        click.echo(err=True)
        sys.exit(130)
