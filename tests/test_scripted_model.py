"""The scripted test double: its completions are exact, chosen per request turn, and it plays
the model's part in generation (cache reuse, stop tokens) as `GptOss` does."""

from __future__ import annotations

from pathlib import Path

import openai_harmony as oh
import pytest
from scripted_model import ScriptedModel, Turn, call, final

from gptoss_mlx.chat.tokenizer import CALL, RETURN, Tokenizer
from gptoss_mlx.generate import Done, PromptCache, stream


@pytest.fixture(scope="module")
def tokenizer(vocab_path: Path) -> Tokenizer:
    return Tokenizer(vocab_path)


def prompt(tokenizer: Tokenizer, *messages: oh.Message) -> list[int]:
    """openai-harmony's rendering of a conversation, ready for the assistant's turn."""
    convo = oh.Conversation.from_messages(list(messages))
    return list(tokenizer.harmony.render_conversation_for_completion(convo, oh.Role.ASSISTANT))


def user(text: str) -> oh.Message:
    return oh.Message.from_role_and_content(oh.Role.USER, text)


def generate(model: ScriptedModel, ids: list[int], cache: PromptCache | None = None) -> Done:
    *_, done = stream(model, model.tokenizer, ids, cache=cache)
    assert isinstance(done, Done)
    return done


def test_completion_is_written_exactly_and_parses(tokenizer: Tokenizer) -> None:
    model = ScriptedModel(tokenizer, [Turn("", final("Hello there.", reasoning="Say hi."))])
    done = generate(model, prompt(tokenizer, user("Hi")))
    expected = tokenizer.encode("<|channel|>analysis<|message|>Say hi.<|end|><|start|>assistant"
                                "<|channel|>final<|message|>Hello there.<|return|>",
                                allow_special=True)
    assert done.tokens == expected
    parsed = tokenizer.harmony.parse_messages_from_completion_tokens(done.tokens, oh.Role.ASSISTANT)
    assert [(m.channel, m.content[0].text) for m in parsed] == [
        ("analysis", "Say hi."), ("final", "Hello there.")]
    assert done.stats.finish_reason == "stop"


def test_turn_is_chosen_by_the_last_message_not_from_the_assistant(tokenizer: Tokenizer) -> None:
    model = ScriptedModel(tokenizer, [
        Turn("functions.exec_command to=assistant", final("It printed hi.")),
        Turn("run it", call("exec_command", {"cmd": "echo hi"}, reasoning="Run it.")),
    ])
    cache = PromptCache(model)
    first = generate(model, prompt(tokenizer, user("Please run it")), cache)
    assert first.tokens[-1] == CALL and first.stats.finish_reason == "tool_calls"
    (tool_call,) = first.tool_calls
    assert (tool_call.name, tool_call.arguments) == ("exec_command", '{"cmd": "echo hi"}')
    result = (oh.Message.from_author_and_content(
        oh.Author.new(oh.Role.TOOL, "functions.exec_command"), "hi\n")
        .with_channel("commentary").with_recipient("assistant"))
    called = tokenizer.harmony.parse_messages_from_completion_tokens(first.tokens,
                                                                    oh.Role.ASSISTANT)
    second_prompt = prompt(tokenizer, user("Please run it"), *called, result)
    second = generate(model, second_prompt, cache)
    assert second.text() == "It printed hi." and second.tokens[-1] == RETURN
    # harmony renders the call as it was written, so the cache held all of the first turn
    first_turn = prompt(tokenizer, user("Please run it")) + first.tokens
    assert second_prompt[:len(first_turn)] == first_turn
    assert second.stats.cached_tokens == len(first_turn)
    assert [m.split("<|message|>")[0] for m in model.seen] == [
        "<|start|>user", "<|start|>functions.exec_command to=assistant<|channel|>commentary"]


def test_unscripted_turn_is_an_error(tokenizer: Tokenizer) -> None:
    model = ScriptedModel(tokenizer, [Turn("weather", final("Sunny."))])
    with pytest.raises(LookupError, match="no scripted turn answers.*Hi"):
        generate(model, prompt(tokenizer, user("Hi")))


def test_script_must_end_a_turn(tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="must end in"):
        ScriptedModel(tokenizer, [Turn("", "<|channel|>final<|message|>Hi<|end|>")])


def test_logits_for_every_position(tokenizer: Tokenizer) -> None:
    import mlx.core as mx

    model = ScriptedModel(tokenizer, [Turn("", "<|channel|>final<|message|>Hi<|return|>")])
    ids = prompt(tokenizer, user("Hi"))
    script = tokenizer.encode("<|channel|>final<|message|>Hi<|return|>", allow_special=True)
    logits = model(mx.array([ids + script[:-1]]), cache=model.make_cache())
    assert logits.shape == (1, len(ids) + len(script) - 1, tokenizer.vocab_size)
    assert mx.argmax(logits[0, len(ids) - 1:], axis=-1).tolist() == script
