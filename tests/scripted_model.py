"""A scripted stand-in for `GptOss`: its logits spell out given harmony completions, so protocol
tests get exact token sequences while the server, its parser and the clients stay real.

    model = ScriptedModel(tokenizer, [
        Turn(when="functions.exec_command to=assistant", then=final("Done.")),  # after the result
        Turn(when="", then=call("exec_command", {"cmd": "echo hi"}, reasoning="Run it.")),
    ])

Each request turn picks the first `Turn` whose `when` holds for the last message of the prompt
not written by the assistant (a user message, a tool's result...), header included, as harmony
renders it: `<|start|>functions.exec_command to=assistant<|channel|>commentary<|message|>...`.
Generated tokens are all assistant messages, so that message, and the choice, stay the same for
the whole generation. The model then writes the turn's completion (the tokens after the prompt's
final `<|start|>assistant`) one token per step, with every other token at -1e4 (exp underflows:
a one-hot distribution at any temperature). The cache holds the token ids themselves, so prefix
reuse, trimming and `cached_tokens` behave as with the real model.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import openai_harmony as oh

from gptoss_mlx.chat.tokenizer import CALL, END, ENDOFTEXT, MESSAGE, RETURN, START, Tokenizer
from gptoss_mlx.config import ModelConfig
from gptoss_mlx.convert.synthetic import tiny_config

UNLIKELY = -1e4  # the logit of every token but the scripted one


def final(text: str, reasoning: str | None = None) -> list[oh.Message]:
    """An answer on the final channel, after optional reasoning."""
    return _reasoning(reasoning) + [
        oh.Message.from_role_and_content(oh.Role.ASSISTANT, text).with_channel("final")]


def call(name: str, arguments: dict[str, Any], reasoning: str | None = None) -> list[oh.Message]:
    """A function call `functions.NAME` with JSON arguments, after optional reasoning."""
    return _reasoning(reasoning) + [
        oh.Message.from_role_and_content(oh.Role.ASSISTANT, json.dumps(arguments))
        .with_channel("commentary").with_recipient(f"functions.{name}")
        .with_content_type("<|constrain|>json")]


def _reasoning(text: str | None) -> list[oh.Message]:
    if text is None:
        return []
    return [oh.Message.from_role_and_content(oh.Role.ASSISTANT, text).with_channel("analysis")]


Script = str | Sequence[int] | Sequence[oh.Message]


@dataclasses.dataclass
class Turn:
    """`then` (harmony text after `<|start|>assistant`, token ids, or messages openai-harmony
    renders) is the answer when `when` (a substring, or a predicate) holds for the prompt's
    last message not written by the assistant."""

    when: str | Callable[[str], bool]
    then: Script

    def matches(self, message: str) -> bool:
        return self.when in message if isinstance(self.when, str) else self.when(message)


class ScriptedModel:
    """`model(tokens [1, T], cache=..., last_only=...) -> logits [1, T|1, vocab]` following
    `turns`; `make_cache()` and `config` as `GptOss` has them. `seen` lists, per request turn,
    the last non-assistant message it answered (header included)."""

    def __init__(self, tokenizer: Tokenizer, turns: Sequence[Turn] = (),
                 context: int = 32768):
        self.tokenizer = tokenizer
        self.config = ModelConfig.from_dict(
            tiny_config(vocab_size=tokenizer.vocab_size, max_position_embeddings=context))
        (self._assistant,) = tokenizer.encode("assistant")
        self._lock = threading.Lock()
        self.seen: list[str] = []
        self.script(turns)

    def script(self, turns: Sequence[Turn]) -> None:
        """Answer with `turns` from now on (and forget the turns seen)."""
        compiled = [(t, self._completion(t.then)) for t in turns]
        with self._lock:
            self._turns = compiled
            self.seen = []

    def make_cache(self) -> list[TokenCache]:
        return [TokenCache()]

    def __call__(self, tokens: mx.array, cache: list[TokenCache] | None = None,
                 last_only: bool = False) -> mx.array:
        if tokens.ndim != 2 or tokens.shape[0] != 1:
            raise ValueError(f"tokens must be [1, time], got shape {tokens.shape}")
        new = tokens[0].tolist()
        held = [] if cache is None else cache[0].tokens
        sequence = held + new
        if cache is not None:
            cache[0].tokens = sequence
        ends = range(len(sequence) - (1 if last_only else len(new)), len(sequence))
        rows = [self._logits(self._next(sequence[: end + 1])) for end in ends]
        return mx.stack(rows)[None]

    def _logits(self, token: int) -> mx.array:
        vocab = mx.arange(self.config.vocab_size)
        return mx.where(vocab == token, 0.0, UNLIKELY).astype(mx.float32)

    def _next(self, sequence: list[int]) -> int:
        """The scripted token after `sequence` (`<|endoftext|>` where no script applies, as at
        the end of a prefill chunk inside the prompt)."""
        message, after = self._last_foreign_message(sequence)
        with self._lock:
            for turn, completion in self._turns:
                if not turn.matches(message):
                    continue
                done = self._written(sequence, after, completion)
                if done == 0:
                    self.seen.append(message)
                if done is None or done >= len(completion):
                    return ENDOFTEXT
                return completion[done]
        if sequence[-2:] == [START, self._assistant]:
            raise LookupError(f"no scripted turn answers {message!r}")
        return ENDOFTEXT

    def _last_foreign_message(self, sequence: list[int]) -> tuple[str, int]:
        """(text, end index) of the last message whose author is not the assistant."""
        starts = [i for i, t in enumerate(sequence) if t == START]
        for i in reversed(starts):
            header_end = next((j for j in range(i + 1, len(sequence)) if sequence[j] == MESSAGE),
                              None)
            if header_end is None:  # the header being written: the assistant's
                continue
            if not self.tokenizer.decode(sequence[i + 1:header_end]).startswith("assistant"):
                end = next((j + 1 for j in range(header_end, len(sequence))
                            if sequence[j] == END), len(sequence))
                return self.tokenizer.decode(sequence[i:end]), end
        return "", 0

    def _written(self, sequence: list[int], after: int, completion: list[int]) -> int | None:
        """How much of `completion` ends `sequence` after `<|start|>assistant` (at or past
        index `after`), the longest such part; None when the sequence is not writing it."""
        opening = [START, self._assistant]
        for k in range(min(len(completion), len(sequence) - after - 2), -1, -1):
            tail = opening + completion[:k]
            if sequence[len(sequence) - len(tail):] == tail:
                return k
        return None

    def _completion(self, script: Script) -> list[int]:
        """Token ids after `<|start|>assistant`, ending in `<|return|>` or `<|call|>`."""
        if isinstance(script, str):
            ids = self.tokenizer.encode(script, allow_special=True)
        elif script and isinstance(script[0], oh.Message):
            ids = [t for m in script for t in self.tokenizer.harmony.render(m)][2:]
            if ids[-1] == END:  # the turn's last message: harmony ends it with <|end|>
                ids[-1] = RETURN
        else:
            ids = list(script)
        if not ids or ids[-1] not in (RETURN, CALL):
            raise ValueError("a scripted completion must end in <|return|> or <|call|>")
        return ids


class TokenCache:
    """The one "layer" cache of a ScriptedModel: the token ids it was fed."""

    def __init__(self) -> None:
        self.tokens: list[int] = []

    @property
    def offset(self) -> int:
        return len(self.tokens)

    @property
    def trimmable(self) -> int:
        return len(self.tokens)

    def trim(self, n: int) -> int:
        n = max(0, min(n, len(self.tokens)))
        del self.tokens[len(self.tokens) - n:]
        return n

    @property
    def state(self) -> list[mx.array]:
        return []

    @property
    def nbytes(self) -> int:
        return 0
