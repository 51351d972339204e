"""The split itself, without launching ranks: each rank's parts, read straight from the files,
put back together give the whole tensors as the unsharded loader reads them; the released shapes
split on 2, 4 and 8 ranks with balanced memory and decode bytes (mlx-lm's shard() cannot split
the 90 MXFP4 blocks of a 2880-wide row on 4 ranks; whole blocks 23/23/22/22 do)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from gptoss_mlx.bench import bytes_per_token
from gptoss_mlx.config import ModelConfig
from gptoss_mlx.convert import convert
from gptoss_mlx.convert.layout import mlx_specs
from gptoss_mlx.convert.synthetic import preset_config, tiny_config, write_checkpoint
from gptoss_mlx.memory import plan_per_rank
from gptoss_mlx.model.sharding import Shard, cut, intermediate_range, shard_specs
from gptoss_mlx.model.weights import open_weights

SHAPE = dict(vocab_size=1024, hidden_size=64, intermediate_size=160, num_local_experts=4,
             head_dim=16, num_attention_heads=16, num_key_value_heads=8, num_hidden_layers=2)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sharding")
    src = write_checkpoint(root / "release", tiny_config(**SHAPE), layout="both", seed=5)
    convert(src, root / "mlx", progress=False)
    convert(src, root / "d8", progress=False, dense_bits=8)
    return {"hf": src, "original": src / "original", "mlx": root / "mlx", "d8": root / "d8"}


@pytest.mark.parametrize("layout", ["hf", "original", "mlx", "d8"])
@pytest.mark.parametrize("ranks", [2, 4])
def test_rank_parts_reassemble_the_whole_tensors(folders: dict[str, Path], layout: str,
                                                 ranks: int) -> None:
    weights = open_weights(folders[layout])
    whole = {n: np.array(a.view(mx.uint8) if a.dtype == mx.bfloat16 else a)
             for n, a in weights.arrays().items()}
    parts = [weights.arrays(Shard(r, ranks)) for r in range(ranks)]
    for name, full in whole.items():
        c = cut(name, full.shape, weights.config, Shard(0, ranks))
        got = [np.array(p[name].view(mx.uint8) if p[name].dtype == mx.bfloat16 else p[name])
               for p in parts]
        if c.zero or name.endswith("down_proj.bias"):  # rank 0 alone adds it
            np.testing.assert_array_equal(got[0], full, err_msg=name)
            assert all(not g.any() for g in got[1:]), name
        elif c.axis is None:
            for g in got:
                np.testing.assert_array_equal(g, full, err_msg=name)
        else:
            axis = c.axis
            np.testing.assert_array_equal(np.concatenate(got, axis=axis), full, err_msg=name)
            assert all(g.shape[axis] < full.shape[axis] for g in got), name


@pytest.mark.parametrize("preset", ["20b", "120b"])
@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_released_shapes_split_evenly(preset: str, ranks: int) -> None:
    cfg = ModelConfig.from_dict(preset_config(preset))
    specs = mlx_specs(cfg)
    blocks = [(hi - lo) // 32 for lo, hi in
              (intermediate_range(cfg, Shard(r, ranks)) for r in range(ranks))]
    assert sum(blocks) == 90 and max(blocks) - min(blocks) <= 1
    if ranks == 4:
        assert blocks == [23, 23, 22, 22]
    whole = plan_per_rank(cfg, specs, 1)[0].weights_total
    plans = plan_per_rank(cfg, specs, ranks)
    for plan in plans:  # a share, plus the replicated norms, router and o_proj/down biases
        assert plan.weights_total <= whole / ranks * 1.07
    decode = [sum(v for k, v in bytes_per_token(cfg, shard_specs(cfg, specs, Shard(r, ranks)))
                  .items() if k != "kv cache") for r in range(ranks)]
    assert max(decode) / min(decode) - 1 < 0.05
