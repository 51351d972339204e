"""One model split across 2, 4 and 8 local ranks (`mlx.launch`, ring backend, CPU) against the same
model in one process: the logits of a prompt and of greedy decode steps agree within 1e-5
relative in float32, on every rank; each rank holds what the memory plan says, no rank holds a
whole copy of any tensor it shares, and a forward costs 2 * layers + 2 collectives."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from shard_worker import FORWARDS, launch, logits_trace

from gptoss_mlx.config import ModelConfig
from gptoss_mlx.convert import convert
from gptoss_mlx.convert.synthetic import tiny_config, write_checkpoint
from gptoss_mlx.memory import plan_per_rank
from gptoss_mlx.model.sharding import ShardingError
from gptoss_mlx.model.weights import open_weights

TOL = 1e-5
# tiny: 8 KV heads so that 4 ranks split them; intermediate 160 = 5 MXFP4 blocks (3 + 2 on two
# ranks, 2 + 1 + 1 + 1 on four: single-block ranks); a small vocabulary (no tokenizer needed)
TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=160, num_local_experts=6,
            head_dim=16, num_attention_heads=16, num_key_value_heads=8, sliding_window=8,
            num_hidden_layers=2)
# tiny on 8 ranks: intermediate 256 = 8 MXFP4 blocks, one per rank; one KV head per rank
EIGHT = {**TINY, "intermediate_size": 256}
# the released hidden and intermediate sizes (2880 = 90 blocks: 23/23/22/22 on 4 ranks), heads
# and head_dim, two layers, few experts
REAL = dict(vocab_size=2048, hidden_size=2880, intermediate_size=2880, num_local_experts=4,
            head_dim=64, num_attention_heads=64, num_key_value_heads=8, sliding_window=8,
            num_hidden_layers=2)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Releases in both layouts and their converted folders, at both shapes; the tiny one also
    converted with 8-bit dense layers (quantized o_proj, embedding and lm_head split too)."""
    root = tmp_path_factory.mktemp("sharded")
    out = {}
    for name, shape in (("tiny", TINY), ("eight", EIGHT), ("real", REAL)):
        src = write_checkpoint(root / f"{name}-release", tiny_config(**shape), layout="both",
                               seed=11)
        convert(src, root / f"{name}-mlx", progress=False)
        out[f"{name}-release"], out[f"{name}-original"] = src, src / "original"
        out[f"{name}-mlx"] = root / f"{name}-mlx"
    convert(out["tiny-release"], root / "tiny-d8", progress=False, dense_bits=8)
    out["tiny-d8"] = root / "tiny-d8"
    return out


def run_ranks(ranks: int, model_dir: Path, tmp_path: Path, experts: str = "mlx") -> list[dict]:
    """Each rank's saved logits and parameter sizes."""
    prefix = tmp_path / "out"
    proc = launch(ranks, [str(model_dir), str(prefix), "--experts", experts])
    done = all(Path(f"{prefix}.{r}.npz").is_file() for r in range(ranks))
    # mlx.launch exits 0 even when a rank failed: the files tell
    assert proc.returncode == 0 and done, f"a rank failed:\n{proc.stderr[-3000:]}"
    out = []
    for r in range(ranks):
        with np.load(f"{prefix}.{r}.npz") as f:
            out.append({k: f[k] for k in f.files})
    return out


def assert_same_logits(ranks: list[dict], want: list[np.ndarray]) -> None:
    for r, got in enumerate(ranks):
        for step, w in enumerate(want):
            g = got[f"arr_{step}"]
            assert g.shape == w.shape
            err = np.abs(g - w).max() / np.abs(w).max()
            assert err <= TOL, f"rank {r}, step {step}: relative logit error {err:.2e}"


_REFERENCE: dict[Path, list[np.ndarray]] = {}


def reference(model_dir: Path) -> list[np.ndarray]:
    """The single-process model's logits (computed once per folder; the release and its
    converted folder load the same bytes, so one shape needs one)."""
    if model_dir not in _REFERENCE:
        _REFERENCE[model_dir] = logits_trace(model_dir)[0]
    return _REFERENCE[model_dir]


@pytest.mark.parametrize(("source", "ranks"), [
    ("tiny-mlx", 2), ("tiny-original", 4), ("tiny-d8", 4), ("real-release", 4), ("real-mlx", 2),
    ("eight-mlx", 8),
])
def test_sharded_logits_match_one_process(checkpoints: dict[str, Path], tmp_path: Path,
                                          source: str, ranks: int) -> None:
    model_dir = checkpoints[source]
    want = reference(checkpoints[source.split("-")[0] + "-mlx"] if source != "tiny-d8"
                     else model_dir)
    got = run_ranks(ranks, model_dir, tmp_path)
    assert_same_logits(got, want)
    # each rank holds exactly what its memory plan counts (float32 here), a share of the whole
    weights = open_weights(model_dir)
    plans = plan_per_rank(weights.config, weights.specs(), ranks, 4096, dtype="float32")
    whole = plan_per_rank(weights.config, weights.specs(), 1, 4096, dtype="float32")[0]
    for r, (rank, plan) in enumerate(zip(got, plans, strict=True)):
        held = sum(int(v) for k, v in rank.items() if k.startswith("bytes:"))
        assert held == plan.weights_total, f"rank {r}"
        for part in ("embedding", "lm_head", "experts", "attention"):
            assert plan.weights[part] < whole.weights[part], (r, part)
        # per forward: the embedding, attention and MoE of each layer summed, the logits gathered
        layers = weights.config.num_hidden_layers
        calls = (rank["calls:all_sum"], rank["calls:all_gather"])
        assert calls == (FORWARDS * (2 * layers + 1), FORWARDS), f"rank {r}"


@pytest.mark.skipif(shutil.which("g++") is None, reason="the MSL emulator needs g++")
def test_sharded_experts_on_emulated_metal_kernels(checkpoints: dict[str, Path],
                                                   tmp_path: Path) -> None:
    """The Metal kernels (emulated on the CPU) run each rank's slice of the experts, three of
    the four ranks holding a single MXFP4 block of the intermediate dimension."""
    model_dir = checkpoints["tiny-mlx"]
    assert_same_logits(run_ranks(4, model_dir, tmp_path, "emulated"), reference(model_dir))


def test_unsplittable_model_is_refused_with_one_line(checkpoints: dict[str, Path]) -> None:
    """Ranks that do not divide the KV heads, or outnumber the intermediate blocks."""
    cfg = ModelConfig.from_dict(tiny_config(**TINY))
    specs = open_weights(checkpoints["tiny-mlx"]).specs()
    with pytest.raises(ShardingError, match="num_key_value_heads=8 does not split into 3"):
        plan_per_rank(cfg, specs, 3)
    with pytest.raises(ShardingError, match="only 5 MXFP4 blocks"):
        plan_per_rank(ModelConfig.from_dict(tiny_config(**{**TINY, "num_key_value_heads": 16,
                                                           "num_attention_heads": 16})),
                      specs, 16)
