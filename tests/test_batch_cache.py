"""Batched decode (BatchCache) against the oracle of each sequence decoding on its own caches
(the per-sequence forward, itself checked against transformers in test_model_parity.py).

Sequences of 3..60 prompt tokens straddle the sliding window (16); with a small slack their
sliding layers drop positions while they decode, so every path of the batch's bookkeeping runs:
rows join (longer or shorter than the batch) and leave between steps, are reordered, extracted
and continued on their own, trimmed.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from gptoss_mlx.convert.synthetic import tiny_config, write_checkpoint
from gptoss_mlx.model.batch_cache import BatchCache, BatchSlidingKVCache
from gptoss_mlx.model.cache import (
    COMPACT_STEP,
    DEFAULT_SLACK,
    GROW_STEP,
    KVCache,
    LayerCache,
    SlidingKVCache,
    trim_to,
    trimmable,
)
from gptoss_mlx.model.loader import load_model

VOCAB = 1000
WINDOW = 16
SLACK, STEP = 4, 3  # small: sliding layers drop positions (and compact) within a few steps
TOL = 1e-4
PROMPTS = [3, 9, 15, 16, 17, 31, 47, 60]  # prompt lengths, around and beyond the window
JOIN = [0, 0, 0, 2, 5, 5, 9, 14]  # the batch step at which each sequence joins
STEPS = [20, 30, 12, 25, 18, 30, 21, 16]  # decode steps each sequence runs in the batch


def write_model(root: Path, **shape: int) -> Path:
    return write_checkpoint(root, tiny_config(vocab_size=VOCAB, sliding_window=WINDOW, **shape),
                            layout="hf", seed=7)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    return load_model(write_model(tmp_path_factory.mktemp("batch")), dtype="float32",
                      experts="mlx")


def tokens(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, VOCAB, size=n).tolist()


def prefilled(model, prompt: list[int], slack: int = SLACK, step: int = STEP,
              chunk: int = 7) -> list[LayerCache]:
    """The sequence's own caches after its prompt, fed in chunks (as the scheduler does)."""
    cache = model.make_cache(slack, step)
    for i in range(0, len(prompt), chunk):
        mx.eval(model(mx.array([prompt[i:i + chunk]]), cache=cache, last_only=True))
    return cache


def decode_solo(model, cache: list[LayerCache], feed: list[int]) -> list[np.ndarray]:
    """Logits [V] of each token of `feed`, one step at a time on the sequence's own caches."""
    out = []
    for t in feed:
        out.append(np.array(model(mx.array([[t]]), cache=cache, last_only=True)[0, -1]))
    return out


def assert_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= TOL, f"{what}: relative logit error {err:.2e}"


