"""gpt-oss-20b and gpt-oss-120b on Apple Silicon through MLX."""

from __future__ import annotations

import os
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the real imports happen inside load(), so `import gptoss_mlx` stays light
    from gptoss_mlx.chat.tokenizer import Tokenizer
    from gptoss_mlx.model.gpt_oss import GptOss

try:
    __version__ = version("gptoss-mlx")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"


def load(path: str | os.PathLike[str], dtype: str = "bfloat16",
         experts: str | Callable[..., Any] = "auto",
         progress: bool = False, group: Any = None) -> tuple[GptOss, Tokenizer | None]:
    """`(model, tokenizer)` from a converted MLX folder, a released checkpoint folder (root
    layout or original/) or a Hugging Face repo id (see gptoss_mlx.model.loader.load).

    `dtype`: "bfloat16" | "float16" | "float32"; `experts`: "auto" | "mlx" | "metal" or a
    callable with `gptoss_mlx.model.experts.moe`'s signature; `progress`: a loading bar on
    stderr. The tokenizer is None when the folder holds no vocabulary. `group`: an
    `mx.distributed` group (`mx.distributed.init()` under `mlx.launch`) over which the model is
    split; each rank loads only its share, and all ranks compute the same logits together.
    """
    from gptoss_mlx.model.loader import load as _load

    return _load(path, dtype=dtype, experts=experts, progress=progress, group=group)
