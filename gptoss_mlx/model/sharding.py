"""How one gpt-oss model splits across the ranks of an `mx.distributed` group (tensor parallel).

Every rank holds a share of every layer; each decode step reads an equal share of the bytes:

- attention: by KV-head groups (rank r holds KV heads r*kv/N.. and their q heads, rows of
  q/k/v, the matching columns of o_proj and its sinks); o_proj sums across ranks and adds its
  bias once (MLX's `ShardedToAllLinear`);
- experts: every expert is split along its intermediate dimension in whole MXFP4 blocks of 32
  (2880 = 90 blocks: 23/23/22/22 on 4 ranks): rank r holds rows of gate/up and the matching
  input blocks of down; the partial outputs are summed across ranks, and rank 0 alone adds the
  down bias and the residual stream;
- embedding and lm_head: by vocabulary rows (a token's row lives on one rank, the others add
  zeros to the sum; the logits are gathered), so no rank holds either whole;
- norms and the router (small): on every rank, so every rank routes identically.

Collectives per forward: one all_sum for the embedding, two all_sums per layer (attention, MoE)
and one all_gather for the logits: 2 * layers + 2 (50 for the 20b, 74 for the 120b).

`cut(name, shape, cfg, shard)` says which part of a tensor (our MLX names and shapes) a rank
holds; the loader reads just that part from the safetensors files (weights.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gptoss_mlx.config import ModelConfig
from gptoss_mlx.convert.layout import MXFP4_BLOCK
from gptoss_mlx.convert.safetensors_io import TensorSpec


class ShardingError(ValueError):
    """A model that cannot be split across the asked number of ranks; the message says why."""


@dataclass(frozen=True)
class Shard:
    """Rank `rank` of `size` ranks."""

    rank: int
    size: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is not in 0..{self.size - 1}")

    def even(self, total: int) -> tuple[int, int]:
        """This rank's `start, stop` of `total` items split into equal parts (ShardingError
        when they do not divide)."""
        if total % self.size:
            raise ShardingError(f"{total} does not split into {self.size} equal parts")
        part = total // self.size
        return self.rank * part, (self.rank + 1) * part

    def balanced(self, total: int) -> tuple[int, int]:
        """This rank's `start, stop` of `total` items split as evenly as whole items allow
        (the first `total % size` ranks take one more)."""
        base, extra = divmod(total, self.size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)


@dataclass(frozen=True)
class Cut:
    """The part of a tensor a rank holds: `start:stop` along `axis` (None: all of it);
    `zero`: a tensor of zeros of that shape (a bias only rank 0 adds)."""

    axis: int | None = None
    start: int = 0
    stop: int = 0
    zero: bool = False

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of the part held."""
        if self.axis is None:
            return shape
        out = list(shape)
        out[self.axis] = self.stop - self.start
        return tuple(out)


WHOLE = Cut()


def check_shardable(cfg: ModelConfig, ranks: int) -> None:
    """Raise ShardingError (one line) when the model does not split across `ranks`."""
    if ranks < 1:
        raise ShardingError(f"ranks={ranks}: expected at least 1")
    blocks = cfg.intermediate_size // MXFP4_BLOCK
    for what, total in (("num_key_value_heads", cfg.num_key_value_heads),
                        ("vocab_size", cfg.vocab_size)):
        if total % ranks:
            raise ShardingError(f"{ranks} ranks: {what}={total} does not split into {ranks} "
                                "equal parts")
    if blocks < ranks:
        raise ShardingError(f"{ranks} ranks: intermediate_size={cfg.intermediate_size} has "
                            f"only {blocks} MXFP4 blocks of {MXFP4_BLOCK}, one per rank at least")


def intermediate_range(cfg: ModelConfig, shard: Shard) -> tuple[int, int]:
    """This rank's expert intermediate units `start, stop` (whole MXFP4 blocks)."""
    a, b = shard.balanced(cfg.intermediate_size // MXFP4_BLOCK)
    return a * MXFP4_BLOCK, b * MXFP4_BLOCK


def cut(name: str, shape: tuple[int, ...], cfg: ModelConfig, shard: Shard) -> Cut:
    """The part of tensor `name` (our MLX layout, full `shape`) that `shard` holds."""
    if shard.size == 1:
        return WHOLE
    leaf = name.rsplit(".", 1)[-1]
    if name.startswith(("model.embed_tokens.", "lm_head.")):
        return Cut(0, *shard.even(shape[0]))
    if ".self_attn." in name:
        if any(f".{p}_proj." in name for p in "qkv") or leaf == "sinks":
            return Cut(0, *shard.even(shape[0]))
        if ".o_proj." in name and leaf != "bias":  # weight, and scales/biases when quantized
            return Cut(len(shape) - 1, *shard.even(shape[-1]))
        return WHOLE
    if ".mlp.experts." in name:
        lo, hi = intermediate_range(cfg, shard)
        if ".down_proj." not in name:  # gate/up: rows of the intermediate units
            return Cut(1, lo, hi)
        if leaf == "bias":
            return WHOLE if shard.rank == 0 else Cut(zero=True)
        per_unit = shape[-1] / cfg.intermediate_size  # uint32 words (1/8) or scales (1/32)
        return Cut(len(shape) - 1, int(lo * per_unit), int(hi * per_unit))
    return WHOLE


def shard_specs(cfg: ModelConfig, specs: Iterable[TensorSpec], shard: Shard) -> list[TensorSpec]:
    """The tensors `shard` holds (same names, its shapes)."""
    return [TensorSpec(s.name, s.dtype, cut(s.name, s.shape, cfg, shard).shape(s.shape))
            for s in specs]
