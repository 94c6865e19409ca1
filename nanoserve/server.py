"""An OpenAI-compatible HTTP server over LLMEngine: POST /v1/completions (plain and streamed),
GET /v1/models, GET /health and GET /metrics (Prometheus text format).

The engine is single-threaded and `step()` blocks for a whole forward pass, so it cannot run on
the asyncio event loop. It lives in ONE background thread that owns it:

    handler (event loop) --add/abort--> commands (queue.SimpleQueue) --> engine thread
    engine thread: apply commands between steps; step() while work exists; block when idle
    engine thread --outputs--> loop.call_soon_threadsafe --> each request's OutputSink (latest snapshot)

Concurrent HTTP requests are just more sequences in the same engine, so the scheduler batches
them step by step (continuous batching) with no extra code here. Around that core: admission
control (bounded queue -> 503, per-client token bucket -> 429), an optional API key (401), a
body size limit (413), OpenAI-style error objects for every client error (never a traceback),
request timeouts, abort on client disconnect, and graceful shutdown on SIGTERM.

The engine thread and the metrics live in async_engine.py, which knows nothing of HTTP; the
OpenAI wire format (request body, error objects, JSON and SSE responses) lives in protocol.py.

Left out: /v1/chat/completions (GPT-2 has no chat template); suffix (a 400 says so; nothing is
silently ignored); TLS (use a proxy).

References: vLLM `entrypoints/openai/api_server.py` and `AsyncLLMEngine`, OpenAI's completions
API reference, the Prometheus text exposition format.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import secrets
import signal
import time
import uuid
from dataclasses import dataclass, fields
from typing import Any, AsyncIterator

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .async_engine import EngineThread, OutputSink
from .config import EngineConfig
from .engine import LLMEngine
from .protocol import (APIError, CompletionRequest, Responses, field_named_in, http_error, internal_error,
                       validation_error)
from .sequence import RequestOutput

log = logging.getLogger("nanoserve.server")


# ---- the HTTP app ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerOptions:
    served_model_name: str | None = None   # the id clients send as "model"; None: the checkpoint dir's name
    api_key: str | None = None             # None: open; else /v1 routes need "Authorization: Bearer <key>"
    max_queue: int = 256                   # prompts admitted but not started yet; beyond that: 503
    rate_limit: float | None = None        # requests/s per client (API key or address); None: no limit
    rate_limit_burst: int = 10             # requests a client may send at once before the rate applies
    request_timeout: float | None = 600.0  # seconds from arrival to the last token, then abort; None: never
    max_body_bytes: int = 1 << 20          # larger request bodies get 413
    shutdown_timeout: float = 30.0         # after SIGTERM, in-flight requests get this long, then abort

    def __post_init__(self) -> None:
        for name in ("max_queue", "rate_limit_burst", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("rate_limit", "request_timeout"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0, or None for no limit")


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


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413, whether it declares its
    Content-Length or arrives chunked (then we count the bytes as they come)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared, received = int(dict(scope["headers"]).get(b"content-length", b"0")), 0

        async def limited_receive() -> dict:
            nonlocal received
            if declared <= self.max_bytes:
                message = await receive()
                received += len(message.get("body", b""))
            if max(declared, received) > self.max_bytes:
                # Raised while the route reads its body, so FastAPI hands it to our error handler.
                raise HTTPException(413, f"the request body is over {self.max_bytes} bytes (--max-body-bytes)")
            return message
        await self.app(scope, limited_receive, send)


class AuthFirst:
    """ASGI middleware: check the API key of /v1 routes before anything reads the body, so a
    client without the key gets 401 whatever it sent (malformed or oversized bodies too)."""

    def __init__(self, app: Any, check: Any) -> None:
        self.app, self.check = app, check

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            try:
                self.check(Request(scope))
            except APIError as e:
                return await e.response()(scope, receive, send)
        await self.app(scope, receive, send)


class Server:
    """The HTTP side: admission, validation, and engine outputs -> OpenAI responses."""

    def __init__(self, engine: LLMEngine, opts: ServerOptions) -> None:
        self.core, self.opts = EngineThread(engine), opts
        self.tokenizer = engine.tokenizer    # tiktoken is thread-safe; we only encode and decode
        self.n_ctx = engine.model_config.n_ctx
        self.model_name = opts.served_model_name or engine.model_dir.name
        self.responses = Responses(self.tokenizer, self.model_name)
        self.limiter = TokenBucket(opts.rate_limit, opts.rate_limit_burst) if opts.rate_limit else None
        self.num_admitted = 0                # prompts admitted; minus core.num_dequeued: the queue
        self.draining = False                # set on SIGTERM: admit nothing new
        self.loop: asyncio.AbstractEventLoop | None = None

    def begin_drain(self) -> None:
        """Stop admitting; give in-flight requests `shutdown_timeout` seconds, then abort them."""
        if not self.draining:
            self.draining = True
            asyncio.get_running_loop().call_later(self.opts.shutdown_timeout, self.core.abort, None)

    def check_auth(self, request: Request) -> None:
        if self.opts.api_key is None:
            return
        # compare_digest: the time taken does not tell an attacker how much of the key matched
        if not secrets.compare_digest(request.headers.get("authorization", "").encode(),
                                      f"Bearer {self.opts.api_key}".encode()):
            raise APIError(401, "missing or wrong API key; send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def admit(self, request: Request, num_prompts: int) -> None:
        if self.draining or not self.core.thread.is_alive():
            raise APIError(503, "the server is shutting down or not started; send the request elsewhere",
                           type="server_error", code="shutting_down")
        if self.limiter:
            # The key identifies a client only when it is checked; else anyone could send a new one.
            client = (request.headers.get("authorization") if self.opts.api_key else None) or \
                (request.client.host if request.client else "")
            if wait := self.limiter.take(client):
                raise APIError(429, f"rate limit of {self.opts.rate_limit:g} requests/s (burst "
                               f"{self.opts.rate_limit_burst}) exceeded; retry in {wait:.1f} s",
                               type="rate_limit_error", code="rate_limit_exceeded",
                               headers={"Retry-After": str(math.ceil(wait))})
        if num_prompts > self.opts.max_queue:     # would never fit: retrying cannot help
            raise APIError(400, f"this request has {num_prompts} prompts but the queue holds {self.opts.max_queue} "
                           "(--max-queue); send fewer prompts per request", param="prompt")
        if (queued := self.num_admitted - self.core.num_dequeued) + num_prompts > self.opts.max_queue:
            raise APIError(503, f"{queued} prompts are already waiting and the queue holds "
                           f"{self.opts.max_queue} (--max-queue); retry later", type="server_error",
                           code="queue_full", headers={"Retry-After": "1"})

    # ---- routes ------------------------------------------------------------------------
    async def health(self) -> Response:
        ok = self.core.ready.is_set() and not self.draining and self.core.thread.is_alive()
        status = "ok" if ok else "shutting down" if self.draining else "starting"
        return JSONResponse({"status": status}, 200 if ok else 503)

    async def metrics(self) -> Response:
        return PlainTextResponse(self.core.metrics.render(), media_type="text/plain; version=0.0.4")

    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "nanoserve",
                                            "created": 0, "max_model_len": self.n_ctx}]}

    async def completions(self, req: CompletionRequest, request: Request) -> Response:
        arrival = time.perf_counter()
        if req.model != self.model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        prompts = req.prompt      # OpenAI's four shapes: str, [str], [int], [[int]]
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise APIError(400, "prompt is an empty list; give at least one prompt", param="prompt")
        for i, p in enumerate(prompts):
            if isinstance(p, str) and not p.isascii():
                try:
                    p.encode("utf-8")
                except UnicodeEncodeError as e:   # JSON can carry a lone surrogate, "\ud800"
                    raise APIError(400, f"prompt {i} is not valid Unicode ({e.reason} at character {e.start})",
                                   param="prompt") from None
        ids = [self.tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
        params = req.sampling_params(self.n_ctx - max(map(len, ids)) if req.max_tokens is None else req.max_tokens)
        self.admit(request, len(ids))

        cid = f"cmpl-{uuid.uuid4().hex}"
        rids = [f"{cid}-{i}" for i in range(len(ids))]
        sink = OutputSink()
        self.num_admitted += len(rids)
        self.core.add(list(zip(rids, ids)), params, sink, arrival, hide_output=req.is_echo_only)
        if (error := await sink.get()) is not None:     # the engine's verdict on the prompts
            if not isinstance(error, (ValueError, TypeError)):
                raise APIError(500, f"the engine failed: {error!r}", type="server_error")
            raise APIError(400, str(error), param=field_named_in(error) or "prompt")
        results = self._results(rids, sink, arrival)
        texts = [p if isinstance(p, str) else None for p in prompts]
        # A stop string may be forming in the last (longest stop - 1) characters of the text: a
        # stream holds them back until the next token decides, so sent text is never taken back.
        hold = max(map(len, params.stop), default=1) - 1
        if req.stream:
            return _EventStream(self.responses.stream(cid, req, texts, hold, results), lambda: self.core.abort(set(rids)))
        # A StreamingResponse notices a hang-up by itself; a plain request watches for one here.
        collect = asyncio.ensure_future(self.responses.collect(cid, req, texts, results))
        hangup = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait([collect, hangup], return_when=asyncio.FIRST_COMPLETED)
        finally:
            hangup.cancel()
            collect.cancel()                  # a no-op once done; else it closes `results`: an abort
            collect.add_done_callback(lambda t: t.cancelled() or t.exception())  # never "never retrieved"
        if collect not in done:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        return JSONResponse(collect.result())

    # ---- engine outputs -> responses ---------------------------------------------------
    async def _results(self, rids: list[str], sink: OutputSink,
                       arrival: float) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Yield (prompt index, output) as the engine makes progress, until all are finished.
        Leaving early (timeout, disconnect, error) aborts the rest, so their KV blocks free up."""
        index, live = {rid: i for i, rid in enumerate(rids)}, set(rids)
        timeout = self.opts.request_timeout
        try:
            while live:
                left = None if timeout is None else arrival + timeout - time.perf_counter()
                try:
                    out = await asyncio.wait_for(sink.get(), left)
                except asyncio.TimeoutError:
                    raise APIError(504, f"the request ran past the {timeout:g} s limit (--request-timeout) and "
                                   "was aborted; lower max_tokens or n", type="timeout_error",
                                   code="request_timeout") from None
                if isinstance(out, Exception):
                    raise APIError(500, f"the engine failed: {out!r}", type="server_error")
                if out.finished:
                    live.discard(out.request_id)
                    if any(c.finish_reason == "abort" for c in out.outputs):  # only a shutdown aborts for us
                        raise APIError(503, "the server is shutting down; the request was aborted",
                                       type="server_error", code="shutting_down")
                yield index[out.request_id], out
        finally:
            if live:
                self.core.abort(live)

