"""Loading a model for a command or the server: check its folder and the memory plan first, so
each failure is one line naming the folder and what is wrong.

    path = check_model("openai/gpt-oss-20b", max_context=8192)   # the local folder, or LoadError
    model, tokenizer = load_checked(path)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gptoss_mlx.chat.tokenizer import Tokenizer


class LoadError(RuntimeError):
    """The model cannot be loaded (or would not fit); the message is one line naming why."""


def check_model(model_path: str | Path, max_context: int | None = None,
                dtype: str = "bfloat16", prefill_chunk: int | None = None) -> Path:
    """The local folder of a model (a converted folder, a released checkpoint folder, or a
    Hugging Face repo id, downloaded once into the hub cache), after checking that it holds a
    vocabulary and that its memory plan at `max_context` in `dtype`, prefilling `prefill_chunk`
    tokens at a time (None: the default), fits (setting Metal's wired limit)."""
    from gptoss_mlx import distributed
    from gptoss_mlx.chat.tokenizer import TOKENIZER_JSON, VOCAB_FILENAME
    from gptoss_mlx.memory import MemoryPlanError, ensure_fits
    from gptoss_mlx.model.weights import ModelLoadError, open_weights

    try:
        weights = open_weights(model_path)
    except ModelLoadError as e:
        raise LoadError(str(e)) from None
    path = weights.folder  # for a repo id, its local copy from here on
    if not any((d / f).is_file() for d in weights.side_folders
               for f in (VOCAB_FILENAME, TOKENIZER_JSON)):
        raise LoadError(
            f"{path} has no {VOCAB_FILENAME} (nor a {TOKENIZER_JSON} to derive it from); copy "
            f"{VOCAB_FILENAME} into it, or convert again with --vocab PATH"
        )
    try:
        # each rank on its machine
        ensure_fits(path, max_context, dtype=dtype, shard=distributed.shard(),
                    prefill_chunk=prefill_chunk)
    except MemoryPlanError as e:
        raise LoadError(str(e)) from None
    except (OSError, ValueError) as e:
        raise LoadError(f"cannot read {path}: {e}") from None
    return path


def load_checked(path: str | Path, dtype: str = "bfloat16") -> tuple[Any, Tokenizer]:
    """The model (in `dtype`, see `gptoss_mlx.load`) and tokenizer of a folder `check_model`
    accepted (LoadError otherwise).

    Under `mlx.launch` (after `distributed.setup`) each rank loads its share; rank 0 gets the
    model wrapped as the leader (`gptoss_mlx.distributed`), the other ranks follow it here
    until it ends, then exit."""
    from gptoss_mlx import distributed, load
    from gptoss_mlx.model.weights import ModelLoadError

    try:
        model, tokenizer = load(path, dtype=dtype, group=distributed.group())
    except ModelLoadError as e:  # its message names the folder already
        raise LoadError(str(e)) from None
    except (ValueError, OSError, KeyError) as e:
        raise LoadError(f"cannot load {path}: {e}") from None
    if tokenizer is None:
        raise LoadError(f"{path}: no tokenizer could be loaded")
    return distributed.distribute(model), tokenizer
