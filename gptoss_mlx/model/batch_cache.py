"""The KV caches of a batch of sequences that decode together, one token per row per step.

    batch = BatchCache(model)
    row = batch.add(prompt_cache.layers)              # a sequence prefilled on its own caches
    logits = model(tokens_b1, cache=batch, last_only=True)   # tokens [B, 1]: one step for all
    batch.keep([0, 2])                                # rows that go on (the others are freed)
    layers = batch.extract(0)                         # a row back as per-sequence caches

Each layer holds keys/values [B, kv_heads, S, D] with every row right-aligned: row r's cached
positions sit in the last `have[r]` of the `idx` columns in use, the columns before them are
its left padding, masked out. A decode step writes every row's new key at column `idx`, so one
`scaled_dot_product_attention` serves the batch; each row keeps its own position (`.offset`,
an int32 array [B] that RoPE takes) and its mask (None while no row is padded within what the
step reads, so a lone row runs as fast as on its own caches).

Sliding layers follow, row by row, what the row's own `SlidingKVCache` would do: the same
positions count as held (`start`), so `extract` gives back a cache that trims exactly as far as
the one the row would have had on its own, and continues identically. The batch's buffer drops
columns no row holds any more, `compact_step` at a time or more, so it holds at most
`window + slack + 2 * compact_step` columns.

Only decode (one token per row) runs on a BatchCache: prompts are prefilled on per-sequence
caches (cache.py) and added.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import mlx.core as mx

from .cache import GROW_STEP, KVCache, LayerCache, Mask, SlidingKVCache


def _check_decode(t: int) -> None:
    if t != 1:
        raise ValueError(f"a BatchCache takes one token per row per step, got {t}: prefill "
                         "each sequence on its own caches, then add them")


class _BatchLayer:
    """One layer's buffers for every row; subclasses say how rows hold and drop positions."""

    window: int | None = None  # keys a query sees at most (None: all)

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.idx = 0  # columns in use; row r holds positions in columns [idx - have[r], idx)
        self.have: list[int] = []  # positions each row holds
        self.start: list[int] = []  # each row's first held position
        self.offset = mx.zeros((0,), dtype=mx.int32)  # each row's next position (RoPE offset)

    @property
    def offsets(self) -> list[int]:
        """Tokens each row has seen."""
        return [s + h for s, h in zip(self.start, self.have, strict=True)]

    @property
    def state(self) -> list[mx.array]:
        """The arrays a step leaves lazy (to `mx.eval` with the logits)."""
        arrays = [] if self.keys is None else [self.keys, self.values]
        return [*arrays, self.offset]

    @property
    def nbytes(self) -> int:
        """Bytes held by the key and value buffers."""
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def _capacity(self, used: int) -> int:
        """Buffer columns for `used` columns in use (room for at least one more)."""
        raise NotImplementedError

    def _advance(self) -> None:
        """Before a step: let each row drop what its own cache would drop (`have` shrinks)."""

    def _fetched(self) -> int:
        """How many columns the next step reads (the new one included)."""
        return self.idx + 1 if self.window is None else min(self.idx + 1, self.window)

    def make_mask(self, t: int) -> Mask:
        """The mask for this step's queries over what `update_and_fetch` will return:
        None when no row has padding there, else boolean [B, 1, 1, keys]."""
        _check_decode(t)
        n = self._fetched()
        pads = [max(0, n - 1 - h) for h in self.have]
        if not any(pads):
            return None
        mask = mx.arange(n)[None, :] >= mx.array(pads)[:, None]
        return mask.reshape(len(pads), 1, 1, n)

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Append one key/value per row (k, v [B, kv_heads, 1, D]); return the keys and values
        this step's queries attend over (see `make_mask`)."""
        _check_decode(k.shape[2])
        if k.shape[0] != len(self.have):
            raise ValueError(f"the batch has {len(self.have)} rows, the step {k.shape[0]}")
        n = self._fetched()
        self._advance()
        if self.keys is None or self.idx == self.keys.shape[2]:
            self._rebuild(list(range(len(self.have))), like=(k, v))
        self.keys[..., self.idx:self.idx + 1, :] = k
        self.values[..., self.idx:self.idx + 1, :] = v
        self.idx += 1
        self.have = [h + 1 for h in self.have]
        self.offset = self.offset + 1
        return self.keys[..., self.idx - n:self.idx, :], self.values[..., self.idx - n:self.idx, :]

    def _rebuild(self, rows: list[int], like: tuple[mx.array, mx.array],
                 new: tuple[mx.array | None, mx.array | None, int] | None = None) -> None:
        """New right-aligned buffers holding `rows` (in that order), then the `new` row
        (keys, values [1, kv, have, D] or None, have) if given; columns no row holds are
        dropped."""
        haves = [self.have[r] for r in rows] + ([new[2]] if new is not None else [])
        used = max(haves, default=0)
        if not haves:
            self.keys = self.values = None
        else:
            old_used = max((self.have[r] for r in rows), default=0)
            buffers = []
            for i, (ref, old) in enumerate(zip(like, (self.keys, self.values), strict=True)):
                _, heads, _, dim = ref.shape
                buf = mx.zeros((len(haves), heads, self._capacity(used), dim), dtype=ref.dtype)
                if old is not None and old_used:
                    cols = old[..., self.idx - old_used:self.idx, :]
                    if rows != list(range(old.shape[0])):
                        cols = mx.take(cols, mx.array(rows), axis=0)
                    buf[:len(rows), :, used - old_used:used, :] = cols
                if new is not None and new[2]:
                    buf[len(rows):, :, used - new[2]:used, :] = new[i]
                buffers.append(buf)
            self.keys, self.values = buffers
        self.idx = used

    def _set_rows(self, have: list[int], start: list[int]) -> None:
        self.have, self.start = have, start
        self.offset = mx.array(self.offsets, dtype=mx.int32)

    def add_row(self, keys: mx.array | None, values: mx.array | None, have: int,
                start: int) -> None:
        """Append a row holding positions [start, start + have) in keys/values[..., :have, :]."""
        like = (self.keys, self.values) if self.keys is not None else (keys, values)
        rows = list(range(len(self.have)))
        if like[0] is not None:
            if keys is not None:
                keys, values = keys[..., :have, :], values[..., :have, :]
            self._rebuild(rows, like, (keys, values, have))
        self._set_rows(self.have + [have], self.start + [start])

    def keep(self, rows: list[int]) -> None:
        """Keep these rows in this order."""
        if rows == list(range(len(self.have))) and max(self.have, default=0) == self.idx:
            return  # nothing to drop
        if self.keys is not None:
            self._rebuild(rows, (self.keys, self.values))
        self._set_rows([self.have[r] for r in rows], [self.start[r] for r in rows])

    def _row(self, row: int) -> tuple[mx.array | None, mx.array | None]:
        """Row `row`'s held keys and values [1, kv, have, D] (None when it holds none)."""
        h = self.have[row]
        if self.keys is None or not h:
            return None, None
        cols = slice(self.idx - h, self.idx)
        return self.keys[row:row + 1, :, cols, :], self.values[row:row + 1, :, cols, :]

    @staticmethod
    def _fill(cache: LayerCache, keys: mx.array | None, values: mx.array | None,
              size: int) -> None:
        """Give `cache` buffers of `size` columns starting with keys/values."""
        if keys is None or not size:
            return
        shape = (1, keys.shape[1], size, keys.shape[3])
        cache.keys = mx.zeros(shape, dtype=keys.dtype)
        cache.values = mx.zeros(shape, dtype=values.dtype)
        cache.keys[..., :keys.shape[2], :] = keys
        cache.values[..., :keys.shape[2], :] = values


