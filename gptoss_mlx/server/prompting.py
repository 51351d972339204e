"""What both endpoints share before generation: tools, tool_choice, system options, sampling,
rendering through the chat package, and the context-length check."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gptoss_mlx.chat.forcing import ToolCallForcing
from gptoss_mlx.chat.harmony import ChatFormatError, HarmonyRenderer, SystemOptions
from gptoss_mlx.chat.tokenizer import Tokenizer
from gptoss_mlx.sampling import SamplingParams
from gptoss_mlx.server.errors import bad_request, context_length_exceeded
from gptoss_mlx.server.schemas import NamedToolChoice, SamplingFields


class PromptContext(Protocol):
    """What rendering a request needs: the server's `Engine`, or an offline batch's stand-in."""

    tokenizer: Tokenizer
    renderer: HarmonyRenderer
    current_date: str

    @property
    def context_length(self) -> int: ...


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request ready to generate: the prompt ids and how to generate after them."""

    prompt: list[int]
    sampling: SamplingParams
    max_tokens: int | None = None
    forcing: ToolCallForcing | None = None  # tool_choice "required" or a named function
    stop: tuple[str, ...] = ()  # stop strings, applied to the answer's text


def _tool_name(tool: Mapping[str, Any]) -> Any:
    """A function tool's name, in chat's (`{"function": {"name"}}`) or Responses' shape."""
    return tool.get("function", tool).get("name")


def function_tools(tools: Sequence[Mapping[str, Any]] | None, tool_choice: Any) -> list[dict]:
    """The function tools the model sees: other tool types are ignored; `tool_choice: none`
    hides all tools and a named choice keeps only that function."""
    found = [dict(t) for t in tools or () if t.get("type", "function") == "function"]
    if tool_choice == "none":
        return []
    if isinstance(tool_choice, NamedToolChoice) and tool_choice.function_name:
        name = tool_choice.function_name
        chosen = [t for t in found if _tool_name(t) == name]
        if not chosen:
            raise bad_request(f"tool_choice names {name!r}, which is not among the tools",
                              param="tool_choice")
        return chosen
    return found


def tool_forcing(engine: PromptContext, tools: Sequence[Mapping[str, Any]], tool_choice: Any,
                 prompt: Sequence[int], max_tokens: int | None) -> ToolCallForcing | None:
    """`tool_choice: "required"` or a named function (`tools` as `function_tools` left them) as
    the logits processor that makes the answer a call to one of `tools`; None for "auto" and
    "none". The answer may take `max_tokens` or what the context leaves after `prompt`."""
    if tool_choice in (None, "auto", "none"):
        return None
    if not tools:
        raise bad_request("tool_choice asks for a function call but no function tools were given",
                          param="tool_choice")
    budget = engine.context_length - len(prompt)
    if max_tokens is not None:
        budget = min(budget, max_tokens)
    return ToolCallForcing(engine.tokenizer, [_tool_name(t) for t in tools], budget)


def sampling_params(req: SamplingFields) -> SamplingParams:
    """The request's sampling settings (OpenAI's defaults for gpt-oss: temperature 1, top_p 1)."""
    defaults = SamplingParams()
    return SamplingParams(
        temperature=defaults.temperature if req.temperature is None else req.temperature,
        top_p=defaults.top_p if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        min_p=req.min_p or 0.0,
        seed=req.seed,
    )


def render_prompt(
    engine: PromptContext,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]],
    effort: str | None,
    param: str,
) -> list[int]:
    """OpenAI chat messages as harmony prompt ids, checked against the context window.

    `param` names the request field the messages came from, for error bodies.
    """
    options = SystemOptions(reasoning_effort=effort or "medium", current_date=engine.current_date)
    try:
        prompt = engine.renderer.render_chat(messages, tools=tools or None, options=options)
    except ChatFormatError as exc:
        raise bad_request(str(exc), param=param) from exc
    if len(prompt) >= engine.context_length:
        raise context_length_exceeded(len(prompt), engine.context_length, param)
    return prompt
