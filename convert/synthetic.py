"""Random gpt-oss checkpoints in the exact released layouts, at any shape.

Tests use tiny ones; benchmarks use the real 20b/120b shapes. Every tensor is a deterministic
function of (seed, Hugging Face tensor name), so the `hf` and `original` layouts written with the
same seed hold the same weights (the `original` qkv is the row concatenation of q, k and v).
"""

from __future__ import annotations

import json
import math
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gptoss_mlx.config import ModelConfig

from .layout import hf_specs, original_specs, original_to_hf, qkv_rows
from .release_files import GENERATION, GENERATION_CONFIG, write_release_files
from .safetensors_io import TensorSpec, write_file, write_sharded

LAYOUTS = ("hf", "original", "both")

_PRESET_COMMON: dict[str, Any] = dict(
    vocab_size=201088,
    hidden_size=2880,
    intermediate_size=2880,
    head_dim=64,
    num_attention_heads=64,
    num_key_value_heads=8,
    num_experts_per_tok=4,
    sliding_window=128,
)
PRESETS: dict[str, dict[str, Any]] = {
    "20b": dict(_PRESET_COMMON, num_hidden_layers=24, num_local_experts=32),
    "120b": dict(_PRESET_COMMON, num_hidden_layers=36, num_local_experts=128),
}


def tiny_config(**overrides: Any) -> dict[str, Any]:
    """A Hugging Face style config.json dict for a tiny model (the real vocabulary size)."""
    shape: dict[str, Any] = dict(
        _PRESET_COMMON,
        num_hidden_layers=4,
        num_local_experts=8,
        hidden_size=64,
        intermediate_size=64,
        head_dim=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=16,
    )
    shape.update(overrides)
    if shape["vocab_size"] <= 200002:  # a vocabulary smaller than harmony's special tokens
        shape.update(pad_token_id=shape["vocab_size"] - 1, eos_token_id=shape["vocab_size"] - 1)
    return hf_config(shape)


def preset_config(name: str) -> dict[str, Any]:
    """The Hugging Face config.json dict of the released 20b or 120b model."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return hf_config(PRESETS[name])


def hf_config(shape: dict[str, Any]) -> dict[str, Any]:
    """Complete a dict of shapes into a released-style Hugging Face config.json dict."""
    layers = shape["num_hidden_layers"]
    shape = dict(shape)
    shape.setdefault(
        "layer_types",
        ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
    )
    d = ModelConfig.from_dict(shape).to_hf_dict()
    d["quantization_config"] = {
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
        "quant_method": "mxfp4",
    }
    return d


def original_config(cfg: ModelConfig) -> dict[str, Any]:
    """The `original/config.json` dict (OpenAI's key names) for a configuration."""
    return {
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_experts": cfg.num_local_experts,
        "experts_per_token": cfg.num_experts_per_tok,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "swiglu_limit": cfg.swiglu_limit,
        "head_dim": cfg.head_dim,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "sliding_window": cfg.sliding_window,
        "initial_context_length": cfg.rope_scaling.original_max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_scaling_factor": cfg.rope_scaling.factor,
        "rope_ntk_alpha": cfg.rope_scaling.beta_slow,
        "rope_ntk_beta": cfg.rope_scaling.beta_fast,
    }


class RandomWeights:
    """Deterministic random tensors by Hugging Face name, with realistic magnitudes."""

    def __init__(self, cfg: ModelConfig, seed: int = 0):
        self.cfg = cfg
        self.seed = seed

    def _rng(self, name: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(name.encode())])

    def hf(self, spec: TensorSpec) -> np.ndarray:
        """The tensor of a Hugging Face layout spec, as an array holding its bytes."""
        rng, name = self._rng(spec.name), spec.name
        if name.endswith("_blocks"):
            return rng.integers(0, 256, size=spec.shape, dtype=np.uint8)
        if name.endswith("_scales"):
            # E8M0 so that a dequantized weight has a standard deviation near 1/sqrt(fan_in):
            # a uniform random nibble has rms 2.93 (the FP4 table's values).
            fan_in = spec.shape[2] * 32
            top = 127 + round(math.log2(1.0 / (math.sqrt(fan_in) * 2.93)))
            return rng.integers(top - 1, top + 1, size=spec.shape, endpoint=True, dtype=np.uint8)
        if name.endswith(("layernorm.weight", "norm.weight")):
            return _bf16(1.0 + 0.1 * _normal(rng, spec.shape))
        if name.endswith("sinks"):
            return _bf16(_normal(rng, spec.shape))
        if name.endswith("bias"):
            return _bf16(0.1 * _normal(rng, spec.shape))
        if name == "model.embed_tokens.weight":
            return _bf16(_normal(rng, spec.shape))
        # Linear weights [out, in]; lm_head a little wider so that logits have a clear argmax.
        gain = 2.0 if name == "lm_head.weight" else 1.0
        return _bf16(_normal(rng, spec.shape, gain / math.sqrt(spec.shape[-1])))

    def original(self, spec: TensorSpec) -> np.ndarray:
        """The tensor of an `original/` layout spec (qkv fused from the HF q, k and v)."""
        hf_name = original_to_hf(spec.name)
        if hf_name is not None:
            return self.hf(TensorSpec(hf_name, spec.dtype, spec.shape))
        layer = spec.name.split(".")[1]
        leaf = spec.name.rsplit(".", 1)[1]  # weight | bias
        parts = [
            self.hf(TensorSpec(f"model.layers.{layer}.self_attn.{p}_proj.{leaf}", spec.dtype,
                               (hi - lo, *spec.shape[1:])))
            for p, lo, hi in qkv_rows(self.cfg)
        ]
        return np.concatenate(parts, axis=0)


