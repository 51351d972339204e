"""Generated harmony messages as API output items: reasoning, text and tool calls.

Both endpoints read the model's output through `OutputBuilder`: it turns the parser events of each
generated token into item events (start/delta/end) and applies the request's stop strings:

    builder = OutputBuilder(stop=["\\n\\n"])
    for event in builder.feed(token_event):   # OutputEvent(kind, item, text)
        ...
    builder.finish()                          # flush held-back text, close a cut-off item

Analysis messages become reasoning items; tool-call messages (any recipient) become tool-call
items whose text is the JSON arguments; final and commentary messages become text items. Messages
the model writes as another author (a hallucinated tool result), and a header the length limit
cut, are dropped.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal

from fastapi import Request

from gptoss_mlx.chat.messages import Message, ToolCall
from gptoss_mlx.chat.tokenizer import END, MESSAGE, STOP_TOKENS
from gptoss_mlx.generate import Done, TokenEvent
from gptoss_mlx.server.engine import Job
from gptoss_mlx.server.errors import APIError
from gptoss_mlx.server.transport import cancel_on_disconnect

ItemKind = Literal["reasoning", "text", "tool_call"]
_ID_PREFIX = {"reasoning": "rs", "text": "msg", "tool_call": "fc"}
_CLOSING = STOP_TOKENS | {END}  # tokens that end a message properly
# Generation ends that cut the output off: max_tokens, the context window, a server shutdown.
CUT_OFF = frozenset({"length", "context", "interrupted"})


def new_id(prefix: str) -> str:
    """A random OpenAI-style id such as `call_3f2a...`."""
    return f"{prefix}_{secrets.token_hex(12)}"


@dataclass
class Item:
    """One output item; `text` is the content so far (the arguments for a tool call)."""

    kind: ItemKind
    index: int
    id: str
    channel: str | None = None
    text: str = ""
    name: str | None = None
    call_id: str | None = None
    call_index: int = 0  # the position of a tool call among the tool calls
    done: bool = False
    truncated: bool = False  # the generation ended inside it


@dataclass
class OutputEvent:
    """`start` opens `item`, `delta` appends `text` to it, `end` closes it."""

    kind: Literal["start", "delta", "end"]
    item: Item
    text: str = ""


def _item_for(message: Message, index: int, call_index: int) -> Item:
    if message.is_tool_call:
        call = ToolCall.from_message(message)
        return Item("tool_call", index, new_id("fc"), message.channel, name=call.name,
                    call_id=new_id("call"), call_index=call_index)
    kind: ItemKind = "reasoning" if message.channel == "analysis" else "text"
    return Item(kind, index, new_id(_ID_PREFIX[kind]), message.channel)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that begins some stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class OutputBuilder:
    """Turns the token events of one generation into output item events."""

    def __init__(self, stop: Sequence[str] = ()):
        self.stop = [s for s in stop if s]
        self.items: list[Item] = []
        # tokens of analysis messages, from the <|message|> opening one through its <|end|>
        self.reasoning_tokens = 0
        self.stopped = False  # a stop string matched: the caller should end generation
        self._current: Item | None = None
        self._skipping = False  # inside a message from another author
        self._pending = ""  # text held back while it may begin a stop string

    @property
    def tool_calls(self) -> list[Item]:
        """The tool-call items so far."""
        return [i for i in self.items if i.kind == "tool_call"]

    def text(self, kind: ItemKind = "text") -> str:
        """All text of the items of one kind, concatenated."""
        return "".join(i.text for i in self.items if i.kind == kind)

    def feed(self, event: TokenEvent, cut_off: bool = False) -> list[OutputEvent]:
        """The item events caused by one generated token.

        `cut_off`: this is the last token and a length limit stopped the generation, so an item
        the parser closes now without a closing token is marked truncated, and a message whose
        header it cut is dropped (its channel or recipient may be cut short, and the header's
        text is no content).
        """
        if self.stopped:
            return []
        in_reasoning = self._current is not None and self._current.kind == "reasoning"
        header_cut = cut_off and event.token != MESSAGE
        out: list[OutputEvent] = []
        for parsed in event.parsed:
            if self.stopped:
                break
            if parsed.kind == "start":
                self._skipping = parsed.message.role != "assistant" or header_cut
                if not self._skipping:
                    self._current = _item_for(
                        parsed.message, len(self.items), len(self.tool_calls)
                    )
                    self.items.append(self._current)
                    out.append(OutputEvent("start", self._current))
            elif parsed.kind == "delta" and self._current is not None and not self._skipping:
                out += self._delta(parsed.text)
            elif parsed.kind == "end":
                if self._current is not None and not self._skipping:
                    self._current.truncated = cut_off and event.token not in _CLOSING
                    out += self._close()
                self._skipping = False
        if in_reasoning or (self._current is not None and self._current.kind == "reasoning"):
            self.reasoning_tokens += 1
        return out

    def finish(self) -> list[OutputEvent]:
        """Flush held-back text and close an item the generation cut off."""
        if self._current is None:
            return []
        self._current.truncated = True
        return self._close()

    def finish_reason(self, generation_reason: str) -> str:
        """OpenAI's finish reason: `tool_calls`, `stop` or `length` (also for a call cut off by
        the length limit: its arguments are incomplete).

        `generation_reason` is `GenerationStats.finish_reason` (or "stop" when cancelled).
        """
        if self.stopped:
            return "stop"
        if generation_reason in CUT_OFF:
            return "length"
        return "tool_calls" if self.tool_calls else "stop"

    def _delta(self, text: str) -> list[OutputEvent]:
        item = self._current
        assert item is not None
        if item.kind != "text" or not self.stop:
            item.text += text
            return [OutputEvent("delta", item, text)]
        self._pending += text
        cut = min((i for i in (self._pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            emit, self._pending = self._pending[:cut], ""
            self.stopped = True
            out = [OutputEvent("delta", item, emit)] if emit else []
            item.text += emit
            return out + self._close()
        keep = _held_back(self._pending, self.stop)
        emit = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(emit) :]
        if not emit:
            return []
        item.text += emit
        return [OutputEvent("delta", item, emit)]

    def _close(self) -> list[OutputEvent]:
        item = self._current
        assert item is not None
        out = []
        if self._pending:
            item.text += self._pending
            out.append(OutputEvent("delta", item, self._pending))
            self._pending = ""
        item.done = True
        self._current = None
        return [*out, OutputEvent("end", item)]


class OutputFeed:
    """Feeds one generation's events into an OutputBuilder, holding each token until the next
    event shows whether it was the last (a last token a length limit cut is fed as such), and
    counts the generated tokens. The caller ends the generation once `builder.stopped`.

        feed = OutputFeed(OutputBuilder(stop))
        for event in events:                  # TokenEvent ..., then Done
            item_events = feed.push(event)
            if feed.builder.stopped: break
        item_events = feed.close()
    """

    def __init__(self, builder: OutputBuilder):
        self.builder = builder
        self.done: Done | None = None
        self.completion_tokens = 0
        self._previous: TokenEvent | None = None

    def push(self, event: TokenEvent | Done) -> list[OutputEvent]:
        """The item events of the token before `event` (none for the first)."""
        if isinstance(event, Done):
            self.done = event
            return []
        out = self.builder.feed(self._previous) if self._previous is not None else []
        if not self.builder.stopped:
            self.completion_tokens += 1
            self._previous = event
        return out

    def close(self) -> list[OutputEvent]:
        """The item events of the last token, then those closing an item the end cut off."""
        out = []
        if self._previous is not None and not self.builder.stopped:
            reason = self.done.stats.finish_reason if self.done else ""
            out = self.builder.feed(self._previous, cut_off=reason in CUT_OFF)
        self._previous = None
        return out + self.builder.finish()

    @property
    def generation_reason(self) -> str:
        """How the generation ended (`GenerationStats.finish_reason`; "stop" when cut short)."""
        return self.done.stats.finish_reason if self.done else "stop"

    @property
    def finish_reason(self) -> str:
        """`tool_calls`, `stop` or `length`."""
        return self.builder.finish_reason(self.generation_reason)


class Generation:
    """Runs one engine job through an OutputFeed; a stop string cancels the job."""

    def __init__(self, job: Job, builder: OutputBuilder):
        self.job = job
        self.builder = builder
        self.feed = OutputFeed(builder)

    @property
    def done(self) -> Done | None:
        return self.feed.done

    @property
    def completion_tokens(self) -> int:
        return self.feed.completion_tokens

    async def events(self) -> AsyncIterator[OutputEvent]:
        """The item events of the whole generation; a stop string cancels the job."""
        events = self.job.events()
        while True:
            try:
                event = await anext(events)
            except StopAsyncIteration:
                break
            except Exception as exc:
                raise APIError(500, f"generation failed: {exc}", type="server_error",
                               code="server_error") from exc
            for out in self.feed.push(event):
                yield out
            if isinstance(event, Done):
                break
            if self.builder.stopped:
                self.job.cancel()
                break
        for out in self.feed.close():
            yield out

    async def run(self, request: Request) -> None:
        """Generate to the end (a response sent whole); a 499 if the client went away first."""
        async with cancel_on_disconnect(request, self.job):
            async for _ in self.events():
                pass
        if self.job.cancelled.is_set() and self.done is None and not self.builder.stopped:
            raise APIError(499, "the client closed the request", code="client_closed_request")

    @property
    def prompt_tokens(self) -> int:
        return len(self.job.prompt)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens the prompt cache supplied."""
        return self.done.stats.cached_tokens if self.done else self.job.cached_tokens

    @property
    def generation_reason(self) -> str:
        """How the generation ended (`GenerationStats.finish_reason`; "stop" when cancelled)."""
        return self.feed.generation_reason

    @property
    def finish_reason(self) -> str:
        """`tool_calls`, `stop` or `length`."""
        return self.feed.finish_reason
