"""Constrained harmony turns: JSON answers that always parse, tool calls to offered functions only.

One mechanism serves `response_format` / `text.format` (the final answer follows a JSON schema),
strict tool calls (the recipient is one of the offered functions, the arguments follow its
parameter schema) and `tool_choice: "required"` or a named function (the turn must end in a
call). A `TurnSpec` says what the turn may hold; it becomes an llguidance grammar over the whole
assistant turn, whose message headers are exact token sequences (as our tokenizer encodes them,
the recipient where gpt-oss writes it and where openai-harmony renders it):

    <|channel|>analysis<|message|> TEXT <|end|>                                  reasoning
    <|channel|>commentary<|message|> TEXT <|end|>                                 a preamble
    <|channel|>final<|message|> (TEXT | JSON) <|return|>                          the answer
    <|channel|>commentary to=functions.NAME <|constrain|>json<|message|> ARGS <|call|>
     to=functions.NAME<|channel|>commentary <|constrain|>json<|message|> ARGS <|call|>

Reasoning and preambles (each followed by `<|start|>assistant`) come first, then one answer or
call; bodies are free text except the schema-constrained JSON. `TurnConstraint` is the logits
processor (`f(generated_ids, logits) -> logits`) that follows one generation: it feeds each new
token to an llguidance matcher and masks the logits to what may come next. The sampled token
always comes from the masked logits, so the request's sampling settings apply among the allowed
tokens. When the turn must end in a constrained answer (a schema, or a forced call) and a
`budget` bounds it, reasoning is closed, or not begun, early enough to leave the answer at least
half of the budget (and its header), so a JSON answer has room to finish.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import mlx.core as mx
import numpy as np

from .tokenizer import END, Tokenizer

# Allowed tokens keep at least this logit (far below any a model gives, and within float16), so
# one of them is sampled even when the logits rule them all out (-inf).
_FLOOR = -1e4
# Up to this many allowed (or left out) tokens, only they are written into the logits: on a CPU a
# select over the whole 201k vocabulary costs as much as writing about 2,500 tokens one by one.
_SPARSE = 2048
# JSON on one line, compact or with one space between tokens (as json.dumps writes it): no run of
# blanks a looping model could extend forever.
JSON_OPTIONS = {"whitespace_pattern": "[ ]?"}
TEXT = r"/(.|\n)*/"


class SchemaError(ValueError):
    """A JSON schema that cannot be enforced: an unsupported feature or an unsatisfiable one."""


@dataclass(frozen=True)
class Function:
    """A function the turn may call; `parameters` constrain its arguments (None: free text)."""

    name: str
    parameters: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class TurnSpec:
    """What an assistant turn may end in.

    `final`: a final answer may end it (else it must end in a call); `answer_schema`: the JSON
    schema the final answer follows (None: free text); `functions`: what it may call.
    """

    final: bool = True
    answer_schema: Mapping[str, Any] | None = None
    functions: tuple[Function, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not self.final and not self.functions:
            raise ValueError("a turn that must end in a call needs at least one function")

    @property
    def forced_end(self) -> bool:
        """Whether the turn's end is constrained (a schema answer or a call), so that reasoning
        must leave it room."""
        return not self.final or self.answer_schema is not None


def schema_error(schema: Mapping[str, Any] | bool) -> str | None:
    """Why llguidance cannot enforce `schema` (its message), or None when it can."""
    import llguidance as llg

    grammar = llg.LLMatcher.grammar_from_json_schema(
        json.dumps(schema), overrides=JSON_OPTIONS)  # type: ignore[arg-type]
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
    if not is_error:
        return None
    message = messages[0]
    marker = "failed to compile JSON schema: "
    if marker in message:
        message = message.split(marker, 1)[1]
    lines = [line.strip() for line in message.splitlines()]  # a regex error spans lines
    return " ".join(line for line in lines if line.strip("^")) or "invalid schema"


def check_schema(schema: Any, where: str) -> dict[str, Any] | bool:
    """`schema` if llguidance can enforce it; SchemaError naming `where` and the feature else."""
    if not isinstance(schema, (Mapping, bool)):
        raise SchemaError(f"{where}: expected a JSON schema object")
    error = schema_error(dict(schema) if isinstance(schema, Mapping) else schema)
    if error is not None:
        raise SchemaError(f"{where}: the schema cannot be enforced: {error}")
    return dict(schema) if isinstance(schema, Mapping) else schema


@dataclass(frozen=True)
class _Header:
    ids: tuple[int, ...]  # from the message's first token through <|message|>
    terminal: bool  # its message ends the turn


@dataclass(frozen=True)
class _Compiled:
    grammar: str
    first: tuple[_Header, ...]  # the turn's first message (after the prompt's <|start|>assistant)
    later: tuple[_Header, ...]  # the later ones, <|start|>assistant included
    end_room: int  # the most tokens a terminal header takes after a reasoning message


_TOKENIZERS: dict[str, Any] = {}
_TOKENIZER_LOCK = threading.Lock()


def llg_tokenizer(tokenizer: Tokenizer) -> Any:
    """llguidance's tokenizer over our vocabulary, built once per process (about 1.4 s)."""
    from llguidance.tiktoken import lltokenizer_from_encoding

    key = str(tokenizer.vocab_path.resolve())
    with _TOKENIZER_LOCK:
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = lltokenizer_from_encoding(tokenizer.encoding,
                                                         n_vocab=tokenizer.vocab_size)
        return _TOKENIZERS[key]


