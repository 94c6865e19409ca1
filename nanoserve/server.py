"""An OpenAI-compatible HTTP server over LLMEngine: POST /v1/completions (plain and streamed),
GET /v1/models, GET /health and GET /metrics (Prometheus text format).

The engine is single-threaded and `step()` blocks for a whole forward pass, so it cannot run on
the asyncio event loop. It lives in ONE background thread that owns it:

    handler (event loop) --add/abort--> commands (queue.SimpleQueue) --> engine thread
    engine thread: apply commands between steps; step() while work exists; block when idle
    engine thread --outputs--> loop.call_soon_threadsafe --> each request's asyncio.Queue

Concurrent HTTP requests are just more sequences in the same engine, so the scheduler batches
them step by step (continuous batching) with no extra code here. Around that core: admission
control (bounded queue -> 503, per-client token bucket -> 429), an optional API key (401), a
body size limit (413), OpenAI-style error objects for every client error (never a traceback),
request timeouts, abort on client disconnect, and graceful shutdown on SIGTERM.

The file has two halves: the engine thread with its metrics, which knows nothing of HTTP,
then the HTTP app. The first half could be a module of its own.

Left out: /v1/chat/completions (GPT-2 has no chat template); best_of, logit_bias, suffix and
presence/frequency penalties (a 400 says so; nothing is silently ignored); TLS (use a proxy).

References: vLLM `entrypoints/openai/api_server.py` and `AsyncLLMEngine`, OpenAI's completions
API reference, the Prometheus text exposition format.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import queue
import secrets
import signal
import threading
import time
import uuid
from dataclasses import dataclass, fields
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import EngineConfig
from .engine import LLMEngine
from .sequence import RequestOutput, SamplingParams
from .tokenizer import IncrementalDetokenizer

log = logging.getLogger("nanoserve.server")


# ---- the engine thread ---------------------------------------------------------------------
class Histogram:
    """A Prometheus histogram: cumulative bucket counts, plus sum and count."""

    def __init__(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help, buckets
        self.counts, self.sum, self.count = [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        self.sum, self.count = self.sum + value, self.count + 1
        for i, le in enumerate(self.buckets):
            self.counts[i] += value <= le

    def render(self) -> list[str]:
        n = self.name
        return ([f"# HELP {n} {self.help}", f"# TYPE {n} histogram"]
                + [f'{n}_bucket{{le="{le}"}} {c}' for le, c in zip(self.buckets, self.counts)]
                + [f'{n}_bucket{{le="+Inf"}} {self.count}', f"{n}_sum {self.sum:.6f}", f"{n}_count {self.count}"])


_METRICS = {   # name (after "nanoserve_") -> (type, help)
    "num_requests_running": ("gauge", "Requests with a sequence in the running batch."),
    "num_requests_waiting": ("gauge", "Requests waiting for a batch slot or KV blocks."),
    "kv_blocks_used": ("gauge", "KV cache blocks in use."),
    "kv_blocks_free": ("gauge", "KV cache blocks free."),
    "prompt_tokens_total": ("counter", "Prompt tokens prefilled."),
    "generation_tokens_total": ("counter", "Output tokens generated."),
    "num_preemptions_total": ("counter", "Sequences preempted (their KV is recomputed later)."),
}


class Metrics:
    """Written by the engine thread after every step, read by GET /metrics: hence the lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.values = dict.fromkeys(_METRICS, 0)
        self.finished: dict[str, int] = {}               # finish_reason -> completions
        self.ttft = Histogram("nanoserve_time_to_first_token_seconds", "Request arrival to first output token.",
                              (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))
        self.tpot = Histogram("nanoserve_time_per_output_token_seconds", "Time between a request's output tokens.",
                              (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5))

    def render(self) -> str:
        with self.lock:
            lines = []
            for name, (kind, help) in _METRICS.items():
                lines += [f"# HELP nanoserve_{name} {help}", f"# TYPE nanoserve_{name} {kind}",
                          f"nanoserve_{name} {self.values[name]}"]
            lines += ["# HELP nanoserve_requests_finished_total Completions finished, by finish reason.",
                      "# TYPE nanoserve_requests_finished_total counter"]
            lines += [f'nanoserve_requests_finished_total{{finish_reason="{r}"}} {c}' for r, c in self.finished.items()]
            return "\n".join(lines + self.ttft.render() + self.tpot.render()) + "\n"


