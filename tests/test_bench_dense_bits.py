"""`convert --dense-bits 8` against the lossless folder: argmax agreement and bytes per token."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from gptoss_mlx import load
from gptoss_mlx.bench import LogitAgreement, bytes_per_token, random_prompt
from gptoss_mlx.config import ModelConfig
from gptoss_mlx.convert import convert
from gptoss_mlx.convert.synthetic import tiny_config, write_checkpoint
from gptoss_mlx.convert.trained import SuccessorLanguage, train_dense
from gptoss_mlx.memory import folder_specs, plan_memory

LANGUAGE = SuccessorLanguage.random(size=256, seed=0)


@pytest.fixture(scope="module")
def dense8_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("dense8") / "tiny8"
    convert(tiny_checkpoint, dst, dense_bits=8, progress=False)
    return dst


@pytest.fixture(scope="module")
def trained_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny random checkpoint whose dense weights were trained on a language where each token
    has a likely (0.6) and a less likely (0.3) successor, so that its top two logits are apart by
    about ln 2 as a real model's often are; converted lossless and with `--dense-bits 8`."""
    root = tmp_path_factory.mktemp("trained")
    random = write_checkpoint(root / "random", tiny_config(vocab_size=4096), seed=0)
    trained = train_dense(random, root / "ckpt", LANGUAGE, steps=300)
    convert(trained, root / "lossless", progress=False)
    convert(trained, root / "dense8", dense_bits=8, progress=False)
    return root / "lossless", root / "dense8"


def logits_of(folder: Path, tokens: mx.array) -> np.ndarray:
    model, _ = load(folder, experts="mlx")
    return np.array(model(tokens).astype(mx.float32))


def test_dense_bits_8_keeps_a_trained_models_argmax(trained_folders: tuple[Path, Path]) -> None:
    tokens = mx.array(LANGUAGE.sample(4, 128, np.random.default_rng(99)))  # held out
    lossless, dense = (logits_of(folder, tokens) for folder in trained_folders)
    # the model did learn the language (an untrained one picks the likelier successor at 1/256)
    learned = np.mean(lossless.argmax(-1) == LANGUAGE.successors[np.array(tokens), 0])
    agreement = LogitAgreement.of(lossless, dense)
    print(f"trained tiny model (its top token is the likelier successor at {learned:.1%} of "
          f"positions), 8-bit dense vs lossless: {agreement}")
    assert learned >= 0.7
    assert agreement.argmax >= 0.95


def test_dense_bits_8_keeps_a_random_models_decisive_argmax(tiny_model_dir: Path,
                                                            dense8_dir: Path) -> None:
    """An untrained model's logits are nearly tied (over 201k tokens the median top-1 lead is
    ~0.3 for a logit sd of 2): bf16 instead of float32 activations alone flip ~5% of its
    argmaxes. Where its lead is above 0.5, 8-bit dense weights must not flip any."""
    tokens = mx.array([random_prompt(256, seed=3)], dtype=mx.int32)
    lossless, dense = (logits_of(folder, tokens)[0] for folder in (tiny_model_dir, dense8_dir))
    two = np.sort(lossless, axis=-1)[:, -2:]
    decisive = two[:, 1] - two[:, 0] > 0.5
    same = lossless.argmax(-1) == dense.argmax(-1)
    print(f"random tiny model, 8-bit dense vs lossless: {LogitAgreement.of(lossless, dense)}; "
          f"{same[decisive].mean():.3f} where the lead > 0.5 ({decisive.mean():.0%} of positions)")
    assert decisive.sum() >= 20
    assert same[decisive].all()


def test_logit_agreement_counts_flips_and_kl() -> None:
    ref = np.log([[0.25, 0.75, 1e-9], [0.7, 0.2, 0.1]])
    other = np.log([[0.5 - 1e-9, 0.5, 1e-9], [0.1, 0.2, 0.7]])
    got = LogitAgreement.of(ref, other)
    assert got.argmax == 0.5 and got.top5 == 1.0
    kl = (0.25 * np.log(0.5) + 0.75 * np.log(1.5) + 0.7 * np.log(7) + 0.1 * np.log(1 / 7)) / 2
    assert got.kl == pytest.approx(kl, rel=1e-6)
    assert got.median_lead == pytest.approx((np.log(3) + np.log(3.5)) / 2)
    ref = np.array([[6.0, 5, 4, 3, 2, 1, 0], [6.0, 5, 4, 3, 2, 1, 0]])
    assert LogitAgreement.of(ref, ref[:, ::-1]).top5 == 0  # 7th of 7
    assert LogitAgreement.of(ref, ref[:, [2, 0, 1, 3, 4, 5, 6]]).top5 == 1  # 2nd of 7


def test_dense_bits_8_reads_fewer_bytes(tiny_model_dir: Path, dense8_dir: Path) -> None:
    cfg = ModelConfig.from_file(tiny_model_dir)
    lossless = bytes_per_token(cfg, folder_specs(tiny_model_dir))
    dense = bytes_per_token(cfg, folder_specs(dense8_dir))
    print(f"bytes per token: lossless {sum(lossless.values())}, 8-bit dense "
          f"{sum(dense.values())}")
    assert dense["experts"] == lossless["experts"]  # MXFP4 experts are never touched
    # 8-bit values plus a bf16 scale and bias per 64 inputs: (8 + 32 / 64) / 16 of bf16's bytes
    H = cfg.hidden_size
    assert dense["lm_head"] == cfg.vocab_size * (H + H // 64 * 4)
    assert lossless["lm_head"] == cfg.vocab_size * H * 2
    assert sum(dense.values()) < sum(lossless.values())
    # the memory plan reads the same headers: its estimate for --dense-bits 8 is what was written
    assert plan_memory(tiny_model_dir, 1024).with_dense_bits(8).weights_total == plan_memory(
        dense8_dir, 1024).weights_total
