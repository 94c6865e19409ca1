"""The engine in a background thread, for servers: asyncio handlers talk to it through a queue.

The engine is single-threaded and `step()` blocks for a whole forward pass, so it cannot run on
the asyncio event loop. It lives in ONE background thread that owns it:

    handler (event loop) --add/abort--> commands (queue.SimpleQueue) --> engine thread
    engine thread: apply commands between steps; step() while work exists; block when idle
    engine thread --outputs--> loop.call_soon_threadsafe --> each request's OutputSink (latest snapshot)

Concurrent requests are just more sequences in the same engine, so the scheduler batches them
step by step (continuous batching) with no extra code here. The thread also keeps the serving
metrics (prometheus_client). Nothing in this file knows about HTTP; server.py does.

If the thread dies (a bug, a device error), every request it holds or that is still queued for
it gets that error, and `on_death` tells the server, which then exits: a server whose engine
is gone must not keep accepting requests it can never answer.

References: vLLM `AsyncLLMEngine`, prometheus_client.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from .engine import LLMEngine
from .sequence import RequestOutput, SamplingParams

# Without this, every counter and histogram also exports a `<name>_created` timestamp sample:
# noise on /metrics that scrapers derive themselves, and easy to mistake for a count.
disable_created_metrics()

log = logging.getLogger("nanoserve.server")


class Metrics:
    """The serving metrics, in prometheus_client's registry (one per engine thread, so that
    several servers in one process never share counters). The engine thread updates them after
    every step; GET /metrics renders them. prometheus_client's metrics are thread-safe."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        gauge = lambda name, doc: Gauge("nanoserve_" + name, doc, registry=self.registry)
        counter = lambda name, doc, *labels: Counter("nanoserve_" + name, doc, labels, registry=self.registry)
        self.running = gauge("num_requests_running", "Requests with a sequence in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting for a batch slot or KV blocks.")
        self.blocks_used = gauge("kv_blocks_used", "KV cache blocks in use.")
        self.blocks_free = gauge("kv_blocks_free", "KV cache blocks free.")
        self.blocks_cached_free = gauge("kv_blocks_cached_free", "Free KV blocks that still hold a prefix the "
                                        "prefix cache can hand back.")
        self.blocks_peak = gauge("kv_blocks_peak", "The most KV cache blocks in use at once since start.")
        self.kv_usage = gauge("kv_cache_usage_ratio", "Fraction of the KV cache's blocks in use (0 to 1).")
        self.hit_rate = gauge("prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / tokens looked up.")
        self.cuda_allocated = gauge("cuda_memory_allocated_bytes", "torch's CUDA allocator: bytes allocated (0 on CPU).")
        self.cuda_reserved = gauge("cuda_memory_reserved_bytes", "torch's CUDA allocator: bytes reserved (0 on CPU).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens prefilled.")
        self.generation_tokens = counter("generation_tokens", "Output tokens generated.")
        self.preemptions = counter("num_preemptions", "Sequences preempted (their KV is recomputed later).")
        self.shifts = counter("context_shifts", "Context shifts: a sequence past n_ctx kept its last tokens "
                              "(context_overflow='shift').")
        self.evictions = counter("kv_blocks_evicted", "KV blocks freed behind a sliding attention window.")
        self.cache_hits = counter("prefix_cache_hit_tokens", "Tokens whose KV came from the prefix cache instead "
                                  "of being computed (prompts, and recomputation after a preemption).")
        self.finished = counter("requests_finished", "Completions finished, by finish reason.", "finish_reason")
        self.ttft = Histogram("nanoserve_time_to_first_token_seconds", "Request arrival to first output token.",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
                              registry=self.registry)
        self.tpot = Histogram("nanoserve_time_per_output_token_seconds", "Time between a request's output tokens.",
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5),
                              registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class OutputSink:
    """One HTTP request's mailbox, on the event loop (the engine thread posts into it with
    call_soon_threadsafe). RequestOutputs are cumulative snapshots, so a newer one replaces an
    unread older one of the same request id: a client that reads slowly, or not at all, holds
    one snapshot per prompt here instead of one per step. Anything else (the verdict, an
    error) queues as is. Used only on the loop's thread, so it needs no lock."""

    def __init__(self) -> None:
        self.items: dict[Any, Any] = {}    # key -> item, oldest first
        self.arrived = asyncio.Event()

    def put_nowait(self, item: Any) -> None:
        key = item.request_id if isinstance(item, RequestOutput) else object()
        self.items.pop(key, None)          # a replaced snapshot goes to the back, after its predecessors
        self.items[key] = item
        self.arrived.set()

    async def get(self) -> Any:
        while not self.items:
            self.arrived.clear()
            await self.arrived.wait()
        return self.items.pop(next(iter(self.items)))