def _normal(rng: np.random.Generator, shape: tuple[int, ...], std: float = 1.0) -> np.ndarray:
    out = rng.standard_normal(size=shape, dtype=np.float32)
    out *= std
    return out


def _bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest even); returns the bf16 bits as uint16."""
    bits = x.view(np.uint32)
    bits += 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).astype(np.uint16)


def write_checkpoint(
    path: str | Path,
    config: dict[str, Any],
    layout: str = "hf",
    seed: int = 0,
    vocab: bytes | str | Path | None = None,
    max_shard_bytes: int = 4 * 1024**3,
    progress: bool = False,
    weights: RandomWeights | None = None,
) -> Path:
    """Write a random checkpoint in the released `hf` layout, the `original/` one, or `both`.

    `config` is a Hugging Face config.json dict (`tiny_config()`, `preset_config("20b")`).
    With `vocab` (o200k_base.tiktoken: its path or bytes) the root gets the release's tokenizer and
    generation files, built from it (`release_files`), and no vocabulary file, as the release;
    without it only the weights, config.json and generation_config.json are written.
    `weights` serves the tensors (default: `RandomWeights(cfg, seed)`; the demo model's are
    `demo.DemoWeights`).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    cfg = ModelConfig.from_dict(config)
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    weights = weights or RandomWeights(cfg, seed)
    jobs = []
    if layout in ("hf", "both"):
        jobs.append(("hf", hf_specs(cfg)))
    if layout in ("original", "both"):
        jobs.append(("original", original_specs(cfg)))
    total = sum(s.nbytes for _, specs in jobs for s in specs)
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing checkpoint",
              disable=not progress, file=sys.stderr) as bar:
        def tick(spec: TensorSpec) -> None:
            bar.update(spec.nbytes)

        for kind, specs in jobs:
            if kind == "hf":
                (root / "config.json").write_text(json.dumps(config, indent=2) + "\n")
                (root / GENERATION_CONFIG).write_text(json.dumps(GENERATION, indent=2) + "\n")
                write_sharded(root, specs, weights.hf, max_shard_bytes, on_tensor=tick)
            else:
                orig = root / "original"
                orig.mkdir(exist_ok=True)
                (orig / "config.json").write_text(json.dumps(original_config(cfg), indent=2) + "\n")
                write_file(orig / "model.safetensors", specs, weights.original, on_tensor=tick)
    if vocab is not None:
        write_release_files(root, vocab if isinstance(vocab, bytes) else Path(vocab).read_bytes())
    return root
