"""Load a model folder into `GptOss`: a converted MLX folder (ours, or an mlx-community gpt-oss
one), a released checkpoint as it is, or a Hugging Face repo id (see `weights`).

A converted folder holds `config.json` (the Hugging Face config plus `quantization`) and
`model*.safetensors` with mlx-lm's gpt_oss tensor names. Non-expert linear layers may be
quantized (mlx-community folders: affine 8-bit or other `mlx_lm.convert -q` settings, recorded
per layer in `config["quantization"]` or inferred from the tensor shapes).

With an `mx.distributed` group (`group=mx.distributed.init()` under `mlx.launch`), each rank
builds and reads only its share of the model (model/sharding.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from tqdm import tqdm

from .experts import ENV_VAR, MoeFn, moe, resolve_backend, self_check
from .gpt_oss import GptOss
from .sharding import Shard, ShardingError, check_shardable
from .weights import ModelLoadError, ModelWeights, open_weights

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
# The largest E8M0 expert scale byte a trained model can hold: 2^16 times FP4's largest value 6,
# a weight of 393216, is far beyond any (released weights stay within a few units); 255 is nan.
MAX_EXPERT_SCALE = 127 + 16
_SHOWN = 6  # problems listed in one error line before "... and N more"


def _infer_quantization(path: str, module: nn.Module, weights: dict[str, mx.array],
                        folder: Path) -> dict[str, Any]:
    """group_size / bits / mode of a quantized layer, from its saved tensors' shapes."""
    in_dims = module.weight.shape[-1]
    scales, packed = weights[f"{path}.scales"], weights.get(f"{path}.weight")
    if packed is None or scales.shape[-1] == 0 or in_dims % scales.shape[-1]:
        raise ModelLoadError(f"{folder}: {path}.scales has shape {list(scales.shape)}, which does "
                             f"not divide the layer's {in_dims} input features into groups")
    group_size = in_dims // scales.shape[-1]
    bits = packed.shape[-1] * 32 // in_dims
    if scales.dtype != mx.uint8:
        return {"group_size": group_size, "bits": bits, "mode": "affine"}
    modes = {(4, 32): "mxfp4", (8, 32): "mxfp8", (4, 16): "nvfp4"}
    if (bits, group_size) not in modes:
        raise ModelLoadError(f"{folder}: {path}: cannot tell the quantization mode of {bits} bits "
                             f"with group size {group_size} and uint8 scales")
    return {"group_size": group_size, "bits": bits, "mode": modes[(bits, group_size)]}


def _quantize_as_saved(model: GptOss, weights: dict[str, mx.array], quantization: dict[str, Any],
                       folder: Path) -> None:
    """Turn the linear/embedding layers the folder stores quantized into quantized layers."""

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        params = quantization.get(path)
        if isinstance(params, dict):
            return {"mode": "affine", **params}
        return _infer_quantization(path, module, weights, folder)

    try:
        nn.quantize(model, class_predicate=predicate)
    except (ValueError, TypeError) as e:  # mlx's refusal of the recorded settings
        raise ModelLoadError(f"{folder}/config.json: cannot quantize as recorded ({e})") from None


def _check_tensors(model: GptOss, weights: dict[str, mx.array], folder: Path) -> None:
    """Raise one ModelLoadError line naming every missing, unexpected or mismatched tensor."""
    expected = dict(tree_flatten(model.parameters()))
    problems = [f"missing {n} {list(a.shape)} {_want(a)}" for n, a in expected.items()
                if n not in weights]
    problems += [f"unexpected {n}" for n in weights if n not in expected]
    for name, want in expected.items():
        got = weights.get(name)
        if got is None:
            continue
        floats = mx.issubdtype(want.dtype, mx.floating) and mx.issubdtype(got.dtype, mx.floating)
        if got.shape != want.shape or (got.dtype != want.dtype and not floats):
            problems.append(f"{name}: expected {list(want.shape)} {_want(want)}, "
                            f"found {list(got.shape)} {_dt(got)}")
    if problems:
        more = f"; ... and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
        raise ModelLoadError(f"{folder}: {len(problems)} tensor problem(s): "
                             + "; ".join(problems[:_SHOWN]) + more)


def _dt(a: mx.array) -> str:
    return str(a.dtype).removeprefix("mlx.core.")


def _want(a: mx.array) -> str:
    """The dtype a parameter needs: exact for packed/integer tensors, any float otherwise."""
    return "float" if mx.issubdtype(a.dtype, mx.floating) else _dt(a)