def _json_rule(schema: Mapping[str, Any] | bool) -> str:
    if schema is True or schema == {}:
        schema = {"type": "object"}  # JSON mode: any object
    if isinstance(schema, Mapping):
        schema = {**schema, "x-guidance": JSON_OPTIONS}
    return f"%json {json.dumps(schema)}"


def _compile(tokenizer: Tokenizer, spec: TurnSpec) -> _Compiled:
    def ids(text: str) -> tuple[int, ...]:
        return tuple(tokenizer.encode(text, allow_special=True))

    def seq(tokens: Sequence[int]) -> str:
        return " ".join(f"<[{t}]>" for t in tokens)

    rules = [f"TEXT: {TEXT}"]
    text_then_end = f"TEXT <[{END}]>"
    nonterminal = [(ids("<|channel|>analysis<|message|>"), text_then_end)]
    terminal: list[tuple[tuple[int, ...], str]] = []
    if spec.final:
        if spec.functions:
            nonterminal.append((ids("<|channel|>commentary<|message|>"), text_then_end))
        if spec.answer_schema is None:
            answer = "TEXT"
        else:
            rules.append(f"answer: {_json_rule(spec.answer_schema)}")
            answer = "answer"
        terminal.append((ids("<|channel|>final<|message|>"), f"{answer} <|return|>"))
    suffix = " <|constrain|>json<|message|>"
    for i, fn in enumerate({f.name: f for f in spec.functions}.values()):
        if fn.parameters is None:
            args = "TEXT"
        else:
            rules.append(f"args{i}: {_json_rule(fn.parameters)}")
            args = f"args{i}"
        for header in (f"<|channel|>commentary to=functions.{fn.name}{suffix}",
                       f" to=functions.{fn.name}<|channel|>commentary{suffix}"):
            terminal.append((ids(header), f"{args} <|call|>"))
    again = ids("<|start|>assistant")
    grammar = "\n".join([
        f"start: (nonterminal {seq(again)})* terminal",
        "nonterminal: " + " | ".join(f"{seq(h)} {body}" for h, body in nonterminal),
        "terminal: " + " | ".join(f"{seq(h)} {body}" for h, body in terminal),
        *rules,
    ])
    first = tuple(_Header(h, False) for h, _ in nonterminal) + tuple(
        _Header(h, True) for h, _ in terminal)
    later = tuple(_Header(again + h.ids, h.terminal) for h in first)
    end_room = max(len(h.ids) for h in later if h.terminal)
    return _Compiled(grammar, first, later, end_room)


@lru_cache(maxsize=64)
def _template(tokenizer: Tokenizer, spec_key: str) -> tuple[_Compiled, Any]:
    """The compiled turn and a fresh matcher for it (copied per generation)."""
    import llguidance as llg

    raw = json.loads(spec_key)
    spec = TurnSpec(final=raw["final"], answer_schema=raw["answer_schema"],
                    functions=tuple(Function(n, p) for n, p in raw["functions"]))
    compiled = _compile(tokenizer, spec)
    grammar = llg.LLMatcher.grammar_from_lark(compiled.grammar)
    lt = llg_tokenizer(tokenizer)
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, lt)
    if is_error:
        raise SchemaError(messages[0].strip().splitlines()[0])
    matcher = llg.LLMatcher(lt, grammar, log_level=0)
    if matcher.is_error():
        raise SchemaError(matcher.get_error())
    return compiled, matcher


def _spec_key(spec: TurnSpec) -> str:
    return json.dumps({"final": spec.final, "answer_schema": spec.answer_schema,
                       "functions": [[f.name, f.parameters] for f in spec.functions]},
                      )  # not sorted: the order of properties is the order they are written in


class LogitsMask:
    """The tokens that may come next, ready to apply to logits [..., `width`]; built once per
    distinct mask, since a run of free text or digits keeps the same one step after step.

    `allowed` [V] is a boolean mask over the tokenizer's ids; ids from V on (a model's vocabulary
    wider than the tokenizer's) are left out, and `allowed` past `width` is ignored."""

    def __init__(self, allowed: np.ndarray, width: int):
        self.width = width
        allowed = allowed[:width]
        if len(allowed) < width:
            allowed = np.concatenate([allowed, np.zeros(width - len(allowed), dtype=bool)])
        n_allowed = int(np.count_nonzero(allowed))
        self._ids: mx.array | None = None  # the allowed ids (few), or the left-out ones
        self._select: mx.array | None = None  # the boolean mask (neither few)
        self._few_allowed = n_allowed <= _SPARSE
        if self._few_allowed:  # e.g. inside JSON
            self._ids = mx.array(np.flatnonzero(allowed).astype(np.uint32))
        elif width - n_allowed <= _SPARSE:  # e.g. reasoning: only control tokens are left out
            self._ids = mx.array(np.flatnonzero(~allowed).astype(np.uint32))
        else:
            self._select = mx.array(allowed)

    def __call__(self, logits: mx.array) -> mx.array:
        """`logits` (same dtype) with the left-out tokens at -inf and the allowed ones at least
        _FLOOR, so one of them is sampled even when the logits rule them all out."""
        if self._select is not None:
            return mx.where(self._select, mx.maximum(logits, _FLOOR), -mx.inf)
        assert self._ids is not None
        if self._few_allowed:  # write the few allowed logits into -inf
            out = mx.full(logits.shape, -mx.inf, dtype=logits.dtype)
            out[..., self._ids] = mx.maximum(logits[..., self._ids], _FLOOR)
            return out
        kept = mx.maximum(logits, _FLOOR)
        kept[..., self._ids] = -mx.inf
        return kept