@dataclass(slots=True)
class _Tracked:
    """What the engine thread remembers about one engine request it serves."""
    loop: asyncio.AbstractEventLoop
    sink: asyncio.Queue            # the HTTP handler's queue for this request's outputs
    arrival: float                 # time.perf_counter() when the HTTP request arrived
    last: float | None = None      # when its previous output came; None: no token yet
    num_tokens: int = 0            # output tokens already counted in the metrics


class EngineThread:
    """Owns the LLMEngine: every call into the engine happens on this one thread. The methods
    without an underscore are for the event loop, and only enqueue a command."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.metrics = Metrics()
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.tracked: dict[str, _Tracked] = {}
        # Prompts that left the queue: started, rejected or aborted. Only this thread writes it;
        # the loop reads it (an int read is atomic), so a dead HTTP handler cannot skew the count.
        self.num_dequeued = 0
        self.ready = threading.Event()           # set after warm-up: GET /health says 200
        self.thread = threading.Thread(target=self._run, name="nanoserve-engine", daemon=True)

    def add(self, batch: list[tuple[str, list[int]]], params: SamplingParams, sink: asyncio.Queue,
            arrival: float) -> None:
        """Queue prompts as (request id, token ids). `sink` first gets the verdict, None
        (accepted) or the engine's ValueError/TypeError, then RequestOutputs, or an exception
        if the engine fails."""
        self.commands.put(("add", batch, params, asyncio.get_running_loop(), sink, arrival))

    def abort(self, request_ids: set[str] | None) -> None:
        """Abort these requests (None: all of them); their KV blocks return to the pool."""
        self.commands.put(("abort", request_ids))

    def stop(self) -> None:
        self.commands.put(("stop",))
        self.thread.join()

    def _run(self) -> None:
        eng = self.engine
        # Warm-up: one short generation, so that no client pays for lazy first-call set-up.
        eng.add_request("warm-up", [eng.model_config.eos_token_id], SamplingParams(max_tokens=2, temperature=0.0))
        while eng.has_unfinished_requests():
            eng.step()
        self.ready.set()
        while True:
            # Block only when idle (no busy loop); with work in flight, take what is there and step.
            cmds = []
            with contextlib.suppress(queue.Empty):
                cmds.append(self.commands.get(block=not eng.has_unfinished_requests()))
                while True:
                    cmds.append(self.commands.get_nowait())
            for cmd in cmds:
                if cmd[0] == "stop":
                    return self._abort(None)
                getattr(self, "_" + cmd[0])(*cmd[1:])
            if eng.has_unfinished_requests():
                try:
                    self._deliver(eng.step())
                except Exception as e:   # a bug or a device error: fail these requests, keep serving
                    log.exception("engine step failed; aborting %d requests", len(self.tracked))
                    self._abort(None, e)
            self._update_gauges()

    def _add(self, batch, params, loop, sink, arrival) -> None:
        # All prompts of one HTTP request get in, or none do (as in LLM.generate).
        try:
            for rid, ids in batch:
                self.engine.add_request(rid, ids, params)
        except (ValueError, TypeError) as e:
            for rid, _ in batch:
                self.engine.abort_request(rid)        # ids that never got in are ignored
            self.num_dequeued += len(batch)
            return self._post(loop, [(sink, e)])
        self.tracked.update((rid, _Tracked(loop, sink, arrival)) for rid, _ in batch)
        self._post(loop, [(sink, None)])

    def _abort(self, request_ids: set[str] | None, error: Exception | None = None) -> None:
        for rid in list(self.tracked) if request_ids is None else request_ids:
            out, t = self.engine.abort_request(rid), self.tracked.pop(rid, None)
            if out is not None and t is not None:
                self.num_dequeued += t.last is None
                with self.metrics.lock:
                    self._count(t, out)
                # The handler may still be listening (shutdown, engine error): tell it the end.
                self._post(t.loop, [(t.sink, error or out)])

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now, posts = time.perf_counter(), {}
        with self.metrics.lock:
            for out in outputs:
                t = self.tracked.get(out.request_id)
                if t is None:
                    continue                          # the warm-up request
                hist, since = (self.metrics.ttft, t.arrival) if t.last is None else (self.metrics.tpot, t.last)
                hist.observe(now - since)
                self.num_dequeued += t.last is None
                t.last = now
                self._count(t, out)
                posts.setdefault(t.loop, []).append((t.sink, out))
                if out.finished:
                    del self.tracked[out.request_id]
        for loop, items in posts.items():
            self._post(loop, items)

    def _count(self, t: _Tracked, out: RequestOutput) -> None:
        v, num = self.metrics.values, sum(len(c.token_ids) for c in out.outputs)
        if t.num_tokens == 0 and num:
            v["prompt_tokens_total"] += len(out.prompt_token_ids)
        v["generation_tokens_total"] += num - t.num_tokens
        t.num_tokens = num
        for c in out.outputs if out.finished else []:
            self.metrics.finished[c.finish_reason] = self.metrics.finished.get(c.finish_reason, 0) + 1

    def _update_gauges(self) -> None:
        sched, free = self.engine.scheduler, self.engine.allocator.num_free
        with self.metrics.lock:
            self.metrics.values.update(
                num_requests_running=len({s.request_id for s in sched.running}),
                num_requests_waiting=len({s.request_id for s in sched.waiting}),
                kv_blocks_used=self.engine.num_blocks - free, kv_blocks_free=free,
                num_preemptions_total=sched.num_preemptions)

    @staticmethod
    def _post(loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue, Any]]) -> None:
        # asyncio.Queue is not thread-safe: the loop's own thread does the puts, one wake-up per step.
        with contextlib.suppress(RuntimeError):       # the loop is closed: nobody is listening
            loop.call_soon_threadsafe(lambda: [sink.put_nowait(item) for sink, item in items])


# ---- the HTTP app ----------------------------------------------------------------------------
class APIError(Exception):
    """A client-visible error, rendered as OpenAI's {"error": {...}} object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, self.status, headers=self.headers)


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


