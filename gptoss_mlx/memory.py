"""The memory plan: will a model folder fit the GPU working set at a given context, before loading?

    plan = plan_memory("gpt-oss-20b-mlx", max_context=8192)
    print(plan.table())                      # weights by part, KV cache, working buffers
    check_fits(plan)                         # raises MemoryPlanError with the options
    set_wired_limit(plan)                    # on a Mac, as mlx-lm does

Weights come from the safetensors headers (no tensor is read). The KV cache follows
`gptoss_mlx.model.cache`: full-attention layers grow with the context in `GROW_STEP` steps,
sliding layers keep `window + DEFAULT_SLACK + COMPACT_STEP` positions. Working buffers are the
activations of the largest prefill chunk (`gptoss_mlx.generate.DEFAULT_PREFILL_CHUNK` tokens,
one layer at a time) plus the last-position logits.
On a Mac the budget is Metal's `max_recommended_working_set_size`; on Linux/CPU no limit applies.

`plan_per_rank(cfg, specs, ranks)` plans one model split across `ranks` machines (see
`gptoss_mlx.model.sharding`): one plan per rank, with that rank's weights, its KV heads' cache
and buffers.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptoss_mlx.config import ModelConfig
from gptoss_mlx.convert.dense import bits_for, quantizable, quantized_specs
from gptoss_mlx.convert.safetensors_io import TensorSpec
from gptoss_mlx.convert.source import ConvertError
from gptoss_mlx.generate import DEFAULT_PREFILL_CHUNK
from gptoss_mlx.model.cache import COMPACT_STEP, DEFAULT_SLACK, GROW_STEP
from gptoss_mlx.model.sharding import (
    Shard,
    ShardingError,
    check_shardable,
    intermediate_range,
    shard_specs,
)
from gptoss_mlx.model.weights import open_weights

WORKING_SET_ENV = "GPTOSS_MLX_WORKING_SET"
MAX_BATCH = 16  # sequences a server runs at once by default, however many more would fit
FLOAT_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}  # safetensors codes
DTYPE_SIZES = {"bfloat16": 2, "float16": 2, "float32": 4}  # the loader's dtypes, bytes each

# Parts of the model, by tensor name (mlx-lm's gpt_oss names, which our folders use).
PARTS = ("experts", "attention", "router", "embedding", "lm_head", "norms")


class MemoryPlanError(RuntimeError):
    """The model does not fit the GPU working set; the message lists the options."""


def tensor_part(name: str) -> str:
    """Which part of the model a tensor of our MLX folder belongs to (one of PARTS)."""
    if ".mlp.experts." in name:
        return "experts"
    if ".self_attn." in name:
        return "attention"
    if ".mlp.router." in name:
        return "router"
    if name.startswith("model.embed_tokens."):
        return "embedding"
    if name.startswith("lm_head."):
        return "lm_head"
    return "norms"


def folder_specs(model_dir: str | Path) -> list[TensorSpec]:
    """Every tensor of a model folder as it loads (a release's: as converted), from the
    safetensors headers alone."""
    return open_weights(model_dir).specs()


def loaded_nbytes(spec: TensorSpec, dtype: str = "bfloat16") -> int:
    """Bytes a tensor takes once loaded: floating tensors become `dtype` (the loader's
    `set_dtype` converts affine quantization scales and biases too), packed integers and E8M0
    scales stay as stored."""
    if spec.dtype in FLOAT_DTYPES:
        return math.prod(spec.shape) * DTYPE_SIZES[dtype]
    return spec.nbytes


def weight_bytes(specs: Iterable[TensorSpec], dtype: str = "bfloat16") -> dict[str, int]:
    """Loaded bytes per model part."""
    out = dict.fromkeys(PARTS, 0)
    for s in specs:
        out[tensor_part(s.name)] += loaded_nbytes(s, dtype)
    return out


def dense_bits_specs(specs: Iterable[TensorSpec], bits: int) -> list[TensorSpec]:
    """The tensors `convert --dense-bits bits` would write instead (the converter's own plan)."""
    return [q for s in specs
            for q in (quantized_specs(s, bits_for(s.name, bits)) if quantizable(s) else [s])]


def kv_bytes_per_token(cfg: ModelConfig, dtype: str = "bfloat16") -> int:
    """Key + value bytes one token adds to one layer."""
    return 2 * cfg.num_key_value_heads * cfg.head_dim * DTYPE_SIZES[dtype]


def kv_positions(cfg: ModelConfig, context: int) -> tuple[int, int]:
    """Positions held by a full and by a sliding layer's cache at `context` tokens."""
    full = -(-context // GROW_STEP) * GROW_STEP
    sliding = cfg.sliding_window + DEFAULT_SLACK + COMPACT_STEP
    return full, sliding


def default_fused_attention() -> bool:
    """True when attention runs MLX's fused Metal kernel (scores never materialised)."""
    import mlx.core as mx

    return mx.metal.is_available()


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes a model needs at a context: weights by part, KV cache, working buffers."""

    config: ModelConfig
    max_context: int
    dtype: str
    weights: dict[str, int]
    kv_cache: int
    buffers: dict[str, int]
    prefill_chunk: int
    fused_attention: bool
    specs: tuple[TensorSpec, ...] = field(repr=False, default=())  # the whole model's
    shard: Shard | None = None  # the rank planned, when the model is split

    @property
    def weights_total(self) -> int:
        return sum(self.weights.values())

    @property
    def buffers_total(self) -> int:
        return sum(self.buffers.values())

    @property
    def total(self) -> int:
        return self.weights_total + self.kv_cache + self.buffers_total

    def at_context(self, max_context: int | None) -> MemoryPlan:
        """The same model and settings at another context."""
        return plan_from_specs(self.config, list(self.specs), max_context, dtype=self.dtype,
                               prefill_chunk=self.prefill_chunk,
                               fused_attention=self.fused_attention, shard=self.shard)

    def with_dense_bits(self, bits: int) -> MemoryPlan:
        """The plan for this folder converted with `--dense-bits bits` (same context)."""
        return plan_from_specs(self.config, dense_bits_specs(self.specs, bits), self.max_context,
                               dtype=self.dtype, prefill_chunk=self.prefill_chunk,
                               fused_attention=self.fused_attention, shard=self.shard)

    def total_for(self, sequences: int) -> int:
        """Bytes with one KV cache per sequence generating at once (`total` is one sequence)."""
        return self.weights_total + sequences * self.kv_cache + self.buffers_total

    def sequences_that_fit(self, budget: int) -> int:
        """How many KV caches at this context fit `budget` beside the weights and buffers."""
        free = budget - self.weights_total - self.buffers_total
        return max(0, free // self.kv_cache) if self.kv_cache else MAX_BATCH

    def largest_context(self, budget: int, sequences: int = 1) -> int:
        """The largest context (a multiple of GROW_STEP, or 0) at which the plan with
        `sequences` KV caches fits `budget`."""
        lo, hi = 0, self.config.max_position_embeddings // GROW_STEP
        while lo < hi:  # the largest n in [0, hi] with a plan at n * GROW_STEP within budget
            mid = (lo + hi + 1) // 2
            if self.at_context(mid * GROW_STEP).total_for(sequences) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lo * GROW_STEP

    def table(self) -> str:
        """A human-readable breakdown, one row per item."""
        rows = [(f"weights: {p}", b) for p, b in self.weights.items() if b]
        rows.append(("weights total", self.weights_total))
        full, sliding = kv_positions(self.config, self.max_context)
        rows.append((f"KV cache ({self.max_context} tokens; full layers {full} positions, "
                     f"sliding layers {sliding})", self.kv_cache))
        rows += [(f"buffers: {k}", b) for k, b in self.buffers.items() if b]
        rows.append(("total", self.total))
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{name:<{width}}  {gb(b):>10}" for name, b in rows)

    def summary(self) -> str:
        """One line: the total and its three parts."""
        who = f" (rank {self.shard.rank} of {self.shard.size})" if self.shard else ""
        return (
            f"memory plan{who}: {gb(self.total)} at a {self.max_context}-token context "
            f"(weights {gb(self.weights_total)} + KV cache {gb(self.kv_cache)} + "
            f"buffers {gb(self.buffers_total)})"
        )


@dataclass(frozen=True)
class BatchPlan:
    """How many sequences generate at once (`batch`), each with its own KV cache, and how many
    KV caches are alive (`caches`: the batch's, or more when more are kept between requests)."""

    plan: MemoryPlan
    batch: int
    caches: int
    budget: int | None  # None: no limit applies (the CPU)

    @property
    def total(self) -> int:
        return self.plan.total_for(self.caches)

    def summary(self) -> str:
        """One line: the batch, its KV caches, the total and the budget."""
        p = self.plan
        within = (f" of the {gb(self.budget)} working set (room for "
                  f"{p.sequences_that_fit(self.budget)} KV caches)" if self.budget is not None
                  else "; no memory limit applies (CPU)")
        return (f"memory plan: batch of {self.batch}: weights {gb(p.weights_total)} + "
                f"{self.caches} KV caches x {gb(p.kv_cache)} at a {p.max_context}-token context "
                f"+ buffers {gb(p.buffers_total)} = {gb(self.total)}{within}")


def plan_batch(plan: MemoryPlan, budget: int | None, max_batch: int | None = None, *,
               kept: int = 1) -> BatchPlan:
    """The batch for `max_batch` sequences, or by default as many as have room for their KV
    cache at the plan's context in `budget` (at most MAX_BATCH; MAX_BATCH when no limit
    applies); `kept` KV caches live between requests (the prompt cache), so max(batch, kept)
    are planned. Raises MemoryPlanError (one line) when they do not fit."""
    room = None if budget is None else plan.sequences_that_fit(budget)
    batch = max_batch or (MAX_BATCH if room is None else max(1, min(MAX_BATCH, room)))
    caches = max(batch, kept)
    if room is not None and budget is not None and caches > room:
        options = [f"{flag} {room}" for flag, n in (("--max-batch", batch), ("--cache-slots", kept))
                   if room and n > room]
        ctx = plan.largest_context(budget, caches)
        options += [f"--max-context {ctx}"] if ctx else []
        raise MemoryPlanError(
            f"{caches} KV caches (a batch of {batch}, {kept} kept as the prompt cache) of "
            f"{gb(plan.kv_cache)} each at a {plan.max_context}-token context need "
            f"{gb(plan.total_for(caches))} with the weights and buffers, more than the "
            f"{gb(budget)} working set, which has room for {room}"
            + (f"; any one of these fits: {', '.join(options)}" if options else ""))
    return BatchPlan(plan, batch, caches, budget)


def gb(n: float) -> str:
    """Bytes as decimal gigabytes (megabytes below 0.1 GB)."""
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def plan_from_specs(
    cfg: ModelConfig,
    specs: list[TensorSpec],
    max_context: int | None = None,
    *,
    dtype: str = "bfloat16",
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    fused_attention: bool | None = None,
    shard: Shard | None = None,
) -> MemoryPlan:
    """The plan for a model whose tensors are `specs` (see `plan_memory`); with `shard`, for
    that rank of the model split across `shard.size` ranks (`specs` are the whole model's)."""
    ctx = cfg.max_position_embeddings if max_context is None else int(max_context)
    if not 0 < ctx <= cfg.max_position_embeddings:
        raise ValueError(
            f"max_context={ctx} must be between 1 and the model's context "
            f"{cfg.max_position_embeddings}"
        )
    if fused_attention is None:
        fused_attention = default_fused_attention()
    n = shard.size if shard else 1
    if shard:
        check_shardable(cfg, n)
    per_tok = kv_bytes_per_token(cfg, dtype) // n  # this rank's KV heads
    full, sliding = kv_positions(cfg, ctx)
    n_sliding = sum(cfg.sliding_layers)
    n_full = cfg.num_hidden_layers - n_sliding
    kv = per_tok * (n_full * full + n_sliding * sliding)

    t = min(prefill_chunk, ctx)
    item = DTYPE_SIZES[dtype]
    H, q = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim // n
    kv_dim = cfg.num_key_value_heads * cfg.head_dim // n
    lo, hi = intermediate_range(cfg, shard) if shard else (0, cfg.intermediate_size)
    k, inter = cfg.num_experts_per_tok, hi - lo
    buffers = {
        # residual stream, normed input and fp32 norm temporaries
        "prefill activations": t * H * (item * 2 + 4 * 2) + t * (2 * q + 2 * kv_dim) * item,
        # each token's k experts: gate and up, the SwiGLU output, down (fp32 accumulation)
        "prefill MoE": t * k * (3 * inter + H) * 4 + t * cfg.num_local_experts * 4,
        # a full cache growing by GROW_STEP copies one layer's buffers
        "KV growth copy": per_tok * full if n_full else 0,
        # logits of the last position, fp32, and the sampler's copy
        "logits row": cfg.vocab_size * 4 * 2,
    }
    if not fused_attention:
        # Without Metal, attention is composed from matmul + softmax: one layer's scores for a
        # prefill chunk over the whole context exist at once, in fp32 and as softmax output in
        # the activation dtype, plus the boolean mask.
        buffers["attention scores (unfused)"] = (
            t * cfg.num_attention_heads // n * ctx * (4 + item) + t * ctx
        )
    held = shard_specs(cfg, specs, shard) if shard else specs
    return MemoryPlan(cfg, ctx, dtype, weight_bytes(held, dtype), kv, buffers, prefill_chunk,
                      fused_attention, tuple(specs), shard)


def plan_per_rank(
    cfg: ModelConfig,
    specs: list[TensorSpec],
    ranks: int,
    max_context: int | None = None,
    **options: Any,
) -> list[MemoryPlan]:
    """One plan per rank for the model whose tensors are `specs` (a folder's: `folder_specs`)
    split across `ranks` ranks (`gptoss_mlx.model.sharding`); `options` as `plan_from_specs`.
    Raises `ShardingError` (a ValueError) when the model does not split that way."""
    check_shardable(cfg, ranks)
    return [plan_from_specs(cfg, specs, max_context, shard=Shard(r, ranks), **options)
            for r in range(ranks)]


def plan_memory(
    model_dir: str | Path,
    max_context: int | None = None,
    *,
    dtype: str = "bfloat16",
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    fused_attention: bool | None = None,
    shard: Shard | None = None,
) -> MemoryPlan:
    """The memory a model folder (converted, or a released checkpoint) needs at `max_context`
    tokens (default: the model's full context), from its config.json and safetensors headers;
    nothing is loaded.

    `fused_attention` (default: Metal available) drops the prefill attention-score buffer;
    `shard`: the plan of that rank when the model is split.
    """
    weights = open_weights(model_dir)
    return plan_from_specs(weights.config, weights.specs(), max_context, dtype=dtype,
                           prefill_chunk=prefill_chunk, fused_attention=fused_attention,
                           shard=shard)


def parse_bytes(text: str) -> int:
    """`"10.5GB"`, `"10752MB"`, `"11274289152"` -> bytes (decimal units; GiB/MiB binary)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m:
        raise ValueError(f"cannot read {text!r} as a size (examples: 10.5GB, 10752MB, 11274289152)")
    unit = m.group(2).rstrip("B")
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def working_set_limit(working_set: int | None = None) -> int | None:
    """The GPU memory budget in bytes: `working_set` if given, else $GPTOSS_MLX_WORKING_SET,
    else Metal's `max_recommended_working_set_size`; None when no limit applies (CPU)."""
    if working_set is not None:
        return int(working_set)
    env = os.environ.get(WORKING_SET_ENV)
    if env:
        return parse_bytes(env)
    import mlx.core as mx

    if not mx.metal.is_available():
        return None
    return mx.device_info().get("max_recommended_working_set_size")


def check_fits(plan: MemoryPlan, working_set: int | None = None) -> int | None:
    """Return the budget the plan was checked against (None: no limit applies, e.g. the CPU).

    Raises MemoryPlanError with one paragraph naming the options when the plan exceeds it.
    """
    budget = working_set_limit(working_set)
    if budget is None or plan.total <= budget:
        return budget
    options = []
    ctx = plan.largest_context(budget)
    why = ("the weights alone do not fit" if plan.weights_total > budget else
           f"not even {GROW_STEP} tokens fit beside the weights")
    options.append(f"a smaller context (--max-context {ctx} fits)" if ctx else
                   f"a smaller --max-context does not help ({why})")
    for bits in (8, 4):
        try:
            dense = plan.with_dense_bits(bits)
        except (ConvertError, ShardingError):
            continue  # shapes `convert --dense-bits` refuses, or that then do not split
        if dense.weights_total >= plan.weights_total:
            continue  # already quantized
        if dense.total <= budget:
            verdict = "fits"
        else:
            ctx = dense.largest_context(budget)
            verdict = f"fits with --max-context {ctx}" if ctx else "still too much"
        options.append(
            f"{bits}-bit attention, embedding and lm_head (`gptoss-mlx convert --dense-bits "
            f"{bits}`: weights {gb(dense.weights_total)}, {gb(dense.total)} in all, {verdict})"
        )
    need_mb = math.ceil(plan.total * 1.1 / 2**20)
    options.append(
        f"raising the GPU wired limit (`sudo sysctl iogpu.wired_limit_mb={need_mb}`; it resets on "
        f"reboot and leaves less memory to macOS and other apps; {WORKING_SET_ENV}={need_mb}MiB "
        "makes this check use a budget of your choosing)"
    )
    raise MemoryPlanError(
        f"The model needs about {gb(plan.total)} at a {plan.max_context}-token context "
        f"(weights {gb(plan.weights_total)}, KV cache {gb(plan.kv_cache)}, buffers "
        f"{gb(plan.buffers_total)}), more than the {gb(budget)} GPU working set this machine "
        f"recommends; it would swap or fail. Options: {'; '.join(options)}."
    )


def set_wired_limit(plan: MemoryPlan, working_set: int | None = None) -> int | None:
    """On Metal, wire up to the recommended working set as mlx-lm does (`mx.set_wired_limit`);
    returns the previous limit, or None when nothing was set (CPU)."""
    import mlx.core as mx

    if not mx.metal.is_available():
        return None
    budget = working_set_limit(working_set)
    if budget is None:
        return None
    return mx.set_wired_limit(budget)


def ensure_fits(
    model_dir: str | Path, max_context: int | None = None, *, dtype: str = "bfloat16",
    working_set: int | None = None, shard: Shard | None = None,
    prefill_chunk: int | None = None,
) -> MemoryPlan:
    """Plan, check (raising MemoryPlanError) and set the wired limit: call before loading
    (with `shard`, for this rank's share of a split model)."""
    plan = plan_memory(model_dir, max_context, dtype=dtype, shard=shard,
                       prefill_chunk=prefill_chunk or DEFAULT_PREFILL_CHUNK)
    check_fits(plan, working_set)
    set_wired_limit(plan, working_set)
    return plan
