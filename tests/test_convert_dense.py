"""`convert --dense-bits`: MLX affine quantization of the dense weights, experts untouched."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors import safe_open
from test_convert import expected_from_hf, read_all

from gptoss_mlx.convert import converter, stream
from gptoss_mlx.convert.synthetic import tiny_config, write_checkpoint

DENSE = ("model.embed_tokens", "lm_head", "model.layers.1.self_attn.q_proj",
         "model.layers.0.self_attn.o_proj", "model.layers.2.mlp.router")


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("dense-ck"),
                            tiny_config(num_hidden_layers=3, vocab_size=4096), seed=5)


def bf16_of(folder: Path, name: str) -> mx.array:
    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            if name in f.keys():
                return mx.array(f.get_tensor(name).view(torch.int16).numpy()).view(mx.bfloat16)
    raise KeyError(name)


@pytest.mark.parametrize("bits", [8, 4])
def test_dense_quantization(bits: int, small_ckpt: Path, tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    from mlx_lm.utils import load_model

    monkeypatch.setattr(stream, "CHUNK_BYTES", 100_000)  # many row slices per tensor
    dst = tmp_path / "q"
    converter.convert(small_ckpt, dst, dense_bits=bits, progress=False)
    got = read_all(dst)
    quant = json.loads((dst / "config.json").read_text())["quantization"]
    assert quant["group_size"] == 32 and quant["mode"] == "mxfp4"

    for module in DENSE:  # the oracle: MLX's own quantizer over the whole source tensor
        want_bits = 8 if module.endswith("router") else bits
        assert quant[module] == {"group_size": 64, "bits": want_bits, "mode": "affine"}
        w, scales, biases = mx.quantize(bf16_of(small_ckpt, f"{module}.weight"), group_size=64,
                                        bits=want_bits, mode="affine")
        assert np.array_equal(got[f"{module}.weight"], np.array(w).view(np.int32))
        assert np.array_equal(got[f"{module}.scales"], np.array(scales.view(mx.int16)))
        assert np.array_equal(got[f"{module}.biases"], np.array(biases.view(mx.int16)))

    lossless = expected_from_hf(read_all(small_ckpt))
    for name, a in lossless.items():
        if ".mlp.experts." in name or "norm" in name or name.endswith((".bias", "sinks")):
            assert np.array_equal(got[name], a), name

    model, _ = load_model(dst)  # strict: every tensor has its module
    assert model.model.layers[0].self_attn.q_proj.bits == bits
    assert model.model.layers[0].mlp.router.bits == 8
    assert model.model.embed_tokens.bits == bits


def test_dense_bits_must_be_8_or_4(small_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(converter.ConvertError, match="expected 8 or 4"):
        converter.convert(small_ckpt, tmp_path / "q", dense_bits=6, progress=False)
    assert not (tmp_path / "q").exists()


def test_lossless_output_does_not_depend_on_slicing(small_ckpt: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream, "CHUNK_BYTES", 10_000)
    monkeypatch.setattr(stream, "COPY_BYTES", 100_000)
    converter.convert(small_ckpt, tmp_path / "out", progress=False)
    got, want = read_all(tmp_path / "out"), expected_from_hf(read_all(small_ckpt))
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_dense_8bit_logits_stay_close_to_transformers(small_ckpt: Path, tmp_path: Path) -> None:
    """A loose check (8-bit weights can flip a random router's top-4): the quantized folder
    still computes the same model as transformers on the unquantized weights."""
    from mlx_lm.utils import load_model
    from transformers import GptOssForCausalLM, Mxfp4Config

    converter.convert(small_ckpt, tmp_path / "q8", dense_bits=8, progress=False)
    ids = np.random.default_rng(1).integers(0, 4096, size=(1, 16))
    ref_model = GptOssForCausalLM.from_pretrained(
        small_ckpt, dtype=torch.float32, quantization_config=Mxfp4Config(dequantize=True))
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids)).logits.numpy()[0]
    model, _ = load_model(tmp_path / "q8")
    model.set_dtype(mx.float32)
    got = np.array(model(mx.array(ids)))[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.15
