"""Per-layer KV caches and the helpers generation and the server use to reuse them.

`model.make_cache()` returns one cache per layer: a `KVCache` (grows) on full-attention layers and
a `SlidingKVCache` (bounded) on sliding-window layers. Both have `.offset` (tokens seen),
`.trimmable` (how many of the last tokens `.trim` can drop) and `.trim(n) -> int`. Sequences
decoding together move theirs into one `batch_cache.BatchCache` and take them back from it.

The sliding cache keeps at least the last `window + slack` positions, in order, in one buffer
(rather than a ring, which would need a mask at every decode step over all its slots), so decode
reads the last `window` keys as one contiguous slice. While it holds every position it can trim
anything; once it has dropped old positions it can still trim `slack + 1` or more tokens (the
`window - 1` positions before the new end must remain). It drops old positions `compact_step`
(default `COMPACT_STEP`) at a time, so memory stays bounded by `window + slack + compact_step`
positions.

Helpers for callers holding the list of per-layer caches:
- `offset(cache)`: tokens the caches hold;
- `trimmable(cache)`: how many tokens can be dropped from the end;
- `trim_to(cache, n)`: keep exactly the first `n` tokens; False (and nothing changed) when some
  layer can no longer go back that far, so the caller prefills from scratch with a new cache;
- `nbytes(cache)`: bytes held by the key/value buffers.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

DEFAULT_SLACK = 1024  # positions a sliding cache keeps beyond its window, for trimming
COMPACT_STEP = 256  # a sliding cache drops old positions this many at a time
GROW_STEP = 256  # a full cache grows its buffers this many positions at a time

Mask = mx.array | str | None


def _alloc(like: mx.array, length: int) -> mx.array:
    b, h, _, d = like.shape
    return mx.zeros((b, h, length, d), dtype=like.dtype)


class _LayerBuffers:
    """Key and value buffers with `offset` tokens seen; subclasses say how far back `trim` goes."""

    keys: mx.array | None
    values: mx.array | None
    offset: int

    @property
    def trimmable(self) -> int:
        """How many of the last tokens `trim` can drop."""
        return self.offset

    def trim(self, n: int) -> int:
        """Drop up to `n` last tokens; returns how many were dropped."""
        n = max(0, min(n, self.trimmable))
        self.offset -= n
        return n

    @property
    def state(self) -> list[mx.array]:
        """The buffers (to `mx.eval` together with the logits)."""
        return [] if self.keys is None else [self.keys, self.values]

    @property
    def nbytes(self) -> int:
        """Bytes held by the key and value buffers."""
        return sum(a.nbytes for a in self.state)


class KVCache(_LayerBuffers):
    """The keys and values of a full-attention layer: every position, in buffers whose length
    is the smallest multiple of `GROW_STEP` that holds them (memory.py plans with that)."""

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Append k, v [B, kv_heads, T, D]; return all keys and values so far."""
        t = k.shape[2]
        end = self.offset + t
        if self.keys is None or end > self.keys.shape[2]:
            size = -(-end // GROW_STEP) * GROW_STEP
            new_k, new_v = _alloc(k, size), _alloc(v, size)
            if self.keys is not None and self.offset:
                new_k[..., : self.offset, :] = self.keys[..., : self.offset, :]
                new_v[..., : self.offset, :] = self.values[..., : self.offset, :]
            self.keys, self.values = new_k, new_v
        self.keys[..., self.offset:end, :] = k
        self.values[..., self.offset:end, :] = v
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def make_mask(self, t: int) -> Mask:
        """The attention mask for `t` new queries (causal, lower-right aligned)."""
        return "causal" if t > 1 else None


class SlidingKVCache(_LayerBuffers):
    """The keys and values of a sliding-window layer: the last `window + slack` positions (or more).

    Positions `[start, offset)` sit in order at buffer indices `[0, offset - start)`.
    """

    def __init__(self, window: int, slack: int = DEFAULT_SLACK,
                 compact_step: int = COMPACT_STEP) -> None:
        if window < 1 or slack < 0 or compact_step < 1:
            raise ValueError(f"window={window} and compact_step={compact_step} must be >= 1, "
                             f"slack={slack} >= 0")
        self.window = window
        self.slack = slack
        self.compact_step = compact_step
        self.keep = window + slack  # positions kept when compacting (the newest included)
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.start = 0
        self.offset = 0

    def _context(self) -> int:
        """How many cached positions the next query still sees (its window minus itself)."""
        return min(self.offset - self.start, self.window - 1)

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Append k, v [B, kv_heads, T, D]; return the last `window - 1` cached keys/values
        followed by the new ones (see `make_mask`)."""
        t = k.shape[2]
        have = self.offset - self.start
        m = self._context()
        fetched = (k, v)
        if t > 1 and m:  # a prompt chunk: its queries also see the cached window before it
            fetched = (mx.concatenate([self.keys[..., have - m:have, :], k], axis=2),
                       mx.concatenate([self.values[..., have - m:have, :], v], axis=2))
        capacity = self.keep + self.compact_step
        if self.keys is not None and have + t <= self.keys.shape[2]:
            self.keys[..., have:have + t, :] = k
            self.values[..., have:have + t, :] = v
        else:
            # (Re)allocate: keep the last `keep` positions of what we have plus the new ones.
            keep_old = max(0, min(have, self.keep - t))
            kept_new = min(t, self.keep)
            size = max(capacity, keep_old + kept_new)
            buf_k, buf_v = _alloc(k, size), _alloc(v, size)
            if keep_old:
                buf_k[..., :keep_old, :] = self.keys[..., have - keep_old:have, :]
                buf_v[..., :keep_old, :] = self.values[..., have - keep_old:have, :]
            buf_k[..., keep_old:keep_old + kept_new, :] = k[..., t - kept_new:, :]
            buf_v[..., keep_old:keep_old + kept_new, :] = v[..., t - kept_new:, :]
            self.keys, self.values = buf_k, buf_v
            self.start = self.offset + t - keep_old - kept_new
        self.offset += t
        if t > 1:
            return fetched
        have = self.offset - self.start
        return self.keys[..., have - m - 1:have, :], self.values[..., have - m - 1:have, :]

    def make_mask(self, t: int) -> Mask:
        """The attention mask for `t` new queries over what `update_and_fetch` will return."""
        return window_mask(t, self._context(), self.window)

    @property
    def trimmable(self) -> int:
        """How many of the last tokens `trim` can drop (all while nothing was dropped yet)."""
        if self.start == 0:
            return self.offset
        return max(0, self.offset - self.start - (self.window - 1))


LayerCache = KVCache | SlidingKVCache


def window_mask(t: int, m: int, window: int) -> Mask:
    """Mask for `t` queries at key indices `m .. m+t-1` over `m + t` keys, each query seeing
    itself and the `window - 1` keys before it. None or "causal" when that is all it takes."""
    if t == 1:
        return None
    if m + t <= window:
        return "causal"
    q = mx.arange(m, m + t)[:, None]
    kpos = mx.arange(m + t)[None, :]
    return (kpos <= q) & (kpos > q - window)


def offset(cache: Sequence[LayerCache]) -> int:
    """How many tokens the caches hold."""
    return cache[0].offset if cache else 0


def trimmable(cache: Sequence[LayerCache]) -> int:
    """How many tokens every layer can drop from the end."""
    return min((c.trimmable for c in cache), default=0)


def trim_to(cache: Sequence[LayerCache], n_tokens: int) -> bool:
    """Keep exactly the first `n_tokens` tokens in every layer.

    Returns False, changing nothing, when that is impossible (the caches hold fewer tokens, or a
    sliding layer already dropped positions the window after `n_tokens` needs): the caller then
    starts over with `model.make_cache()`.
    """
    if n_tokens < 0 or any(c.offset < n_tokens for c in cache):
        return False
    drop = [c.offset - n_tokens for c in cache]
    if any(d > c.trimmable for c, d in zip(cache, drop, strict=True)):
        return False
    for c, d in zip(cache, drop, strict=True):
        c.trim(d)
    return True


def nbytes(cache: Sequence[LayerCache]) -> int:
    """Bytes held by the caches' key/value buffers."""
    return sum(c.nbytes for c in cache)