class _EventStream(StreamingResponse):
    """An SSE response that calls `on_close` however it ends. If the client leaves before the
    body starts, Starlette cancels it unstarted and the body's own `finally` never runs."""

    def __init__(self, body: AsyncIterator[str], on_close: Any) -> None:
        super().__init__(body, media_type="text/event-stream")
        self.on_close = on_close

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _disconnected(request: Request) -> None:
    """Return when the client hangs up (after the body is read, ASGI's receive() waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def build_app(engine_or_config: LLMEngine | EngineConfig, **options: Any) -> FastAPI:
    """The FastAPI app: routes, error handlers, and the engine thread, which starts with the app
    and stops after uvicorn has sent the last response. `options` are ServerOptions fields;
    `app.state.server` is the Server (for tests, and for serve's signal handling)."""
    engine = engine_or_config if isinstance(engine_or_config, LLMEngine) else LLMEngine(engine_or_config)
    server = Server(engine, ServerOptions(**options))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.loop = asyncio.get_running_loop()
        server.core.thread.start()
        yield
        server.core.stop()

    app = FastAPI(title="nanoserve", lifespan=lifespan)
    app.state.server = server
    app.add_middleware(BodyLimit, max_bytes=server.opts.max_body_bytes)
    app.add_middleware(AuthFirst, check=server.check_auth)   # added last = runs first
    app.add_exception_handler(APIError, lambda request, e: e.response())
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    app.get("/health")(server.health)
    app.get("/metrics")(server.metrics)
    app.get("/v1/models")(server.models)               # /v1 routes: AuthFirst checks the key
    app.post("/v1/completions")(server.completions)
    return app


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """The server's flags; the CLI adds the engine's (EngineConfig's fields) itself."""
    d = ServerOptions()
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the server to the network")
    g.add_argument("--port", type=int, default=8000, help="port to listen on")
    g.add_argument("--served-model-name", default=None, help="model id for clients; None: the checkpoint dir's name")
    # No default from the environment here: --help would print the key.
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes; "
                   "None: $NANOSERVE_API_KEY if set, else no key")
    g.add_argument("--max-queue", type=int, default=d.max_queue, help="prompts waiting to start; more get 503")
    g.add_argument("--rate-limit", type=float, default=None, help="requests/s per client (API key or address); "
                   "None or 0: no limit")
    g.add_argument("--rate-limit-burst", type=int, default=d.rate_limit_burst, help="requests at once per client")
    g.add_argument("--request-timeout", type=float, default=d.request_timeout, help="seconds per request; 0: none")
    g.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="larger request bodies get 413")
    g.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout,
                   help="seconds in-flight requests get after SIGTERM before they are aborted")


