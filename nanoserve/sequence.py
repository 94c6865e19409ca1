"""Request-level data: the engine's running state of each generated sequence (Sequence), a
request's n sequences together (Request), and what the user gets back (RequestOutput). What
the user asks for, SamplingParams, has its own file (sampling_params.py).

A request with n > 1 becomes n sequences that share a request_id. A sequence's tokens are
prompt + output; `num_computed_tokens` counts those whose K/V are already in the cache. The
scheduler's whole job is to move that counter towards len(token_ids) step by step: a prefill
moves it by a chunk, a decode by one. Preemption drops the cache and resets it to 0, and the
sequence recomputes its prompt *and* its output so far, then continues where it stopped.

This file is plain Python: no tensors, so scheduler tests run without torch doing any work.

References: vLLM `Request`, `RequestOutput`, nano-vllm `engine/sequence.py`.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from .config import cdiv
from .sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"      # queued; no KV blocks (new, or preempted)
    RUNNING = "running"      # has KV blocks; gets tokens scheduled every step
    FINISHED = "finished"


@dataclass(slots=True)
class Sequence:
    seq_id: int
    request_id: str
    index: int                           # which of the request's n completions
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0                    # lower runs first (vLLM's convention)
    arrival_order: int = 0               # a counter, not a time: ties in priority go first come, first served
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0         # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)   # KV block ids, in token order
    block_hashes: list[bytes] = field(default_factory=list)  # prefix-cache hash of each full block of tokens
    num_cached_blocks: int = 0           # leading blocks of block_table that the prefix cache knows
    finish_reason: str | None = None     # "stop" | "length" | "abort"
    text: str = ""                       # detokenized output (stop strings cut off)
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    detok: Any = None                    # IncrementalDetokenizer, set by the engine
    stop_strings: Any = None             # outputs.StopStrings, built at the first stop check
    num_detok: int = 0                   # output tokens already turned into `text`
    generator: Any = None                # torch.Generator for seeded sampling, set by the engine
    plain_greedy: bool = False           # params.plain_greedy, read once (the request's params never change)
    peak_num_blocks: int = 0             # most KV blocks this sequence held at once
    num_preemptions: int = 0             # times it lost its blocks to make room for others
    num_dropped_tokens: int = 0          # leading tokens shifted out of the model's context
    num_shifts: int = 0                  # context shifts (EngineConfig.context_overflow="shift")
    num_evicted_blocks: int = 0          # leading block_table entries freed by a sliding window (now -1)
    # Async scheduling: tokens already sampled by a step still running on the device, not yet
    # in output_token_ids. They count in num_tokens (the next step feeds them from the device)
    # but not in token_ids, whose values the host does not know yet.
    num_pending_tokens: int = 0

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending_tokens

    @property
    def num_context_tokens(self) -> int:
        """Tokens the model sees: all but those a context shift dropped. K/V positions, the
        block table and num_computed_tokens all count within this context."""
        return self.num_tokens - self.num_dropped_tokens

    @property
    def context_token_ids(self) -> list[int]:
        return self.token_ids[self.num_dropped_tokens:]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def num_blocks_needed(self, num_tokens: int, block_size: int) -> int:
        """Extra blocks to hold `num_tokens` tokens in total."""
        return max(0, cdiv(num_tokens, block_size) - len(self.block_table))


@dataclass(slots=True)
class Request:
    """One user request: its n sequences (completions) share the prompt and the params."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    error: str | None = None             # why the engine aborted it, if its bookkeeping failed

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """time.perf_counter() timestamps (seconds), as vLLM's RequestOutput.metrics, and what the
    request cost the KV pool. Counts are summed over the request's n sequences."""
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    num_kv_blocks_peak: int = 0          # each sequence's most KV blocks held at once, summed
    num_preemptions: int = 0             # times a sequence was preempted (and recomputed)
    num_shifts: int = 0                  # context shifts: times the context was cut to its last W tokens


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, float] | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    error: str | None = None             # set when the engine aborted the request on an internal error