class CompletionRequest(BaseModel):
    # strict: "5" is not an int and true is not a number. forbid: an unknown option is a 400,
    # never a silently ignored setting.
    model_config = ConfigDict(strict=True, extra="forbid")
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)     # None: up to the context length
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    stream: bool = False
    stream_options: dict[str, bool] | None = None    # {"include_usage": true}: a last chunk with usage
    user: str | None = None                          # accepted for compatibility; unused
    # OpenAI options we do not implement: accepted only at their neutral values.
    best_of: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    # vLLM's extensions, passed straight to SamplingParams.
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        for name, neutral in [("best_of", (None, self.n)), ("frequency_penalty", (0,)), ("presence_penalty", (0,)),
                              ("logit_bias", (None, {})), ("suffix", (None, ""))]:
            if getattr(self, name) not in neutral:
                raise APIError(400, f"{name}={getattr(self, name)!r} is not supported by nanoserve; leave it unset",
                               param=name)
        try:
            return SamplingParams(
                n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                seed=self.seed, max_tokens=max_tokens, min_tokens=self.min_tokens, stop=self.stop,
                stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, logprobs=self.logprobs,
                # echo + logprobs scores the prompt too, as OpenAI's API does
                prompt_logprobs=self.logprobs if self.echo else None, repetition_penalty=self.repetition_penalty)
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e)) from None


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


@dataclass(slots=True)
class _StreamChoice:
    """How much of one choice a stream has sent so far."""
    detok: IncrementalDetokenizer  # the tokens sent so far, as text: text_offset counts from it
    num_chars: int = 0             # characters of text sent
    num_tokens: int = 0            # tokens sent (their logprobs)
    done: bool = False