@dataclass(slots=True)
class _Tracked:
    """What the engine thread remembers about one engine request it serves."""
    loop: asyncio.AbstractEventLoop
    sink: OutputSink               # where the HTTP handler reads this request's outputs
    arrival: float                 # time.perf_counter() when the HTTP request arrived
    last: float | None = None      # when its previous output came; None: no token yet
    num_tokens: int = 0            # output tokens already counted in the metrics
    hide_output: bool = False      # the client sees no generated tokens (echo-only scoring): count none


class EngineThread:
    """Owns the LLMEngine: every call into the engine happens on this one thread. The methods
    without an underscore are for the event loop, and only enqueue a command."""

    def __init__(self, engine: LLMEngine, on_death: Callable[[BaseException], None] | None = None) -> None:
        self.engine = engine
        self.metrics = Metrics()
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.tracked: dict[str, _Tracked] = {}
        # Prompts that left the queue: started, rejected or aborted. Only this thread writes it;
        # the loop reads it (an int read is atomic), so a dead HTTP handler cannot skew the count.
        self.num_dequeued = 0
        self.ready = threading.Event()           # set after warm-up: GET /health says 200
        self.error: BaseException | None = None  # why the thread died; None while it lives
        self.on_death = on_death                 # called (on this thread) once it has answered everyone
        self._counted: dict[str, int] = {}   # the engine's totals already added to the counters
        self.thread = threading.Thread(target=self._run, name="nanoserve-engine", daemon=True)

    def add(self, batch: list[tuple[str, list[int]]], params: SamplingParams, sink: OutputSink,
            arrival: float, hide_output: bool = False) -> None:
        """Queue prompts as (request id, token ids). `sink` first gets the verdict, None
        (accepted) or what add_request raised (ValueError/TypeError: the client's mistake),
        then RequestOutputs, or an exception if the engine fails. With `hide_output` the
        metrics count no generated tokens (the client is shown none)."""
        self.commands.put(("add", batch, params, asyncio.get_running_loop(), sink, arrival, hide_output))
        if self.error is not None:   # the thread died: maybe before it could see this command
            self._fail_queued(self.error)

    def abort(self, request_ids: set[str] | None) -> None:
        """Abort these requests (None: all of them); their KV blocks return to the pool."""
        self.commands.put(("abort", request_ids))

    def stop(self) -> None:
        self.commands.put(("stop",))
        self.thread.join()

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:   # a bug or a device error outside any one request: we are done
            log.critical("the engine thread died: %r; failing every request", e, exc_info=e)
            self.error = e
            for t in self.tracked.values():
                self._post(t.loop, [(t.sink, e)])
            self.tracked.clear()
            self._fail_queued(e)
            if self.on_death is not None:
                self.on_death(e)

    def _fail_queued(self, error: BaseException) -> None:
        """Answer every add still in the queue with `error`. Either thread may call this, so a
        request queued just as the engine died is answered by whichever thread sees it."""
        with contextlib.suppress(queue.Empty):
            while True:
                cmd = self.commands.get_nowait()
                if cmd[0] == "add":
                    self._post(cmd[3], [(cmd[4], error)])

    def _serve(self) -> None:
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

    def _add(self, batch, params, loop, sink, arrival, hide_output) -> None:
        # All prompts of one HTTP request get in, or none do (as in LLM.generate).
        try:
            for rid, ids in batch:
                self.engine.add_request(rid, ids, params)
        except Exception as e:   # ValueError/TypeError: a bad prompt (400); anything else is our bug (500)
            for rid, _ in batch:
                self.engine.abort_request(rid)        # ids that never got in are ignored
            self.num_dequeued += len(batch)
            if not isinstance(e, (ValueError, TypeError)):
                log.exception("add_request failed")
            return self._post(loop, [(sink, e)])
        self.tracked.update((rid, _Tracked(loop, sink, arrival, hide_output=hide_output)) for rid, _ in batch)
        self._post(loop, [(sink, None)])

    def _abort(self, request_ids: set[str] | None, error: Exception | None = None) -> None:
        for rid in list(self.tracked) if request_ids is None else request_ids:
            out, t = self.engine.abort_request(rid), self.tracked.pop(rid, None)
            if out is not None and t is not None:
                if t.last is None:                    # aborted while still queued
                    self.num_dequeued += 1
                self._count(t, out)
                # The handler may still be listening (shutdown, engine error): tell it the end.
                self._post(t.loop, [(t.sink, error or out)])

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now, posts = time.perf_counter(), {}
        for out in outputs:
            t = self.tracked.get(out.request_id)
            if t is None:
                continue                          # the warm-up request
            if t.last is None:                    # its first token: it has left the queue
                self.metrics.ttft.observe(now - t.arrival)
                self.num_dequeued += 1
            else:
                self.metrics.tpot.observe(now - t.last)
            t.last = now
            self._count(t, out)
            posts.setdefault(t.loop, []).append((t.sink, out))
            if out.finished:
                del self.tracked[out.request_id]
        for loop, items in posts.items():
            self._post(loop, items)

    def _count(self, t: _Tracked, out: RequestOutput) -> None:
        m, num = self.metrics, sum(len(c.token_ids) for c in out.outputs)
        if t.num_tokens == 0 and num:
            m.prompt_tokens.inc(len(out.prompt_token_ids))
        if not t.hide_output:
            m.generation_tokens.inc(num - t.num_tokens)
        t.num_tokens = num
        for c in out.outputs if out.finished else []:
            m.finished.labels(finish_reason=c.finish_reason).inc()

    def _update_gauges(self) -> None:
        """Copy the engine's state (LLMEngine.get_stats) into the Prometheus metrics."""
        m, sched, stats = self.metrics, self.engine.scheduler, self.engine.get_stats()
        m.running.set(len({s.request_id for s in sched.running}))
        m.waiting.set(len({s.request_id for s in sched.waiting}))
        m.blocks_used.set(stats["num_blocks_used"])
        m.blocks_free.set(stats["num_blocks_free"])
        m.blocks_cached_free.set(stats["num_blocks_cached_free"])
        m.blocks_peak.set(stats["peak_blocks_used"])
        m.kv_usage.set(stats["kv_cache_usage"])
        m.hit_rate.set(stats["prefix_cache_hit_rate"])
        m.cuda_allocated.set(stats.get("cuda_memory_allocated", 0))
        m.cuda_reserved.set(stats.get("cuda_memory_reserved", 0))
        # The engine keeps running totals; a counter only goes up, so add what is new.
        totals = {"preemptions": stats["num_preemptions"], "shifts": stats["num_shifts"],
                  "evictions": stats["num_evicted_blocks"], "cache_hits": sched.num_cached_tokens}
        for name, total in totals.items():
            getattr(m, name).inc(total - self._counted.get(name, 0))
            self._counted[name] = total

    @staticmethod
    def _post(loop: asyncio.AbstractEventLoop, items: list[tuple[OutputSink, Any]]) -> None:
        # A sink is not thread-safe: the loop's own thread does the puts, one wake-up per step.
        with contextlib.suppress(RuntimeError):       # the loop is closed: nobody is listening
            loop.call_soon_threadsafe(lambda: [sink.put_nowait(item) for sink, item in items])
