"""Render conversations into harmony token ids through openai-harmony.

Two entry points:
- `HarmonyRenderer.render_chat(messages, tools=..., options=...)` renders a whole OpenAI-style
  chat (`[{"role": "user", "content": ...}, ...]`, tools as OpenAI function schemas) into a prompt
  ending in `<|start|>assistant`, ready for sampling.
- `system`, `developer`, `message` and `assistant_start` render single pieces, so a session can
  append only new messages to what its KV cache already holds (see `gptoss_mlx.session`).

The system message carries the reasoning effort, knowledge cutoff and the current date; pin the
date once per session (`SystemOptions(current_date=today())`) so rendered prefixes stay equal and
the KV cache stays reusable across turns and days.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gptoss_mlx.chat.messages import FUNCTIONS_NAMESPACE, ROLES, Message
from gptoss_mlx.chat.tokenizer import START, Tokenizer

REASONING_EFFORTS = ("low", "medium", "high")
# OpenAI's effort names, as gpt-oss's: `none` and `minimal` become low
REASONING_EFFORT_ALIASES = {"none": "low", "minimal": "low", "low": "low", "medium": "medium",
                            "high": "high"}
DEFAULT_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
KNOWLEDGE_CUTOFF = "2024-06"
JSON_CONTENT_TYPE = "<|constrain|>json"


def today() -> str:
    """Today's date as harmony writes it (YYYY-MM-DD)."""
    return datetime.date.today().isoformat()


def normalize_effort(value: str) -> str:
    """gpt-oss's reasoning effort for a name in any case (OpenAI's names accepted); ValueError
    naming the choices otherwise."""
    effort = REASONING_EFFORT_ALIASES.get(value.strip().lower())
    if effort is None:
        raise ValueError(f"unknown reasoning effort {value!r}; expected one of "
                         f"{', '.join(REASONING_EFFORT_ALIASES)}")
    return effort


@dataclass(frozen=True)
class SystemOptions:
    """What goes into the system message. `current_date=None` leaves the date out."""

    reasoning_effort: str = "medium"
    current_date: str | None = None
    knowledge_cutoff: str | None = KNOWLEDGE_CUTOFF
    model_identity: str | None = DEFAULT_IDENTITY

    def __post_init__(self) -> None:
        if self.reasoning_effort not in REASONING_EFFORTS:
            raise ValueError(
                f"unknown reasoning effort {self.reasoning_effort!r}; "
                f"expected one of {', '.join(REASONING_EFFORTS)}"
            )


def response_format_section(name: str | None, description: str | None,
                            schema: Mapping[str, Any] | bool | None) -> str | None:
    """The `# Response Formats` section harmony puts in the developer message for an answer
    that follows `schema` (None when there is no schema)."""
    if schema is None:
        return None
    lines = ["# Response Formats", "", f"## {name or 'response'}", ""]
    if description:
        lines.append(f"// {description}")
    lines.append(json.dumps(schema, separators=(",", ":")))
    return "\n".join(lines)


class ChatFormatError(ValueError):
    """A chat message or tool schema that cannot be rendered."""


def tool_schema(tool: Mapping[str, Any]) -> dict[str, Any]:
    """`{"name", "description", "parameters"}` from an OpenAI tool (`{"type": "function",
    "function": {...}}`) or a flat function description."""
    fn = tool.get("function", tool) if tool.get("type", "function") == "function" else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ChatFormatError(f"tool {json.dumps(tool)[:80]}: expected a function with a name")
    params = fn.get("parameters")
    if params is not None and not isinstance(params, Mapping):
        raise ChatFormatError(f"tool {fn['name']}: parameters must be a JSON schema object")
    return {
        "name": fn["name"],
        "description": fn.get("description") or "",
        "parameters": dict(params) if params else None,
    }


def _text(content: Any, where: str) -> str:
    """Plain text of an OpenAI message content: a string or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") in ("text", "input_text"):
                parts.append(str(part.get("text", "")))
            elif isinstance(part, str):
                parts.append(part)
            else:
                raise ChatFormatError(f"{where}: only text content is supported, got {part!r:.80}")
        return "".join(parts)
    raise ChatFormatError(f"{where}: content must be a string or a list of text parts")


def from_openai(
    messages: Sequence[Mapping[str, Any]],
) -> tuple[str | None, list[Message]]:
    """Convert OpenAI chat messages to (developer instructions, harmony messages).

    system/developer messages become the developer instructions; an assistant message becomes
    an analysis message (from `reasoning_content` or `reasoning`), then its `content` on the final
    channel (or as a commentary preamble when it also has `tool_calls`), then one commentary
    message per tool call; a tool result becomes a message from `functions.NAME`.
    """
    instructions: list[str] = []
    out: list[Message] = []
    call_names: dict[str, str] = {}
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        role = msg.get("role")
        if role in ("system", "developer"):
            instructions.append(_text(msg.get("content"), where))
        elif role == "user":
            out.append(Message("user", _text(msg.get("content"), where)))
        elif role == "assistant":
            reasoning = msg.get("reasoning_content") or msg.get("reasoning")
            if reasoning:
                out.append(Message("assistant", _text(reasoning, where), channel="analysis"))
            calls = msg.get("tool_calls") or []
            text = _text(msg.get("content"), where)
            if text:
                out.append(Message("assistant", text, channel="commentary" if calls else "final"))
            for call in calls:
                fn = call.get("function") if isinstance(call, Mapping) else None
                if not isinstance(fn, Mapping) or not fn.get("name"):
                    raise ChatFormatError(f"{where}.tool_calls: expected function.name")
                args = fn.get("arguments", "{}")
                if not isinstance(args, str):
                    args = json.dumps(args)
                if call.get("id"):
                    call_names[call["id"]] = fn["name"]
                out.append(
                    Message(
                        "assistant",
                        args,
                        channel="commentary",
                        recipient=f"{FUNCTIONS_NAMESPACE}.{fn['name']}",
                        content_type=JSON_CONTENT_TYPE,
                    )
                )
        elif role == "tool":
            name = msg.get("name") or call_names.get(msg.get("tool_call_id", ""))
            if not name:
                raise ChatFormatError(
                    f"{where}: tool result needs a name or the tool_call_id of an earlier call"
                )
            out.append(tool_result(name, _text(msg.get("content"), where)))
        else:
            raise ChatFormatError(f"{where}: unknown role {role!r}; expected one of {ROLES}")
    return ("\n\n".join(instructions) if instructions else None), out


def tool_result(name: str, content: str) -> Message:
    """The message returning a function's result (`name` with or without `functions.`)."""
    if "." not in name:
        name = f"{FUNCTIONS_NAMESPACE}.{name}"
    return Message("tool", content, channel="commentary", recipient="assistant", name=name)