class BatchKVCache(_BatchLayer):
    """A full-attention layer: every row holds all its positions."""

    def _capacity(self, used: int) -> int:
        return (used // GROW_STEP + 1) * GROW_STEP

    def add(self, cache: KVCache) -> None:
        """Append a row equal to `cache`."""
        self.add_row(cache.keys, cache.values, cache.offset, 0)

    def extract(self, row: int) -> KVCache:
        """Row `row` as the KVCache it would be on its own (same buffer size rule)."""
        out = KVCache()
        out.offset = self.have[row]
        self._fill(out, *self._row(row), -(-out.offset // GROW_STEP) * GROW_STEP)
        return out


class BatchSlidingKVCache(_BatchLayer):
    """A sliding-window layer: each row holds and drops positions as its own SlidingKVCache
    would (same `start` and buffer length `size`), with that cache's slack and compact step."""

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window
        self.slack: list[int] = []
        self.compact_step: list[int] = []
        self.size: list[int] = []  # each row's own buffer length (0: none yet)

    def _capacity(self, used: int) -> int:
        # The longest buffer a row's own cache has (at most window + slack + compact_step,
        # >= used), plus compact_step: columns are dropped at most every compact_step steps.
        own = [self.window + s + c for s, c in zip(self.slack, self.compact_step, strict=True)]
        return max(used, *self.size, *own) + max(self.compact_step, default=1)

    def _advance(self) -> None:
        # SlidingKVCache.update_and_fetch for one token: a full buffer is reallocated with
        # the last `window + slack - 1` positions (and the new one), `compact_step` to spare.
        for r, (h, n) in enumerate(zip(self.have, self.size, strict=True)):
            if h + 1 > n:
                keep = self.window + self.slack[r]
                kept = max(0, min(h, keep - 1))
                self.start[r] += h - kept
                self.have[r] = kept
                self.size[r] = keep + self.compact_step[r]

    def add(self, cache: SlidingKVCache) -> None:
        """Append a row equal to `cache`."""
        size = 0 if cache.keys is None else cache.keys.shape[2]
        self.slack.append(cache.slack)
        self.compact_step.append(cache.compact_step)
        self.size.append(size)
        self.add_row(cache.keys, cache.values, cache.offset - cache.start, cache.start)

    def keep(self, rows: list[int]) -> None:
        for name in ("slack", "compact_step", "size"):
            values = getattr(self, name)
            setattr(self, name, [values[r] for r in rows])
        super().keep(rows)

    def extract(self, row: int) -> SlidingKVCache:
        """Row `row` as the SlidingKVCache it would be on its own."""
        out = SlidingKVCache(self.window, self.slack[row], self.compact_step[row])
        out.start, out.offset = self.start[row], self.start[row] + self.have[row]
        self._fill(out, *self._row(row), self.size[row])
        return out


BatchLayer = BatchKVCache | BatchSlidingKVCache


class BatchCache:
    """The per-layer caches of a batch of sequences decoding together (rows right-aligned).

    `model(tokens [B, 1], cache=batch, last_only=True)` runs one decode step for every row.
    """

    def __init__(self, model: Any) -> None:
        cfg = model.config
        self.layers: list[BatchLayer] = [
            BatchSlidingKVCache(cfg.sliding_window) if s else BatchKVCache()
            for s in cfg.sliding_layers]

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> BatchLayer:
        return self.layers[i]

    def __iter__(self) -> Iterator[BatchLayer]:
        return iter(self.layers)

    @property
    def size(self) -> int:
        """Rows in the batch."""
        return len(self.layers[0].have) if self.layers else 0

    @property
    def offsets(self) -> list[int]:
        """Tokens each row holds."""
        return self.layers[0].offsets if self.layers else []

    @property
    def nbytes(self) -> int:
        """Bytes held by the key/value buffers."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def state(self) -> list[mx.array]:
        """Every array a step leaves lazy."""
        return [a for layer in self.layers for a in layer.state]

    def add(self, layers: Sequence[LayerCache]) -> int:
        """Append a sequence whose per-sequence caches (one per layer, prefilled) hold its
        tokens; returns its row. The caches are not changed and may be dropped afterwards."""
        self._check(layers)
        for batch_layer, cache in zip(self.layers, layers, strict=True):
            batch_layer.add(cache)
        return self.size - 1

    def keep(self, rows: Sequence[int]) -> None:
        """Keep these rows, in this order; the others are dropped and their memory freed."""
        rows = [self._row(r) for r in rows]
        if len(set(rows)) != len(rows):
            raise ValueError(f"rows to keep must be distinct, got {rows}")
        for layer in self.layers:
            layer.keep(rows)

    def extract(self, row: int) -> list[LayerCache]:
        """Row `row` as per-sequence caches (as its own caches would be now); the batch keeps it."""
        row = self._row(row)
        caches = [layer.extract(row) for layer in self.layers]
        mx.eval([c.state for c in caches])  # copies now: nothing of the batch stays referenced
        return caches

    def _row(self, row: int) -> int:
        if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < self.size:
            raise IndexError(f"row {row!r} is not in the batch (rows 0..{self.size - 1})")
        return row

    def _check(self, layers: Sequence[LayerCache]) -> None:
        if len(layers) != len(self.layers):
            raise ValueError(f"the sequence has caches for {len(layers)} layers, "
                             f"the model {len(self.layers)}")
        for i, (batch_layer, cache) in enumerate(zip(self.layers, layers, strict=True)):
            kind = SlidingKVCache if isinstance(batch_layer, BatchSlidingKVCache) else KVCache
            if type(cache) is not kind:
                raise ValueError(f"layer {i} of the sequence is a {type(cache).__name__}, "
                                 f"the model's needs a {kind.__name__}")
            if kind is SlidingKVCache and cache.window != batch_layer.window:
                raise ValueError(f"layer {i} of the sequence has window {cache.window}, "
                                 f"the model {batch_layer.window}")
            if (batch_layer.keys is not None and cache.keys is not None
                    and cache.keys.dtype != batch_layer.keys.dtype):
                raise ValueError(f"the batch holds {batch_layer.keys.dtype} keys, the sequence "
                                 f"{cache.keys.dtype}")
        if len({c.offset for c in layers}) > 1:
            raise ValueError("the sequence's layers hold different numbers of tokens: "
                             f"{sorted({c.offset for c in layers})}")
        sliding = {(c.start, c.slack, c.compact_step, None if c.keys is None else c.keys.shape)
                   for c in layers if isinstance(c, SlidingKVCache)}
        if len(sliding) > 1:
            raise ValueError("the sequence's sliding layers disagree on what they hold "
                             "(start, slack, compact_step or buffer size)")
