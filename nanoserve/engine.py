"""The engine: requests in, tokens out. LLMEngine is the step-by-step core (what a server
drives); LLM is the offline convenience wrapper with vLLM's `generate`.

One `LLMEngine.step()`:
    scheduler.schedule()  -> which sequences, how many tokens each
    runner.execute()      -> model forward on the paged cache + sampling (one host sync)
    _update()             -> append tokens, check stop conditions (outputs.py), free blocks
and returns a RequestOutput for every request that made progress, so callers can stream.
`last_step` shows what the scheduler decided in the latest step.

References: vLLM `LLMEngine` / `LLM`, nano-vllm `llm_engine.py`.
"""
from __future__ import annotations

import itertools
import logging
import time
from typing import Any

from . import cpu_attention, linear
from .attention import paged_attention
from .config import EngineConfig, GPT2Config, resolve_device, resolve_dtype
from .kv_cache import BlockAllocator, allocate_kv_cache, auto_num_blocks, bytes_per_block
from .model import GPT2
from .outputs import OutputProcessor
from .runner import ModelRunner, StepResult
from .sampler import Sampler
from .scheduler import Scheduler, SchedulerOutput, StepRecord
from .sequence import Request, RequestOutput, SamplingParams, Sequence
from .tokenizer import IncrementalDetokenizer, Tokenizer
from .weights import load_state_dict, resolve_model

log = logging.getLogger("nanoserve")

