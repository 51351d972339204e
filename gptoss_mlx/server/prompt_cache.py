"""A few KV caches kept between requests, each picked by the longest shared token prefix.

Agents resend a growing history each turn; the cache holding the longest prefix of the new prompt
is reused (`gptoss_mlx.generate.stream` trims it to the common prefix and prefills only the rest).
Several slots let a few conversations alternate without evicting each other; the least recently
used free slot is recycled when no free slot shares anything with the prompt. A generation that
finds every slot busy gets a fresh cache of its own, dropped when it ends.

With a `PromptStore`, a prompt whose long instructions prefix no slot holds gets it from disk
(or, the first time, has it written there once prefilled), so a restarted server skips it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gptoss_mlx.generate import PromptCache, common_prefix
from gptoss_mlx.prompt_store import PromptStore


class PromptCachePool:
    """`slots` PromptCaches over one model; only the engine's worker thread may use it."""

    def __init__(self, model: Any, slots: int = 2, store: PromptStore | None = None):
        if slots < 1:
            raise ValueError(f"the prompt cache needs at least one slot, got {slots}")
        self._model = model
        self.store = store
        self._slots: list[PromptCache] = [PromptCache(model) for _ in range(slots)]  # LRU first

    @property
    def size(self) -> int:
        """Number of slots."""
        return len(self._slots)

    def acquire(self, prompt: Sequence[int], busy: Sequence[PromptCache] = ()) -> PromptCache:
        """The free slot sharing the longest prefix with `prompt` (else the least recently used);
        a fresh cache outside the pool when every slot is in `busy` (used by other generations).
        With a store, the cache is then prepared by it (`PromptStore.prepare`).
        """
        free = [c for c in self._slots if all(c is not b for b in busy)]
        if not free:
            best = PromptCache(self._model)
        else:
            best = max(free, key=lambda c: common_prefix(c.tokens, prompt))
            if common_prefix(best.tokens, prompt) == 0:
                best = free[0]
            self._slots.remove(best)
            self._slots.append(best)
        if self.store is not None:
            self.store.prepare(best, prompt)
        return best
