"""The gate in front of every route: API keys, and a size limit on request bodies that holds for
chunked bodies as for sized ones (the body is read up to the limit before any route sees it)."""

import hmac
import json

from .core import ApiError, Server

OPEN_PATHS = ("/health", "/ready", "/", "/docs", "/openapi.json")  # probes and the page need no key


class Guard:
    """ASGI middleware: 401 without a valid key, 413 past `max_body_bytes`, before the app runs."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        config = self.server.config
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if config.api_keys and scope["path"] not in OPEN_PATHS:
            auth = headers.get("authorization", "")
            token = auth[7:] if auth.lower().startswith("bearer ") else ""
            # constant-time comparison against every key, so timing does not reveal a prefix
            if not any(hmac.compare_digest(token.encode(), k.encode()) for k in config.api_keys):
                return await self._refuse(send, ApiError(401, "missing or invalid API key "
                                                              "(Authorization: Bearer <key>)", code="invalid_api_key"))
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = config.max_body_bytes
        size = headers.get("content-length")
        too_big = ApiError(413, f"the request body exceeds this server's limit of {limit} bytes", code="body_too_large")
        if size is not None and (not size.isdigit() or int(size) > limit):
            return await self._refuse(send, too_big if size.isdigit() else ApiError(400, "bad Content-Length"))
        chunks, total = [], 0
        while True:  # sized or chunked alike: never hold more than the limit
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                return await self._refuse(send, too_big)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        return await self.app(scope, replay, send)

    async def _refuse(self, send, e: ApiError) -> None:
        self.server.metrics.requests.labels("guard", str(e.status)).inc()
        payload = json.dumps(e.body()).encode()
        await send({"type": "http.response.start", "status": e.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})