def drop_past_reasoning(messages: Sequence[Message]) -> list[Message]:
    """Drop analysis messages of turns that ended in a final answer.

    An analysis message is dropped when a final-channel assistant message follows it; reasoning
    of an open tool-call chain (no final yet) is kept.
    """
    last_final = max(
        (i for i, m in enumerate(messages) if m.role == "assistant" and m.channel == "final"),
        default=-1,
    )
    return [
        m
        for i, m in enumerate(messages)
        if not (i < last_final and m.role == "assistant" and m.channel == "analysis")
    ]


class HarmonyRenderer:
    """Renders harmony messages to token ids with openai-harmony (vocabulary from the model)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._encoding = tokenizer.harmony
        self._assistant_start = [START, *tokenizer.encode("assistant")]

    def system(self, options: SystemOptions, *, function_tools: bool = False) -> list[int]:
        """The system message; `function_tools` adds the line routing calls to commentary."""
        import openai_harmony as oh

        content = oh.SystemContent(
            model_identity=options.model_identity,
            reasoning_effort=oh.ReasoningEffort(options.reasoning_effort.capitalize()),
            conversation_start_date=options.current_date,
            knowledge_cutoff=options.knowledge_cutoff,
        )
        msg = oh.Message.from_role_and_content(oh.Role.SYSTEM, content)
        return self._render(msg, function_tools)

    def developer(
        self, instructions: str | None, tools: Sequence[Mapping[str, Any]] | None = None
    ) -> list[int]:
        """The developer message (instructions and function tools), or [] when both are empty."""
        import openai_harmony as oh

        if not instructions and not tools:
            return []
        content = oh.DeveloperContent()
        if instructions:
            content = content.with_instructions(instructions)
        if tools:
            content = content.with_function_tools(
                [oh.ToolDescription(**tool_schema(t)) for t in tools]
            )
        msg = oh.Message.from_role_and_content(oh.Role.DEVELOPER, content)
        return self._render(msg, bool(tools))

    def message(self, message: Message) -> list[int]:
        """One user, assistant or tool message, ending in `<|end|>` (`<|call|>` for tool calls)."""
        import openai_harmony as oh

        if message.role not in ("user", "assistant", "tool"):
            raise ChatFormatError(f"cannot render a {message.role!r} message this way")
        if message.role == "tool" and not message.name:
            raise ChatFormatError("a tool message needs the tool's name")
        author = oh.Author(role=oh.Role(message.role), name=message.name)
        msg = oh.Message.from_author_and_content(author, message.content)
        msg.channel = message.channel
        msg.recipient = message.recipient
        msg.content_type = message.content_type
        return self._render(msg, False)

    def assistant_start(self) -> list[int]:
        """`<|start|>assistant`: the tokens that hand the turn to the model."""
        return list(self._assistant_start)

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        options: SystemOptions | None = None,
    ) -> list[int]:
        """A whole OpenAI-style chat as a prompt ending in `<|start|>assistant`.

        Past reasoning is dropped as `drop_past_reasoning` describes.
        """
        instructions, history = from_openai(messages)
        return self.render_prompt(history, instructions=instructions, tools=tools, options=options)

    def render_prompt(
        self,
        history: Sequence[Message],
        *,
        instructions: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        options: SystemOptions | None = None,
    ) -> list[int]:
        """System + developer + `history` (past reasoning dropped) + `<|start|>assistant`."""
        ids = self.system(options or SystemOptions(), function_tools=bool(tools))
        ids += self.developer(instructions, tools)
        for message in drop_past_reasoning(history):
            ids += self.message(message)
        return ids + self.assistant_start()

    def _render(self, msg: Any, function_tools: bool) -> list[int]:
        import openai_harmony as oh

        opts = oh.RenderOptions(conversation_has_function_tools=function_tools)
        return list(self._encoding.render(msg, opts))
