"""The engine: requests in, tokens out. LLMEngine is the step-by-step core that a server
drives (llm.py wraps it in vLLM's offline `LLM.generate`).

One `LLMEngine.step()`:
    scheduler.schedule()  -> which sequences, how many tokens each
    runner.launch()       -> model forward on the paged cache + sampling, queued on the device
    _finish()             -> read the tokens back (one host sync), append them, check stop
                             conditions (outputs.py), free blocks
and returns a RequestOutput for every request that made progress, so callers can stream.
With async scheduling (the default on CUDA) step k+1 is launched before step k is finished,
so the host's work overlaps the device's; see "async scheduling" below.
`last_step` shows what the scheduler decided in the latest step.

References: vLLM `LLMEngine`, nano-vllm `llm_engine.py`.
"""
from __future__ import annotations

import gc
import itertools
import logging
import sys
import time

import torch

from . import fast_paths, stats
from .config import EngineConfig, GPT2Config, resolve_device, resolve_dtype
from .kv_cache import BlockAllocator, allocate_kv_cache, auto_num_blocks, bytes_per_block
from .model import GPT2
from .inputs import InputProcessor, PromptType
from .outputs import OutputProcessor
from .runner import LaunchedStep, ModelRunner
from .sampler import Sampler
from .scheduler import Scheduler, SchedulerOutput, StepRecord, is_decode
from .sequence import Request, RequestOutput, SamplingParams, Sequence
from .tokenizer import IncrementalDetokenizer, Tokenizer
from .weights import load_state_dict, resolve_model

log = logging.getLogger("nanoserve")



