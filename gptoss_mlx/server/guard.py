"""The API-key check as ASGI middleware: it answers 401 from the headers alone, before any body
is read or parsed, on every path but `/health` (the API, `/docs` and `/openapi.json` alike)."""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

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


class APIKeyGuard:
    """Rejects HTTP requests without `Authorization: Bearer <api_key>` (none when the key is
    None)."""

    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.api_key is not None and scope["type"] == "http" and \
                scope["path"] not in OPEN_PATHS:
            error = key_error(Headers(scope=scope).get("authorization", ""), self.api_key)
            if error is not None:
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