class Server:
    """The HTTP side: admission, validation, and engine outputs -> OpenAI responses."""

    def __init__(self, engine: LLMEngine, opts: ServerOptions) -> None:
        self.core, self.opts = EngineThread(engine), opts
        self.tokenizer = engine.tokenizer    # tiktoken is thread-safe; we only encode and decode
        self.n_ctx = engine.model_config.n_ctx
        self.model_name = opts.served_model_name or engine.model_dir.name
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
            client = request.headers.get("authorization") or (request.client.host if request.client else "")
            if wait := self.limiter.take(client):
                raise APIError(429, f"rate limit of {self.opts.rate_limit:g} requests/s (burst "
                               f"{self.opts.rate_limit_burst}) exceeded; retry in {wait:.1f} s",
                               type="rate_limit_error", code="rate_limit_exceeded",
                               headers={"Retry-After": str(math.ceil(wait))})
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
        ids = [self.tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
        params = req.sampling_params(req.max_tokens or self.n_ctx - max(len(i) for i in ids))
        self.admit(request, len(ids))

        cid = f"cmpl-{uuid.uuid4().hex}"
        rids = [f"{cid}-{i}" for i in range(len(ids))]
        sink: asyncio.Queue = asyncio.Queue()
        self.num_admitted += len(rids)
        self.core.add(list(zip(rids, ids)), params, sink, arrival)
        if (error := await sink.get()) is not None:     # the engine's verdict on the prompts
            raise APIError(400, str(error), param="prompt")
        results = self._results(rids, sink, arrival)
        texts = [p if isinstance(p, str) else None for p in prompts]
        # A stop string may be forming in the last (longest stop - 1) characters of the text: a
        # stream holds them back until the next token decides, so sent text is never taken back.
        hold = max(map(len, params.stop), default=1) - 1
        if req.stream:
            return _EventStream(self._stream(cid, req, texts, hold, results), lambda: self.core.abort(set(rids)))
        # A StreamingResponse notices a hang-up by itself; a plain request watches for one here.
        collect = asyncio.ensure_future(self._collect(cid, req, texts, results))
        hangup = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait([collect, hangup], return_when=asyncio.FIRST_COMPLETED)
        finally:
            hangup.cancel()
            collect.cancel()                  # a no-op once done; else it closes `results`: an abort
        if collect not in done:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        return JSONResponse(collect.result())

    # ---- engine outputs -> responses ---------------------------------------------------
    async def _results(self, rids: list[str], sink: asyncio.Queue,
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

    def _logprobs(self, ids: list[int], lps: list[dict[int, float] | None],
                  detok: IncrementalDetokenizer) -> dict:
        """OpenAI's logprobs object for `ids`; `detok` holds the choice's text before them
        (text_offset indexes the returned text) and gets them pushed."""
        offsets = []
        for t in ids:
            offsets.append(len(detok.text))
            detok.push(t)
        word = lambda t: self.tokenizer.decode([t])
        return {"tokens": [word(t) for t in ids],
                "token_logprobs": [None if lp is None else lp[t] for t, lp in zip(ids, lps)],
                "top_logprobs": [None if lp is None else {word(k): v for k, v in lp.items()} for lp in lps],
                "text_offset": offsets}

    def _echo(self, req: CompletionRequest, text: str | None, out: RequestOutput) -> tuple[str, list, list]:
        """What a choice starts with: with echo, the prompt's text, token ids and logprobs."""
        if not req.echo:
            return "", [], []
        text = text if text is not None else self.tokenizer.decode(out.prompt_token_ids)
        return text, list(out.prompt_token_ids), list(out.prompt_logprobs or [])

    async def _collect(self, cid: str, req: CompletionRequest, texts: list[str | None],
                       results: AsyncIterator) -> dict:
        final: dict[int, RequestOutput] = {}
        async with contextlib.aclosing(results):
            async for i, out in results:
                final[i] = out
        choices = []
        for i, out in sorted(final.items()):
            for c in out.outputs:
                text, ids, lps = self._echo(req, texts[i], out)
                lp = None if req.logprobs is None else self._logprobs(
                    ids + c.token_ids, lps + c.logprobs, IncrementalDetokenizer(self.tokenizer))
                choices.append({"index": i * req.n + c.index, "text": text + c.text, "logprobs": lp,
                                "finish_reason": c.finish_reason})
        return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": self.model_name,
                "choices": choices, "usage": _usage(final.values())}

    async def _stream(self, cid: str, req: CompletionRequest, texts: list[str | None], hold: int,
                      results: AsyncIterator) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, then `data: [DONE]`. A client hang-up
        cancels this generator at an await; closing `results` then aborts the request."""
        head = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": self.model_name}
        event = lambda data: f"data: {json.dumps({**head, **data})}\n\n"
        states: dict[int, _StreamChoice] = {}
        final: dict[int, RequestOutput] = {}
        try:
            async with contextlib.aclosing(results):
                async for i, out in results:
                    final[i] = out
                    for c in out.outputs:
                        k, text, ids, lps = i * req.n + c.index, "", [], []
                        if k not in states:                   # this choice's first chunk
                            states[k] = _StreamChoice(IncrementalDetokenizer(self.tokenizer))
                            text, ids, lps = self._echo(req, texts[i], out)
                        st = states[k]
                        if st.done:
                            continue
                        end = len(c.text) if c.finish_reason else max(st.num_chars, len(c.text) - hold)
                        text += c.text[st.num_chars:end]
                        ids += c.token_ids[st.num_tokens:]
                        lps += (c.logprobs or [])[st.num_tokens:]
                        st.num_chars, st.num_tokens, st.done = end, len(c.token_ids), c.finish_reason is not None
                        if text or st.done or (ids and req.logprobs is not None):
                            lp = None if req.logprobs is None else self._logprobs(ids, lps, st.detok)
                            yield event({"choices": [{"index": k, "text": text, "logprobs": lp,
                                                      "finish_reason": c.finish_reason}]})
            if (req.stream_options or {}).get("include_usage"):
                yield event({"choices": [], "usage": _usage(final.values())})
        except APIError as e:                  # timeout, shutdown: the stream ends with the error
            yield f"data: {json.dumps(e.body)}\n\n"
        yield "data: [DONE]\n\n"


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


def _usage(outputs: Any) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)       # once per prompt, not per choice
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# ---- errors: every client mistake becomes an OpenAI error object, never a traceback ------
def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if errors and errors[0]["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON (at character {errors[0]['loc'][-1]})").response()
    where = lambda e: ".".join(str(x) for x in e["loc"][1:]) or "body"
    message = "; ".join(f"{where(e)}: {e['msg']}" for e in errors[:3])
    param = str(errors[0]["loc"][1]) if errors and len(errors[0]["loc"]) > 1 else None
    return APIError(400, message or "invalid request", param=param).response()


def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return APIError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)).response()


def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return APIError(500, "internal server error; the server log has the details", type="server_error").response()


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
    app.add_exception_handler(APIError, lambda request, e: e.response())
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    auth = [Depends(server.check_auth)]
    app.get("/health")(server.health)
    app.get("/metrics")(server.metrics)
    app.get("/v1/models", dependencies=auth)(server.models)
    app.post("/v1/completions", dependencies=auth)(server.completions)
    return app


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """The server's flags; the CLI adds the engine's (EngineConfig's fields) itself."""
    d = ServerOptions()
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the server to the network")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--served-model-name", default=None, help="model id for clients; default: checkpoint dir name")
    g.add_argument("--api-key", default=os.environ.get("NANOSERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $NANOSERVE_API_KEY)")
    g.add_argument("--max-queue", type=int, default=d.max_queue, help="prompts waiting to start; more get 503")
    g.add_argument("--rate-limit", type=float, default=None, help="requests/s per client (API key or address)")
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
    options["request_timeout"] = options.get("request_timeout") or None     # 0 means no timeout
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
