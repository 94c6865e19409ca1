"""An OpenAI-compatible HTTP server over LLMEngine: POST /v1/completions (plain and streamed),
GET /v1/models[/{id}], vLLM's POST /tokenize and /detokenize, GET /health and GET /metrics.

The engine is single-threaded and `step()` blocks for a whole forward pass, so it cannot run on
the asyncio event loop. It lives in ONE background thread that owns it:

    handler (event loop) --add/abort--> commands (queue.SimpleQueue) --> engine thread
    engine thread: apply commands between steps; step() while work exists; block when idle
    engine thread --outputs--> loop.call_soon_threadsafe --> each request's OutputSink (latest snapshot)

Concurrent HTTP requests are just more sequences in the same engine, so the scheduler batches
them step by step (continuous batching) with no extra code here. Around that core: admission
control (bounded queue -> 503, per-client token bucket -> 429) checked before a request costs
anything, limits on what one request may ask for (prompt characters, stop strings, tokens,
logprobs: 400), OpenAI-style error objects for every client error (never a traceback), request
timeouts, abort on client disconnect, graceful shutdown on SIGTERM, and exit (status 1) if the
engine thread dies. No request may stall the event loop: tokenizing and building large
responses happen in worker threads.

The engine thread and the metrics live in async_engine.py, which knows nothing of HTTP; the
OpenAI wire format in protocol.py (request body, error objects) and responses.py (JSON and SSE
responses); the API key, rate limits and read deadlines in guards.py; the `serve` command
(flags, uvicorn's settings, exit status) in launch.py.

Left out: /v1/chat/completions (GPT-2 has no chat template: a 400 says to use completions);
suffix (a 400 says so; nothing is silently ignored); TLS (use a proxy).

References: vLLM `entrypoints/openai/api_server.py` and `AsyncLLMEngine`, OpenAI's completions
API reference, the Prometheus text exposition format.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from dataclasses import dataclass, fields
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from .async_engine import EngineThread, OutputSink
from .config import EngineConfig
from .engine import LLMEngine
from .guards import AuthFirst, BodyLimit, TokenBucket, bearer_token
from .protocol import (APIError, CompletionRequest, DetokenizeRequest, TokenizeRequest, api_error, field_named_in,
                       http_error, internal_error, openapi_with_400, validation_error)
from .responses import Responses
from .sequence import RequestOutput, SamplingParams

log = logging.getLogger("nanoserve.server")


# ---- the HTTP app ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerOptions:
    """The server's settings; every one is a `serve` flag (--max-queue for max_queue, ...)."""
    served_model_name: tuple[str, ...] = ()  # ids clients may send as "model"; (): the names asked for
    api_key: str | None = None             # None: open; else every route but /health needs "Bearer <key>"
    max_queue: int = 256                   # prompts admitted but not started yet; beyond that: 503
    rate_limit: float | None = None        # requests/s per client (API key or address); None: no limit
    rate_limit_burst: int = 10             # requests a client may send at once before the rate applies
    request_timeout: float | None = 600.0  # seconds from arrival to the last token, then abort; None: never
    shutdown_timeout: float = 30.0         # after SIGTERM, in-flight requests get this long, then abort
    # What one request may ask for (real clients stay far below; each bounds memory or time).
    max_body_bytes: int = 1 << 20          # larger request bodies get 413
    max_prompt_chars: int = 100_000        # characters in all of a request's text prompts, before tokenizing
    max_stop_strings: int = 32             # stop strings per request (OpenAI allows 4)
    max_stop_chars: int = 256              # characters per stop string
    max_request_tokens: int = 1 << 18      # prompts x (n or best_of) x max_tokens: tokens one request may generate
    max_request_logprobs: int = 1 << 20    # logprob entries one response may hold (tokens x (logprobs + 1))
    # The connections (uvicorn's settings, plus the head deadline uvicorn lacks).
    limit_concurrency: int = 1024          # connections + requests at once; more get 503
    timeout_keep_alive: float = 5.0        # an idle keep-alive connection is closed after this long
    header_timeout: float = 10.0           # a request head must arrive within this long, else 408 and close
    body_timeout: float = 30.0             # a request body must arrive within this long, else 408
    max_header_bytes: int = 16384          # a larger request head is refused (uvicorn's h11_max_incomplete_event_size)
    forwarded_allow_ips: str | None = None  # proxies whose X-Forwarded-For is trusted; None: nobody's

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not (math.isfinite(v) and v > 0):
                raise ValueError(f"{f.name}={v} must be a finite number > 0" +
                                 (", or None for no limit" if f.default is None or f.name == "request_timeout" else ""))
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key is empty: that would turn authentication off; give a real key, or none")


