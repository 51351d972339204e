"""ModelConfig reads both released config.json flavours to the same configuration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptoss_mlx.config import ConfigError, ModelConfig

# gpt-oss-20b's original/config.json as published (OpenAI's key names).
ORIGINAL_20B = {
    "num_hidden_layers": 24, "num_experts": 32, "experts_per_token": 4, "vocab_size": 201088,
    "hidden_size": 2880, "intermediate_size": 2880, "swiglu_limit": 7.0, "head_dim": 64,
    "num_attention_heads": 64, "num_key_value_heads": 8, "sliding_window": 128,
    "initial_context_length": 4096, "rope_theta": 150000, "rope_scaling_factor": 32.0,
    "rope_ntk_alpha": 1, "rope_ntk_beta": 32,
}


@pytest.mark.parametrize("name,layers,experts", [("20b", 24, 32), ("120b", 36, 128)])
def test_released_hf_config(shared_dir: Path, name: str, layers: int, experts: int) -> None:
    cfg = ModelConfig.from_file(shared_dir / "configs" / f"gpt-oss-{name}.json")
    assert (cfg.num_hidden_layers, cfg.num_local_experts, cfg.num_experts_per_tok) == (
        layers, experts, 4)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (2880, 2880, 201088)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (64, 8, 64)
    assert cfg.sliding_layers == [i % 2 == 0 for i in range(layers)]
    assert cfg.rope_theta == 150000 and cfg.rope_scaling.factor == 32
    assert cfg.rope_scaling.original_max_position_embeddings == 4096
    assert (cfg.rope_scaling.beta_fast, cfg.rope_scaling.beta_slow) == (32, 1)
    assert cfg.rope_scaling.truncate is False
    assert (cfg.swiglu_limit, cfg.rms_norm_eps, cfg.sliding_window) == (7.0, 1e-5, 128)
    assert (cfg.eos_token_id, cfg.pad_token_id, cfg.max_position_embeddings) == (
        200002, 199999, 131072)


def test_original_flavour_reads_the_same(shared_dir: Path) -> None:
    hf = ModelConfig.from_file(shared_dir / "configs" / "gpt-oss-20b.json")
    assert ModelConfig.from_dict(ORIGINAL_20B) == hf


def test_hf_dict_round_trip(shared_dir: Path) -> None:
    released = json.loads((shared_dir / "configs" / "gpt-oss-120b.json").read_text())
    cfg = ModelConfig.from_dict(released)
    out = cfg.to_hf_dict()
    assert ModelConfig.from_dict(out) == cfg
    for key, value in out.items():
        assert released[key] == value, key


@pytest.mark.parametrize("change,needle", [
    ({"num_key_value_heads": 5}, "num_key_value_heads=5"),
    ({"hidden_size": 100}, "hidden_size=100"),
    ({"num_experts_per_tok": 64}, "num_experts_per_tok=64"),
    ({"layer_types": ["full_attention"]}, "layer_types has 1 entries"),
])
def test_contradictions_are_named(change: dict, needle: str) -> None:
    d = dict(ORIGINAL_20B, num_local_experts=32, **change)
    with pytest.raises(ConfigError, match=needle):
        ModelConfig.from_dict(d)


def test_missing_field_and_bad_file(tmp_path: Path) -> None:
    d = dict(ORIGINAL_20B)
    del d["vocab_size"]
    with pytest.raises(ConfigError, match="vocab_size"):
        ModelConfig.from_dict(d)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path)
    with pytest.raises(ConfigError, match="no such file"):
        ModelConfig.from_file(tmp_path / "missing.json")


@pytest.mark.parametrize("change,needle", [
    ({"num_key_value_heads": 0}, "num_key_value_heads=0"),
    ({"num_attention_heads": 0}, "num_attention_heads=0"),
    ({"num_hidden_layers": -1}, "num_hidden_layers=-1"),
    ({"sliding_window": -1}, "sliding_window=-1"),
    ({"head_dim": 0}, "head_dim=0"),
    ({"num_hidden_layers": 1.5}, "num_hidden_layers"),
    ({"eos_token_id": []}, "eos_token_id"),
    ({"eos_token_id": "a"}, "eos_token_id"),
    ({"rope_scaling": "x"}, "rope_scaling"),
    ({"rope_scaling": {"factor": None}}, "rope_scaling.factor"),
    ({"layer_types": 5}, "layer_types"),
    ({"vocab_size": None}, "vocab_size"),
])
def test_bad_values_are_named(change: dict, needle: str) -> None:
    """A wrong type or a non-positive size is a ConfigError naming the field, not a crash."""
    d = dict(ORIGINAL_20B, num_local_experts=32, **change)
    d.pop("num_experts")
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        ModelConfig.from_dict(d)


def test_not_an_object(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        ModelConfig.from_file(tmp_path)


def test_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        ModelConfig.from_file(tmp_path)


@pytest.mark.parametrize("change,needle", [
    ({"vocab_size": 10**12}, "vocab_size=1000000000000 must be in 1..4,194,304"),
    ({"max_position_embeddings": 10**15}, "max_position_embeddings=1000000000000000 must be in"),
    ({"num_hidden_layers": 10**6}, "num_hidden_layers=1000000 must be in 1..1,024"),
    ({"num_local_experts": 10**5}, "num_local_experts=100000"),
    ({"hidden_size": 2**20}, "hidden_size=1048576"),
    ({"sliding_window": 2**40}, "sliding_window=1099511627776"),
    ({"rope_theta": float("nan")}, "rope_theta=nan must be in 1..1e+12"),
    ({"rope_theta": 0.5}, "rope_theta=0.5"),
    ({"rms_norm_eps": float("inf")}, "rms_norm_eps=inf"),
    ({"rms_norm_eps": 0}, "rms_norm_eps=0.0"),
    ({"swiglu_limit": -1}, "swiglu_limit=-1.0"),
    ({"rope_scaling": {"factor": 1e300}}, "rope_scaling.factor=1e+300"),
    ({"rope_scaling": {"beta_slow": 0}}, "rope_scaling.beta_slow=0.0"),
    ({"rope_scaling": {"original_max_position_embeddings": 0}},
     "rope_scaling.original_max_position_embeddings=0"),
    ({"eos_token_id": 2**40}, "eos_token_id=1099511627776 must be in 0..4,194,304"),
    ({"pad_token_id": -1}, "pad_token_id=-1"),
    ({"head_dim": 63}, "head_dim=63 must be even"),
])
def test_out_of_range_values_are_named(change: dict, needle: str, tmp_path: Path) -> None:
    """Every number has sane bounds: one ConfigError line naming the field and the range (a
    huge vocab_size used to overflow deep in MLX, a huge context was accepted)."""
    d = dict(ORIGINAL_20B, num_local_experts=32, num_experts_per_tok=4)
    del d["num_experts"], d["experts_per_token"]
    d.update(change)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_file(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'config.json'}: ") and needle in message
    assert "\n" not in message


def test_original_flavour_bounds_its_context_factor() -> None:
    with pytest.raises(ConfigError, match="rope_scaling_factor=1e"):
        ModelConfig.from_dict(dict(ORIGINAL_20B, rope_scaling_factor=1e308))


def test_released_extremes_are_inside_the_bounds() -> None:
    """The 120b's 128 experts and top-1 / all-experts routing are valid configurations."""
    for k in (1, 128):
        d = dict(ORIGINAL_20B, num_experts=128, experts_per_token=k, num_hidden_layers=36)
        assert ModelConfig.from_dict(d).num_experts_per_tok == k
