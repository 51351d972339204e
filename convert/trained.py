"""Random checkpoints whose dense weights were trained, so their logits are peaked.

An untrained model's logits are nearly tied: over a 201k vocabulary the top-1 lead is about a
sixth of their standard deviation, so any perturbation (8-bit weights, even bf16 instead of
float32 activations) flips a good share of its argmaxes, which says nothing about a real model.
`train_dense` fits a random checkpoint's attention, router, norms, embedding and lm_head to a
`SuccessorLanguage` (each token has a likely and a less likely successor), leaving
the MXFP4 experts as written, and saves the result in the same released layout.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from tqdm import tqdm


@dataclass(frozen=True)
class SuccessorLanguage:
    """Token ids `0..size-1`; after token t comes `successors[t, i]` with probability
    `probs[i]`, else (probability `1 - sum(probs)`) a uniformly random token."""

    successors: np.ndarray  # [size, len(probs)]: distinct successors of each token
    probs: tuple[float, ...]

    @classmethod
    def random(cls, size: int = 256, probs: tuple[float, ...] = (0.6, 0.3),
               seed: int = 0) -> SuccessorLanguage:
        first = np.random.default_rng(seed).permutation(size)
        return cls(np.stack([np.roll(first, i) for i in range(len(probs))], axis=1), probs)

    @property
    def size(self) -> int:
        return len(self.successors)

    def sample(self, batch: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """`batch` sequences of `length` token ids."""
        out = np.empty((batch, length), dtype=np.int32)
        out[:, 0] = rng.integers(0, self.size, batch)
        bounds = np.cumsum(self.probs)
        for t in range(1, length):
            rank = np.searchsorted(bounds, rng.random(batch), side="right")
            follow = self.successors[out[:, t - 1], np.minimum(rank, len(self.probs) - 1)]
            out[:, t] = np.where(rank < len(self.probs), follow, rng.integers(0, self.size, batch))
        return out


def train_dense(src: str | Path, dst: str | Path, language: SuccessorLanguage, steps: int = 300,
                batch: int = 8, length: int = 17, learning_rate: float = 3e-3, seed: int = 0,
                progress: bool = False) -> Path:
    """Copy the Hugging Face layout checkpoint `src` to `dst` with its dense weights trained on
    `language` (next-token cross-entropy, AdamW, float32); experts are left as they were."""
    from mlx_lm.utils import load_model

    from .converter import convert

    src, dst = Path(src), Path(dst)
    with tempfile.TemporaryDirectory() as tmp:
        convert(src, Path(tmp) / "mlx", progress=False)  # mlx-lm's names: the HF dense names
        model, _ = load_model(Path(tmp) / "mlx")
    model.set_dtype(mx.float32)
    model.apply_to_modules(lambda name, m: m.freeze() if name.endswith(".experts") else None)

    def loss_fn(m: nn.Module, x: mx.array) -> mx.array:
        return nn.losses.cross_entropy(m(x[:, :-1]), x[:, 1:], reduction="mean")

    step_fn = nn.value_and_grad(model, loss_fn)
    opt = optim.AdamW(learning_rate=learning_rate, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    bar = tqdm(range(steps), desc="training dense weights", disable=not progress, file=sys.stderr)
    for _ in bar:
        loss, grads = step_fn(model, mx.array(language.sample(batch, length, rng)))
        opt.update(model, grads)
        mx.eval(loss, model.parameters(), opt.state)
        bar.set_postfix(loss=f"{loss.item():.3f}")

    trained = {k: v.astype(mx.bfloat16) for k, v in tree_flatten(model.trainable_parameters())}
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("original"))  # HF layout only
    for file in sorted(dst.glob("*.safetensors")):
        tensors = mx.load(str(file))
        hits = trained.keys() & tensors.keys()
        if hits:
            tensors.update({k: trained.pop(k) for k in hits})
            mx.save_safetensors(str(file), tensors, metadata={"format": "pt"})
    if trained:
        raise ValueError(f"{src}: no tensor for trained weights {sorted(trained)[:4]}")
    return dst
