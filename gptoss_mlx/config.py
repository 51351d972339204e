"""The gpt-oss model configuration, read from either released `config.json` flavour."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json that is missing a field or contradicts itself."""


@dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters (Hugging Face names)."""

    factor: float = 32.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = False


# Inclusive ranges of every number in a config: wide around the released models (20b, 120b),
# narrow enough that no count overflows an allocation or a context outgrows any memory.
_RANGES: dict[str, tuple[float, float]] = {
    "num_hidden_layers": (1, 1024),
    "num_local_experts": (1, 4096),
    "vocab_size": (1, 1 << 22),
    "hidden_size": (1, 1 << 16),
    "intermediate_size": (1, 1 << 17),
    "head_dim": (1, 1024),
    "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024),
    "sliding_window": (1, 1 << 24),
    "max_position_embeddings": (1, 1 << 24),
    "rope_scaling.original_max_position_embeddings": (1, 1 << 24),
    "rope_theta": (1.0, 1e12),
    "rope_scaling.factor": (1e-3, 1e4),
    "rope_scaling.beta_fast": (1e-6, 1e6),
    "rope_scaling.beta_slow": (1e-6, 1e6),
    "swiglu_limit": (1e-3, 1e6),
    "rms_norm_eps": (1e-12, 0.1),
    # recorded, not used by the model (original/config.json has none: harmony's ids apply)
    "eos_token_id": (0, 1 << 22),
    "pad_token_id": (0, 1 << 22),
}


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of a gpt-oss model (Hugging Face field names)."""

    num_hidden_layers: int
    num_local_experts: int
    num_experts_per_tok: int
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    head_dim: int
    num_attention_heads: int
    num_key_value_heads: int
    sliding_window: int
    layer_types: tuple[str, ...]
    rope_theta: float = 150000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    swiglu_limit: float = 7.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    eos_token_id: int = 200002
    pad_token_id: int = 199999

    def __post_init__(self) -> None:
        for name in _RANGES:
            value = self
            for part in name.split("."):
                value = getattr(value, part)
            _check_range(name, value)
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even (rotary pairs)")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries, "
                f"expected num_hidden_layers={self.num_hidden_layers}"
            )
        bad = set(self.layer_types) - {"sliding_attention", "full_attention"}
        if bad:
            raise ConfigError(f"layer_types has unknown entries {sorted(bad)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % 32:
                raise ConfigError(f"{name}={getattr(self, name)} must be a multiple of 32 (MXFP4)")
        if not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise ConfigError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                f"1..num_local_experts={self.num_local_experts}"
            )

    @property
    def sliding_layers(self) -> list[bool]:
        """True for each layer that attends within the sliding window."""
        return [t == "sliding_attention" for t in self.layer_types]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Read a Hugging Face `config.json` dict, or an `original/config.json` one."""
        if not isinstance(d, dict):
            raise ConfigError("config.json is not a JSON object")
        if "num_experts" in d and "num_local_experts" not in d:
            return cls._from_original(d)
        try:
            layers = _int("num_hidden_layers", d["num_hidden_layers"])
            layer_types = d.get("layer_types") or [
                "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)
            ]
            rs = d.get("rope_scaling") or {}
            if not isinstance(rs, dict):
                raise ConfigError(f"rope_scaling={rs!r}: expected a JSON object")
            if not isinstance(layer_types, list):
                raise ConfigError(f"layer_types={layer_types!r}: expected a list")
            return cls(
                num_hidden_layers=layers,
                num_local_experts=_int("num_local_experts", d["num_local_experts"]),
                num_experts_per_tok=_int("num_experts_per_tok",
                                         d.get("num_experts_per_tok") or d["experts_per_token"]),
                vocab_size=_int("vocab_size", d["vocab_size"]),
                hidden_size=_int("hidden_size", d["hidden_size"]),
                intermediate_size=_int("intermediate_size", d["intermediate_size"]),
                head_dim=_int("head_dim", d.get("head_dim", 64)),
                num_attention_heads=_int("num_attention_heads", d["num_attention_heads"]),
                num_key_value_heads=_int("num_key_value_heads", d["num_key_value_heads"]),
                sliding_window=_int("sliding_window", d.get("sliding_window", 128)),
                layer_types=tuple(layer_types),
                rope_theta=_float("rope_theta", d.get("rope_theta", 150000.0)),
                rope_scaling=RopeScaling(
                    factor=_float("rope_scaling.factor", rs.get("factor", 32.0)),
                    original_max_position_embeddings=_int(
                        "rope_scaling.original_max_position_embeddings",
                        rs.get("original_max_position_embeddings", 4096),
                    ),
                    beta_fast=_float("rope_scaling.beta_fast", rs.get("beta_fast", 32.0)),
                    beta_slow=_float("rope_scaling.beta_slow", rs.get("beta_slow", 1.0)),
                    truncate=bool(rs.get("truncate", False)),
                ),
                swiglu_limit=_float("swiglu_limit", d.get("swiglu_limit", 7.0)),
                rms_norm_eps=_float("rms_norm_eps", d.get("rms_norm_eps", 1e-5)),
                max_position_embeddings=_int("max_position_embeddings",
                                             d.get("max_position_embeddings", 131072)),
                eos_token_id=_int("eos_token_id", _first(d.get("eos_token_id", 200002))),
                pad_token_id=_int("pad_token_id", d.get("pad_token_id") or 199999),
            )
        except KeyError as e:
            raise ConfigError(f"config.json has no field {e.args[0]!r}") from None

    @classmethod
    def _from_original(cls, d: dict[str, Any]) -> ModelConfig:
        """Map OpenAI's `original/config.json` keys onto the Hugging Face ones."""
        renamed = {"num_experts": "num_local_experts", "experts_per_token": "num_experts_per_tok"}
        missing = [k for k in (*renamed, "num_hidden_layers", "vocab_size", "hidden_size",
                               "intermediate_size", "num_attention_heads", "num_key_value_heads")
                   if k not in d]
        if missing:
            raise ConfigError(f"original config.json has no field {missing[0]!r}")
        hf = {renamed.get(k, k): v for k, v in d.items()}
        ctx = _int("initial_context_length", d.get("initial_context_length", 4096))
        factor = _float("rope_scaling_factor", d.get("rope_scaling_factor", 32.0))
        _check_range("rope_scaling.factor", factor, shown="rope_scaling_factor")
        hf["rope_scaling"] = {
            "factor": factor,
            "original_max_position_embeddings": ctx,
            "beta_fast": d.get("rope_ntk_beta", 32.0),
            "beta_slow": d.get("rope_ntk_alpha", 1.0),
        }
        hf["max_position_embeddings"] = int(ctx * factor)
        return cls.from_dict(hf)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Read `config.json` (a file, or the folder holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError before it
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The Hugging Face `config.json` content for this configuration."""
        d = asdict(self)
        d["layer_types"] = list(self.layer_types)
        d["rope_scaling"] = {"rope_type": "yarn", **asdict(self.rope_scaling)}
        d.update(
            architectures=["GptOssForCausalLM"],
            model_type="gpt_oss",
            attention_bias=True,
            experts_per_token=self.num_experts_per_tok,
            initial_context_length=self.rope_scaling.original_max_position_embeddings,
            hidden_act="silu",
            tie_word_embeddings=False,
        )
        return d


def _check_range(name: str, value: float, shown: str | None = None) -> None:
    """ConfigError naming the field (`shown`, else `name`) when `value` leaves `_RANGES[name]`."""
    low, high = _RANGES[name]
    if not low <= value <= high:  # False for nan too
        raise ConfigError(f"{shown or name}={value} must be in {low:g}..{high:g}"
                          if isinstance(low, float) else
                          f"{shown or name}={value} must be in {low}..{high:,}")


def _first(v: Any) -> Any:
    """The first entry of a non-empty list (eos_token_id may list several), else `v`."""
    return v[0] if isinstance(v, list) and v else v


def _int(name: str, v: Any) -> int:
    """A field's value as an integer (a float must be whole); ConfigError naming it otherwise."""
    try:
        out = int(v)
        if out != v or isinstance(v, (str, bool)):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{name}={v!r}: expected an integer") from None
    return out


def _float(name: str, v: Any) -> float:
    """A field's value as a number; ConfigError naming it otherwise."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{name}={v!r}: expected a number")
    return float(v)
