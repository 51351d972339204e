"""`gptoss-mlx synthesize`: a random checkpoint in the released layouts, at any preset shape."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("synthesize")
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--preset", type=click.Choice(["tiny", "demo", "20b", "120b"]), default="tiny",
              help="Shape: tiny (tests), demo (a small trained model that speaks harmony), "
                   "or the released 20b / 120b configuration.")
@click.option("--layout", type=click.Choice(["hf", "original", "both"]), default="hf",
              help="Hugging Face root layout, OpenAI's original/ layout, or both.")
@click.option("--seed", type=int, default=0, help="Random seed (same seed, same weights).")
@click.option("--vocab", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="o200k_base.tiktoken to build the tokenizer files from (default: tiktoken's "
                   "cache or download).")
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
def synthesize_command(dst: Path, preset: str, layout: str, seed: int, vocab: Path | None,
                       force: bool) -> None:
    """Write a random gpt-oss checkpoint to DST with the release's tokenizer and generation
    files (tests, benchmarks, demos; no download of weights).

    `--preset demo` writes the demo model instead: trained weights shipped with the package
    (`--seed` does not apply)."""
    import time

    from gptoss_mlx.convert import ConvertError
    from gptoss_mlx.convert.converter import os_error_line
    from gptoss_mlx.convert.demo import write_demo
    from gptoss_mlx.convert.staging import staged_folder
    from gptoss_mlx.convert.synthetic import preset_config, tiny_config, write_checkpoint
    from gptoss_mlx.convert.vocab import download_vocab, read_vocab

    config = None if preset == "demo" else tiny_config() if preset == "tiny" else preset_config(
        preset)
    started = time.perf_counter()
    try:
        vocab_bytes = read_vocab(vocab) if vocab is not None else download_vocab()
    except ConvertError as e:
        if vocab is None:
            raise click.ClickException(f"no o200k_base vocabulary for the tokenizer files: {e}; "
                                       "pass --vocab PATH to a copy of o200k_base.tiktoken"
                                       ) from None
        raise click.ClickException(str(e)) from None
    try:
        with staged_folder(dst, force) as tmp:
            if config is None:
                write_demo(tmp, layout=layout, vocab=vocab_bytes, progress=True)
            else:
                write_checkpoint(tmp, config, layout=layout, seed=seed, vocab=vocab_bytes,
                                 progress=True)
    except ConvertError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:  # an unwritable DST (no permission, disk full, ...)
        raise click.ClickException(os_error_line(e, dst)) from None
    size = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
    what = f"{preset} checkpoint ({layout} layout, seed {seed})"
    if preset == "demo":
        what = f"demo model ({layout} layout)"
    click.echo(f"wrote {what} to {dst}: "
               f"{size / 1e9:.3f} GB in {time.perf_counter() - started:.1f} s", err=True)