PromptType = str | list[int] | dict


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
        if mc.vocab_size > self.tokenizer.vocab_size + 64 or mc.vocab_size < self.tokenizer.vocab_size - 1:
            log.warning("vocab_size=%d differs from GPT-2's tokenizer (%d tokens)", mc.vocab_size,
                        self.tokenizer.vocab_size)

        self.model = GPT2(mc)
        self.model.load_weights(load_state_dict(self.model_dir, mc))
        self.model.to(device=self.device, dtype=self.dtype).eval()
        self._use_kernels()
        linear.check_quantization(config.quantization, self.device, self.dtype)
        if linear.is_supported(self.device, self.dtype):
            linear.use_cpu_linears(self.model, config.quantization)   # oneDNN-packed or int8 weights
        # Bigger steps amortise a GPU's fixed per-step cost; on a CPU they only add latency.
        self.max_num_batched_tokens = config.max_num_batched_tokens or (8192 if self.device.type == "cuda" else 2048)

        self.num_blocks = config.num_blocks or auto_num_blocks(self.model, config, self.dtype, self.device,
                                                               self.max_num_batched_tokens)
        self.kv_cache = allocate_kv_cache(mc, self.num_blocks, config.block_size, self.dtype, self.device)
        self.allocator = BlockAllocator(self.num_blocks)
        self.scheduler = Scheduler(self.allocator, config.block_size, config.max_num_seqs,
                                   self.max_num_batched_tokens, config.enable_kv_cache,
                                   config.enable_prefix_caching)
        self.sampler = Sampler(mc.vocab_size, mc.eos_token_id, self.device, config.seed)
        self.runner = ModelRunner(self.model, mc, config, self.kv_cache, self.sampler, self.device)
        if not config.quiet:
            log.info("nanoserve: %s on %s (%s); KV pool: %d blocks x %d tokens, %.2f MiB per block, %.0f MiB in all",
                     self.model_dir, self.device, self.dtype, self.num_blocks, config.block_size,
                     bytes_per_block(mc, config.block_size, self.dtype) / 2**20,
                     self.num_blocks * bytes_per_block(mc, config.block_size, self.dtype) / 2**20)
        # CUDA graphs need kernels that never synchronise with the host: the Triton ones.
        if self.device.type == "cuda" and not config.enforce_eager and self.model.attn_fn is not paged_attention:
            self.runner.capture_cuda_graphs()

        self.outputs = OutputProcessor(self.tokenizer, mc.eos_token_id, mc.n_ctx)
        self.requests: dict[str, Request] = {}
        self._last_sched: SchedulerOutput | None = None     # see last_step
        self._seq_ids = itertools.count()
        self._arrival_order = itertools.count()
        self._request_ids = itertools.count()

    # ---- set-up helpers -------------------------------------------------------------------
    def _use_kernels(self) -> None:
        """Swap a fast path into the model in place of attention.py's reference: the tuned
        decode attention on a CPU (cpu_attention.py), Triton kernels on CUDA when available."""
        if self.device.type == "cpu":
            fast = cpu_attention.compiled_attention() if self.config.compile_cpu_attention else None
            self.model.attn_fn = fast or cpu_attention.decode_attention
            return
        want = self.config.use_triton
        if want is False:
            return
        from . import kernels
        if not kernels.HAS_TRITON:
            if want:
                raise RuntimeError("use_triton=True but triton is not installed; pip install triton")
            return
        self.model.attn_fn, self.model.write_fn = kernels.paged_attention, kernels.write_kv

    # ---- requests -----------------------------------------------------------------------
    def _prompt_ids(self, prompt: Any) -> tuple[str | None, list[int]]:
        """(text or None, token ids) for the prompt forms the API accepts; raises on others."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = prompt["prompt_token_ids"]
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise TypeError(f"a dict prompt needs 'prompt' or 'prompt_token_ids', got keys {list(prompt)}")
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            V = self.model_config.vocab_size
            bad = [t for t in prompt if not 0 <= t < V]
            if bad:
                raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {V})")
            return None, list(prompt)
        raise TypeError(f"prompt must be a str, a list of token ids, or a dict with 'prompt_token_ids'; "
                        f"got {type(prompt).__name__}")

    def add_request(self, request_id: str | None, prompt: PromptType,
                    params: SamplingParams | None = None, priority: int = 0) -> str:
        """Queue a request; returns its id. Raises ValueError/TypeError (and changes nothing)
        if it is invalid."""
        params = params if params is not None else SamplingParams()
        request_id = self._check_request(request_id, params, priority)
        text, ids = self._prompt_ids(prompt)
        self._check_fits(len(ids), params)
        # Everything is validated above, so from here on nothing can fail half-way: a rejected
        # request never leaves sequences or blocks behind.
        arrival_order = next(self._arrival_order)
        seqs = []
        for i in range(params.n):
            seq = Sequence(seq_id=next(self._seq_ids), request_id=request_id, index=i, prompt_token_ids=ids,
                           params=params, priority=priority, arrival_order=arrival_order)
            seq.detok = IncrementalDetokenizer(self.tokenizer)
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

    def _check_request(self, request_id: str | None, params: SamplingParams, priority: int) -> str:
        """Check the arguments' types and the params against the vocabulary; return the
        request id to use (a fresh one for None)."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        if not isinstance(priority, int):
            raise TypeError(f"priority must be an int, got {priority!r}")
        params.check_vocab(self.model_config.vocab_size)
        if request_id is None:      # the next free number: a caller may have taken "0" already
            while (request_id := str(next(self._request_ids))) in self.requests:
                pass
        request_id = str(request_id)
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        return request_id

    def _check_fits(self, num_prompt: int, params: SamplingParams) -> None:
        """The prompt plus max_tokens must fit n_ctx, the KV pool, and (without a KV cache) one step."""
        if num_prompt == 0:
            raise ValueError("prompt is empty; give at least one token")
        total, n_ctx = num_prompt + params.max_tokens, self.model_config.n_ctx
        if total > n_ctx:
            raise ValueError(f"prompt is {num_prompt} tokens and max_tokens is {params.max_tokens}: "
                             f"{total} > n_ctx={n_ctx}; shorten the prompt or lower max_tokens")
        capacity = self.num_blocks * self.config.block_size
        if total > capacity:
            raise ValueError(f"prompt + max_tokens = {total} tokens exceeds the whole KV pool "
                             f"({capacity} tokens); raise num_blocks or lower max_tokens")
        if not self.config.enable_kv_cache and total - 1 > self.max_num_batched_tokens:
            raise ValueError(f"without a KV cache every step recomputes the whole sequence, and prompt + max_tokens "
                             f"- 1 = {total - 1} tokens exceeds max_num_batched_tokens="
                             f"{self.max_num_batched_tokens}; raise it or lower max_tokens")

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now; its blocks go back to the pool. Unknown ids are ignored."""
        req = self.requests.pop(str(request_id), None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
        req.finished_time = time.perf_counter()
        return self.outputs.output(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ---- the step -----------------------------------------------------------------------
    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Run one step. Returns a RequestOutput for every request that made progress (or,
        with finished_only, only for those that finished: cheaper when nobody streams)."""
        sched = self._last_sched = self.scheduler.schedule()
        if sched.is_empty:
            self.runner.release_rows(sched.freed_seq_ids)   # sequences aborted since the last step
            if self.scheduler.has_unfinished():
                raise RuntimeError("scheduler could not schedule any sequence; the KV pool is too small")
            return []
        result = self.runner.execute(sched)
        return self._update(sched, result, finished_only)

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

    def _update(self, sched: SchedulerOutput, result: StepResult,
                finished_only: bool = False) -> list[RequestOutput]:
        """Apply one step's results to the sequences, in the scheduler's order.

        Every scheduled sequence advances its cache counter by the tokens it ran. Only those
        whose prompt (or recompute) is now complete got a sampled token; a prefill chunk that
        stopped mid-prompt just waits for its next chunk."""
        touched: dict[str, Request] = {}
        now = time.perf_counter()
        for seq, n in sched.scheduled:
            self.scheduler.computed(seq, n)       # and shares the blocks that filled up
            req = self.requests[seq.request_id]
            if seq.seq_id in result.prompt_logprobs:
                seq.prompt_logprobs.extend(result.prompt_logprobs[seq.seq_id])
            if seq.seq_id not in result.sampled:
                continue                       # a prefill chunk that did not reach the end yet
            touched[req.request_id] = req
            req.first_token_time = req.first_token_time or now
            reason = self.outputs.append(seq, result.sampled[seq.seq_id], result.logprobs.get(seq.seq_id))
            if reason is not None:
                self.scheduler.finish(seq, reason)    # frees its blocks
        outputs = []
        for req in touched.values():
            done = req.seqs[-1].is_finished and req.is_finished   # cheap test first: n is usually 1
            if done:
                req.finished_time = now
            if done or not finished_only:
                outputs.append(self.outputs.output(req))
            if done:
                del self.requests[req.request_id]
        return outputs


