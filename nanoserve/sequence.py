"""Request-level data: what the user asks for (SamplingParams), the engine's running state of
each generated sequence (Sequence), a request's n sequences together (Request), and what
the user gets back (RequestOutput).

A request with n > 1 becomes n sequences that share a request_id. A sequence's tokens are
prompt + output; `num_computed_tokens` counts those whose K/V are already in the cache. The
scheduler's whole job is to move that counter towards len(token_ids) step by step: a prefill
moves it by a chunk, a decode by one. Preemption drops the cache and resets it to 0, and the
sequence recomputes its prompt *and* its output so far, then continues where it stopped.

This file is plain Python: no tensors, so scheduler tests run without torch doing any work.

References: vLLM `SamplingParams`, `RequestOutput`, nano-vllm `engine/sequence.py`.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

from .config import cdiv


@dataclass
class SamplingParams:
    n: int = 1                          # completions per prompt
    temperature: float = 1.0            # 0 means greedy (argmax)
    top_p: float = 1.0                  # nucleus: smallest set of tokens with this much probability
    top_k: int = 0                      # keep the k most likely tokens; 0 or -1: all
    min_p: float = 0.0                  # drop tokens less likely than min_p * the top token
    seed: int | None = None             # per-request RNG: same tokens alone or in any batch
    max_tokens: int = 16                # tokens to generate, at most
    min_tokens: int = 0                 # EOS and stop token ids are suppressed until this many
    stop: str | list[str] | None = None # stop strings; the text is cut before them
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None         # top-k logprobs (plus the sampled token's) per output token
    prompt_logprobs: int | None = None  # same for each prompt token after the first
    repetition_penalty: float = 1.0     # > 1 discourages tokens already in prompt or output
    presence_penalty: float = 0.0       # OpenAI's: subtracted once from each token the output holds
    frequency_penalty: float = 0.0      # OpenAI's: subtracted per time the output holds the token
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (OpenAI's, in [-100, 100])

    def __post_init__(self) -> None:
        def bad(name: str, limit: str) -> ValueError:
            return ValueError(f"SamplingParams.{name}={getattr(self, name)!r} is invalid: {limit}")
        for name in ("n", "top_k", "max_tokens", "min_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"SamplingParams.{name} must be an int, got {type(v).__name__} {v!r}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"SamplingParams.{name} must be a number, got {type(v).__name__} {v!r}")
            if not math.isfinite(v):          # NaN slips through every comparison below
                raise bad(name, "must be a finite number")
        if self.n < 1:
            raise bad("n", "must be >= 1")
        if self.temperature < 0:
            raise bad("temperature", "must be >= 0 (0 means greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if self.top_k < -1:
            raise bad("top_k", "must be -1, 0 (all tokens) or a positive count")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if self.max_tokens < 1:
            raise bad("max_tokens", "must be >= 1")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise bad("min_tokens", f"must be in [0, max_tokens={self.max_tokens}]")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be > 0 (1 means no penalty)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, "must be in [-2, 2] (0 means no penalty)")
        self.logit_bias = dict(self.logit_bias or {})
        if not all(isinstance(t, int) and not isinstance(t, bool) and isinstance(b, (int, float))
                   and not isinstance(b, bool) and -100 <= b <= 100 for t, b in self.logit_bias.items()):
            raise bad("logit_bias", "must map token ids (ints) to biases in [-100, 100]")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise bad(name, "must be None or an int >= 0")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"SamplingParams.seed must be an int or None, got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be a non-empty string or a list of them")
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not all(isinstance(t, int) for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be a list of ints")
        if self.top_k == -1:
            self.top_k = 0

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


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
    num_detok: int = 0                   # output tokens already turned into `text`
    generator: Any = None                # torch.Generator for seeded sampling, set by the engine

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

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
    """time.perf_counter() timestamps (seconds), as vLLM's RequestOutput.metrics."""
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, float] | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
