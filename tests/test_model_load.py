"""Loading: bad folders give one clear line; dtypes; the tokenizer; a light `import gptoss_mlx`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

import gptoss_mlx
from gptoss_mlx.convert import convert
from gptoss_mlx.convert.synthetic import tiny_config, write_checkpoint
from gptoss_mlx.model import ModelLoadError

LAYER0 = "model.layers.0.mlp.experts.gate_proj"


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(released hf-layout checkpoint, converted MLX folder) of a tiny model, no vocabulary."""
    root = tmp_path_factory.mktemp("load")
    src = write_checkpoint(root / "src", tiny_config(vocab_size=300, num_hidden_layers=2))
    convert(src, root / "mlx", progress=False)
    return src, root / "mlx"


def edited(folder: Path, dst: Path, edit) -> Path:
    """A copy of `folder` whose tensors went through `edit(dict) -> dict`."""
    shutil.copytree(folder, dst)
    files = sorted(dst.glob("model*.safetensors"))
    weights = {}
    for f in files:
        weights.update(mx.load(str(f)))
        f.unlink()
    mx.save_safetensors(str(dst / "model.safetensors"), edit(weights))
    (dst / "model.safetensors.index.json").unlink(missing_ok=True)
    return dst


def load_error(folder: Path) -> str:
    with pytest.raises(ModelLoadError) as e:
        gptoss_mlx.load(folder, experts="mlx")
    msg = str(e.value)
    assert "\n" not in msg and str(folder) in msg
    return msg


def test_missing_tensor(small, tmp_path: Path) -> None:
    def drop(w):
        del w[f"{LAYER0}.scales"]
        return w

    msg = load_error(edited(small[1], tmp_path / "m", drop))
    assert f"missing {LAYER0}.scales [8, 64, 2] uint8" in msg


def test_mismatched_shape_dtype_and_unexpected(small, tmp_path: Path) -> None:
    def spoil(w):
        w[f"{LAYER0}.weight"] = w[f"{LAYER0}.weight"].view(mx.uint8)  # bytes, not packed words
        w["model.layers.1.self_attn.sinks"] = mx.zeros((5,), dtype=mx.bfloat16)
        w["model.layers.1.self_attn.extra"] = mx.zeros((2,))
        return w

    msg = load_error(edited(small[1], tmp_path / "m", spoil))
    assert f"{LAYER0}.weight: expected [8, 64, 8] uint32, found [8, 64, 32] uint8" in msg
    assert "model.layers.1.self_attn.sinks: expected [4] float, found [5] bfloat16" in msg
    assert "unexpected model.layers.1.self_attn.extra" in msg


def test_folder_without_config_or_weights(tmp_path: Path) -> None:
    assert "no config.json" in load_error(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(tiny_config(vocab_size=300)))
    assert "no checkpoint found" in load_error(tmp_path)  # a release's config.json, no weights
    (tmp_path / "config.json").write_text(json.dumps({**tiny_config(vocab_size=300),
                                                      "quantization": {}}))
    assert "no model*.safetensors" in load_error(tmp_path)
    (tmp_path / "config.json").write_text("{")
    assert "not valid JSON" in load_error(tmp_path)
    (tmp_path / "config.json").write_bytes(b"\xff\xfe{")
    assert "not valid JSON" in load_error(tmp_path)


def test_bad_config_field(small, tmp_path: Path) -> None:
    dst = shutil.copytree(small[1], tmp_path / "m")
    cfg = json.loads((dst / "config.json").read_text())
    del cfg["num_local_experts"]
    (dst / "config.json").write_text(json.dumps(cfg))
    assert "num_local_experts" in load_error(dst)


def test_dtypes(small) -> None:
    model, tokenizer = gptoss_mlx.load(small[1], experts="mlx")
    assert tokenizer is None
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16
    assert model.model.layers[0].mlp.experts.down_proj.weight.dtype == mx.uint32
    logits = model(mx.array([[1, 2, 3]], dtype=mx.int32))
    assert logits.dtype == mx.bfloat16 and logits.shape == (1, 3, 300)
    model32, _ = gptoss_mlx.load(small[1], dtype="float32", experts="mlx")
    assert model32.model.layers[1].self_attn.sinks.dtype == mx.float32
    assert model32.model.layers[1].mlp.experts.up_proj.scales.dtype == mx.uint8
    assert model32(mx.array([[1, 2, 3]], dtype=mx.int32)).dtype == mx.float32
    assert model32.config.num_hidden_layers == 2
    with pytest.raises(ValueError, match="dtype='int8'"):
        gptoss_mlx.load(small[1], dtype="int8")


def test_tokenizer_comes_with_the_vocabulary(tiny_model_dir: Path) -> None:
    model, tokenizer = gptoss_mlx.load(tiny_model_dir, experts="mlx")
    assert tokenizer is not None
    ids = tokenizer.encode("Hello world")
    assert len(ids) > 0 and max(ids) < model.config.vocab_size


def test_vocabulary_larger_than_the_embedding(small, vocab_path: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(small[1], tmp_path / "mlx")
    shutil.copyfile(vocab_path, folder / "o200k_base.tiktoken")
    msg = load_error(folder)
    assert "o200k_base.tiktoken has 201088 token ids" in msg and "vocab_size is 300" in msg


def test_import_is_lazy() -> None:
    """`import gptoss_mlx` (what `gptoss-mlx --help` pays) loads neither mlx nor the model."""
    code = "import sys, gptoss_mlx; print(sorted(m for m in sys.modules if m.startswith('mlx')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("quantization,needle", [
    ("mxfp4", "quantization"),
    ({"group_size": 32, "bits": 4, "mode": "mxfp4",
      "lm_head": {"group_size": 64, "bits": 8, "mode": "zzz"}}, "zzz"),
])
def test_bad_quantization_entry(small, tmp_path: Path, quantization, needle: str) -> None:
    """A config.json "quantization" that is not an object, or names an unknown mode."""
    dst = tmp_path / "m"
    convert(small[0], dst, progress=False, dense_bits=8)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization"] = quantization
    (dst / "config.json").write_text(json.dumps(cfg))
    assert needle in load_error(dst)
