"""The on-disk prompt cache: a restarted server (or a new chat) reads long instruction prefixes
back instead of prefilling them; the restored caches give the logits a run without any cache
gives; broken or foreign files are ignored with a warning; the byte budget holds."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import openai
import openai_harmony as oh
import pytest
from serving import running

from gptoss_mlx import prompt_store
from gptoss_mlx.chat.harmony import HarmonyRenderer, SystemOptions
from gptoss_mlx.chat.tokenizer import Tokenizer
from gptoss_mlx.generate import PromptCache, common_prefix, prefill
from gptoss_mlx.model.cache import trimmable
from gptoss_mlx.prompt_store import PromptStore, instructions_length, model_identity

OPTIONS = SystemOptions(current_date="2025-08-05")
DATE = "2025-08-05"


@pytest.fixture(scope="module")
def identity(loaded) -> str:
    return model_identity(loaded[0])


def chat_prompt(tok: Tokenizer, developer: str, user: str) -> list[int]:
    return HarmonyRenderer(tok).render_chat([{"role": "developer", "content": developer},
                                             {"role": "user", "content": user}], options=OPTIONS)


COMMON = "the of and to in is for on that with as was by at from this have are not but".split()


def words(n: int, topic: str = "rules") -> str:
    """`topic` then n common words: n + 1 or 2 tokens."""
    return topic + " " + " ".join(COMMON[i % len(COMMON)] for i in range(n))


class Counting:
    """The model, counting the tokens it is fed."""

    def __init__(self, model: Any):
        self.model, self.config, self.fed = model, model.config, 0

    def make_cache(self, *args: Any, **kw: Any) -> list[Any]:
        return self.model.make_cache(*args, **kw)

    def __call__(self, tokens: mx.array, cache: Any = None, last_only: bool = False) -> mx.array:
        self.fed += tokens.shape[1]
        return self.model(tokens, cache=cache, last_only=last_only)


def stored(store: PromptStore, cache: PromptCache, prompt: list[int]) -> Path:
    """Prefill `prompt` into `cache` through the store; return the file it wrote."""
    store.prepare(cache, prompt)
    prefill(cache.model, cache, prompt)
    store.flush()
    n = instructions_length(prompt, store.tokenizer)
    path = store.path(prompt[:n])
    assert path.is_file()
    return path


# -- which prefix: the system and developer messages, as openai-harmony renders them -----------

def test_instructions_length_is_the_harmony_header(loaded) -> None:
    _, tok = loaded
    developer = "Use the tools. " * 20
    prompt = chat_prompt(tok, developer, "hello")
    system = (oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort.MEDIUM)
              .with_conversation_start_date(DATE))
    head = oh.Conversation.from_messages([
        oh.Message.from_role_and_content(oh.Role.SYSTEM, system),
        oh.Message.from_role_and_content(oh.Role.DEVELOPER,
                                         oh.DeveloperContent.new().with_instructions(developer))])
    header = tok.harmony.render_conversation(head)
    assert prompt[:len(header)] == list(header)
    assert instructions_length(prompt, tok) == len(header)
    no_developer = HarmonyRenderer(tok).render_chat([{"role": "user", "content": "hi"}],
                                                    options=OPTIONS)
    system_only = tok.harmony.render_conversation(
        oh.Conversation.from_messages([oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]))
    assert instructions_length(no_developer, tok) == len(system_only)


# -- restored caches give the logits of a run without any cache ------------------------------

class NoSlack(Counting):
    """Sliding layers keep no spare positions: after a short prefix they have dropped some."""

    def make_cache(self, *args: Any, **kw: Any) -> list[Any]:
        return self.model.make_cache(slack=0, compact_step=8)


def test_restored_prefix_matches_a_fresh_run(loaded, identity, tmp_path: Path) -> None:
    model, tok = loaded
    first = chat_prompt(tok, words(300), "What is the capital of France?")
    second = chat_prompt(tok, words(300), "Name a prime number.")
    n = instructions_length(second, tok)
    assert n == instructions_length(first, tok) > 300 and first[:n] == second[:n]

    writer = PromptStore(tmp_path, identity, tok, min_tokens=256)
    stored(writer, PromptCache(NoSlack(model)), first)

    counting = NoSlack(model)
    cache = PromptCache(counting)
    reader = PromptStore(tmp_path, identity, tok, min_tokens=256)  # a restarted process
    assert reader.prepare(cache, second) == n and cache.tokens == second[:n]
    assert all(getattr(layer, "start", 1) > 0 for layer in cache.layers)  # sliding: dropped some
    logits, reused = prefill(counting, cache, second)
    assert reused == n and counting.fed == len(second) - n
    # oracle: one forward over the whole prompt with no cache at all
    fresh = model(mx.array([second]), last_only=True)[:, -1, :]
    assert mx.abs(logits - fresh).max().item() < 1e-5
    # and the tail's logits at every position, against a cache that never left memory
    tail = mx.array([second[n:]])
    restored = PromptCache(NoSlack(model))
    assert reader.prepare(restored, second) == n
    plain = PromptCache(model)
    prefill(model, plain, second[:n + 1])
    plain.trim_to(n)
    got = model(tail, cache=restored.layers)
    want = model(tail, cache=plain.layers)
    assert mx.abs(got - want).max().item() < 1e-5
    # the file, read by the safetensors package: the prefix, and a full layer's keys
    from safetensors import safe_open

    with safe_open(str(reader.path(second[:n])), "pt") as f:
        assert f.get_tensor("tokens").tolist() == second[:n]
        assert f.metadata()["tokens"] == str(n)
        stored_keys = f.get_tensor("layers.1.keys").numpy()
    assert not hasattr(plain.layers[1], "window")  # layer 1 attends to everything
    assert np.allclose(stored_keys, np.array(plain.layers[1].keys[..., :n, :]), atol=1e-6)


def test_slot_that_cannot_go_back_gets_the_prefix_from_disk(loaded, identity,
                                                            tmp_path: Path) -> None:
    model, tok = loaded
    small = NoSlack(model)
    first = chat_prompt(tok, words(80), words(60, "question"))  # a user turn past the window
    second = chat_prompt(tok, words(80), "short")
    n = instructions_length(second, tok)
    store = PromptStore(tmp_path, identity, tok, min_tokens=64)
    cache = PromptCache(small)
    store.prepare(cache, first)
    prefill(small, cache, first)
    store.flush()
    assert common_prefix(cache.tokens, second) >= n
    assert trimmable(cache.layers) < len(cache.tokens) - n  # reuse alone would start over
    assert store.prepare(cache, second) == n
    logits, reused = prefill(small, cache, second)
    assert reused == n
    fresh = model(mx.array([second]), last_only=True)[:, -1, :]
    assert mx.abs(logits - fresh).max().item() < 1e-5


# -- a restarted server reports the 5,000-token prefix as cached and prefills only the rest ---

def _serve_once(model: Any, counting: Counting, tok: Tokenizer, folder: Path, identity: str,
                user: str) -> tuple[Any, int]:
    from gptoss_mlx.server.app import create_app
    from gptoss_mlx.server.engine import Engine

    store = PromptStore(folder, identity, tok)  # the defaults serve uses
    engine = Engine(model, tok, current_date=DATE, prompt_store=store)
    engine.model = counting
    with running(create_app(engine, "gpt-oss-tiny")) as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x")
        before = counting.fed
        r = client.chat.completions.create(
            model="gpt-oss-tiny", max_tokens=2, temperature=0,
            messages=[{"role": "system", "content": words(5000)},
                      {"role": "user", "content": user}])
        fed = counting.fed - before - (r.usage.completion_tokens - 1)
    store.flush()
    return r, fed


def test_restart_reads_the_prefix_back(loaded, identity, tmp_path: Path) -> None:
    model, tok = loaded
    counting = Counting(model)
    first, fed = _serve_once(model, counting, tok, tmp_path, identity, "Hello there")
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert fed == first.usage.prompt_tokens
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    _, meta = mx.load(str(files[0]), return_metadata=True)
    prefix = int(meta["tokens"])
    assert 5000 <= prefix < first.usage.prompt_tokens

    second, fed = _serve_once(model, counting, tok, tmp_path, identity, "Something else")
    assert second.usage.prompt_tokens_details.cached_tokens == prefix
    assert fed == second.usage.prompt_tokens - prefix  # only the rest was prefilled


# -- broken and foreign files are ignored with a warning (and removed) -----------------------

def _damaged(path: Path, how: str, foreign: Path) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flipped":
        path.write_bytes(data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:])
    elif how == "garbage":
        path.write_bytes(b"not a safetensors file")
    else:  # another model's file under this prefix's name
        path.write_bytes(foreign.read_bytes())


@pytest.fixture(scope="module")
def header(loaded) -> tuple[list[int], PromptCache]:
    """A prompt with a ~100-token instructions prefix, and a cache holding just that prefix."""
    model, tok = loaded
    prompt = chat_prompt(tok, words(60), "hi")
    cache = PromptCache(model)
    prefill(model, cache, prompt)
    cache.trim_to(instructions_length(prompt, tok))
    return prompt, cache


@pytest.mark.parametrize("how", ["truncated", "flipped", "garbage", "foreign"])
def test_bad_file_is_ignored_with_a_warning(loaded, identity, header, tmp_path: Path, how: str,
                                            caplog: pytest.LogCaptureFixture) -> None:
    model, tok = loaded
    prompt, held = header
    ours = PromptStore(tmp_path / "ours", identity, tok, min_tokens=64)
    theirs = PromptStore(tmp_path / "theirs", "0" * 64, tok, min_tokens=64)
    for store in (ours, theirs):
        store.save(held)
        store.flush()
    path, foreign = ours.path(held.tokens), theirs.path(held.tokens)
    assert ours.prepare(PromptCache(model), prompt) == len(held.tokens)  # intact, it is used
    _damaged(path, how, foreign)

    store = PromptStore(tmp_path / "ours", identity, tok, min_tokens=64)
    cache = PromptCache(model)
    with caplog.at_level(logging.WARNING, logger="gptoss_mlx.prompt_store"):
        assert store.prepare(cache, prompt) == 0
    assert cache.tokens == [] and cache.checkpoint is not None  # prefill will store it again
    assert not path.exists()
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert str(path) in record.getMessage() and "ignored" in record.getMessage()


# -- the byte budget holds, least recently used first out ------------------------------------

def test_budget_evicts_least_recently_used(loaded, identity, tmp_path: Path) -> None:
    model, tok = loaded
    prompts = [chat_prompt(tok, words(60, topic), "hi") for topic in ("red", "green", "blue")]
    probe = PromptStore(tmp_path / "probe", identity, tok, min_tokens=64)
    size = stored(probe, PromptCache(model), prompts[0]).stat().st_size
    budget = int(size * 2.5)
    store = PromptStore(tmp_path / "lru", identity, tok, min_tokens=64, max_bytes=budget)
    paths = []
    for p in prompts[:2]:
        paths.append(stored(store, PromptCache(model), p))
        time.sleep(0.02)
    assert store.prepare(PromptCache(model), prompts[0]) > 0  # the first is now the most recent
    time.sleep(0.02)
    paths.append(stored(store, PromptCache(model), prompts[2]))
    assert [p.exists() for p in paths] == [True, False, True]
    assert sum(p.stat().st_size for p in store.entries()) <= budget

    small = PromptStore(tmp_path / "small", identity, tok, min_tokens=64, max_bytes=size // 2)
    cache = PromptCache(model)
    small.prepare(cache, prompts[0])
    prefill(model, cache, prompts[0])
    small.flush()
    assert small.entries() == []  # one prefix larger than the whole budget is not written


# -- writes are atomic: concurrent writers, a writer that fails half way ----------------------

def test_concurrent_and_failed_writes_leave_only_whole_files(
        loaded, identity, header, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = loaded
    prompt, held = header
    stores = [PromptStore(tmp_path, identity, tok, min_tokens=64) for _ in range(4)]
    for s in stores:  # four "processes" write the same prefix at once
        s.save(held)
    for s in stores:
        s.flush()
    assert [p.name for p in tmp_path.iterdir()] == [stores[0].path(held.tokens).name]
    assert PromptStore(tmp_path, identity, tok, min_tokens=64).prepare(
        PromptCache(model), prompt) == len(held.tokens)

    def dies_half_way(path: Path, *args: Any, **kw: Any) -> None:
        path.write_bytes(b"\0" * 1000)  # the start of a file the disk could not hold
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prompt_store, "write_file", dies_half_way)
    failing = PromptStore(tmp_path / "failing", identity, tok, min_tokens=64)
    failing.save(held)
    failing.flush()
    assert list((tmp_path / "failing").iterdir()) == []  # neither a half file nor a temporary


# -- chat: a new session reads the long developer message back --------------------------------

def test_chat_session_reads_the_header_back(loaded, identity, tmp_path: Path) -> None:
    from gptoss_mlx.sampling import SamplingParams
    from gptoss_mlx.session import ChatSession

    model, tok = loaded

    def turn(text: str) -> Any:
        store = PromptStore(tmp_path, identity, tok, min_tokens=64)
        session = ChatSession(model, tok, instructions=words(80), options=OPTIONS, store=store)
        *_, done = session.send(text, sampling=SamplingParams(temperature=0), max_tokens=2)
        store.flush()
        return session, done

    session, first = turn("Hello")
    assert first.stats.cached_tokens == 0
    header = len(session.prompt()) - len(HarmonyRenderer(tok).assistant_start())
    header -= len(HarmonyRenderer(tok).message(session.messages[0])) + sum(
        len(HarmonyRenderer(tok).message(m)) for m in session.messages[1:])
    _, second = turn("Another question")
    assert second.stats.cached_tokens == header > 80
    assert json.loads(mx.load(str(next(tmp_path.glob("*.safetensors"))),
                              return_metadata=True)[1]["tokens"]) == header


def test_unusable_folder_is_one_clear_error(loaded, tmp_path: Path) -> None:
    import click

    from gptoss_mlx.cli.prompt_cache import open_prompt_store

    model, tok = loaded
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(click.ClickException, match=f"--prompt-cache-dir {blocker}/sub: cannot"):
        open_prompt_store(blocker / "sub", 2**30, model, tok)
    assert open_prompt_store(None, 2**30, model, tok) is None