class LLM:
    """Offline inference, vLLM-style:  LLM("gpt2").generate(prompts, SamplingParams(...))."""

    def __init__(self, model: str = "gpt2", **kwargs: Any) -> None:
        unknown = set(kwargs) - set(EngineConfig.field_names())
        if unknown:
            raise TypeError(f"LLM() got unknown keyword(s) {sorted(unknown)}; known: {EngineConfig.field_names()[1:]}")
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: PromptType | list[PromptType],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion; results in input order.

        All prompts are validated before any runs: one bad prompt raises and queues nothing."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                               and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a str or a list, got {type(prompts).__name__}")
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"got {len(sampling_params)} SamplingParams for {len(prompts)} prompts")
            params = list(sampling_params)
        else:
            params = [sampling_params or SamplingParams()] * len(prompts)
        eng = self.engine
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(eng.add_request(None, prompt, p))
        except Exception:
            for rid in ids:                   # leave the engine as we found it
                eng.abort_request(rid)
            raise
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm and len(ids) > 1 and not eng.config.quiet:
            from tqdm import tqdm
            bar = tqdm(total=len(ids), desc="generate", unit="req")
        try:
            while eng.has_unfinished_requests():
                for out in eng.step(finished_only=True):
                    if out.finished:
                        results[out.request_id] = out
                        if bar:
                            bar.update(1)
        except BaseException:                 # an error or Ctrl-C mid-run: free what we queued
            for rid in ids:
                eng.abort_request(rid)
            raise
        finally:
            if bar:
                bar.close()
        return [results[r] for r in ids]
