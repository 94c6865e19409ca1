"""nanoserve: a from-scratch GPT-2 inference runtime (paged KV cache, continuous batching).

Reading order: config, tokenizer, weights, model, attention, kernels, kv_cache, sequence,
scheduler, runner, sampler, engine, stats (then server, bench, __main__).
"""
from .config import EngineConfig, GPT2Config
from .engine import LLM, LLMEngine
from .sequence import CompletionOutput, RequestMetrics, RequestOutput, SamplingParams

__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput", "RequestMetrics",
           "EngineConfig", "GPT2Config"]
