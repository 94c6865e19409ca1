"""What stands between the network and the server's routes: the API key check, per-client rate
limits, the request body's size and read deadline, and the request head's read deadline.

Each is cheap and runs before anything costly (reading a body, parsing JSON, tokenizing), so
that a client who may not be served costs the server next to nothing:

    connection --HeadDeadline--> request head --AuthFirst--> key --BodyLimit--> body --> route

References: OWASP's "slow HTTP" denial of service (slowloris), RFC 7235 (auth schemes are
case-insensitive), uvicorn's protocol classes.
"""
from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any, Callable

from fastapi import HTTPException, Request
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from .protocol import APIError


class TokenBucket:
    """Per-client token buckets: a client may send `burst` requests at once, refilled at `rate`
    per second. Used only on the event loop's thread, so it needs no lock."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.buckets: dict[str, tuple[float, float]] = {}   # client -> (tokens, time of last refill)

    def take(self, client: str) -> float:
        """Spend one of `client`'s tokens: 0.0 if it had one, else the seconds until it will."""
        now = time.monotonic()
        tokens, last = self.buckets.get(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
        self.buckets[client] = (tokens - 1 if wait == 0 else tokens, now)
        if len(self.buckets) > 10_000:   # forget clients whose bucket has refilled: a new one starts full
            self.buckets = {c: (t, s) for c, (t, s) in self.buckets.items() if t + (now - s) * self.rate < self.burst}
        return wait


def bearer_token(request: Request) -> str | None:
    """The token of an "Authorization: Bearer <token>" header (any case of "Bearer", RFC 7235)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


class AuthFirst:
    """ASGI middleware: with an API key, every route but /health needs it (the docs and the
    OpenAPI schema too, and /metrics, whose counters tell about other clients' prompts). It is
    checked before anything reads the body, so a client without the key gets 401 whatever it
    sent (malformed or oversized bodies too)."""

    def __init__(self, app: Any, api_key: str | None) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if self.api_key is not None and scope["type"] == "http" and scope["path"] != "/health":
            # compare_digest: the time taken does not tell an attacker how much of the key matched
            if not secrets.compare_digest((bearer_token(Request(scope)) or "").encode(), self.api_key.encode()):
                error = APIError(401, "missing or wrong API key; send the header 'Authorization: Bearer <key>'",
                                 code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413, whether it declares its
    Content-Length or arrives chunked (then we count the bytes as they come); a body that has
    not fully arrived `timeout` seconds after its request began gets 408."""

    def __init__(self, app: Any, max_bytes: int, timeout: float) -> None:
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared, received, done = int(dict(scope["headers"]).get(b"content-length", b"0")), 0, False
        deadline = time.monotonic() + self.timeout

        async def limited_receive() -> dict:
            nonlocal received, done
            if done:                 # the body is in: the route is waiting for a hang-up
                return await receive()
            if declared <= self.max_bytes:
                try:
                    message = await asyncio.wait_for(receive(), deadline - time.monotonic())
                except asyncio.TimeoutError:
                    raise HTTPException(408, f"the request body did not arrive within {self.timeout:g} s "
                                        "(--body-timeout)") from None
                received += len(message.get("body", b""))
                done = not message.get("more_body", False)
            if max(declared, received) > self.max_bytes:
                # Raised while the route reads its body, so FastAPI hands it to our error handler.
                raise HTTPException(413, f"the request body is over {self.max_bytes} bytes (--max-body-bytes)")
            return message
        await self.app(scope, limited_receive, send)


class HeadDeadline(AutoHTTPProtocol):   # uvicorn's HTTP/1.1 protocol (h11, or httptools if installed)
    """A connection must deliver a whole request head within `timeout` seconds of opening (or
    of its previous response); else it gets 408 and is closed. uvicorn has no such deadline,
    so a client that sends headers a byte at a time, or never finishes them (slowloris), could
    hold a connection forever; thousands of them exhaust the server."""
    timeout = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:   # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_timer.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if timer := getattr(self, "_head_timer", None):
            timer.cancel()
        self._head_timer = self.loop.call_later(self.timeout, self._head_overdue)

    def _head_overdue(self) -> None:
        waiting_for_head = self.cycle is None or self.cycle.response_complete
        if waiting_for_head and not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            self.transport.close()


def head_deadline(timeout: float) -> Callable[..., asyncio.Protocol]:
    """uvicorn's `http=` argument: the HTTP protocol with a `timeout`-second head deadline."""
    return type("HeadDeadline", (HeadDeadline,), {"timeout": timeout})
