"""The memory plan against the reference figures, real file sizes and the working-set budget."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import click
import mlx.core as mx
import pytest
from click.testing import CliRunner

from gptoss_mlx.cli.options import max_context_option
from gptoss_mlx.config import ModelConfig
from gptoss_mlx.convert.converter import QUANTIZATION
from gptoss_mlx.convert.layout import mlx_specs
from gptoss_mlx.convert.synthetic import preset_config
from gptoss_mlx.memory import (
    MAX_BATCH,
    WORKING_SET_ENV,
    MemoryPlanError,
    check_fits,
    parse_bytes,
    plan_batch,
    plan_memory,
    working_set_limit,
)
from gptoss_mlx.model.cache import GROW_STEP

GB = 1e9


def write_sparse_folder(path: Path, config: dict) -> Path:
    """A converted model folder (config.json with "quantization") whose one safetensors file has
    the MLX layout's header and sparse (unwritten) data: the 20b shape's 13.8 GB take no disk."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**config, "quantization": QUANTIZATION}))
    header, offset = {}, 0
    for spec in mlx_specs(ModelConfig.from_dict(config)):
        header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    blob = json.dumps(header).encode()
    with open(path / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)
    return path


@pytest.fixture(scope="module")
def folder_20b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sparse_folder(tmp_path_factory.mktemp("m") / "20b", preset_config("20b"))


def test_20b_weights_match_the_reference_figures(folder_20b: Path) -> None:
    plan = plan_memory(folder_20b, 4096, fused_attention=True)
    # Reference section 5 and issue 7: 13.8 GB lossless; experts 32 x 13.24 MB x 24 layers;
    # attention 1.27 GB and lm_head 1.16 GB in bf16.
    assert plan.weights_total / GB == pytest.approx(13.8, abs=0.05)
    assert plan.weights["experts"] / GB == pytest.approx(32 * 13.24e6 * 24 / GB, rel=2e-3)
    assert plan.weights["attention"] / GB == pytest.approx(1.27, abs=0.005)
    assert plan.weights["lm_head"] / GB == pytest.approx(1.16, abs=0.005)
    # mlx-community's 8-bit-dense build of the 20b is 12.1 GB.
    assert plan.with_dense_bits(8).weights_total / GB == pytest.approx(12.1, abs=0.05)
    assert "weights total" in plan.table() and "13.76 GB" in plan.table()


def test_kv_cache_grows_2048_bytes_per_token_per_full_layer(folder_20b: Path) -> None:
    small = plan_memory(folder_20b, 4096, fused_attention=True)
    big = plan_memory(folder_20b, 8192, fused_attention=True)
    # Reference: bf16 KV is 2048 B per token per layer and only the 12 full layers grow.
    assert big.kv_cache - small.kv_cache == 2048 * 12 * 4096
    full = plan_memory(folder_20b, None, fused_attention=True)
    assert full.max_context == 131072
    # 12 full layers x 131072 positions + 12 sliding layers x a bounded window.
    assert 2048 * 12 * 131072 < full.kv_cache < 2048 * 12 * (131072 + 2048)