class LLMEngine:
    """Owns the model, the KV pool, the scheduler and the sampler; advances all requests one
    step at a time. Not thread-safe: one thread drives it (see async_engine.py for servers)."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.model_dir = resolve_model(config.model)
        self.model_config = GPT2Config.from_json(self.model_dir / "config.json")
        self.tokenizer = Tokenizer(self.model_dir)
        mc = self.model_config
        # The ids a request may use or see: those both the model and the tokenizer know. A
        # checkpoint padded past the tokenizer (nanoGPT's 50304) gets no logits for the rest.
        self.vocab_size = min(mc.vocab_size, self.tokenizer.vocab_size)
        if mc.eos_token_id >= self.vocab_size:
            raise ValueError(f"{self.model_dir / 'config.json'}: eos_token_id={mc.eos_token_id} is beyond the "
                             f"tokenizer's {self.tokenizer.vocab_size} tokens")
        # Context shifting: a sequence whose context would pass n_ctx keeps its last shift_window
        # tokens and goes on (see _apply), so n_ctx no longer ends a generation.
        self.shift_window = self._shift_window()

        self._load_model()
        # Bigger steps amortise a GPU's fixed per-step cost; on a CPU they only add latency.
        self.max_num_batched_tokens = config.max_num_batched_tokens or (8192 if self.device.type == "cuda" else 2048)

        self._set_up_pool()
        fast_paths.set_up_decode(self.model, self.runner, self.config, self.device)

        kv_capacity = self.num_blocks * config.block_size
        self.inputs = InputProcessor(self.tokenizer, self.vocab_size, mc.n_ctx, kv_capacity, self.shift_window,
                                     None if config.enable_kv_cache else self.max_num_batched_tokens)
        self.outputs = OutputProcessor(self.tokenizer, mc.eos_token_id,
                                       mc.n_ctx if self.shift_window is None else sys.maxsize)
        self.requests: dict[str, Request] = {}
        self._last_sched: SchedulerOutput | None = None     # see last_step
        # Async scheduling pays where a device runs the step while the host goes on (CUDA).
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else self.device.type == "cuda" and config.enable_kv_cache)
        self._in_flight: LaunchedStep | None = None         # launched, results not read back yet
        self._seq_ids = itertools.count()
        self._arrival_order = itertools.count()
        self._request_ids = itertools.count()
        self.num_prompt_tokens_computed = 0       # prefill and recompute tokens run, in all
        self.num_generation_tokens = 0            # tokens sampled, in all
        self.stats_logger = stats.StatsLogger(config.log_stats_interval)

    # ---- set-up helpers -------------------------------------------------------------------
    def _load_model(self) -> None:
        """self.model: the checkpoint's GPT-2 on our device and dtype, with the fast paths swapped in
        (fast_paths.py: attention kernels, the CPU's linear layers)."""
        if self.device.type == "cuda":
            # An engine dropped earlier in this process may still hold its KV pool through a
            # reference cycle. Free it before our weights go to the GPU: placed inside that
            # pool's cached segment, they would keep it from being released, and our own pool,
            # sized from the memory the driver reports, would not fit (an OOM seen on the H200).
            gc.collect()
            torch.cuda.empty_cache()
        state_dict = load_state_dict(self.model_dir, self.model_config)   # checks config.json against the file first
        model = GPT2(self.model_config, num_logits=self.vocab_size)
        model.load_weights(state_dict)
        del state_dict
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        if self.device.type == "cuda":
            model.pad_head()                  # cuBLAS's aligned kernels for the logits (model.py)
        fast_paths.swap_in(self.model, self.config, self.device, self.dtype)

    def _set_up_pool(self) -> None:
        """The KV pool (as many blocks as fit, unless num_blocks says), its allocator, and the
        scheduler, sampler and runner that share it."""
        config, mc = self.config, self.model_config
        self.num_blocks = config.num_blocks or auto_num_blocks(self.model, config, self.dtype, self.device,
                                                               self.max_num_batched_tokens)
        self.kv_cache = allocate_kv_cache(mc, self.num_blocks, config.block_size, self.dtype, self.device)
        self.allocator = BlockAllocator(self.num_blocks)
        # A sliding window turns prefix caching off: sharing full blocks would be sound (a block's
        # K/V depend only on the tokens up to it and on W), but eviction would then free blocks
        # that other sequences hold, and the two policies have not been tested together.
        self.scheduler = Scheduler(self.allocator, config.block_size, config.max_num_seqs,
                                   self.max_num_batched_tokens, config.enable_kv_cache,
                                   config.enable_prefix_caching and config.attention_window is None,
                                   config.attention_window)
        self.sampler = Sampler(self.vocab_size, mc.eos_token_id, self.device, config.seed)
        self.runner = ModelRunner(self.model, mc, config, self.kv_cache, self.sampler, self.device)
        if not config.quiet:
            block_mib = bytes_per_block(mc, config.block_size, self.dtype) / 2**20
            log.info("nanoserve: %s on %s (%s); KV pool: %d blocks x %d tokens, %.2f MiB per block, %.0f MiB in all",
                     self.model_dir, self.device, self.dtype, self.num_blocks, config.block_size,
                     block_mib, self.num_blocks * block_mib)

    def _shift_window(self) -> int | None:
        """Tokens a context shift keeps (None: no shifting). It must leave room to grow."""
        if self.config.context_overflow != "shift":
            return None
        n_ctx = self.model_config.n_ctx
        W = self.config.shift_window or n_ctx // 2
        if not 1 <= W < n_ctx:
            raise ValueError(f"shift_window={W} must be in [1, n_ctx={n_ctx}): the kept context needs room "
                             "for new tokens before the next shift")
        return W

    # ---- requests -----------------------------------------------------------------------
    def add_request(self, request_id: str | None, prompt: PromptType,
                    params: SamplingParams | None = None, priority: int = 0) -> str:
        """Queue a request; returns its id. Raises ValueError/TypeError (and changes nothing)
        if it is invalid (inputs.py says what is checked). The request keeps its own copy of
        `params`: changing the caller's object afterwards does not reach a queued request."""
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise TypeError(f"priority must be an int, got {priority!r}")
        text, ids, params = self.inputs.process(prompt, params if params is not None else SamplingParams())
        request_id = self._new_request_id(request_id)
        # Everything is validated above, so from here on nothing can fail half-way: a rejected
        # request never leaves sequences or blocks behind.
        arrival_order = next(self._arrival_order)
        seqs = []
        for i in range(params.n):
            seq = Sequence(seq_id=next(self._seq_ids), request_id=request_id, index=i, prompt_token_ids=ids,
                           params=params, priority=priority, arrival_order=arrival_order)
            seq.detok = IncrementalDetokenizer(self.tokenizer)
            seq.plain_greedy = params.plain_greedy
            seq.logprobs = [] if params.logprobs is not None else None
            # Only the first completion reports prompt logprobs (they are the same for all n).
            seq.prompt_logprobs = [None] if params.prompt_logprobs is not None and i == 0 else None
            if params.seed is not None:
                seq.generator = self.sampler.make_generator(params.seed + i)
            seqs.append(seq)
        self.requests[request_id] = Request(request_id, text, ids, params, seqs, time.perf_counter())
        for seq in seqs:
            self.scheduler.add(seq)
        return request_id

    def _new_request_id(self, request_id: str | None) -> str:
        """The id to use: the caller's, if free, or the next free number for None."""
        if request_id is None:      # the next free number: a caller may have taken "0" already
            while (request_id := str(next(self._request_ids))) in self.requests:
                pass
        request_id = str(request_id)
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now; its blocks go back to the pool. Unknown ids are ignored."""
        req = self.requests.pop(str(request_id), None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
        return self._output(req, time.perf_counter())

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ---- the step -----------------------------------------------------------------------
    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Run one step. Returns a RequestOutput for every request that made progress (or,
        with finished_only, only for those that finished: cheaper when nobody streams).

        With async scheduling the step launched here is read back by the next call, so the
        outputs returned are the previous step's: while the device computes step k+1, the
        host applies step k's tokens (see _held and _can_run_ahead for when it waits)."""
        outputs: list[RequestOutput] = []
        prev = self._in_flight
        if prev is not None and not self._can_run_ahead(prev):
            outputs, prev = self._finish(prev, finished_only), None
        self._in_flight = None
        sched = self._last_sched = self.scheduler.schedule(self._held(prev))
        if sched.is_empty:
            self.runner.release_rows(sched.freed_seq_ids)   # sequences aborted since the last step
            if prev is not None:                            # what is held waits for prev's tokens
                return outputs + self._finish(prev, finished_only)
            if self.scheduler.has_unfinished():
                raise RuntimeError("scheduler could not schedule any sequence; the KV pool is too small")
            return outputs
        try:
            launched = self.runner.launch(sched, prev)
        except BaseException:
            if prev is not None:      # apply what prev computed, so no sequence keeps a pending token
                self._finish(prev)
            raise
        self._advance(sched, launched)
        if prev is not None:
            outputs += self._finish(prev, finished_only)    # the device works on `launched` meanwhile
        if self.async_scheduling:
            self._in_flight = launched
        else:
            outputs += self._finish(launched, finished_only)
        if self.config.log_stats_interval and not self.config.quiet:
            self.stats_logger.maybe_log(self.get_stats)
        return outputs

    @property
    def last_step(self) -> StepRecord | None:
        """What the scheduler decided for the latest step (None before the first), as plain
        values captured when it decided, so the record stays true after the step has run:
        `scheduled` holds, per sequence in run order, its seq_id and request_id, the tokens
        already computed before the step, the tokens computed in it, "prefill" or "decode",
        and the tokens its admission in this step took from the prefix cache;
        `preempted_seq_ids` the sequences sent back to wait. Built when read, so watching
        costs the engine nothing per step."""
        return self._last_sched.record() if self._last_sched is not None else None

    # ---- async scheduling -----------------------------------------------------------------
    # The next step is scheduled before the last one's tokens are known: each sequence that
    # sampled is counted one token longer (Sequence.num_pending_tokens), and the runner feeds
    # that token from the device. Stop conditions are checked one step late, so a sequence that
    # stopped may have run one step too many; that step's token is dropped, as are its K/V
    # (its blocks were freed when it stopped; the device finishes the step before any later one
    # reuses them, as one stream runs in order). Outputs stay those of the synchronous engine.
    def _can_run_ahead(self, prev: LaunchedStep) -> bool:
        """Whether the next step may be scheduled before `prev`'s tokens are read: not if a
        sequence's next logits depend on its output so far (penalties, min_tokens)."""
        return not any(s.params.needs_output_history for s in prev.sample_seqs)

    def _held(self, prev: LaunchedStep | None) -> frozenset[int]:
        """Sequences whose pending token is their last (max_tokens): scheduling them would
        compute a step only to throw it away. (A context shift needs no hold: num_tokens counts
        the pending token, so _apply shifts a sequence as soon as it would pass n_ctx.)"""
        if prev is None:
            return frozenset()
        return frozenset(s.seq_id for s in prev.sample_seqs
                         if len(s.output_token_ids) + s.num_pending_tokens >= s.params.max_tokens)

    def _advance(self, sched: SchedulerOutput, launched: LaunchedStep) -> None:
        """Count a launched step's work as done: the tokens whose K/V it writes, and the
        token each sampling sequence will get."""
        num_decode = 0
        for seq, n in sched.scheduled:
            num_decode += is_decode(seq, seq.num_computed_tokens, n)
            self.scheduler.computed(seq, n)
        for seq in launched.sample_seqs:
            seq.num_pending_tokens += 1
        self.num_prompt_tokens_computed += sched.num_tokens - num_decode

    def _finish(self, launched: LaunchedStep, finished_only: bool = False) -> list[RequestOutput]:
        """Read a launched step's results back and apply them to the sequences, in the
        scheduler's order.

        Only sequences whose prompt (or recompute) is complete got a sampled token; a prefill
        chunk that stopped mid-prompt just waits for its next chunk. Full blocks are offered to
        the prefix cache once their tokens are known. A request whose bookkeeping raises
        (detokenizing, a stop check) fails alone: see _fail."""
        result = self.runner.collect(launched)
        if result.prompt_logprobs:
            for seq, _ in launched.sched.scheduled:
                if not seq.is_finished and seq.seq_id in result.prompt_logprobs:
                    seq.prompt_logprobs.extend(result.prompt_logprobs[seq.seq_id])
        touched: dict[str, Request] = {}
        now = time.perf_counter()
        logprobs = result.logprobs or itertools.repeat(None)
        for seq, token, lp in zip(launched.sample_seqs, result.tokens, logprobs):
            if seq.is_finished:
                continue                       # stopped or aborted since: its token is dropped
            req = self.requests[seq.request_id]
            try:
                self._apply(seq, token, lp)
            except Exception as e:
                self._fail(req, e)
            touched[req.request_id] = req
            req.first_token_time = req.first_token_time or now
        outputs = []
        for req in touched.values():
            if finished_only and not (req.seqs[-1].is_finished and req.is_finished):  # cheap test first
                continue
            out = self._output(req, now)
            if out.finished:
                del self.requests[req.request_id]
            outputs.append(out)
        return outputs

    def _apply(self, seq: Sequence, token: int, logprobs: dict[int, float] | None) -> None:
        """One sequence's sampled token (the sequence finishes, freeing its blocks, if the
        token stops it)."""
        seq.num_pending_tokens -= 1
        reason = self.outputs.append(seq, token, logprobs)
        self.num_generation_tokens += 1
        self.scheduler.cache_blocks(seq)     # a block that waited for this token's value (async) is shared now
        if reason is not None:
            self.scheduler.finish(seq, reason)       # frees its blocks
        elif self.shift_window is not None and seq.num_context_tokens > self.model_config.n_ctx:
            # The new token would sit at position n_ctx, which GPT-2 has no embedding for.
            self.scheduler.shift(seq, self.shift_window)

    def _fail(self, req: Request, error: Exception) -> None:
        """A request's own bookkeeping raised: finish all its sequences with "abort" and the
        error on record, freeing their blocks, so one bad request never takes down the step
        (or the server thread) that every other request shares. Its text stays as it was:
        decoding again is what raised."""
        log.error("request %s failed and was aborted: %r", req.request_id, error, exc_info=error)
        req.error = f"{type(error).__name__}: {error}"
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
            seq.num_detok = len(seq.output_token_ids)     # freeze the text

    def _output(self, req: Request, now: float) -> RequestOutput:
        """The request's snapshot, stamped finished if it is; a request whose output cannot
        be built (its detokenizing raises) fails instead of raising."""
        if req.is_finished:
            req.finished_time = req.finished_time or now
        try:
            return self.outputs.output(req)
        except Exception as e:
            self._fail(req, e)
            req.finished_time = req.finished_time or now
            return self.outputs.output(req)

    # ---- statistics ---------------------------------------------------------------------
    def get_stats(self) -> dict[str, float | int]:
        """The engine's state now, as plain numbers (what a server exports as gauges).

        KV blocks: `num_blocks_total` = `num_blocks_used` (held by a sequence) +
        `num_blocks_free`; `num_blocks_cached_free` of the free ones still hold a prefix the
        prefix cache can hand back. `peak_blocks_used` is the most ever held at once.
        Counters since start: preemptions, context shifts, blocks evicted by a sliding window,
        prompt and generated tokens.
        `prefix_cache_hit_rate`: tokens taken from the prefix cache / tokens looked up.
        On CUDA, the allocator's `cuda_memory_allocated` / `cuda_memory_reserved` (bytes)."""
        return stats.collect(self)

