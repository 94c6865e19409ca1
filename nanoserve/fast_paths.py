"""Which fast path runs where. The engine reads model.py and attention.py as the reference and
swaps faster code into the same places; this file makes those choices, per device and
EngineConfig, and nothing else (each fast path is tested against what it replaces). LLMEngine
calls swap_in() once the model is loaded and set_up_decode() once the KV pool and the runner
exist.

  device                    attention         linear layers              decode step
  CUDA (triton installed)   kernels.py        cuBLAS; gemv.py for 1-2    CUDA graphs (cuda_graphs.py) of
                                              rows (in the graphs)       fused.py's compiled step
  CPU, AVX-512 BF16 + VNNI  cpu_attention.py  linear.py (oneDNN), and    cpu_step.cpp, 1-8 sequences
                                              cpu_gemv.cpp for <= 8 rows
                                              (int8: <= 32)
  other CPUs                cpu_attention.py  linear.py (oneDNN, where   model.py (fused.compile_cpu_decode
                                              torch has it)              with fused_decode=True)

enforce_eager=True, use_triton=False, fused_decode=False and gemv=False turn the choices off
one by one; asking for one that cannot run here is a clear error.
"""
from __future__ import annotations

import logging

import torch

from . import cpu_attention, linear
from .attention import paged_attention
from .config import EngineConfig
from .model import GPT2
from .runner import ModelRunner

log = logging.getLogger("nanoserve")


def swap_in(model: GPT2, config: EngineConfig, device: torch.device, dtype: torch.dtype) -> None:
    """At load: the attention fast path, and on a CPU the linear layers' packed (or int8) weights."""
    _use_kernels(model, config, device)
    linear.check_quantization(config.quantization, device, dtype)
    if linear.is_supported(device, dtype):
        # oneDNN-packed or int8 weights (and in fp32 the plain ones too, for the compiled step)
        linear.use_cpu_linears(model, config.quantization, compiled_decode=_use_cpu_decode(config, device))


def _use_kernels(model: GPT2, config: EngineConfig, device: torch.device) -> None:
    """Swap a fast path into the model in place of attention.py's reference: the tuned
    decode attention on a CPU (cpu_attention.py), Triton kernels on CUDA when available."""
    if device.type == "cpu":
        fast = cpu_attention.compiled_attention() if config.compile_cpu_attention else None
        model.attn_fn = fast or cpu_attention.decode_attention
        return
    want = config.use_triton
    if want is False:
        return
    from . import kernels
    if not kernels.HAS_TRITON:
        if want:
            raise RuntimeError("use_triton=True but triton is not installed; pip install triton")
        return
    model.attn_fn, model.write_fn = kernels.paged_attention, kernels.write_kv


def set_up_decode(model: GPT2, runner: ModelRunner, config: EngineConfig, device: torch.device) -> None:
    """The decode fast path: CUDA graphs (of the fused step, with gemv.py's linears) on CUDA,
    or on a CPU cpu_step.py's C++ step (up to 8 sequences) or fused.py's compiled one (one); a
    clear error where an option asked for one that cannot run here."""
    # CUDA graphs need kernels that never synchronise with the host: the Triton ones.
    use_graphs = device.type == "cuda" and not config.enforce_eager and model.attn_fn is not paged_attention
    if config.fused_decode and not use_graphs and not _use_cpu_decode(config, device):
        raise ValueError("fused_decode=True needs CUDA graphs (device='cuda', triton installed) or device='cpu', "
                         "and enforce_eager=False; leave fused_decode=None to use it only where it applies")
    if config.gemv and not use_graphs:
        raise ValueError("gemv=True needs CUDA graphs (device='cuda', enforce_eager=False, triton installed); "
                         "leave gemv=None to use it only where it applies")
    if use_graphs:
        if config.gemv is not False:
            # Decode steps read every weight once per token: a GEMV that streams them faster
            # than cuBLAS shortens the step (gemv.py). Larger M still goes to cuBLAS.
            from .gemv import use_gemv_linears
            use_gemv_linears(model)
        _capture_graphs(model, runner, config)
    elif device.type == "cpu" and config.fused_decode is not False and not config.enforce_eager:
        from . import cpu_step
        if cpu_step.supports(model):     # one C++ call a step, nothing to compile: on by default
            runner.cpu_decode, runner.cpu_decode_seqs = cpu_step.build(model), cpu_step.MAX_SEQS
        elif _use_cpu_decode(config, device):
            from .fused import compile_cpu_decode
            runner.cpu_decode = compile_cpu_decode(model)   # compiles on its first step


def _use_cpu_decode(config: EngineConfig, device: torch.device) -> bool:
    """Whether fused_decode=True asks for a fused step on a CPU: the C++ step runs there by
    default anyway where cpu_gemv builds; elsewhere this is what turns on
    fused.compile_cpu_decode, which compiles for 13-84 s on first use, in every process whose
    Inductor cache is cold (BENCHMARKS.md, issue 12, has its speed)."""
    return device.type == "cpu" and bool(config.fused_decode) and not config.enforce_eager


def _capture_graphs(model: GPT2, runner: ModelRunner, config: EngineConfig) -> None:
    """Capture the decode CUDA graphs, of the fused step unless fused_decode=False, and
    the graphs for one sequence's prompt (runner.capture_prefill_graphs)."""
    if config.fused_decode is not False:
        from .fused import compile_decode
        runner.decode_logits = compile_decode(model)
    try:
        runner.capture_cuda_graphs()
    except Exception as e:
        if config.fused_decode is None and runner.decode_logits is not None:
            # Default on means "where it works": an unsupported torch or compiler must not
            # stop the engine, which is correct (if slower) with eager graphs.
            log.warning("fused decode failed (%s: %s); capturing eager CUDA graphs", type(e).__name__, e)
            runner.decode_logits = None
            runner.capture_cuda_graphs()
        else:
            raise
    runner.capture_prefill_graphs()       # a prompt that runs alone: the eager forward, captured