def test_weights_equal_the_safetensors_data_bytes(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = 0
    for f in tiny_model_dir.glob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
        data += os.path.getsize(f) - 8 - n
    assert plan_memory(tiny_model_dir, 1024).weights_total == data
    # a stray safetensors file the loader does not read is not counted either
    folder = shutil.copytree(tiny_model_dir, tmp_path / "m")
    mx.save_safetensors(str(folder / "adapters.safetensors"), {"a": mx.zeros((1000,))})
    assert plan_memory(folder, 1024).weights_total == data


def test_unfused_attention_adds_the_prefill_score_matrix(folder_20b: Path) -> None:
    fused = plan_memory(folder_20b, 4096, fused_attention=True)
    unfused = plan_memory(folder_20b, 4096, fused_attention=False)
    # one layer's scores for a 512-token chunk over 4096 keys x 64 heads, in fp32 and bf16,
    # plus a bool mask
    assert unfused.total - fused.total == 512 * 64 * 4096 * (4 + 2) + 512 * 4096


def test_the_message_names_the_options_when_it_does_not_fit(
    folder_20b: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = plan_memory(folder_20b, None, fused_attention=True)
    monkeypatch.setenv(WORKING_SET_ENV, "10.5GiB")  # a 16 GB Mac's default budget
    with pytest.raises(MemoryPlanError) as err:
        check_fits(plan)
    msg = str(err.value)
    assert "17.4" in msg and "11.27 GB" in msg  # 10.5 GiB
    assert "--dense-bits 8" in msg and "sudo sysctl iogpu.wired_limit_mb=" in msg
    assert "--max-context" in msg and "weights alone" in msg


def test_the_message_names_the_largest_context_that_fits(folder_20b: Path) -> None:
    want = plan_memory(folder_20b, 16384, fused_attention=True)
    budget = want.total + 1000
    plan = plan_memory(folder_20b, None, fused_attention=True)
    with pytest.raises(MemoryPlanError, match=r"a smaller context \(--max-context 16384 fits"):
        check_fits(plan, working_set=budget)
    assert check_fits(want, working_set=budget) == budget


def test_no_dense_bits_option_when_the_converter_would_refuse_it(tmp_path: Path) -> None:
    """96 columns are not a multiple of the 64-wide groups: `convert --dense-bits` refuses such a
    model, so the advice leaves it out (and still names the other options)."""
    from gptoss_mlx.convert.synthetic import tiny_config

    folder = write_sparse_folder(tmp_path / "m", tiny_config(vocab_size=1024, hidden_size=96))
    plan = plan_memory(folder, 1024, fused_attention=True)
    with pytest.raises(MemoryPlanError) as err:
        check_fits(plan, working_set=plan.weights_total // 2)
    assert "--dense-bits" not in str(err.value) and "wired_limit_mb" in str(err.value)


def test_weights_that_fit_with_no_room_for_any_context(folder_20b: Path) -> None:
    """When the weights fit but not even GROW_STEP tokens do, the message says so (it used to
    claim the weights alone do not fit)."""
    plan = plan_memory(folder_20b, None, fused_attention=True)
    budget = plan.weights_total + 1000
    assert plan.at_context(256).total > budget
    with pytest.raises(MemoryPlanError) as err:
        check_fits(plan, working_set=budget)
    assert "weights alone" not in str(err.value)
    assert "--max-context does not help" in str(err.value)


def test_without_metal_no_limit_applies(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(WORKING_SET_ENV, raising=False)
    expected = mx.device_info().get("max_recommended_working_set_size")
    if not mx.metal.is_available():
        expected = None
    assert working_set_limit() == expected
    plan = plan_memory(tiny_model_dir)
    assert check_fits(plan) == expected


def test_parse_bytes() -> None:
    assert parse_bytes("10.5GB") == 10_500_000_000
    assert parse_bytes("10752MiB") == 10752 * 2**20
    assert parse_bytes("123") == 123
    with pytest.raises(ValueError):
        parse_bytes("lots")


def test_max_context_option() -> None:
    @click.command()
    @max_context_option
    def cmd(max_context: int | None) -> None:
        click.echo(repr(max_context))

    runner = CliRunner()
    assert runner.invoke(cmd, []).output.strip() == "None"
    assert runner.invoke(cmd, ["--max-context", "4096"]).output.strip() == "4096"
    assert runner.invoke(cmd, ["--max-context", "0"]).exit_code != 0
    assert "the model's full context" in runner.invoke(cmd, ["--help"]).output


def test_max_context_beyond_the_model_is_refused(tiny_model_dir: Path) -> None:
    ctx = ModelConfig.from_file(tiny_model_dir).max_position_embeddings
    with pytest.raises(ValueError, match="max_context"):
        plan_memory(tiny_model_dir, ctx + 1)


@pytest.mark.parametrize(("tokens", "dtype"),
                         [(300, "bfloat16"), (1500, "bfloat16"), (300, "float32")])
def test_kv_cache_matches_the_model_cache(tiny_model_dir: Path, tokens: int, dtype: str) -> None:
    from gptoss_mlx import load
    from gptoss_mlx.generate import PromptCache, prefill
    from gptoss_mlx.model.cache import nbytes

    model, _ = load(tiny_model_dir, dtype=dtype, experts="mlx")
    cache = PromptCache(model)
    prefill(model, cache, [i % 1000 for i in range(tokens)])
    assert plan_memory(tiny_model_dir, tokens, dtype=dtype).kv_cache == nbytes(cache.layers)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_weights_match_the_loaded_arrays(tiny_model_dir: Path, dtype: str) -> None:
    """Each part's planned bytes at `dtype` are the loaded model's arrays' bytes."""
    from mlx.utils import tree_flatten

    from gptoss_mlx import load
    from gptoss_mlx.memory import DTYPE_SIZES, tensor_part

    model, _ = load(tiny_model_dir, dtype=dtype, experts="mlx")
    loaded: dict[str, int] = {}
    for name, a in tree_flatten(model.parameters()):
        part = tensor_part(name)
        loaded[part] = loaded.get(part, 0) + a.nbytes
    planned = plan_memory(tiny_model_dir, 1024, dtype=dtype).weights
    assert {p: b for p, b in planned.items() if b} == loaded
    assert DTYPE_SIZES[dtype] == getattr(mx, dtype).size


def test_the_plan_matches_mlx_peak_memory(tiny_model_dir: Path) -> None:
    from gptoss_mlx import load
    from gptoss_mlx.generate import PromptCache, prefill

    mx.clear_cache()
    before = mx.get_active_memory()
    model, _ = load(tiny_model_dir, experts="mlx")
    loaded = mx.get_active_memory()
    plan = plan_memory(tiny_model_dir, 2048)  # fused or not as on this device
    assert loaded - before == pytest.approx(plan.weights_total, rel=0.01)
    cache = PromptCache(model)
    mx.reset_peak_memory()
    prefill(model, cache, [i % 1000 for i in range(2048)])
    extra = mx.get_peak_memory() - loaded
    assert extra == pytest.approx(plan.kv_cache + plan.buffers_total, rel=0.2)


# -- the serving batch: one KV cache per sequence (issue 14) ------------------------------------

def _kv_bytes_per_token_per_layer(cfg: ModelConfig) -> int:
    """Keys and values of one token in one layer, bf16: from the config alone."""
    return 2 * cfg.num_key_value_heads * cfg.head_dim * 2


def test_each_sequence_of_the_batch_has_its_own_kv_cache(folder_20b: Path) -> None:
    """The 20b at its full context: 3.2 GB of KV cache per sequence (12 full layers of 131072
    positions at 2048 bytes per token, plus 12 bounded sliding layers); the default batch is
    as many of those as fit beside the weights and buffers, capped at MAX_BATCH."""
    cfg = ModelConfig.from_dict(preset_config("20b"))
    plan = plan_memory(folder_20b, None, fused_attention=True)
    per_seq_full = _kv_bytes_per_token_per_layer(cfg) * 12 * 131072
    assert _kv_bytes_per_token_per_layer(cfg) == 2048
    assert per_seq_full < plan.kv_cache < per_seq_full + 2048 * 12 * 2048
    fixed = plan.weights_total + plan.buffers_total
    for room in (1, 3, 16, 40):
        budget = fixed + room * plan.kv_cache + plan.kv_cache // 2
        batch = plan_batch(plan, budget)
        assert batch.batch == min(room, MAX_BATCH) == batch.caches
        assert batch.total == fixed + batch.batch * plan.kv_cache <= budget
    assert plan_batch(plan, None).batch == MAX_BATCH  # no limit applies (the CPU)
    assert plan_batch(plan, None, 40).batch == 40


def test_a_batch_that_does_not_fit_is_refused_in_one_line(folder_20b: Path) -> None:
    plan = plan_memory(folder_20b, 65536, fused_attention=True)
    at_32k = plan_memory(folder_20b, 32768, fused_attention=True)
    # 4 KV caches fit at 32768 tokens (0.84 GB each), not one grow step further
    budget = at_32k.total_for(4)
    assert budget == at_32k.weights_total + at_32k.buffers_total + 4 * at_32k.kv_cache
    assert plan.at_context(32768 + GROW_STEP).total_for(4) > budget
    room = (budget - plan.weights_total - plan.buffers_total) // plan.kv_cache
    assert 1 <= room < 4
    assert plan_batch(plan, budget, room).batch == room
    with pytest.raises(MemoryPlanError) as err:
        plan_batch(plan, budget, 4)
    msg = str(err.value)
    assert "\n" not in msg
    assert "4 KV caches (a batch of 4, 1 kept as the prompt cache)" in msg
    assert f"{plan.kv_cache / GB:.2f} GB each at a 65536-token context" in msg
    assert f"room for {room}; any one of these fits: --max-batch {room}, --max-context 32768" in msg
    # the prompt cache's kept caches count too, even for the default batch
    with pytest.raises(MemoryPlanError, match=rf"4 KV caches \(a batch of {room}, 4 kept.*"
                                              rf"fits: --cache-slots {room}, --max-context 32768"):
        plan_batch(plan, budget, kept=4)


def test_the_batch_plan_line(folder_20b: Path) -> None:
    plan = plan_memory(folder_20b, 8192, fused_attention=True)
    budget = plan.weights_total + plan.buffers_total + 5 * plan.kv_cache
    line = plan_batch(plan, budget, 2, kept=3).summary()
    assert line.startswith("memory plan: batch of 2: weights 13.76 GB + 3 KV caches x ")
    assert "at a 8192-token context" in line and "(room for 5 KV caches)" in line
    total = plan.weights_total + plan.buffers_total + 3 * plan.kv_cache
    assert f"= {total / GB:.2f} GB of the {budget / GB:.2f} GB working set" in line
    assert "no memory limit applies" in plan_batch(plan, None).summary()
