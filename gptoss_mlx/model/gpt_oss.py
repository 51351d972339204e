"""The gpt-oss architecture in MLX, following OpenAI's PyTorch reference.

Block: `x += attn(rmsnorm(x))`, `x += moe(rmsnorm(x))`. Attention has biased q/k/v/o projections,
grouped KV heads, YaRN RoPE (rope.py), one learned sink logit per head and a sliding window on the
`sliding_attention` layers. The MoE router takes the top-k logits and softmaxes over those only;
the experts (experts.py) run the released MXFP4 weights. Module and parameter names follow
mlx-lm's gpt_oss (the Hugging Face names, experts split into gate/up/down), so a converted
folder or an mlx-community folder loads by name.

With an `mx.distributed` group of N > 1 ranks the model is one rank's share (see sharding.py):
attention over its KV-head group, every expert over its intermediate blocks, its vocabulary rows
of the embedding and lm_head; the forward sums across ranks after attention and after the MoE,
and every rank returns the same, complete logits.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from gptoss_mlx.config import ModelConfig

from .cache import (
    COMPACT_STEP,
    DEFAULT_SLACK,
    KVCache,
    LayerCache,
    Mask,
    SlidingKVCache,
    window_mask,
)
from .experts import MoeFn, QWeights, moe
from .rope import YarnRope, attention_scale
from .sharding import Shard, check_shardable, intermediate_range

SWIGLU_ALPHA = 1.702


class Attention(nn.Module):
    """Grouped-query attention with biases, YaRN RoPE and per-head sinks.

    Loaded with separate q/k/v projections (the saved names); `fuse_qkv` then makes them one
    matmul, and q and k rotate in one RoPE call. With a `shard`, only its heads (see sharding.py).
    """

    def __init__(self, cfg: ModelConfig, shard: Shard | None = None):
        super().__init__()
        n = shard.size if shard else 1
        d, h, kv = cfg.head_dim, cfg.num_attention_heads // n, cfg.num_key_value_heads // n
        self.head_dim, self.heads, self.kv_heads = d, h, kv
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, kv * d, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, kv * d, bias=True)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=True)
        self.sinks = mx.zeros((h,))

    def fuse_qkv(self) -> bool:
        """Replace q/k/v_proj by one `qkv_proj` (rows q|k|v); False, changing nothing, when
        they are stored differently (e.g. quantized with different bits)."""
        fused = _concat_rows([self.q_proj, self.k_proj, self.v_proj])
        if fused is None:
            return False
        self.qkv_proj = fused
        del self.q_proj, self.k_proj, self.v_proj
        return True

    def _qkv(self, x: mx.array, pos: int, rope: YarnRope) -> tuple[mx.array, ...]:
        """Rotated q [B, heads, T, D], rotated k and v [B, kv_heads, T, D]."""
        b, t, _ = x.shape
        d, h, kv = self.head_dim, self.heads, self.kv_heads
        if "qkv_proj" in self:
            y = self.qkv_proj(x).reshape(b, t, h + 2 * kv, d).transpose(0, 2, 1, 3)
            qk = rope(y[:, : h + kv], pos)
            return qk[:, :h], qk[:, h:], y[:, h + kv:]
        q = self.q_proj(x).reshape(b, t, h, d).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(b, t, kv, d).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(b, t, kv, d).transpose(0, 2, 1, 3)
        return rope(q, pos), rope(k, pos), v

    def __call__(self, x: mx.array, mask: Mask, cache: LayerCache | None, rope: YarnRope,
                 scale: float) -> mx.array:
        b, t, _ = x.shape
        q, k, v = self._qkv(x, 0 if cache is None else cache.offset, rope)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask,
                                                 sinks=self.sinks)
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(b, t, -1))


def _concat_rows(layers: list[nn.Module]) -> nn.Module | None:
    """One linear layer computing `layers` side by side (their rows stacked), or None when
    they differ in type, quantization or parameters."""
    first = layers[0]
    kind = type(first)
    if kind not in (nn.Linear, nn.QuantizedLinear) or any(type(m) is not kind for m in layers):
        return None
    params = ("group_size", "bits", "mode")
    if kind is nn.QuantizedLinear and any(
            getattr(m, p) != getattr(first, p) for m in layers for p in params):
        return None
    keys = {n for n, a in first.items() if isinstance(a, mx.array)}
    if any({n for n, a in m.items() if isinstance(a, mx.array)} != keys for m in layers):
        return None
    out_dims = sum(m.weight.shape[0] for m in layers)
    if kind is nn.Linear:
        fused = nn.Linear(first.weight.shape[1], out_dims, bias="bias" in keys)
    else:
        in_dims = first.scales.shape[1] * first.group_size
        fused = nn.QuantizedLinear(in_dims, out_dims, "bias" in keys, first.group_size,
                                   first.bits, first.mode)
    for n in keys:
        fused[n] = mx.concatenate([m[n] for m in layers], axis=0)
    return fused


def _sharded_to_all(layer: nn.Module, group: mx.distributed.Group) -> nn.Module:
    """MLX's ShardedToAllLinear (or its quantized twin) holding `layer`'s parameters, which are
    already this rank's columns: it sums the ranks' outputs and adds the bias once."""
    n = group.size()
    out_dims = layer.weight.shape[0]
    bias = "bias" in layer
    if isinstance(layer, nn.QuantizedLinear):
        in_dims = layer.scales.shape[1] * layer.group_size * n
        new = nn.QuantizedShardedToAllLinear(in_dims, out_dims, bias, layer.group_size,
                                             layer.bits, layer.mode, group)
    else:
        new = nn.ShardedToAllLinear(layer.weight.shape[1] * n, out_dims, bias, group)
    new.update(layer.parameters())
    return new


class ExpertLinear(nn.Module):
    """One projection of every expert: MXFP4 `weight` [E, out, in/8], `scales`, `bias`."""

    def __init__(self, experts: int, out_dims: int, in_dims: int):
        super().__init__()
        self.weight = mx.zeros((experts, out_dims, in_dims // 8), dtype=mx.uint32)
        self.scales = mx.zeros((experts, out_dims, in_dims // 32), dtype=mx.uint8)
        self.bias = mx.zeros((experts, out_dims))

    @property
    def qweights(self) -> QWeights:
        """The (weight, scales, bias) triple the experts backends take."""
        return self.weight, self.scales, self.bias


class Experts(nn.Module):
    """The gate, up and down projections of all experts (mlx-lm's SwitchGLU names); with a
    `shard`, its intermediate units of each expert."""

    def __init__(self, cfg: ModelConfig, shard: Shard | None = None):
        super().__init__()
        lo, hi = intermediate_range(cfg, shard) if shard else (0, cfg.intermediate_size)
        e, h, i = cfg.num_local_experts, cfg.hidden_size, hi - lo
        self.gate_proj = ExpertLinear(e, i, h)
        self.up_proj = ExpertLinear(e, i, h)
        self.down_proj = ExpertLinear(e, h, i)


class MoE(nn.Module):
    """Top-k router (softmax over the chosen logits) and the experts. With a `group`, this
    rank's part of every expert: the partial outputs are summed across the ranks in float32,
    rank 0's carrying the residual (and the down bias: the other ranks load zeros for it)."""

    def __init__(self, cfg: ModelConfig, group: mx.distributed.Group | None = None):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.swiglu_limit = cfg.swiglu_limit
        self.router = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=True)
        self.experts = Experts(cfg, _shard(group))
        self.group = group

    def __call__(self, x: mx.array, residual: mx.array, moe_fn: MoeFn) -> mx.array:
        """`residual + moe(x)` (the experts backend adds the residual)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(x)
        k = self.top_k
        e = logits.shape[-1]
        indices = mx.argpartition(logits, kth=e - k, axis=-1)[:, e - k:]
        weights = mx.softmax(mx.take_along_axis(logits, indices, axis=-1).astype(mx.float32),
                             axis=-1, precise=True)
        ex = self.experts
        res: mx.array | None = residual.reshape(x.shape)
        group, dtype = self.group, x.dtype
        if group is not None:
            x = x.astype(mx.float32)
            res = res.astype(mx.float32) if group.rank() == 0 else None
        y = moe_fn(x, indices.astype(mx.uint32), weights, ex.gate_proj.qweights,
                   ex.up_proj.qweights, ex.down_proj.qweights, self.swiglu_limit, SWIGLU_ALPHA,
                   residual=res)
        if group is not None:
            y = mx.distributed.all_sum(y, group=group).astype(dtype)
        return y.reshape(shape)


class Block(nn.Module):
    """One transformer layer (pre-norm attention, then pre-norm MoE)."""

    def __init__(self, cfg: ModelConfig, group: mx.distributed.Group | None = None):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, _shard(group))
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = MoE(cfg, group)

    def __call__(self, x: mx.array, mask: Mask, cache: LayerCache | None, rope: YarnRope,
                 scale: float, moe_fn: MoeFn) -> mx.array:
        x = x + self.self_attn(self.input_layernorm(x), mask, cache, rope, scale)
        return self.mlp(self.post_attention_layernorm(x), x, moe_fn)


class Body(nn.Module):
    """Embedding, layers and final norm (the Hugging Face `model.` prefix)."""

    def __init__(self, cfg: ModelConfig, group: mx.distributed.Group | None = None):
        super().__init__()
        n = group.size() if group else 1
        self.embed_tokens = nn.Embedding(cfg.vocab_size // n, cfg.hidden_size)
        self.layers = [Block(cfg, group) for _ in range(cfg.num_hidden_layers)]
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)


def _shard(group: mx.distributed.Group | None) -> Shard | None:
    return Shard(group.rank(), group.size()) if group is not None else None


class GptOss(nn.Module):
    """gpt-oss: `model(tokens [B, T], cache=None, last_only=False) -> logits [B, T|1, vocab]`.

    With `group` (an `mx.distributed` group of more than one rank) this is one rank's share of
    the model (see sharding.py); after loading its weights, `connect()` puts MLX's
    ShardedToAllLinear in place of each o_proj. Every rank must make the same calls; each
    returns the same logits.
    """

    def __init__(self, cfg: ModelConfig, experts: MoeFn = moe, experts_name: str = "mlx",
                 group: mx.distributed.Group | None = None):
        super().__init__()
        if group is not None and group.size() == 1:
            group = None
        if group is not None:
            check_shardable(cfg, group.size())
        self.config = cfg
        self.group = group
        n = group.size() if group else 1
        self.model = Body(cfg, group)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size // n, bias=False)
        self._rope = YarnRope(cfg)
        self._scale = attention_scale(cfg)
        self._sliding = cfg.sliding_layers
        self.set_experts(experts, experts_name)

    def fuse_qkv(self) -> int:
        """Fuse each layer's q/k/v projections into one matmul (after loading weights by their
        saved names); returns how many layers were fused."""
        return sum(layer.self_attn.fuse_qkv() for layer in self.model.layers)

    def connect(self) -> None:
        """Sharded model, weights loaded: each o_proj becomes MLX's ShardedToAllLinear (the
        ranks' outputs summed, the bias added once). Nothing to do without a group."""
        if self.group is None:
            return
        for layer in self.model.layers:
            attn = layer.self_attn
            if not isinstance(attn.o_proj, (nn.ShardedToAllLinear,
                                            nn.QuantizedShardedToAllLinear)):
                attn.o_proj = _sharded_to_all(attn.o_proj, self.group)

    def _embed(self, tokens: mx.array) -> mx.array:
        """Embedding rows; sharded: each rank looks up the tokens in its vocabulary rows, zeros
        elsewhere, and the ranks' rows are summed."""
        if self.group is None:
            return self.model.embed_tokens(tokens)
        rows = self.config.vocab_size // self.group.size()
        local = tokens - self.group.rank() * rows
        inside = (local >= 0) & (local < rows)
        x = self.model.embed_tokens(mx.where(inside, local, 0))
        x = mx.where(mx.expand_dims(inside, -1), x, mx.zeros((), dtype=x.dtype))
        return mx.distributed.all_sum(x, group=self.group)

    def _logits(self, x: mx.array) -> mx.array:
        """lm_head; sharded: each rank's vocabulary rows, gathered in rank order."""
        y = self.lm_head(x)
        if self.group is None:
            return y
        *lead, rows = y.shape
        n = self.group.size()
        y = mx.distributed.all_gather(y.reshape(-1, rows), group=self.group)
        return y.reshape(n, -1, rows).transpose(1, 0, 2).reshape(*lead, n * rows)

    def set_experts(self, fn: MoeFn, name: str = "custom") -> None:
        """Run the experts with `fn` (a function with `experts.moe`'s signature)."""
        self._moe_fn = fn
        self.experts_backend = name

    @property
    def moe_fn(self) -> MoeFn:
        """The experts function in use (see `set_experts`)."""
        return self._moe_fn

    def make_cache(self, slack: int = DEFAULT_SLACK,
                   compact_step: int = COMPACT_STEP) -> list[LayerCache]:
        """Fresh per-layer caches; sliding layers keep `slack` extra positions for trimming
        and drop old ones `compact_step` at a time (see cache.py)."""
        w = self.config.sliding_window
        return [SlidingKVCache(w, slack, compact_step) if s else KVCache() for s in self._sliding]

    def _masks(self, t: int, cache: list[LayerCache] | None) -> tuple[Mask, Mask]:
        """(full-attention mask, sliding-window mask) for `t` new tokens."""
        if cache is None:
            return ("causal" if t > 1 else None), window_mask(t, 0, self.config.sliding_window)
        full = next((c for c, s in zip(cache, self._sliding, strict=True) if not s), None)
        slide = next((c for c, s in zip(cache, self._sliding, strict=True) if s), None)
        return (full.make_mask(t) if full else None), (slide.make_mask(t) if slide else None)

    def __call__(self, tokens: mx.array, cache: list[LayerCache] | None = None,
                 last_only: bool = False) -> mx.array:
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {tokens.shape}")
        if cache is not None and len(cache) != len(self.model.layers):
            raise ValueError(f"cache has {len(cache)} layers, the model {len(self.model.layers)}")
        x = self._embed(tokens)
        full_mask, slide_mask = self._masks(tokens.shape[1], cache)
        for i, layer in enumerate(self.model.layers):
            mask = slide_mask if self._sliding[i] else full_mask
            x = layer(x, mask, None if cache is None else cache[i], self._rope, self._scale,
                      self._moe_fn)
        if last_only:
            x = x[:, -1:, :]
        return self._logits(self.model.norm(x))
