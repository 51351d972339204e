"""The converter against independent oracles: the source bytes read with safetensors, mlx-lm's
own loader, and transformers' GptOssForCausalLM on the same random weights."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from gptoss_mlx.convert import convert
from gptoss_mlx.convert.synthetic import tiny_config, write_checkpoint

VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"


def read_all(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of every safetensors file in a folder, as raw bytes in a numpy array of the
    tensor's shape (bf16 as int16, uint32 as int32: the bits are what matters)."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if t.dtype == torch.bfloat16:
                    t = t.view(torch.int16)
                elif t.dtype == torch.uint32:
                    t = t.view(torch.int32)
                assert name not in out, f"{name} stored twice"
                out[name] = t.numpy()
    return out


def expected_from_hf(src: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The MLX tensors that the release's bytes must become (mlx-lm's gpt_oss layout)."""
    out = {}
    for name, a in src.items():
        if ".mlp.experts." not in name:
            out[name] = a
            continue
        stem, leaf = name.rsplit(".", 1)[0], name.rsplit(".", 1)[1]
        fused, kind = leaf.rsplit("_", 1)  # gate_up_proj | down_proj ; blocks | scales | bias
        new_leaf = {"blocks": "weight", "scales": "scales", "bias": "bias"}[kind]
        if kind == "blocks":  # [E, rows, K/32, 16] bytes -> [E, rows, K/8] uint32 (same bytes)
            a = a.reshape(*a.shape[:2], -1).view(np.int32)
        if fused == "down_proj":
            out[f"{stem}.down_proj.{new_leaf}"] = a
        else:
            out[f"{stem}.gate_proj.{new_leaf}"] = a[:, 0::2]
            out[f"{stem}.up_proj.{new_leaf}"] = a[:, 1::2]
    return out


def hf_from_original(src: dict[str, np.ndarray], cfg: dict) -> dict[str, np.ndarray]:
    """The release's `original/` tensors under their Hugging Face names (qkv split by rows)."""
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    glob = {"embedding.weight": "model.embed_tokens.weight", "norm.scale": "model.norm.weight",
            "unembedding.weight": "lm_head.weight"}
    layer = {"attn.norm.scale": "input_layernorm.weight", "attn.sinks": "self_attn.sinks",
             "attn.out.weight": "self_attn.o_proj.weight", "attn.out.bias": "self_attn.o_proj.bias",
             "mlp.norm.scale": "post_attention_layernorm.weight",
             "mlp.gate.weight": "mlp.router.weight", "mlp.gate.bias": "mlp.router.bias",
             "mlp.mlp1_weight.blocks": "mlp.experts.gate_up_proj_blocks",
             "mlp.mlp1_weight.scales": "mlp.experts.gate_up_proj_scales",
             "mlp.mlp1_bias": "mlp.experts.gate_up_proj_bias",
             "mlp.mlp2_weight.blocks": "mlp.experts.down_proj_blocks",
             "mlp.mlp2_weight.scales": "mlp.experts.down_proj_scales",
             "mlp.mlp2_bias": "mlp.experts.down_proj_bias"}
    out = {}
    for name, a in src.items():
        if name in glob:
            out[glob[name]] = a
            continue
        _, n, rest = name.split(".", 2)
        p = f"model.layers.{n}."
        if rest.startswith("attn.qkv."):
            leaf = rest.rsplit(".", 1)[1]
            out[p + f"self_attn.q_proj.{leaf}"] = a[:q]
            out[p + f"self_attn.k_proj.{leaf}"] = a[q:q + kv]
            out[p + f"self_attn.v_proj.{leaf}"] = a[q + kv:]
        else:
            out[p + layer[rest]] = a
    return out


@pytest.fixture(scope="module")
def original_model_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("mlx-orig") / "tiny"
    convert(tiny_checkpoint / "original", dst, progress=False)
    return dst


def test_hf_layout_is_byte_identical(tiny_checkpoint: Path, tiny_model_dir: Path) -> None:
    expected = expected_from_hf(read_all(tiny_checkpoint))
    got = read_all(tiny_model_dir)
    assert sorted(got) == sorted(expected)
    for name, a in expected.items():
        assert got[name].shape == a.shape, name
        assert got[name].dtype == a.dtype, name
        assert np.array_equal(got[name], a), name


def test_original_layout_is_byte_identical(tiny_checkpoint: Path, original_model_dir: Path) -> None:
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    expected = expected_from_hf(hf_from_original(read_all(tiny_checkpoint / "original"), cfg))
    got = read_all(original_model_dir)
    assert sorted(got) == sorted(expected)
    for name, a in expected.items():
        assert np.array_equal(got[name], a), name


