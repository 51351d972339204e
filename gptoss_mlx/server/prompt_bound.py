"""A cheap lower bound on a request's prompt tokens, so that a huge text over the context is
refused before all of it is tokenized.

A token holds at most 4 bytes of a character's UTF-8 (at least 1 byte), so text of at most
`context / 4` characters cannot overflow and is not looked at. Longer text is tokenized only up
to `CHARS_PER_TOKEN_SCANNED` characters per token of context per string: typical text has far
fewer characters per token, so an overflowing prompt shows itself in that prefix. The count of a
prefix, less a few tokens for merges across the cut and the rendered text around it, cannot
exceed the tokens the whole prompt renders to.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from gptoss_mlx.chat.tokenizer import Tokenizer

CHARS_PER_TOKEN_SCANNED = 8
_MERGE_SLACK = 2  # tokens a string's count may lose to merges at its two ends
# Text the renderer may leave out: past reasoning is dropped after a final answer.
_SKIPPED_KEYS = frozenset({"reasoning", "reasoning_content", "summary"})


def prompt_texts(value: Any) -> Iterator[str]:
    """The strings in a request's messages/input/tools that may reach the prompt."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        if value.get("type") == "reasoning":
            return
        for key, item in value.items():
            if key not in _SKIPPED_KEYS:
                yield from prompt_texts(item)
    elif isinstance(value, list):
        for item in value:
            yield from prompt_texts(item)


def tokens_at_least(tokenizer: Tokenizer, texts: list[str], context: int) -> int:
    """A lower bound on the prompt tokens of `texts`; it reaches `context` when a prefix of the
    text already shows the prompt cannot fit (0 when the text is too short to matter)."""
    if 4 * sum(map(len, texts)) < context:
        return 0
    scanned = CHARS_PER_TOKEN_SCANNED * (context + _MERGE_SLACK)
    bound = 0
    for text in texts:
        bound += max(0, len(tokenizer.encode(text[:scanned])) - _MERGE_SLACK)
        if bound >= context:
            break
    return bound
