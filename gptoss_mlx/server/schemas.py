"""Validated request bodies of the chat-completions and Responses endpoints.

Fields the server does not use (`user`, `metadata`, `logprobs`, penalties, ...) are accepted and
ignored, as clients send them routinely; fields it uses are type-checked, so a bad value gets a
400 naming the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, model_validator
from pydantic_core import PydanticCustomError

from gptoss_mlx.chat.harmony import REASONING_EFFORT_ALIASES, normalize_effort


def _effort(value: str | None) -> str | None:
    return None if value is None else normalize_effort(value)


def _any_case(word: str) -> str:
    return "".join(f"[{c.lower()}{c.upper()}]" for c in word)


# An optional reasoning effort, normalised (and checked) by `normalize_effort`; the OpenAPI
# description states the same rule (any case, surrounding blanks) as a pattern.
_EFFORT_PATTERN = rf"^\s*({'|'.join(map(_any_case, REASONING_EFFORT_ALIASES))})\s*$"
Effort = Annotated[str, AfterValidator(_effort),
                   WithJsonSchema({"type": "string", "pattern": _EFFORT_PATTERN})] | None


def _surrogate_at(value: Any, path: str) -> str | None:
    """The path of the first string (or key) holding a lone surrogate, else None."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and _surrogate_at(key, path) is not None:
                return where
            if (found := _surrogate_at(item, where)) is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if (found := _surrogate_at(item, f"{path}[{i}]")) is not None:
                return found
    return None


class _Lenient(BaseModel):
    """Accepts unknown fields (clients send many) but checks the known ones."""

    model_config = ConfigDict(extra="allow")


class Reasoning(_Lenient):
    """`{"effort": ..., "summary": ...}` as both APIs accept it."""

    effort: Effort = None
    summary: str | None = None


class FunctionDefinition(_Lenient):
    """A function tool's name, description and JSON-schema parameters."""

    name: Annotated[str, Field(min_length=1)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(_Lenient):
    """A chat-completions tool; only `type: function` ones reach the model."""

    # the rule `_function_given` checks, for the OpenAPI description
    model_config = ConfigDict(extra="allow", json_schema_extra={"anyOf": [
        {"required": ["function"], "properties": {"function": {"type": "object"}}},
        {"required": ["type"], "properties": {"type": {"not": {"const": "function"}}}}]})

    type: str = "function"
    function: FunctionDefinition | None = None

    @model_validator(mode="after")
    def _function_given(self) -> ChatTool:
        if self.type == "function" and self.function is None:
            raise ValueError("a function tool needs `function` with at least a name")
        return self


class FunctionCallRef(_Lenient):
    """`function` inside an assistant message's tool call."""

    name: Annotated[str, Field(min_length=1)]
    arguments: str | dict[str, Any] = "{}"


class ChatToolCall(_Lenient):
    """A tool call in an assistant message sent back as history."""

    id: str | None = None
    type: str = "function"
    function: FunctionCallRef


class ContentPart(_Lenient):
    """One part of a message's content (only text parts can be rendered)."""

    type: str
    text: str | None = None


class ChatMessage(_Lenient):
    """One chat message. Assistant reasoning is accepted as `reasoning` or `reasoning_content`."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ChatToolCall] | None = None
    tool_call_id: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None


class NamedFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    """`{"type": "function", "function": {"name": ...}}` (chat) or `{"type", "name"}`."""

    type: str = "function"
    function: NamedFunction | None = None
    name: str | None = None

    @property
    def function_name(self) -> str | None:
        """The chosen function's name, from either API's shape."""
        return self.function.name if self.function else self.name


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatTemplateKwargs(_Lenient):
    reasoning_effort: Effort = None


class SamplingFields(_Lenient):
    """Sampling fields both endpoints share (top_k and min_p as the usual extensions)."""

    model: str | None = None
    stream: bool = False
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[float, Field(ge=0, lt=1)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**64)] | None = None
    reasoning: Reasoning | None = None
    tool_choice: ToolChoice | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        """Text must be valid Unicode: JSON can carry a lone surrogate (`"\\ud800"`), which no
        tokenizer or UTF-8 encoder accepts."""
        where = _surrogate_at(data, "")
        if where is not None:
            raise PydanticCustomError(
                "lone_surrogate",
                "text must be valid Unicode, but it holds a lone surrogate (an unpaired "
                "\\ud800-\\udfff escape)", {"param": where})
        return data


class JSONSchemaFormat(_Lenient):
    """`response_format.json_schema`: the schema a chat answer follows."""

    name: str | None = None
    description: str | None = None
    schema_: Annotated[dict[str, Any] | None, Field(alias="schema")] = None
    strict: bool | None = None


def _schema_rule(holder: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI statement of `_schema_given`: type json_schema needs a schema object."""
    return {"anyOf": [{"properties": {"type": {"enum": ["text", "json_object"]}}},
                      {"required": ["type", *holder["required"]],
                       "properties": holder["properties"]}]}


_SCHEMA_OBJECT = {"required": ["schema"], "properties": {"schema": {"type": "object"}}}


class ResponseFormat(_Lenient):
    """Chat's `response_format`: free text, any JSON object, or JSON following a schema."""

    model_config = ConfigDict(extra="allow", json_schema_extra=_schema_rule({
        "required": ["json_schema"],
        "properties": {"json_schema": {"type": "object", **_SCHEMA_OBJECT}}}))

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None
                                           or self.json_schema.schema_ is None):
            raise ValueError("a json_schema response format needs json_schema.schema")
        return self


class TextFormat(_Lenient):
    """Responses' `text.format`: as chat's response format, its schema fields flattened."""

    model_config = ConfigDict(extra="allow", json_schema_extra=_schema_rule(_SCHEMA_OBJECT))

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    description: str | None = None
    schema_: Annotated[dict[str, Any] | None, Field(alias="schema")] = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("a json_schema text format needs a schema")
        return self


class TextConfig(_Lenient):
    """Responses' `text`: its output format."""

    format: TextFormat | None = None


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: list[ChatTool] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    n: Annotated[int, Field(ge=1, le=1)] = 1
    stream_options: StreamOptions | None = None
    reasoning_effort: Effort = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    response_format: ResponseFormat | None = None

    @property
    def effort(self) -> str | None:
        """The reasoning effort from whichever of the three places carries it."""
        if self.reasoning_effort:
            return self.reasoning_effort
        if self.reasoning and self.reasoning.effort:
            return self.reasoning.effort
        return self.chat_template_kwargs.reasoning_effort if self.chat_template_kwargs else None

    @property
    def stop_strings(self) -> list[str]:
        """`stop` as a list without empty strings."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class InputItem(_Lenient):
    """One Responses input item: a message, function_call, function_call_output or reasoning."""

    type: str = "message"
    role: Literal["system", "developer", "user", "assistant"] | None = None
    content: str | list[ContentPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[ContentPart] | None = None
    summary: list[ContentPart] | None = None


class ResponsesRequest(SamplingFields):
    """POST /v1/responses."""

    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    text: TextConfig | None = None
