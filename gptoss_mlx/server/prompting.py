"""What both endpoints share before generation: tools, tool_choice, system options, sampling,
rendering through the chat package, and the context-length check."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gptoss_mlx.chat.forcing import (
    Function,
    SchemaError,
    TurnConstraint,
    TurnSpec,
    check_schema,
    schema_error,
)
from gptoss_mlx.chat.harmony import ChatFormatError, HarmonyRenderer, SystemOptions
from gptoss_mlx.chat.tokenizer import Tokenizer
from gptoss_mlx.sampling import SamplingParams
from gptoss_mlx.server.errors import bad_request, context_length_exceeded
from gptoss_mlx.server.schemas import NamedToolChoice, SamplingFields

log = logging.getLogger("gptoss_mlx.server")


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
    forcing: TurnConstraint | None = None  # tool_choice, strict tools, response format
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


def _strict(tool: Mapping[str, Any]) -> bool | None:
    """A function tool's `strict` flag, in chat's or Responses' shape (None when unset)."""
    return tool.get("function", tool).get("strict")


def _function(tool: Mapping[str, Any], i: int, strict_tools: bool) -> Function:
    """The function a constrained turn may call: its arguments follow its parameter schema when
    the tool says `strict: true` (a 400 if the schema cannot be enforced) or, with
    `strict_tools`, unless it says `strict: false` (free arguments if it cannot be)."""
    fn = tool.get("function", tool)
    name, strict = fn["name"], _strict(tool)
    if not (strict or (strict_tools and strict is None)):
        return Function(name)
    params = fn.get("parameters") or {"type": "object"}
    if strict:
        where = f"tools[{i}].{'function.' if 'function' in tool else ''}parameters"
        try:
            return Function(name, check_schema(params, where))
        except SchemaError as exc:
            raise bad_request(str(exc), param=where) from exc
    if schema_error(params) is not None:
        log.info("tool %s: parameters llguidance cannot enforce; its arguments stay free", name)
        return Function(name)
    return Function(name, params)


def answer_schema(kind: str | None, schema: Any, param: str) -> dict[str, Any] | bool | None:
    """The JSON schema a final answer must follow for a response format of type `kind`
    (`text`/None: none; `json_object`: any object; `json_schema`: `schema`); a 400 naming
    `param` when it cannot be enforced."""
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return {"type": "object"}
    if schema is None:
        raise bad_request(f"{param}: a json_schema response format needs a schema", param=param)
    try:
        return check_schema(schema, param)
    except SchemaError as exc:
        raise bad_request(str(exc), param=param) from exc


def turn_constraint(engine: PromptContext, tools: Sequence[Mapping[str, Any]], tool_choice: Any,
                    prompt: Sequence[int], max_tokens: int | None, *,
                    answer: dict[str, Any] | bool | None = None,
                    strict_tools: bool = True) -> TurnConstraint | None:
    """The logits processor that keeps the turn within the request: `tool_choice: "required"`
    or a named function (`tools` as `function_tools` left them) makes it end in a call to one of
    `tools`; `answer` (see `answer_schema`) constrains the final answer; strict tools constrain
    call names and arguments. None when nothing is constrained. The turn may take `max_tokens`
    or what the context leaves after `prompt`."""
    forced = tool_choice not in (None, "auto", "none")
    if forced and not tools:
        raise bad_request("tool_choice asks for a function call but no function tools were given",
                          param="tool_choice")
    functions = tuple(_function(t, i, strict_tools) for i, t in enumerate(tools))
    if not forced and answer is None and all(f.parameters is None for f in functions):
        return None  # nothing strict: the turn stays free
    budget = engine.context_length - len(prompt)
    if max_tokens is not None:
        budget = min(budget, max_tokens)
    spec = TurnSpec(final=not forced, answer_schema=answer, functions=functions)
    try:
        return TurnConstraint(engine.tokenizer, spec, budget)
    except SchemaError as exc:
        raise bad_request(f"the response format and tools cannot be enforced together: {exc}",
                          param="tools") from exc


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
    response_format: str | None = None,
) -> list[int]:
    """OpenAI chat messages as harmony prompt ids, checked against the context window.

    `param` names the request field the messages came from, for error bodies;
    `response_format` (see `chat.harmony.response_format_section`) goes into the developer message.
    """
    options = SystemOptions(reasoning_effort=effort or "medium", current_date=engine.current_date)
    if response_format:
        messages = [*messages, {"role": "developer", "content": response_format}]
    try:
        prompt = engine.renderer.render_chat(messages, tools=tools or None, options=options)
    except ChatFormatError as exc:
        raise bad_request(str(exc), param=param) from exc
    if len(prompt) >= engine.context_length:
        raise context_length_exceeded(len(prompt), engine.context_length, param)
    return prompt