def serve(args: argparse.Namespace) -> None:
    """Serve until SIGTERM or Ctrl-C, then drain and return (exit status 0)."""
    import uvicorn
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    config = EngineConfig(**{k: v for k, v in vars(args).items() if k in EngineConfig.field_names() and v is not None})
    options = {f.name: getattr(args, f.name) for f in fields(ServerOptions) if hasattr(args, f.name)}
    for name in ("request_timeout", "rate_limit"):       # 0 on the command line means "no limit"
        options[name] = options.get(name) or None
    options["api_key"] = options.get("api_key") or os.environ.get("NANOSERVE_API_KEY") or None
    app = build_app(config, **options)
    server = app.state.server

    class Uvicorn(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # We are in a signal handler: hand the drain to the loop. uvicorn then stops accepting
            # connections and waits for in-flight responses before running the app's shutdown.
            if server.loop is not None:
                server.loop.call_soon_threadsafe(server.begin_drain)
            super().handle_exit(sig, frame)

    # uvicorn re-raises the signal after its graceful shutdown, so that the default action ends
    # the process (status 143). By then we have shut down cleanly: let that be a no-op.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    Uvicorn(uvicorn.Config(app, host=args.host, port=args.port,
                           timeout_graceful_shutdown=server.opts.shutdown_timeout + 5)).run()