def run_schedule(model, slack: int, step: int) -> BatchCache:
    """Decode the PROMPTS in one batch along JOIN/STEPS and compare every row's logits at every
    step with the sequence decoding alone (and each step's masks with the rows' positions);
    rows that finish leave (the rest kept reversed)."""
    n = len(PROMPTS)
    prompts = [tokens(i, p) for i, p in enumerate(PROMPTS)]
    feeds = [tokens(100 + i, s) for i, s in enumerate(STEPS)]
    want = [decode_solo(model, prefilled(model, p, slack, step, chunk=64), f)
            for p, f in zip(prompts, feeds, strict=True)]
    batch = BatchCache(model)
    rows: list[int] = []  # the sequence in each row
    done = [0] * n  # steps each sequence ran
    g = 0
    while g <= max(JOIN) or rows:
        for i in range(n):
            if JOIN[i] == g:
                assert batch.add(prefilled(model, prompts[i], slack, step)) == len(rows)
                rows.append(i)
        assert batch.offsets == [PROMPTS[i] + done[i] for i in rows]
        check_masks(batch, [PROMPTS[i] + done[i] for i in rows])
        logits = model(mx.array([[feeds[i][done[i]]] for i in rows]), cache=batch,
                       last_only=True)
        mx.eval(logits, batch.state)
        for layer in batch:  # memory stays bounded as for the rows' own caches
            bound = (WINDOW + slack + 2 * step if isinstance(layer, BatchSlidingKVCache)
                     else (max(batch.offsets) // GROW_STEP + 1) * GROW_STEP)
            assert layer.keys.shape[2] <= bound
        for r, i in enumerate(rows):
            assert_close(np.array(logits[r, -1]), want[i][done[i]], f"seq {i} step {done[i]}")
            done[i] += 1
        going = [r for r, i in enumerate(rows) if done[i] < STEPS[i]][::-1]
        if len(going) < len(rows):
            batch.keep(going)
            rows = [rows[r] for r in going]
        g += 1
    assert done == STEPS
    return batch


def check_masks(batch: BatchCache, offsets: list[int]) -> None:
    """Each layer's mask lets each row's new query see exactly its last `offset` positions
    (full layers) or min(offset, window - 1) (sliding), and itself, among the keys the step
    reads (the last ones of the buffer, right-aligned)."""
    for layer in batch:
        mask = layer.make_mask(1)
        sliding = isinstance(layer, BatchSlidingKVCache)
        n = min(layer.idx + 1, WINDOW) if sliding else layer.idx + 1
        got = np.ones((len(offsets), n), bool) if mask is None else np.array(mask).reshape(-1, n)
        seen = [(min(o, WINDOW - 1) if sliding else o) + 1 for o in offsets]
        want = np.arange(n)[None, :] >= n - np.array(seen)[:, None]
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(("slack", "step"), [(SLACK, STEP), (DEFAULT_SLACK, COMPACT_STEP)])
def test_batched_decode_equals_each_sequence_alone(model, slack: int, step: int) -> None:
    batch = run_schedule(model, slack, step)
    assert batch.size == 0 and batch.nbytes == 0


def test_extracted_rows_continue_and_trim_as_their_own_caches(model) -> None:
    prompts = [tokens(10 + i, p) for i, p in enumerate([5, 22, 58])]
    steps = 25
    feeds = [tokens(20 + i, steps) for i in range(3)]
    own = [prefilled(model, p) for p in prompts]
    batch = BatchCache(model)
    for p in prompts:
        batch.add(prefilled(model, p))
    for s in range(steps):
        mx.eval(model(mx.array([[f[s]] for f in feeds]), cache=batch, last_only=True),
                batch.state)
    for cache, f in zip(own, feeds, strict=True):
        decode_solo(model, cache, f)
    more = tokens(30, 6)
    for r in range(3):
        got = batch.extract(r)
        # the same caches as the sequence's own: kinds, positions held, buffer sizes, contents
        assert [type(c) for c in got] == [type(c) for c in own[r]]
        for g, w in zip(got, own[r], strict=True):
            assert (g.offset, g.trimmable, g.keys.shape) == (w.offset, w.trimmable, w.keys.shape)
            if isinstance(w, SlidingKVCache):
                assert (g.start, g.window, g.slack, g.compact_step) == \
                    (w.start, w.window, w.slack, w.compact_step)
            np.testing.assert_allclose(np.array(g.keys[..., :g.offset - getattr(g, "start", 0), :]),
                                       np.array(w.keys[..., :w.offset - getattr(w, "start", 0), :]),
                                       rtol=1e-5, atol=1e-5)
        assert any(isinstance(w, SlidingKVCache) and w.start > 0 for w in own[r])
        # continuing on the extracted caches equals continuing on the sequence's own
        for g, w in zip(decode_solo(model, got, more), decode_solo(model, own[r], more),
                        strict=True):
            assert_close(g, w, f"row {r} after extract")
        # and they trim as far, then continue alike
        back = trimmable(own[r])
        assert trimmable(got) == back < got[0].offset
        assert not trim_to(got, got[0].offset - back - 1)
        assert trim_to(got, got[0].offset - back) and trim_to(own[r], own[r][0].offset - back)
        for g, w in zip(decode_solo(model, got, more), decode_solo(model, own[r], more),
                        strict=True):
            assert_close(g, w, f"row {r} after trim")
    assert batch.offsets == [len(p) + steps for p in prompts]  # extract leaves the batch alone


def test_a_lone_row_or_equal_rows_need_no_mask(model) -> None:
    """B=1 (and rows of equal length) decode without any mask, as on the sequence's own
    caches, also once its sliding layers dropped positions."""
    for count in (1, 3):
        batch = BatchCache(model)
        for i in range(count):
            batch.add(prefilled(model, tokens(40 + i, 20)))
        for s in range(30):
            assert all(layer.make_mask(1) is None for layer in batch)
            mx.eval(model(mx.array([[s]] * count), cache=batch, last_only=True), batch.state)


def test_keep_frees_the_dropped_rows_and_common_padding(model) -> None:
    batch = BatchCache(model)
    for n in (300, 5, 9):  # the long row makes every row's full-layer buffers 512 columns
        batch.add(prefilled(model, tokens(n, n), chunk=64))
    assert all(layer.keys.shape[2] == 2 * GROW_STEP for layer in batch if layer.window is None)
    full = batch.nbytes
    batch.keep([2, 1])  # the long row leaves: the others' common left padding goes too
    assert batch.offsets == [9, 5] and batch.nbytes < full * 2 / 3
    assert all(layer.idx == 9 for layer in batch)
    assert all(layer.keys.shape[2] == GROW_STEP for layer in batch if layer.window is None)
    batch.keep([])
    assert batch.size == 0 and batch.nbytes == 0 and batch.offsets == []


def test_bad_rows_and_caches_are_refused(model) -> None:
    batch = BatchCache(model)
    cache = prefilled(model, tokens(1, 5))
    batch.add(cache)
    for bad in ([1], [-1], [0.0], [True]):
        with pytest.raises(IndexError, match="not in the batch"):
            batch.keep(bad)
    with pytest.raises(ValueError, match="distinct"):
        batch.keep([0, 0])
    with pytest.raises(IndexError, match="not in the batch"):
        batch.extract(1)
    with pytest.raises(ValueError, match="caches for 3 layers, the model 4"):
        batch.add(cache[:3])
    with pytest.raises(ValueError, match="layer 0 of the sequence is a KVCache"):
        batch.add([KVCache(), *cache[1:]])
    with pytest.raises(ValueError, match="window 8, the model 16"):
        batch.add([SlidingKVCache(8, SLACK, STEP), *cache[1:]])
    mixed = prefilled(model, tokens(2, 6))
    with pytest.raises(ValueError, match="different numbers of tokens"):
        batch.add([mixed[0], *cache[1:]])
    half = [c for c in model.make_cache()]
    x = mx.zeros((1, 2, 5, 16), dtype=mx.float16)
    for c in half:
        c.update_and_fetch(x, x)
    with pytest.raises(ValueError, match="float32 keys, the sequence .*float16"):
        batch.add(half)
    with pytest.raises(ValueError, match="one token per row per step"):
        model(mx.array([[1, 2]]), cache=batch)
    assert batch.size == 1 and batch.offsets == [5]  # nothing refused was half-done


def test_real_dims_batched_decode_equals_solo(tmp_path: Path) -> None:
    """The released attention shapes: hidden size 2880, 64 query heads of 64, 8 kv heads; 2
    layers (one sliding, one full); small experts (their real shapes are test_experts.py's)."""
    path = write_model(tmp_path, hidden_size=2880, intermediate_size=256, head_dim=64,
                       num_attention_heads=64, num_key_value_heads=8, num_local_experts=4,
                       num_experts_per_tok=2, num_hidden_layers=2)
    model = load_model(path, dtype="float32", experts="mlx")
    prompts = [tokens(50 + i, n) for i, n in enumerate([4, 19, 33])]
    feeds = [tokens(60 + i, 3) for i in range(3)]
    own = [prefilled(model, p, chunk=64) for p in prompts]
    batch = BatchCache(model)
    for cache in own:
        batch.add(cache)
    want = [decode_solo(model, cache, f) for cache, f in zip(own, feeds, strict=True)]
    for s in range(3):
        logits = model(mx.array([[f[s]] for f in feeds]), cache=batch, last_only=True)
        for r in range(3):
            assert_close(np.array(logits[r, -1]), want[r][s], f"row {r} step {s}")


@pytest.mark.skipif(shutil.which("g++") is None, reason="the MSL emulator needs g++")
def test_batched_decode_on_emulated_metal_kernels_equals_solo(tmp_path: Path) -> None:
    """The Metal experts backend (run by the CPU MSL emulator) takes a step's B rows as N = B
    tokens through its decode GEMVs, and batched decode on it equals each sequence alone."""
    from msl_emulator import make_factory

    from gptoss_mlx.kernels.moe import DECODE_MAX_TOKENS
    from gptoss_mlx.kernels.moe import moe as kernels_moe

    ran: list[str] = []
    factory = make_factory("random", seed=2)

    def recording(name: str, *args, **kwargs):
        kernel = factory(name, *args, **kwargs)

        def call(*a, **k):
            ran.append(name)
            return kernel(*a, **k)
        return call

    path = write_model(tmp_path, num_hidden_layers=2, intermediate_size=96, num_local_experts=5)
    model = load_model(path, dtype="float32", experts="mlx")
    lengths = [3, 20, 9, 40, 17, 1, 12, 33, 25, 6, 14, 50, 2, 8, 30, 19]
    assert len(lengths) == DECODE_MAX_TOKENS
    prompts = [tokens(70 + i, n) for i, n in enumerate(lengths)]
    feeds = [tokens(90 + i, 2) for i in range(len(lengths))]
    own = [prefilled(model, p) for p in prompts]  # prompts on the portable experts (faster)
    batch = BatchCache(model)
    for cache in own:
        batch.add(cache)
    model.set_experts(functools.partial(kernels_moe, kernel_factory=recording), "emulated")
    want = [decode_solo(model, cache, f) for cache, f in zip(own, feeds, strict=True)]
    for s in range(2):
        ran.clear()
        logits = model(mx.array([[f[s]] for f in feeds]), cache=batch, last_only=True)
        mx.eval(logits)
        assert ran and all(name.endswith("_gemv") for name in ran), ran
        for r in range(len(lengths)):
            assert_close(np.array(logits[r, -1]), want[r][s], f"row {r} step {s}")


def test_a_row_with_empty_caches_starts_at_position_zero(model) -> None:
    """A sequence added before any token (fresh caches) decodes from position 0 beside rows
    that hold many, as it would alone."""
    feed = tokens(80, 20)
    want = decode_solo(model, model.make_cache(SLACK, STEP), feed)
    batch = BatchCache(model)
    batch.add(prefilled(model, tokens(81, 40)))
    batch.add(model.make_cache(SLACK, STEP))
    assert batch.offsets == [40, 0]
    for s, t in enumerate(feed):
        logits = model(mx.array([[1], [t]]), cache=batch, last_only=True)
        assert_close(np.array(logits[1, -1]), want[s], f"step {s}")