def load_model(path: str | Path | ModelWeights, dtype: str = "bfloat16",
               experts: str | MoeFn = "auto", progress: bool = False,
               group: mx.distributed.Group | None = None) -> GptOss:
    """Read a gpt-oss model (weights evaluated) from a converted MLX folder, a released
    checkpoint folder (either layout), a Hugging Face repo id, or opened `ModelWeights`.

    `dtype` is the activation (and non-quantized weight) dtype: "bfloat16" (as released),
    "float16" or "float32" (for verification). `experts` picks the experts backend
    (see `experts.resolve_backend`; an automatic `metal` is autotuned per token count against
    the portable one, see `kernels.autotune`). `progress` shows a bar on stderr while weights load.
    `group` (an `mx.distributed` group of several ranks): this rank's share of the model, read
    alone from the files; every rank of the group must load, then make the same calls.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    source = open_weights(path) if isinstance(path, (str, os.PathLike)) else path
    folder = source.folder
    name, fn = resolve_backend(experts)
    if group is not None and group.size() == 1:
        group = None
    shard = None
    if group is not None:
        shard = Shard(group.rank(), group.size())
        try:
            check_shardable(source.config, shard.size)
        except ShardingError as e:
            raise ModelLoadError(f"{folder}: {e}") from None
    try:
        weights = source.arrays(shard)
    except ShardingError as e:  # a stored tensor whose shape does not split
        raise ModelLoadError(f"{folder}: {e}") from None
    model = GptOss(source.config, fn, name, group)
    quantization = source.raw_config.get("quantization") or {}
    if not isinstance(quantization, dict):
        raise ModelLoadError(f"{folder}/config.json: quantization={quantization!r}: expected a "
                             "JSON object")
    _quantize_as_saved(model, weights, quantization, folder)
    _check_tensors(model, weights, folder)
    model.load_weights(list(weights.items()), strict=False)
    del weights  # the model holds what it needs; fusing must not keep the originals alive
    model.fuse_qkv()
    model.connect()
    target = DTYPES[dtype]
    model.set_dtype(target, lambda t: mx.issubdtype(t, mx.floating))
    _materialize(model, progress)
    _check_expert_scales(model, folder)
    model.eval()
    forced = experts != "auto" or bool(os.environ.get(ENV_VAR))
    if fn is not moe and forced:
        _verify_experts(model, folder, forced)
    elif fn is not moe:  # picked automatically: measured per phase against the portable experts
        from gptoss_mlx.kernels.autotune import tune_model

        tune_model(model, fn)
    return model


def _verify_experts(model: GptOss, folder: Path, forced: bool) -> None:
    """Check a non-portable experts backend against the portable one on the first layer.

    The Metal kernels are verified on Linux by an emulator, not by Apple's compiler: when the
    backend was picked automatically and fails, warn and fall back to the portable experts;
    when it was asked for, refuse with the reason.
    """
    mlp = model.model.layers[0].mlp
    e = mlp.experts
    problem = self_check(model.moe_fn, e.gate_proj.qweights, e.up_proj.qweights,
                         e.down_proj.qweights, mlp.top_k, model.model.norm.weight.dtype,
                         mlp.swiglu_limit)
    if problem is None:
        return
    what = f"the {model.experts_backend} experts backend failed its self-check ({problem})"
    if forced:
        raise ModelLoadError(f"{folder}: {what}; load with experts='mlx'")
    print(f"warning: {what}; using the portable mlx experts", file=sys.stderr)
    model.set_experts(moe, "mlx")


def _check_expert_scales(model: GptOss, folder: Path) -> None:
    """Refuse expert scales above MAX_EXPERT_SCALE (a corrupt file: they give nan logits); one
    max per tensor, read together."""
    scales = [(n, a) for n, a in tree_flatten(model.parameters())
              if ".experts." in n and n.endswith(".scales") and a.dtype == mx.uint8]
    if not scales:
        return
    tops = mx.stack([a.max() for _, a in scales]).tolist()
    bad = [(n, top) for (n, _), top in zip(scales, tops, strict=True) if top > MAX_EXPERT_SCALE]
    if bad:
        name, top = bad[0]
        value = "nan in E8M0" if top == 255 else f"a scale of 2^{top - 127}"
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise ModelLoadError(
            f"{folder}: {name} holds the MXFP4 scale byte {top} ({value}){more}, where no "
            f"trained model goes above {MAX_EXPERT_SCALE}: the expert weights are corrupt; "
            "convert the released checkpoint again")


def _materialize(model: GptOss, progress: bool) -> None:
    """Read the weights in, one layer at a time (so transient copies stay one layer big)."""
    parts = [model.model.embed_tokens, *model.model.layers, model.model.norm, model.lm_head]
    sizes = [sum(a.nbytes for _, a in tree_flatten(p.parameters())) for p in parts]
    with tqdm(total=sum(sizes), unit="B", unit_scale=True, desc="loading", file=sys.stderr,
              disable=not progress) as bar:
        for part, size in zip(parts, sizes, strict=True):
            mx.eval(part.parameters())
            bar.update(size)


def load(path: str | Path, dtype: str = "bfloat16", experts: str | MoeFn = "auto",
         progress: bool = False,
         group: mx.distributed.Group | None = None) -> tuple[GptOss, Any]:
    """`(model, tokenizer)` from a converted folder, a released checkpoint folder or a Hugging
    Face repo id (see `load_model`; `group`: this rank's share); the tokenizer is None without
    a vocabulary."""
    from gptoss_mlx.chat.tokenizer import VOCAB_FILENAME, load_tokenizer

    source = open_weights(path)
    tokenizer = load_tokenizer(*source.side_folders)
    if tokenizer is not None and tokenizer.vocab_size > source.config.vocab_size:
        # a token id past the embedding would read outside it
        raise ModelLoadError(f"{source.folder}: {VOCAB_FILENAME} has {tokenizer.vocab_size} "
                             f"token ids but config.json's vocab_size is "
                             f"{source.config.vocab_size}")
    return load_model(source, dtype, experts, progress, group), tokenizer
