"""The gpt-oss model in MLX: architecture, YaRN RoPE, KV caches, experts backends, loader.

    model, tokenizer = gptoss_mlx.load("gpt-oss-20b-mlx")       # dtype="bfloat16", experts="auto"
    model, tokenizer = gptoss_mlx.load("openai/gpt-oss-20b")    # or a release, as it is
    cache = model.make_cache()                                   # one cache per layer
    logits = model(mx.array([ids], dtype=mx.int32), cache=cache, last_only=True)  # [1, 1, V]
    trim_to(cache, n)       # keep the first n tokens (False: start over with make_cache())

Modules: gpt_oss.py (the architecture), rope.py (YaRN as OpenAI's reference computes it),
cache.py (KV caches and the trimming helpers), experts.py (the MoE function, its portable
backend and the backend choice), weights.py (a converted folder's tensors, or a release's
through the converter's plan), loader.py (folders to models, ModelLoadError), sharding.py (one
model split across the ranks of an `mx.distributed` group: `load(path, group=group)`),
local_ranks.py (`mlx.launch` on this machine, for tests and benchmarks).
"""

from .cache import trim_to
from .gpt_oss import GptOss
from .loader import ModelLoadError, load, load_model

__all__ = ["GptOss", "ModelLoadError", "load", "load_model", "trim_to"]
