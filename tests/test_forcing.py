"""Tool-call forcing as a logits processor in the decode loop, on the random tiny model.

openai-harmony is the oracle: whatever the model would write, a forced turn parses as reasoning
followed by one call to an offered function (cut off only by the token budget).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import openai_harmony as oh
import pytest

from gptoss_mlx.chat.forcing import Function, TurnConstraint, TurnSpec
from gptoss_mlx.chat.harmony import HarmonyRenderer, SystemOptions
from gptoss_mlx.chat.tokenizer import Tokenizer
from gptoss_mlx.generate import Done, TokenEvent, stream
from gptoss_mlx.sampling import SamplingParams

FUNCTIONS = ["get_weather", "get_time", "search"]
TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
         for n in FUNCTIONS]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> tuple[Any, Tokenizer]:
    from gptoss_mlx import load

    model, tok = load(tiny_model_dir)
    assert tok is not None
    return model, tok


@pytest.fixture(scope="module")
def prompt(loaded) -> list[int]:
    _, tok = loaded
    return HarmonyRenderer(tok).render_chat(
        [{"role": "user", "content": "What now?"}], tools=TOOLS,
        options=SystemOptions(current_date="2025-08-05"))


class Prefers:
    """The tiny model with a large bonus on the tokens of `text`, one per generated position:
    a model that would write `text` (not a call) if nothing stopped it."""

    def __init__(self, model: Any, tok: Tokenizer, text: str, prompt_len: int):
        self.model, self.config = model, model.config
        self.script = tok.encode(text, allow_special=True)
        self.prompt_len = prompt_len

    def make_cache(self) -> list[Any]:
        return self.model.make_cache()

    def __call__(self, tokens: mx.array, cache: Any = None, last_only: bool = False) -> mx.array:
        logits = self.model(tokens, cache=cache, last_only=last_only)
        step = cache[0].offset - self.prompt_len
        if 0 <= step < len(self.script):
            bonus = mx.zeros((logits.shape[-1],)).at[self.script[step]].add(1e4)
            logits = logits + bonus.astype(logits.dtype)
        return logits


def forcing(tok: Tokenizer, functions: list[str], budget: int | None = None) -> TurnConstraint:
    """tool_choice "required" (or named) over `functions`, arguments free."""
    spec = TurnSpec(final=False, functions=tuple(Function(n) for n in functions))
    return TurnConstraint(tok, spec, budget)


def generate(model: Any, tok: Tokenizer, prompt: list[int], processors: list[Any],
             **kw: Any) -> tuple[list[int], Done]:
    ids, done = [], None
    for event in stream(model, tok, prompt, logits_processors=processors, **kw):
        if isinstance(event, TokenEvent):
            ids.append(event.token)
        else:
            done = event
    assert done is not None
    return ids, done


def harmony_turn(tok: Tokenizer, ids: list[int]) -> list[tuple[str | None, str | None, str]]:
    """openai-harmony's reading of generated ids as (channel, recipient, content type) per
    message, the one the ids end inside included."""
    parser = oh.StreamableParser(tok.harmony, oh.Role.ASSISTANT)
    for token in ids:
        parser.process(token)
    out = [(m.channel, m.recipient, m.content_type or "") for m in parser.messages]
    if parser.current_role is not None:
        out.append((parser.current_channel, parser.current_recipient,
                    parser.current_content_type or ""))
    return out


def assert_forced_call(tok: Tokenizer, ids: list[int], functions: list[str]) -> str:
    """The turn is reasoning and then one call to one of `functions`; returns its name."""
    *reasoning, call = harmony_turn(tok, ids)
    assert all(m == ("analysis", None, "") for m in reasoning), reasoning
    channel, recipient, content_type = call
    assert channel == "commentary" and content_type == "<|constrain|>json", call
    assert recipient is not None and recipient.removeprefix("functions.") in functions, call
    return recipient.removeprefix("functions.")


@pytest.mark.parametrize("functions", [FUNCTIONS[:1], FUNCTIONS, ["get_time"]],
                         ids=["required-one", "required-several", "named"])
def test_every_sampled_turn_is_a_call_to_an_offered_function(loaded, prompt,
                                                             functions: list[str]) -> None:
    model, tok = loaded
    names = set()
    for seed in range(16):
        max_tokens = 20 + seed  # from no room to reason to some reasoning first
        ids, done = generate(model, tok, prompt, [forcing(tok, functions, max_tokens)],
                             sampling=SamplingParams(seed=seed), max_tokens=max_tokens)
        names.add(assert_forced_call(tok, ids, functions))
        # random weights hardly ever end the arguments: the call is cut off, not finished
        assert done.stats.finish_reason == "length" and len(ids) == max_tokens or \
            done.stats.finish_reason == "tool_calls"
    assert len(functions) == 1 or len(names) > 1  # the model, not the forcing, picks among them


@pytest.mark.parametrize("text", [
    "<|channel|>final<|message|>No tool needed.<|return|>",
    "<|channel|>commentary<|message|>Let me check.<|end|>",
    "<|channel|>commentary to=functions.delete_all <|constrain|>json<|message|>{}<|call|>",
    " to=functions<|channel|>commentary json<|message|>{}<|call|>",
    "<|channel|>analysis<|message|>Done thinking.<|return|>",
    "<|channel|>analysis<|message|>Hmm<|end|><|start|>user<|message|>hi<|end|>",
    "<|channel|>analysis<|message|>Hmm<|end|><|start|>assistant<|channel|>final<|message|>x",
])
def test_what_the_model_would_write_instead_becomes_a_call(loaded, prompt, text: str) -> None:
    model, tok = loaded
    prefers = Prefers(model, tok, text, len(prompt))
    ids, _ = generate(prefers, tok, prompt, [forcing(tok, ["get_weather"], 40)],
                      sampling=SamplingParams(temperature=0), max_tokens=40)
    assert assert_forced_call(tok, ids, ["get_weather"]) == "get_weather"


@pytest.mark.parametrize("text,functions", [
    ('<|channel|>commentary to=functions.get_time <|constrain|>json<|message|>{"tz": "UTC"}'
     "<|call|>", FUNCTIONS),
    ('<|channel|>analysis<|message|>Time.<|end|><|start|>assistant to=functions.get_time'
     '<|channel|>commentary <|constrain|>json<|message|>{"tz": "UTC"}<|call|>', ["get_time"]),
])
def test_a_call_the_model_writes_itself_is_kept(loaded, prompt, text: str,
                                                functions: list[str]) -> None:
    """Both places harmony allows the recipient in; the tokens are the model's own."""
    model, tok = loaded
    prefers = Prefers(model, tok, text, len(prompt))
    ids, done = generate(prefers, tok, prompt, [forcing(tok, functions, 64)],
                         sampling=SamplingParams(temperature=0), max_tokens=64)
    assert ids == tok.encode(text, allow_special=True)
    assert done.stats.finish_reason == "tool_calls"
    parsed = tok.harmony.parse_messages_from_completion_tokens(ids, oh.Role.ASSISTANT)
    assert (parsed[-1].recipient, parsed[-1].content[0].text) == ("functions.get_time",
                                                                  '{"tz": "UTC"}')


