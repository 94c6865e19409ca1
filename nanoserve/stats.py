"""What the engine can tell about itself: the KV pool's state and the engine's counters as
plain numbers (LLMEngine.get_stats, which a server exports as gauges), and the one-line log
the engine writes every few seconds while it is busy.

Everything here is read from the allocator, the scheduler and the engine's token counters; no
step does extra work for it, except one clock read to see whether a log line is due.

References: vLLM `SchedulerStats` and `LoggingStatLogger` (its "Avg prompt throughput" line).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch

from .kv_cache import bytes_per_block

log = logging.getLogger("nanoserve")


def collect(engine: Any) -> dict[str, float | int]:
    """The engine's state now (see LLMEngine.get_stats for what each key means)."""
    a, sch = engine.allocator, engine.scheduler
    used = a.num_blocks - a.num_free
    stats: dict[str, float | int] = dict(
        num_blocks_total=a.num_blocks, num_blocks_used=used, num_blocks_free=a.num_free,
        num_blocks_cached_free=a.num_cached_free, peak_blocks_used=a.peak_used,
        kv_cache_usage=used / a.num_blocks, peak_kv_cache_usage=a.peak_used / a.num_blocks,
        kv_block_bytes=bytes_per_block(engine.model_config, engine.config.block_size, engine.dtype),
        num_running=len(sch.running), num_waiting=len(sch.waiting),
        num_preemptions=sch.num_preemptions, num_shifts=sch.num_shifts,
        num_evicted_blocks=sch.num_evicted_blocks,
        prefix_cache_hit_rate=sch.num_cached_tokens / sch.num_queried_tokens if sch.num_queried_tokens else 0.0,
        num_prompt_tokens=engine.num_prompt_tokens_computed, num_generation_tokens=engine.num_generation_tokens)
    if engine.device.type == "cuda":
        stats["cuda_memory_allocated"] = torch.cuda.memory_allocated(engine.device)
        stats["cuda_memory_reserved"] = torch.cuda.memory_reserved(engine.device)
    return stats


class StatsLogger:
    """One log line every `interval` seconds while the engine steps: throughput since the last
    line, the queues, the pool's usage and the prefix cache's hit rate."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._mark = (time.perf_counter(), 0, 0)     # (time, prompt tokens, generated) at the last line

    def maybe_log(self, get_stats: Callable[[], dict[str, float | int]]) -> None:
        now = time.perf_counter()
        t0, prompt0, gen0 = self._mark
        if now - t0 < self.interval:
            return
        s = get_stats()
        self._mark = (now, s["num_prompt_tokens"], s["num_generation_tokens"])
        log.info("engine: prompt %.1f tok/s, generation %.1f tok/s | running %d, waiting %d, preempted %d | "
                 "KV cache %.1f%% (%d/%d blocks, peak %.1f%%) | prefix cache hit rate %.1f%%",
                 (s["num_prompt_tokens"] - prompt0) / (now - t0), (s["num_generation_tokens"] - gen0) / (now - t0),
                 s["num_running"], s["num_waiting"], s["num_preemptions"], 100 * s["kv_cache_usage"],
                 s["num_blocks_used"], s["num_blocks_total"], 100 * s["peak_kv_cache_usage"],
                 100 * s["prefix_cache_hit_rate"])
