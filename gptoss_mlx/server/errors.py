"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with a status code."""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
    """An error the API reports to the client as an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.headers = headers
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The JSON error body."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        """The error as an HTTP response."""
        return ErrorResponse(self.body(), status_code=self.status, headers=self.headers)


class ErrorResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error may quote text that is not valid UTF-8 (a lone
    surrogate from a client's JSON), which must not turn the 400 into a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 invalid_request_error."""
    return APIError(400, message, param=param, code=code)


def server_busy(message: str, retry_after: int) -> APIError:
    """The 429 for a request the server has no room for now."""
    return APIError(429, message, type="requests", code="rate_limit_exceeded",
                    headers={"Retry-After": str(retry_after)})


def shutting_down() -> APIError:
    """The 503 for a request that arrives or waits while the server stops."""
    return APIError(503, "The server is shutting down; retry against a running server.",
                    type="server_error", code="server_shutting_down")


def context_length_exceeded(prompt_tokens: int, context: int, param: str,
                            at_least: bool = False) -> APIError:
    """The 400 for a prompt the model's context cannot hold with room for an answer
    (`at_least`: `prompt_tokens` is a lower bound, the text was not tokenized to its end)."""
    count = f"at least {prompt_tokens}" if at_least else f"{prompt_tokens}"
    return bad_request(
        f"This model's maximum context length is {context} tokens. However, your request has "
        f"{count} input tokens. Please reduce the length of the input.",
        param=param,
        code="context_length_exceeded",
    )


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def _param(loc: tuple | list) -> str | None:
    """`messages[0].role` from pydantic's location, without the union-member tags it adds."""
    param = ""
    for part in loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part != "body" and part not in _TYPE_TAGS and part.isidentifier() and part.islower():
            param += f".{part}" if param else part
    return param or None


def _first_error(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """The error to report: the first, unless a value failed several members of a union (one
    error per member, at the same field): then the member that got furthest (`too_long`, not
    the `string_type` of the member it was never meant for)."""
    if not errors:
        return {"msg": "invalid request", "loc": ()}
    first = errors[0]
    same_field = [e for e in errors if _param(e.get("loc", ())) == _param(first.get("loc", ()))]
    specific = [e for e in same_field if not str(e.get("type", "")).endswith("_type")]
    return specific[0] if specific else first


def validation_error(exc: RequestValidationError | ValidationError) -> APIError:
    """One clear 400 from pydantic's list of errors (with its field path)."""
    first = _first_error(list(exc.errors()))
    if first.get("type") == "lone_surrogate":
        param = first["ctx"]["param"]
        return bad_request(f"Invalid value for '{param}': {first['msg']}", param=param,
                           code="invalid_unicode")
    if first.get("type") == "json_invalid":
        return bad_request(
            "We could not parse the JSON body of your request: "
            f"{first.get('ctx', {}).get('error', 'invalid JSON')}",
            code="invalid_json",
        )
    param = _param(first.get("loc", ()))
    where = f"'{param}'" if param else "the request body"
    message = f"Invalid value for {where}: {first.get('msg', 'invalid')}"
    if first.get("type") == "missing":
        message = f"Missing required parameter: {where}."
    return bad_request(message, param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    """Make every error the app raises an OpenAI error body."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "unknown_url", 405: "method_not_allowed", 413: "request_too_large"}
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return APIError(exc.status_code, detail, code=codes.get(exc.status_code),
                        headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        err = APIError(500, f"internal error: {exc}", type="server_error", code="server_error")
        return err.response()
