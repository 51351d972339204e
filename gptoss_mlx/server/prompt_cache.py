"""A few KV caches kept between requests, each picked by the longest shared token prefix.

Agents resend a growing history each turn; the cache holding the longest prefix of the new prompt
is reused (`gptoss_mlx.generate.stream` trims it to the common prefix and prefills only the rest).
Several slots let a few conversations alternate without evicting each other; the least recently
used free slot is recycled when no free slot shares anything with the prompt. A generation that
finds every slot busy gets a fresh cache of its own, dropped when it ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gptoss_mlx.generate import PromptCache, common_prefix


class PromptCachePool:
    """`slots` PromptCaches over one model; only the engine's worker thread may use it."""

    def __init__(self, model: Any, slots: int = 2):
        if slots < 1:
            raise ValueError(f"the prompt cache needs at least one slot, got {slots}")
        self._model = model
        self._slots: list[PromptCache] = [PromptCache(model) for _ in range(slots)]  # LRU first

    @property
    def size(self) -> int:
        """Number of slots."""
        return len(self._slots)

    def acquire(self, prompt: Sequence[int], busy: Sequence[PromptCache] = ()) -> PromptCache:
        """The free slot sharing the longest prefix with `prompt` (else the least recently used);
        a fresh cache outside the pool when every slot is in `busy` (used by other generations).
        """
        free = [c for c in self._slots if all(c is not b for b in busy)]
        if not free:
            return PromptCache(self._model)
        best = max(free, key=lambda c: common_prefix(c.tokens, prompt))
        if common_prefix(best.tokens, prompt) == 0:
            best = free[0]
        self._slots.remove(best)
        self._slots.append(best)
        return best
