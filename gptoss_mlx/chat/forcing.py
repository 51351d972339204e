"""`tool_choice: "required"` or a named function, as a logits processor on harmony headers.

A forced turn may reason first, but every other message it writes is a call to an allowed
function. While the model writes a message header, the logits are masked to the continuations
of the allowed headers (token ids, as our tokenizer encodes them):

    <|channel|>analysis<|message|>                                          reasoning
    <|channel|>commentary to=functions.NAME <|constrain|>json<|message|>   a call (gpt-oss)
     to=functions.NAME<|channel|>commentary <|constrain|>json<|message|>   a call (openai-harmony)

(the recipient where gpt-oss writes it, and where openai-harmony renders it).

The first header follows the prompt's `<|start|>assistant`; after the `<|end|>` of a reasoning
message the next one is `<|start|>assistant` and one of them again. Inside a message body only
harmony's special tokens are restricted: reasoning ends with `<|end|>`, a call with `<|call|>`
(which ends the generation), and no other special token is written. Given a `budget` (the tokens
the generation may write in all), reasoning is closed, or not begun, early enough for a call's
header and a first token of its arguments to fit. The sampled token always comes from the masked
logits, so the request's sampling settings still apply among the allowed tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from .tokenizer import CALL, END, STARTOFTEXT, Tokenizer

# Allowed tokens keep at least this logit (far below any a model gives, and within float16), so
# one of them is sampled even when the logits rule them all out (-inf).
_FLOOR = -1e4


@dataclass(frozen=True)
class _Header:
    ids: tuple[int, ...]
    is_call: bool


class ToolCallForcing:
    """A logits processor `(generated_ids, logits) -> logits` that makes a turn end in a call.

    `functions` are the names the call may go to (one for a named tool_choice). One instance
    serves one generation; it follows the generated ids it is given, call after call.
    """

    def __init__(self, tokenizer: Tokenizer, functions: Sequence[str],
                 budget: int | None = None):
        if not functions:
            raise ValueError("forcing a tool call needs at least one function name")

        def ids(text: str) -> tuple[int, ...]:
            return tuple(tokenizer.encode(text, allow_special=True))

        suffix = " <|constrain|>json<|message|>"
        first = [_Header(ids("<|channel|>analysis<|message|>"), is_call=False)]
        for name in dict.fromkeys(functions):
            first.append(_Header(ids(f"<|channel|>commentary to=functions.{name}{suffix}"), True))
            first.append(_Header(ids(f" to=functions.{name}<|channel|>commentary{suffix}"), True))
        again = ids("<|start|>assistant")
        self._first = first  # the headers of the turn's first message
        self._later = [_Header(again + h.ids, h.is_call) for h in first]
        # the tokens a call still needs once reasoning ends: <|end|>, a header, one argument token
        self._call_room = 1 + max(len(h.ids) for h in self._later if h.is_call) + 1
        self.budget = budget
        self._masks: dict[tuple[Any, ...], mx.array] = {}
        self._reset()

    def _reset(self) -> None:
        self._seen = 0  # generated tokens followed so far
        self._written: list[int] = []  # the header being written
        self._alive = self._first  # headers `_written` is a prefix of; [] inside a body
        self._body_is_call = False

    def __call__(self, generated: Sequence[int], logits: mx.array) -> mx.array:
        """`logits` [1, V] for the token after `generated`, masked to what may come next."""
        if len(generated) < self._seen:  # a new generation
            self._reset()
        for token in generated[self._seen:]:
            self._follow(token)
        self._seen = len(generated)
        mask = self._mask(self._allowed(len(generated)), logits.shape[-1])
        return mx.where(mask, mx.maximum(logits, _FLOOR), -mx.inf).astype(logits.dtype)

    def _follow(self, token: int) -> None:
        if not self._alive:  # in a body: only <|end|> of reasoning leads to another header
            if token == END and not self._body_is_call:
                self._written, self._alive = [], self._later
            return
        self._written.append(token)
        n = len(self._written)
        self._alive = [h for h in self._alive if h.ids[n - 1] == token]
        done = [h for h in self._alive if len(h.ids) == n]
        if done:  # headers end in <|message|>, which no header has earlier: the body begins
            self._body_is_call = done[0].is_call
            self._alive = []

    def _allowed(self, n_generated: int) -> tuple[bool, tuple[int, ...]]:
        """(whether ordinary text may come next, the special or header tokens that may)."""
        left = None if self.budget is None else self.budget - n_generated  # this token included
        if not self._alive:  # a body: ordinary text, and the one special token that ends it
            if self._body_is_call:
                return True, (CALL,)
            return left is None or left > self._call_room, (END,)  # or end it so the call fits
        n = len(self._written)
        # reasoning needs its header's rest, one token of text, then room for the call
        return False, tuple(sorted({
            h.ids[n] for h in self._alive
            if h.is_call or left is None or left > len(h.ids) - n + self._call_room}))

    def _mask(self, allowed: tuple[bool, tuple[int, ...]], width: int) -> mx.array:
        """The boolean mask [V] of allowed tokens, built once per distinct set."""
        key = (*allowed, width)
        if key not in self._masks:
            text, tokens = allowed
            mask = np.zeros(width, dtype=bool)
            mask[:STARTOFTEXT] = text
            mask[list(tokens)] = True
            self._masks[key] = mx.array(mask)
        return self._masks[key]
