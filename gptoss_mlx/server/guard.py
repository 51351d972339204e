"""What is checked before a request's body is read, as ASGI middleware: the API key (401 from
the headers alone, on every path but `/health`: the API, `/docs` and `/openapi.json` alike),
then the body's size (413 from `Content-Length` before reading, or as soon as a chunked body
passes the limit while it is read)."""

from __future__ import annotations

import hmac

from fastapi import HTTPException
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gptoss_mlx.server.errors import APIError

OPEN_PATHS = frozenset({"/health"})


def key_error(authorization: str, api_key: str) -> APIError | None:
    """The 401 for an `Authorization` header that does not carry `Bearer <api_key>`, else None."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                          api_key.encode()):
        return None
    message = ("Missing API key: send it as 'Authorization: Bearer <key>'." if not authorization
               else "Incorrect API key provided.")
    return APIError(401, message, code="invalid_api_key")


def too_large_message(limit: int) -> str:
    return (f"The request body is larger than this server accepts ({limit} bytes; "
            "`serve --max-body-size`).")


class BodyTooLarge(HTTPException):
    """Raised from `receive` when a body grows past the limit (FastAPI passes HTTPExceptions
    from its body reading on to the app's handlers, which answer 413)."""

    def __init__(self, limit: int):
        super().__init__(413, too_large_message(limit))


class RequestGuard:
    """Rejects requests without `Authorization: Bearer <api_key>` (when a key is set) and
    bodies over `max_body_bytes`."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        error = None
        if self.api_key is not None and scope["path"] not in OPEN_PATHS:
            error = key_error(headers.get("authorization", ""), self.api_key)
        length = headers.get("content-length", "")
        if error is None and length.isdigit() and int(length) > self.max_body_bytes:
            error = APIError(413, too_large_message(self.max_body_bytes),
                             code="request_too_large")
        if error is not None:
            await error.response()(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        await self.app(scope, counted, send)
