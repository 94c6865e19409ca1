"""nanoserve: a from-scratch GPT-2 inference runtime (paged KV cache, continuous batching).

Reading order: config, tokenizer, weights, model, attention, kv_cache, sampling_params,
sequence, scheduler, runner, sampler, inputs, outputs, engine, llm, stats; then the fast paths
(kernels, cpu_attention, fused) and serving (async_engine, protocol, server).
"""
from .config import EngineConfig, GPT2Config
from .engine import LLMEngine
from .llm import LLM
from .sequence import CompletionOutput, RequestMetrics, RequestOutput, SamplingParams

__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput", "RequestMetrics",
           "EngineConfig", "GPT2Config"]
