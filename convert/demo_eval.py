"""Score the demo model through our MLX runtime on held-out corpus conversations.

For each conversation the prompt our runtime renders is completed by `gptoss_mlx.generate`;
openai-harmony's strict parser reads the completion. When the model calls a tool, the second
turn is prompted with the reference call and the tool's result (teacher forcing), so every
conversation has one answer to score. `benchmarks/demo_model.py` prints the table for 200
conversations, greedy and at temperature 1.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from gptoss_mlx.chat.tokenizer import Tokenizer
from gptoss_mlx.generate import Done, stream
from gptoss_mlx.sampling import SamplingParams

from .demo_corpus import Conversation, CorpusRenderer, sample

HELD_OUT_SEED = 1_000_003  # training uses seed 0: a different stream of conversations
MAX_TOKENS = 96


@dataclass
class Outcome:
    """How one conversation went."""

    family: str
    parsed: bool  # every completion parsed with openai-harmony's strict parser
    analysis_then_final: bool  # the answering turn is analysis message(s), then a final one
    tool_fits: bool  # an offered tool fits the request
    called: str | None  # the tool the model called first, if any
    args_ok: bool  # the call's arguments equal the reference ones
    honest: bool  # the final answer repeats every value of the tool's result
    text: str = ""  # the completions, for a look by eye


def held_out(n: int, seed: int = HELD_OUT_SEED) -> list[Conversation]:
    """`n` conversations from a stream the training never saw."""
    rng = random.Random(seed)
    return [sample(rng) for _ in range(n)]


def _complete(model: Any, tokenizer: Tokenizer, prompt: list[int],
              params: SamplingParams) -> tuple[list[int], list[Any] | None]:
    done = None
    for event in stream(model, tokenizer, prompt, sampling=params, max_tokens=MAX_TOKENS):
        if isinstance(event, Done):
            done = event
    assert done is not None
    import openai_harmony as oh

    try:
        msgs = tokenizer.harmony.parse_messages_from_completion_tokens(
            done.tokens, oh.Role.ASSISTANT, strict=True)
    except Exception:  # noqa: BLE001 - any parse failure counts as one
        msgs = None
    return done.tokens, msgs


def _answers(msgs: list[Any] | None) -> bool:
    channels = [m.channel for m in msgs or []]
    return (len(channels) >= 2 and channels[-1] == "final"
            and all(c == "analysis" for c in channels[:-1]))


def _text(msg: Any) -> str:
    return "".join(getattr(c, "text", "") for c in msg.content)


def score(model: Any, tokenizer: Tokenizer, conv: Conversation, params: SamplingParams,
          renderer: CorpusRenderer) -> Outcome:
    """Run one conversation (and its second turn after a tool call) and score it."""
    tokens, msgs = _complete(model, tokenizer, renderer.prompt(conv), params)
    texts = [tokenizer.decode(tokens)]
    calls = [m for m in msgs or [] if m.recipient and m.recipient.startswith("functions.")]
    called = calls[0].recipient.removeprefix("functions.") if calls else None
    args_ok = False
    if calls:
        try:
            args_ok = json.loads(_text(calls[0])) == conv.call[1] if conv.call else False
        except ValueError:
            pass
    parsed, answered, honest = msgs is not None, _answers(msgs), False
    if conv.call is not None and called == conv.fitting_tool:
        channels = [m.channel for m in msgs]
        first_ok = channels and all(c == "analysis" for c in channels[:-1])
        tokens, msgs = _complete(model, tokenizer, renderer.prompt(conv, with_call=True), params)
        texts.append(tokenizer.decode(tokens))
        parsed = parsed and msgs is not None
        answered = bool(first_ok) and _answers(msgs)
        final = _text(msgs[-1]) if answered else ""
        honest = answered and all(f in final for f in conv.facts)
    return Outcome(conv.family, parsed, answered, conv.call is not None, called, args_ok,
                   honest, "\n".join(texts))


def evaluate(model: Any, tokenizer: Tokenizer, n: int, temperature: float,
             seed: int = HELD_OUT_SEED) -> list[Outcome]:
    """Outcomes of `n` held-out conversations at `temperature` (0: greedy)."""
    renderer = CorpusRenderer(tokenizer)
    return [score(model, tokenizer, conv, SamplingParams(temperature=temperature, seed=i),
                  renderer) for i, conv in enumerate(held_out(n, seed))]


def rates(outcomes: list[Outcome]) -> dict[str, float]:
    """The acceptance rates: parse, analysis-then-final, right tool (of conversations with a
    fitting tool), argument values and honest answers (of right calls), needless calls."""
    def share(hits: list[bool]) -> float:
        return sum(hits) / len(hits) if hits else float("nan")

    fitting = [o for o in outcomes if o.tool_fits]
    right = [o for o in fitting if o.called == _fitting_name(o)]
    return {
        "parse": share([o.parsed for o in outcomes]),
        "analysis_then_final": share([o.analysis_then_final for o in outcomes]),
        "right_tool": share([o.called == _fitting_name(o) for o in fitting]),
        "args_ok": share([o.args_ok for o in right]),
        "honest": share([o.honest for o in right]),
        "needless_call": share([o.called is not None for o in outcomes if not o.tool_fits]),
    }


def _fitting_name(o: Outcome) -> str:
    return {"weather": "get_weather", "shell": "exec_command"}[o.family]


def unused_mass(model: Any, tokenizer: Tokenizer, used_ids: np.ndarray, n: int = 20,
                seed: int = HELD_OUT_SEED) -> float:
    """The largest probability (temperature 1) that any position of `n` held-out conversations
    gives to token ids outside `used_ids`."""
    renderer = CorpusRenderer(tokenizer)
    unused = np.ones(tokenizer.vocab_size, dtype=bool)
    unused[used_ids] = False
    mask = mx.array(unused)
    worst = 0.0
    for conv in held_out(n, seed):
        ids, _ = renderer.render(conv)
        logits = model(mx.array([ids]), cache=None).astype(mx.float32)[0]
        probs = mx.softmax(logits, axis=-1)
        worst = max(worst, mx.max(mx.sum(mx.where(mask, probs, 0.0), axis=-1)).item())
    return worst