class Server:
    """The HTTP side: admission, validation, and engine outputs -> OpenAI responses."""

    def __init__(self, engine: LLMEngine, opts: ServerOptions) -> None:
        self.core, self.opts = EngineThread(engine, on_death=self._engine_died), opts
        self.tokenizer = engine.tokenizer    # tiktoken is thread-safe; we only encode and decode
        self.n_ctx = engine.model_config.n_ctx
        # The names the model answers to: the operator's, else both the name it was asked for
        # and its directory's (`--model gpt2` falling back to the embedded model offline still
        # answers to "gpt2", as the README's example sends).
        self.model_names = list(opts.served_model_name) or list(dict.fromkeys([engine.config.model,
                                                                               engine.model_dir.name]))
        self.model_root = engine.model_dir.name     # the checkpoint behind the names (vLLM's "root")
        self.responses = Responses(self.tokenizer)
        self.limiter = TokenBucket(opts.rate_limit, opts.rate_limit_burst) if opts.rate_limit else None
        self.num_admitted = 0                # prompts admitted; minus core.num_dequeued: the queue
        self.draining = False                # set on SIGTERM: admit nothing new
        self.failed: str | None = None       # why the engine thread died; the process is exiting
        self.on_fatal: Callable[[], None] | None = None   # serve() sets it: how to end the process
        self.loop: asyncio.AbstractEventLoop | None = None

    def begin_drain(self) -> None:
        """Stop admitting; give in-flight requests `shutdown_timeout` seconds, then abort them."""
        if not self.draining:
            self.draining = True
            asyncio.get_running_loop().call_later(self.opts.shutdown_timeout, self.core.abort, None)

    def _engine_died(self, error: BaseException) -> None:
        """On the engine thread, after it answered every request: mark us failed and exit."""
        def on_loop() -> None:
            self.failed = repr(error)
            if self.on_fatal is not None:
                self.on_fatal()
        if self.loop is not None:
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(on_loop)

    def admit(self, request: Request, num_prompts: int) -> None:
        """The cheap checks, before the request costs anything: reserve queue room for its prompts."""
        if self.failed or self.draining or not self.core.thread.is_alive():
            raise APIError(503, "the server is shutting down or not started; send the request elsewhere",
                           type="server_error", code="shutting_down")
        if self.limiter:
            # The key identifies a client only when it is checked; else anyone could send a new one.
            client = (bearer_token(request) if self.opts.api_key else None) or \
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
        self.num_admitted += num_prompts

    def check_text(self, req: CompletionRequest, prompts: list) -> None:
        """Size limits that need no tokenizer: prompt characters, stop strings."""
        o = self.opts
        if (chars := sum(len(p) for p in prompts if isinstance(p, str))) > o.max_prompt_chars:
            raise APIError(400, f"the prompts hold {chars} characters; the limit is {o.max_prompt_chars} "
                           "(--max-prompt-chars); send shorter or fewer prompts", param="prompt")
        stops = [req.stop] if isinstance(req.stop, str) else req.stop or []
        if len(stops) > o.max_stop_strings or any(len(s) > o.max_stop_chars for s in stops):
            raise APIError(400, f"stop has {len(stops)} strings of up to {max(map(len, stops))} characters; the "
                           f"limits are {o.max_stop_strings} strings (--max-stop-strings) of {o.max_stop_chars} "
                           "characters (--max-stop-chars)", param="stop")

    def check_work(self, req: CompletionRequest, params: SamplingParams, ids: list[list[int]]) -> None:
        """What the engine would generate and the response would hold, bounded before it runs."""
        o, per_prompt = self.opts, params.n * params.max_tokens
        if (tokens := len(ids) * per_prompt) > o.max_request_tokens:
            raise APIError(400, f"{len(ids)} prompts x {params.n} completions x max_tokens {params.max_tokens} = "
                           f"{tokens} tokens; one request may generate at most {o.max_request_tokens} "
                           "(--max-request-tokens); split it", param="max_tokens")
        entries = 0
        for p in ids:
            if req.logprobs is not None:
                entries += params.n * (req.logprobs + 1) * (params.max_tokens + (len(p) if req.echo else 0))
            if req.prompt_logprobs is not None:
                entries += req.n * (req.prompt_logprobs + 1) * len(p)
        if entries > o.max_request_logprobs:
            raise APIError(400, f"the response would hold {entries} logprobs; the limit is {o.max_request_logprobs} "
                           "(--max-request-logprobs); ask for fewer logprobs, tokens or prompts", param="logprobs")

    def tokenize(self, prompts: list) -> list[list[int]]:
        """Token ids for each prompt (in a worker thread: a long prompt takes a while)."""
        ids = []
        for i, p in enumerate(prompts):
            if isinstance(p, str) and not p.isascii():
                try:
                    p.encode("utf-8")
                except UnicodeEncodeError as e:   # JSON can carry a lone surrogate, "\ud800"
                    raise APIError(400, f"prompt {i} is not valid Unicode ({e.reason} at character {e.start})",
                                   param="prompt") from None
            ids.append(self.tokenizer.encode(p) if isinstance(p, str) else p)
        return ids

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.model_names:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                           f"{' or '.join(map(repr, self.model_names))}", param="model", code="model_not_found")

    # ---- routes ------------------------------------------------------------------------
    async def health(self) -> Response:
        ok = self.core.ready.is_set() and not (self.draining or self.failed) and self.core.thread.is_alive()
        status = "ok" if ok else "failed" if self.failed else "shutting down" if self.draining else "starting"
        return JSONResponse({"status": status}, 200 if ok else 503)

    async def metrics(self) -> Response:
        return Response(self.core.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def _model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "owned_by": "nanoserve", "created": 0, "root": self.model_root,
                "max_model_len": self.n_ctx}

    async def models(self) -> dict:
        return {"object": "list", "data": [self._model_card(name) for name in self.model_names]}

    async def model(self, model_id: str) -> dict:
        self.check_model(model_id)
        return self._model_card(model_id)

    async def chat(self) -> Response:
        raise APIError(400, f"this server serves a base model ({self.model_names[0]}, GPT-2 has no chat template): "
                       "POST /v1/completions with a \"prompt\" instead of /v1/chat/completions with messages",
                       code="chat_not_supported")

    async def tokenize_route(self, req: TokenizeRequest) -> dict:
        """vLLM's /tokenize: a prompt's token ids, their count, the context length."""
        self.check_model(req.model)
        if len(req.prompt) > self.opts.max_prompt_chars:
            raise APIError(400, f"the prompt holds {len(req.prompt)} characters; the limit is "
                           f"{self.opts.max_prompt_chars} (--max-prompt-chars)", param="prompt")
        ids = (await asyncio.to_thread(self.tokenize, [req.prompt]))[0]
        return {"count": len(ids), "max_model_len": self.n_ctx, "tokens": ids,
                "token_strs": [self.responses._token_string(t) for t in ids] if req.return_token_strs else None}

    async def detokenize_route(self, req: DetokenizeRequest) -> dict:
        """vLLM's /detokenize: token ids back to text."""
        self.check_model(req.model)
        if bad := [t for t in req.tokens if not 0 <= t < self.tokenizer.vocab_size]:
            raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary [0, {self.tokenizer.vocab_size})",
                           param="tokens")
        return {"prompt": self.tokenizer.decode(req.tokens)}

    async def completions(self, req: CompletionRequest, request: Request) -> Response:
        arrival = time.perf_counter()
        self.check_model(req.model)
        prompts = req.prompt      # OpenAI's four shapes: str, [str], [int], [[int]]
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise APIError(400, "prompt is an empty list; give at least one prompt", param="prompt")
        self.admit(request, len(prompts))     # cheap limits first; reserves the prompts' room in the queue
        try:
            self.check_text(req, prompts)
            ids = await asyncio.to_thread(self.tokenize, prompts)
            texts = [p if isinstance(p, str) else None for p in prompts]
            if (k := req.truncate_prompt_tokens) is not None:      # vLLM's: keep the last k tokens
                k = self.n_ctx if k == -1 else k
                texts = [t if len(p) <= k else None for t, p in zip(texts, ids)]   # echo the kept part
                ids = [p[-k:] for p in ids]
            longest = max(map(len, ids))
            params = req.sampling_params(self.n_ctx - longest if req.max_tokens is None else req.max_tokens)
            self.check_work(req, params, ids)
        except BaseException:
            self.num_admitted -= len(prompts)
            raise

        cid = f"cmpl-{uuid.uuid4().hex}"
        rids = [f"{cid}-{i}" for i in range(len(ids))]
        sink = OutputSink()
        self.core.add(list(zip(rids, ids)), params, sink, arrival, hide_output=req.is_echo_only)
        if (error := await sink.get()) is not None:     # the engine's verdict on the prompts
            if not isinstance(error, (ValueError, TypeError)):
                raise APIError(500, f"the engine failed: {error!r}", type="server_error")
            raise APIError(400, str(error), param=field_named_in(error) or "prompt")
        results = self._results(rids, sink, arrival)
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
            # Abort here too. Cancelling `collect` should close `results`, whose clean-up
            # aborts; in test_server that clean-up did not run until shutdown in 4 runs of 7, and
            # the request went on generating after its client had left. Aborting a request
            # twice, or one that has finished, does nothing.
            self.core.abort(set(rids))
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        return Response(collect.result(), media_type="application/json")

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
                if out.error is not None:     # the engine gave up on this request alone
                    live.discard(out.request_id)
                    raise APIError(500, f"the engine failed on this request: {out.error}", type="server_error")
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
    and stops after uvicorn has sent the last response. `options` are ServerOptions fields
    (checked before the engine loads); `app.state.server` is the Server (for tests, and for
    serve's signal handling)."""
    if isinstance(options.get("served_model_name"), str):
        options["served_model_name"] = (options["served_model_name"],)
    opts = ServerOptions(**options)
    engine = engine_or_config if isinstance(engine_or_config, LLMEngine) else LLMEngine(engine_or_config)
    server = Server(engine, opts)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.loop = asyncio.get_running_loop()
        server.core.thread.start()
        yield
        server.core.stop()

    app = FastAPI(title="nanoserve", lifespan=lifespan)
    app.state.server = server
    app.add_middleware(BodyLimit, max_bytes=opts.max_body_bytes, timeout=opts.body_timeout)
    app.add_middleware(AuthFirst, api_key=opts.api_key)      # added last = runs first
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    app.get("/health")(server.health)
    app.get("/metrics")(server.metrics)
    app.get("/v1/models")(server.models)
    app.get("/v1/models/{model_id:path}")(server.model)
    app.post("/v1/completions")(server.completions)
    app.post("/v1/chat/completions")(server.chat)
    app.post("/tokenize")(server.tokenize_route)
    app.post("/detokenize")(server.detokenize_route)
    app.openapi = lambda: openapi_with_400(app)
    return app