def test_config_and_side_files(tiny_checkpoint: Path, tiny_model_dir: Path,
                               original_model_dir: Path) -> None:
    src_cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    for folder in (tiny_model_dir, original_model_dir):
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["quantization"] == {"group_size": 32, "bits": 4, "mode": "mxfp4"}
        assert "quantization_config" not in cfg
        for key in ("num_hidden_layers", "num_local_experts", "num_experts_per_tok", "vocab_size",
                    "hidden_size", "intermediate_size", "head_dim", "num_attention_heads",
                    "num_key_value_heads", "sliding_window", "layer_types", "rope_theta",
                    "rope_scaling", "swiglu_limit", "model_type"):
            assert cfg[key] == src_cfg[key], (folder, key)
        assert (folder / "generation_config.json").read_bytes() == (
            tiny_checkpoint / "generation_config.json").read_bytes()
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(read_all(folder))
    vocab = (tiny_model_dir / "o200k_base.tiktoken").read_bytes()
    assert hashlib.sha256(vocab).hexdigest() == VOCAB_SHA256


def test_shards_are_capped_and_index_names_them(tiny_checkpoint: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    convert(tiny_checkpoint, dst, max_shard_bytes=20 * 10**6, progress=False)
    shards = sorted(dst.glob("*.safetensors"))
    assert len(shards) > 1
    for s in shards:  # a shard passes the cap only when it holds a single larger tensor
        with safe_open(s, framework="pt") as f:
            size = sum(f.get_tensor(k).nbytes for k in f.keys())
            assert size <= 20 * 10**6 or len(f.keys()) == 1, s.name
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    assert expected_from_hf(read_all(tiny_checkpoint)).keys() == read_all(dst).keys()


def test_source_shards_are_found_through_the_index(tmp_path: Path) -> None:
    """The 20b release names its shards model-00000-of-00002 ..: go by the weight_map."""
    src = write_checkpoint(tmp_path / "ck", tiny_config(vocab_size=1024, num_hidden_layers=2),
                           max_shard_bytes=200_000)
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    old = sorted(set(index["weight_map"].values()))
    assert len(old) > 2
    rename = {name: f"model-{i:05d}-of-{len(old) - 1:05d}.safetensors"
              for i, name in enumerate(old)}
    for a, b in rename.items():
        (src / a).rename(src / f"tmp-{b}")
    for b in rename.values():
        (src / f"tmp-{b}").rename(src / b)
    index["weight_map"] = {k: rename[v] for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    convert(src, tmp_path / "out", progress=False)
    assert read_all(tmp_path / "out").keys() == expected_from_hf(read_all(src)).keys()


@pytest.mark.parametrize("which", ["hf", "original"])
def test_loads_in_mlx_lm_and_matches_transformers(which: str, tiny_checkpoint: Path,
                                                  tiny_model_dir: Path,
                                                  original_model_dir: Path) -> None:
    import mlx.core as mx
    from mlx_lm.utils import load_model
    from transformers import GptOssForCausalLM, Mxfp4Config

    ids = np.random.default_rng(0).integers(0, 200000, size=(1, 24))
    ref_model = GptOssForCausalLM.from_pretrained(
        tiny_checkpoint, dtype=torch.float32, quantization_config=Mxfp4Config(dequantize=True))
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids)).logits.numpy()[0]

    model, _ = load_model(tiny_model_dir if which == "hf" else original_model_dir)  # strict
    model.set_dtype(mx.float32)
    got = np.array(model(mx.array(ids)))[0]
    # mlx-lm rounds the YaRN ramp bounds (8, 18 instead of 8.09, 17.40): a small, known drift.
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.01
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_layout_detection_prefers_the_root(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from gptoss_mlx.convert.source import resolve

    assert resolve(tiny_checkpoint).layout == "hf"
    assert resolve(tiny_checkpoint).folder == tiny_checkpoint
    assert resolve(tiny_checkpoint / "original").layout == "original"
    only_original = write_checkpoint(tmp_path / "o", tiny_config(vocab_size=1024),
                                     layout="original")
    found = resolve(only_original)
    assert (found.layout, found.folder) == ("original", only_original / "original")


def test_without_kernel_copies(tiny_checkpoint: Path, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Where copy_file_range is refused (other file systems, other kernels), the plain
    read/write fallback writes the same bytes."""
    import errno
    import os

    def refuse(*args: object) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    convert(tiny_checkpoint, tmp_path / "out", progress=False)
    got, want = read_all(tmp_path / "out"), expected_from_hf(read_all(tiny_checkpoint))
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in want)