def test_call_headers_are_tokenized_as_openai_harmony_renders_them(loaded) -> None:
    """A forced header with a greedy model preferring the role form is exactly harmony's."""
    model, tok = loaded
    call = (oh.Message.from_role_and_content(oh.Role.ASSISTANT, "{}").with_channel("commentary")
            .with_recipient("functions.get_weather").with_content_type("<|constrain|>json"))
    rendered = tok.harmony.render(call)  # <|start|>assistant to=...<|message|>{}<|call|>
    header = rendered[2:rendered.index(tok.encode("<|message|>", allow_special=True)[0]) + 1]
    prompt = HarmonyRenderer(tok).render_chat([{"role": "user", "content": "x"}], tools=TOOLS)
    # the model wants the role form's first token; forcing decides the rest by its mask
    prefers = Prefers(model, tok, tok.decode(header[:1]), len(prompt))
    ids, _ = generate(prefers, tok, prompt, [forcing(tok, FUNCTIONS[:1], 32)],
                      sampling=SamplingParams(temperature=0), max_tokens=32)
    assert ids[:len(header)] == header


def test_reasoning_closes_in_time_for_the_call(loaded, prompt) -> None:
    """A model that would reason forever is made to end its analysis so the call fits."""
    model, tok = loaded
    endless = "<|channel|>analysis<|message|>" + " think" * 200
    prefers = Prefers(model, tok, endless, len(prompt))
    ids, _ = generate(prefers, tok, prompt, [forcing(tok, FUNCTIONS, 120)],
                      sampling=SamplingParams(temperature=0), max_tokens=120)
    assert harmony_turn(tok, ids)[0] == ("analysis", None, "")
    assert assert_forced_call(tok, ids, FUNCTIONS) in FUNCTIONS
    assert tok.decode(ids).count(" think") > 20  # it did reason as long as the budget allowed


def test_processors_see_every_token_before_the_next_step(loaded, prompt) -> None:
    """Without the lookahead, a pass-through processor leaves greedy decoding unchanged."""
    model, tok = loaded
    seen: list[list[int]] = []

    def record(generated: list[int], logits: mx.array) -> mx.array:
        seen.append(list(generated))
        return logits

    greedy = SamplingParams(temperature=0)
    plain, _ = generate(model, tok, prompt, [], sampling=greedy, max_tokens=12)
    ids, _ = generate(model, tok, prompt, [record], sampling=greedy, max_tokens=12)
    assert ids == plain
    assert seen == [ids[:i] for i in range(len(ids))]


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
def test_an_allowed_token_is_sampled_even_when_the_logits_rule_all_out(loaded, dtype) -> None:
    _, tok = loaded
    constraint = forcing(tok, ["get_weather"])
    logits = mx.full((1, tok.vocab_size), -mx.inf, dtype=dtype)
    first = {tok.encode(t, allow_special=True)[0] for t in ("<|channel|>", " to")}
    for seed in range(4):
        sampled = mx.random.categorical(constraint([], logits), key=mx.random.key(seed))
        assert int(sampled.item()) in first
