"""A multi-turn harmony chat that reuses its KV cache from turn to turn.

Every message is rendered once, when it joins the history; a turn's prompt is the concatenation
of the kept pieces, so it extends the previous turn's tokens and only the new part is prefilled
(`PromptCache` trims to the common prefix); with a `PromptStore`, long system and developer
messages come from disk when an earlier session stored them. When a turn ends in a final answer
its reasoning is dropped from the history, as harmony asks; the cache then rewinds to where the
reasoning began.
The current date is pinned when the session starts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from gptoss_mlx.chat.harmony import HarmonyRenderer, SystemOptions, drop_past_reasoning, today
from gptoss_mlx.chat.messages import Message
from gptoss_mlx.chat.tokenizer import Tokenizer
from gptoss_mlx.generate import Done, Progress, PromptCache, TokenEvent, stream
from gptoss_mlx.prompt_store import PromptStore
from gptoss_mlx.sampling import SamplingParams


class ChatSession:
    """Conversation state (system options, developer instructions, history) plus its KV cache."""

    def __init__(
        self,
        model: Any,
        tokenizer: Tokenizer,
        *,
        instructions: str | None = None,
        options: SystemOptions | None = None,
        max_context: int | None = None,
        store: PromptStore | None = None,
    ):
        """`options` default to medium effort; a missing current date is pinned to today.
        `max_context` caps prompt + answer below the model's context; `store` keeps long
        system + developer prefixes on disk across sessions."""
        self.model = model
        self.tokenizer = tokenizer
        self.renderer = HarmonyRenderer(tokenizer)
        self.cache = PromptCache(model)
        options = options or SystemOptions()
        self.options = replace(options, current_date=options.current_date or today())
        self.instructions = instructions
        self.max_context = max_context
        self.store = store
        self._history: list[tuple[Message, list[int]]] = []
        self._header = self._render_header()

    @property
    def messages(self) -> list[Message]:
        """The history as the model sees it (past reasoning dropped)."""
        return drop_past_reasoning([m for m, _ in self._history])

    def set_options(self, **changes: Any) -> None:
        """Change system options, e.g. `reasoning_effort="high"` (ValueError for a bad value).

        The history stays; the next turn re-prefills from the first changed token.
        """
        self.options = replace(self.options, **changes)
        self._header = self._render_header()

    def set_instructions(self, instructions: str | None) -> None:
        """Replace the developer instructions; the history stays."""
        self.instructions = instructions
        self._header = self._render_header()

    def clear(self) -> None:
        """Forget the history (the system and developer messages stay cached)."""
        self._history = []

    def prompt(self) -> list[int]:
        """The tokens of the next turn's prompt, ending in `<|start|>assistant`."""
        kept = {id(m) for m in self.messages}
        ids = list(self._header)
        for message, rendered in self._history:
            if id(message) in kept:
                ids += rendered
        return ids + self.renderer.assistant_start()

    def send(
        self,
        text: str,
        *,
        sampling: SamplingParams | None = None,
        max_tokens: int | None = None,
        progress: Progress | None = None,
    ) -> Iterator[TokenEvent | Done]:
        """Add a user message and stream the answer (see `gptoss_mlx.generate.stream`).

        The answer's assistant messages join the history when the stream completes; if it is
        abandoned (closed early, Ctrl-C, an error) the whole turn, question included, is removed.
        """
        mark = len(self._history)
        self._append(Message("user", text))
        completed = False
        try:
            prompt = self.prompt()
            if self.store is not None:
                self.store.prepare(self.cache, prompt)
            events = stream(
                self.model,
                self.tokenizer,
                prompt,
                cache=self.cache,
                sampling=sampling,
                max_tokens=max_tokens,
                progress=progress,
                max_context=self.max_context,
            )
            with contextlib.closing(events):
                for event in events:
                    if isinstance(event, Done):
                        # Only the assistant speaks in its turn; a hallucinated user or system
                        # header is not history.
                        for message in event.messages:
                            if message.role == "assistant":
                                self._append(message)
                        completed = True
                    yield event
        finally:
            if not completed:
                del self._history[mark:]

    def _append(self, message: Message) -> None:
        self._history.append((message, self.renderer.message(message)))

    def _render_header(self) -> list[int]:
        return self.renderer.system(self.options) + self.renderer.developer(self.instructions)