def _has(words: np.ndarray, token: int) -> bool:
    return bool(int(words[token >> 5]) >> (token & 31) & 1)


class TurnConstraint:
    """A logits processor `(generated_ids, logits) -> logits` keeping a turn within `spec`.

    `budget` is the number of tokens the generation may write in all (None: unbounded). One
    instance serves one generation (a shorter `generated` than seen starts over). Raises
    SchemaError when building it for a spec llguidance cannot enforce.
    """

    def __init__(self, tokenizer: Tokenizer, spec: TurnSpec, budget: int | None = None):
        self.spec = spec
        self.budget = budget
        self._compiled, template = _template(tokenizer, _spec_key(spec))
        self._matcher = template.deep_copy()
        self._vocab = tokenizer.vocab_size
        self._bitmask = np.zeros((self._vocab + 31) // 32, dtype=np.uint32)  # llguidance's
        self._mask: LogitsMask | None = None  # the last mask applied, and its bits
        self._mask_bits = np.zeros_like(self._bitmask)
        # the tokens the answer keeps for itself when reasoning must end in time
        answer_room = max(1, budget // 2) if budget is not None else 1
        self._room = 1 + self._compiled.end_room + answer_room  # <|end|>, a header, the answer
        self._reset()

    def _reset(self) -> None:
        self._matcher.reset()
        self._seen = 0
        self._written: list[int] = []  # the header being written
        self._alive: tuple[_Header, ...] = self._compiled.first  # headers it may still become
        self._in_reasoning = False  # inside a message that <|end|> closes

    def __call__(self, generated: Sequence[int], logits: mx.array) -> mx.array:
        """`logits` [1, V] for the token after `generated`, masked to what may come next.

        The scheduler calls it while the forward pass computing `logits` runs: the matcher
        follows the new token and computes the mask before `logits` are needed."""
        if len(generated) < self._seen:  # a new generation
            self._reset()
        for token in generated[self._seen:]:
            if not self._matcher.consume_token(token):
                raise RuntimeError(f"constrained generation: token {token} broke the grammar: "
                                   f"{self._matcher.get_error()}")
            self._follow(token)
        self._seen = len(generated)
        bits = self._allowed_bits(len(generated))
        width = logits.shape[-1]
        if self._mask is None or self._mask.width != width or not np.array_equal(
                bits, self._mask_bits):
            allowed = np.unpackbits(bits.view(np.uint8), bitorder="little")[:self._vocab]
            self._mask = LogitsMask(allowed.view(bool), width)
            self._mask_bits[:] = bits
        return self._mask(logits)

    def _allowed_bits(self, n_generated: int) -> np.ndarray:
        """The tokens that may follow `n_generated` tokens: one bit per token id, little-endian in
        uint32 words, as llguidance writes them."""
        bits = self._bitmask
        self._matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
        if self._matcher.is_error():
            raise RuntimeError(f"constrained generation: {self._matcher.get_error()}")
        left = None if self.budget is None else self.budget - n_generated  # this one included
        if left is None or not self.spec.forced_end:
            return bits
        # end it so the answer fits (once a character split across tokens is complete)
        if self._in_reasoning and left <= self._room and _has(bits, END):
            bits[:] = 0
            bits[END >> 5] = 1 << (END & 31)
            return bits
        n = len(self._written)
        for h in self._alive:  # a reasoning header needs its rest, a token of text, the answer
            if not h.terminal and left <= len(h.ids) - n + self._room and not any(
                    o.terminal and o.ids[n] == h.ids[n] for o in self._alive):
                token = h.ids[n]
                bits[token >> 5] &= ~np.uint32(1 << (token & 31))
        return bits

    def _follow(self, token: int) -> None:
        if not self._alive:  # in a body: only <|end|> of reasoning leads to another header
            if token == END and self._in_reasoning:
                self._written, self._alive, self._in_reasoning = [], self._compiled.later, False
            return
        self._written.append(token)
        n = len(self._written)
        self._alive = tuple(h for h in self._alive if h.ids[n - 1] == token)
        done = [h for h in self._alive if len(h.ids) == n]
        if done:  # headers end in <|message|>, which no header has earlier: the body begins
            self._in_reasoning = not done[0].terminal
            self._alive = ()
