"""The demo model: a small trained gpt-oss that speaks harmony, expanded to the released layout.

`demo_weights.safetensors` (beside this file, written by `demo_train.py`, a few MB) holds the
embedding and lm_head rows of the token ids the corpus uses, every other tensor in the released
dtypes (bf16 bits, MXFP4 expert blocks and E8M0 scales), and the list of used ids. `DemoWeights`
serves it to `synthetic.write_checkpoint` by released tensor name, filling in the unused
vocabulary: embedding rows holding only the reserved dimension, lm_head rows far negative on it.
The model knows the tasks of `demo_corpus`: word transforms, and the function tools `get_weather`
{"city": ...} and `exec_command` {"cmd": ...} when the developer message offers them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gptoss_mlx.config import ModelConfig

from .safetensors_io import TensorSpec
from .synthetic import RandomWeights, _bf16, tiny_config

DEMO_WEIGHTS = Path(__file__).resolve().with_name("demo_weights.safetensors")
DEMO_SHAPE: dict[str, Any] = dict(
    num_hidden_layers=2, hidden_size=64, intermediate_size=64, head_dim=16,
    num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, sliding_window=128,
)
RESERVED_VALUE = 1.0  # every embedding row holds this in hidden dimension 0
REST_WEIGHT = 200.0  # every unused lm_head row is -REST_WEIGHT in dimension 0, zero elsewhere
FP4_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float32)


def demo_config() -> dict[str, Any]:
    """The demo model's Hugging Face config.json dict (the real vocabulary size)."""
    return tiny_config(**DEMO_SHAPE)


def mxfp4_quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round `w` [..., K] to MXFP4: blocks [..., K/32, 16] (low nibble first), E8M0 scales."""
    x = w.astype(np.float32).reshape(*w.shape[:-1], -1, 32)
    amax = np.abs(x).max(axis=-1, keepdims=True)
    exp = np.ceil(np.log2(np.maximum(amax, 1e-30) / 6.0)).clip(-127, 127)
    v = x / np.exp2(exp)
    code = np.abs(np.abs(v)[..., None] - FP4_VALUES).argmin(axis=-1).astype(np.uint8)
    code |= np.where((v < 0) & (code > 0), 8, 0).astype(np.uint8)
    blocks = (code[..., 0::2] | (code[..., 1::2] << 4)).astype(np.uint8)
    return blocks, (exp[..., 0] + 127).astype(np.uint8)


def mxfp4_dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The float32 values of MXFP4 `blocks` [..., nb, 16] and `scales` [..., nb]."""
    table = np.concatenate([FP4_VALUES, -FP4_VALUES])
    vals = np.stack([table[blocks & 0xF], table[blocks >> 4]], axis=-1)
    scale = np.exp2(scales.astype(np.float32) - 127)[..., None]
    vals = vals.reshape(*blocks.shape[:-1], 32) * scale
    return vals.reshape(*blocks.shape[:-2], -1)


def save_demo(path: Path, model: Any, used_ids: np.ndarray) -> None:
    """Save a trained transformers GptOssForCausalLM (classes = used ids + rest) compactly."""
    import torch
    from safetensors.numpy import save_file

    def bits(t: torch.Tensor) -> np.ndarray:
        return _bf16(t.detach().float().numpy().copy())

    out: dict[str, np.ndarray] = {"used_ids": used_ids.astype(np.int32)}
    for name, p in model.named_parameters():
        if name == "model.embed_tokens.weight":
            out["embed_rows"] = bits(p[:-1])
        elif name == "lm_head.weight":
            out["lm_head_rows"] = bits(p[:-1])
        elif name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = mxfp4_quantize(p.detach().transpose(1, 2).numpy())
            out[name + "_blocks"], out[name + "_scales"] = blocks, scales
        else:
            out[name] = bits(p)
    save_file(out, str(path))


class DemoWeights(RandomWeights):
    """The demo model's tensors by released (Hugging Face) name, for `write_checkpoint`."""

    def __init__(self, cfg: ModelConfig, path: str | Path = DEMO_WEIGHTS):
        super().__init__(cfg)
        from safetensors.numpy import load_file

        self.path = path
        self.tensors = load_file(str(path))
        self.used = self.tensors["used_ids"]

    def hf(self, spec: TensorSpec) -> np.ndarray:
        if spec.name == "model.embed_tokens.weight":
            return self._rows(spec, "embed_rows", RESERVED_VALUE)
        if spec.name == "lm_head.weight":
            return self._rows(spec, "lm_head_rows", -REST_WEIGHT)
        t = self.tensors[spec.name]
        if t.shape != spec.shape:
            raise ValueError(f"{self.path}: {spec.name} has shape {t.shape}, "
                             f"expected {spec.shape}")
        return t

    def _rows(self, spec: TensorSpec, key: str, reserved: float) -> np.ndarray:
        out = np.zeros(spec.shape, dtype=np.uint16)
        out[:, 0] = _bf16(np.array([reserved], dtype=np.float32))[0]
        out[self.used] = self.tensors[key]
        return out


def write_demo(path: str | Path, layout: str = "hf", vocab: bytes | str | Path | None = None,
               progress: bool = False, weights: str | Path = DEMO_WEIGHTS) -> Path:
    """Write the demo model (from the compact file `weights`) as a released checkpoint, with
    the same writer as random ones."""
    from .synthetic import write_checkpoint

    config = demo_config()
    return write_checkpoint(path, config, layout=layout, vocab=vocab, progress=progress,
                            weights=DemoWeights(ModelConfig.from_dict(config), weights))
