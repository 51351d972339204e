"""Synthetic checkpoints: presets equal the released configs, tensors have the released shapes,
and the two layouts hold the same weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from gptoss_mlx.cli import main
from gptoss_mlx.config import ModelConfig
from gptoss_mlx.convert.layout import hf_specs, original_specs
from gptoss_mlx.convert.synthetic import preset_config

# Released keys that describe training or runtime switches, not the model: a preset may omit them.
NOT_MODEL_KEYS = {"attention_dropout", "initializer_range", "output_router_logits",
                  "router_aux_loss_coef", "transformers_version", "use_cache"}


@pytest.mark.parametrize("name", ["20b", "120b"])
def test_presets_equal_the_released_configs(shared_dir: Path, name: str) -> None:
    released = json.loads((shared_dir / "configs" / f"gpt-oss-{name}.json").read_text())
    preset = preset_config(name)
    assert ModelConfig.from_dict(preset) == ModelConfig.from_dict(released)
    assert set(released) - set(preset) <= NOT_MODEL_KEYS
    for key, value in preset.items():
        assert released.get(key) == value, key


def weights_of(specs) -> int:
    """Weights a layout stores: two per MXFP4 block byte, one per bf16 value, no scales."""
    return sum(math.prod(s.shape) * (2 if s.name.endswith(("_blocks", ".blocks")) else 1)
               for s in specs if not s.name.endswith(("_scales", ".scales")))


@pytest.mark.parametrize("name,billions", [("20b", 20.91), ("120b", 116.83)])
def test_preset_shapes_are_the_released_ones(name: str, billions: float) -> None:
    cfg = ModelConfig.from_dict(preset_config(name))
    specs = {s.name: s for s in hf_specs(cfg)}
    E = cfg.num_local_experts
    p = "model.layers.0."
    assert specs[p + "self_attn.q_proj.weight"].shape == (4096, 2880)
    assert specs[p + "self_attn.k_proj.weight"].shape == (512, 2880)
    assert specs[p + "self_attn.o_proj.weight"].shape == (2880, 4096)
    assert specs[p + "mlp.experts.gate_up_proj_blocks"].shape == (E, 5760, 90, 16)
    assert specs[p + "mlp.experts.gate_up_proj_scales"].shape == (E, 5760, 90)
    assert specs[p + "mlp.experts.down_proj_blocks"].shape == (E, 2880, 90, 16)
    assert specs["lm_head.weight"].shape == (201088, 2880)
    # The model cards' parameter counts (20.9B and 116.8B).
    assert weights_of(specs.values()) / 1e9 == pytest.approx(billions, abs=0.01)
    assert weights_of(original_specs(cfg)) == weights_of(specs.values())


def read(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_synthesize_command_both_layouts(tmp_path: Path, vocab_path: Path) -> None:
    dst = tmp_path / "ck"
    runner = CliRunner()
    result = runner.invoke(main, ["synthesize", str(dst), "--layout", "both", "--seed", "3",
                                  "--vocab", str(vocab_path)])
    assert result.exit_code == 0, result.output
    cfg = ModelConfig.from_file(dst)
    assert ModelConfig.from_file(dst / "original") == cfg
    # The release's file set: tokenizer and generation files, no o200k_base.tiktoken.
    assert sorted(p.name for p in dst.iterdir() if not p.name.endswith(".safetensors")) == [
        "chat_template.jinja", "config.json", "generation_config.json",
        "model.safetensors.index.json",
        "original", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]

    hf, orig = read(dst), read(dst / "original")
    assert {k: (str(v.dtype), tuple(v.shape)) for k, v in hf.items()} == {
        s.name: ({"BF16": "torch.bfloat16", "U8": "torch.uint8"}[s.dtype], s.shape)
        for s in hf_specs(cfg)}
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    for i in range(cfg.num_hidden_layers):
        qkv = orig[f"block.{i}.attn.qkv.weight"]
        for name, rows in (("q", qkv[:q]), ("k", qkv[q:q + kv]), ("v", qkv[q + kv:])):
            assert torch.equal(rows, hf[f"model.layers.{i}.self_attn.{name}_proj.weight"])
        assert torch.equal(orig[f"block.{i}.mlp.mlp1_weight.blocks"],
                           hf[f"model.layers.{i}.mlp.experts.gate_up_proj_blocks"])
        assert torch.equal(orig[f"block.{i}.mlp.mlp2_bias"],
                           hf[f"model.layers.{i}.mlp.experts.down_proj_bias"])
    assert torch.equal(orig["unembedding.weight"], hf["lm_head.weight"])

    # The same seed gives the same weights; another seed different ones; DST is never clobbered.
    vocab = ["--vocab", str(vocab_path)]
    again = runner.invoke(main, ["synthesize", str(tmp_path / "again"), "--seed", "3", *vocab])
    other = runner.invoke(main, ["synthesize", str(tmp_path / "other"), "--seed", "4", *vocab])
    assert again.exit_code == 0 and other.exit_code == 0
    w = "model.layers.1.mlp.router.weight"
    assert torch.equal(read(tmp_path / "again")[w], hf[w])
    assert not torch.equal(read(tmp_path / "other")[w], hf[w])
    refused = runner.invoke(main, ["synthesize", str(dst), *vocab])
    assert refused.exit_code != 0 and "already exists" in refused.output
    assert (dst / "original" / "model.safetensors").is_file()


def test_magnitudes_are_realistic(tiny_checkpoint: Path) -> None:
    """Dequantized expert weights have a standard deviation near 1/sqrt(fan_in)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    t = read(tiny_checkpoint)
    p = "model.layers.0.mlp.experts.down_proj_"
    w = convert_moe_packed_tensors(t[p + "blocks"], t[p + "scales"], dtype=torch.float32)
    fan_in = t[p + "blocks"].shape[2] * 32
    assert 0.5 < float(w.std()) * math.sqrt(fan_in) < 2.0


def test_synthesize_unwritable_dst(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   vocab_path: Path) -> None:
    """A DST under a file, or a write that fails (disk full): one Error line, nothing left."""
    import errno

    from gptoss_mlx.convert import safetensors_io

    (tmp_path / "afile").write_text("")
    vocab = ["--vocab", str(vocab_path)]
    result = CliRunner().invoke(main, ["synthesize", str(tmp_path / "afile" / "ck"), *vocab])
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1 and len(errors) == 1 and "afile" in errors[0], result.output

    def full(out, data) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", out.name)

    monkeypatch.setattr(safetensors_io, "write_all", full)
    result = CliRunner().invoke(main, ["synthesize", str(tmp_path / "ck"), *vocab])
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1 and len(errors) == 1, result.output
    assert "No space left on device" in errors[0] and ".safetensors" in errors[0], errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_synthesize_refuses_a_vocabulary_that_is_not_o200k(tmp_path: Path) -> None:
    fake = tmp_path / "o200k_base.tiktoken"
    fake.write_text("aGVsbG8= 0\n")
    result = CliRunner().invoke(main, ["synthesize", str(tmp_path / "ck"), "--vocab", str(fake)])
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1 and len(errors) == 1, result.output
    assert "not the o200k_base vocabulary" in errors[0] and str(fake) in errors[0]
    assert not (tmp_path / "ck").exists()


def test_synthesize_without_a_vocabulary_offline(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """No --vocab and tiktoken cannot download: one line naming the remedy, nothing written."""
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # a closed port: offline
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(main, ["synthesize", str(tmp_path / "ck")])
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1 and len(errors) == 1, result.output
    assert "o200k_base" in errors[0] and "--vocab PATH" in errors[0]
    assert not (tmp_path / "ck").exists()
