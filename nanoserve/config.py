"""Configuration: the model's hyperparameters (GPT2Config, read from config.json) and the
engine's knobs (EngineConfig), plus the named GPT-2 presets.

GPT2Config mirrors the names in Hugging Face's config.json (n_layer, n_head, n_embd, n_ctx)
so that a checkpoint's file maps onto it 1:1. Options of GPT-2's config that this runtime does
not implement are rejected here, loudly, rather than silently producing wrong logits.

References: nanoGPT `GPTConfig`, Hugging Face `GPT2Config`, vLLM `EngineArgs`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch

# Named checkpoints on the Hugging Face hub, with their sizes (parameters, tied lm_head counted
# once). The hub ids are what `LLM("gpt2-medium")` resolves to.
PRESETS: dict[str, dict] = {
    "distilgpt2":  dict(hub_id="distilbert/distilgpt2",         n_layer=6,  n_head=12, n_embd=768,  params="82M"),
    "gpt2":        dict(hub_id="openai-community/gpt2",         n_layer=12, n_head=12, n_embd=768,  params="124M"),
    "gpt2-medium": dict(hub_id="openai-community/gpt2-medium",  n_layer=24, n_head=16, n_embd=1024, params="355M"),
    "gpt2-large":  dict(hub_id="openai-community/gpt2-large",   n_layer=36, n_head=20, n_embd=1280, params="774M"),
    "gpt2-xl":     dict(hub_id="openai-community/gpt2-xl",      n_layer=48, n_head=25, n_embd=1600, params="1558M"),
}

# config.json options that change the math of GPT-2 and that we do not implement.
_UNSUPPORTED = {
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
}


# GPT2Config's annotations (strings, under `from __future__ import annotations`) -> the Python
# types config.json values must have, and how to say so. An int is a fine float.
_FIELD_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool}
_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}


@dataclass(frozen=True)
class GPT2Config:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_ctx: int = 1024              # context length; config.json calls it n_positions (older: n_ctx)
    vocab_size: int = 50257        # 50,000 BPE merges + 256 byte tokens + <|endoftext|>
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"   # the tanh approximation of GELU
    scale_attn_weights: bool = True         # divide scores by sqrt(head_dim)
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    tie_word_embeddings: bool = True        # lm_head shares wte's weights

    def __post_init__(self) -> None:
        # Types first: "12" or True would fail later with a TypeError far from the cause.
        for f in fields(self):
            v, want = getattr(self, f.name), _FIELD_TYPES[f.type]
            if not isinstance(v, want) or (want is not bool and isinstance(v, bool)):
                raise ValueError(f"{f.name}={v!r} must be {_TYPE_WORDS[f.type]}")
        for name in ("n_layer", "n_head", "n_embd", "n_ctx", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.n_embd % self.n_head != 0:      # after the >= 1 check: n_head 0 divides nothing
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        for name in ("bos_token_id", "eos_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"{name}={getattr(self, name)} is outside the vocabulary [0, {self.vocab_size})")
        if not self.layer_norm_epsilon > 0:
            raise ValueError(f"layer_norm_epsilon={self.layer_norm_epsilon} must be > 0")
        if self.activation_function not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
            raise ValueError(f"activation_function={self.activation_function!r} is not supported; "
                             "nanoserve implements gelu_new (GPT-2's) and gelu")

    @property
    def num_parameters(self) -> int:
        """Parameters the weights must hold: embeddings, L blocks of 12C^2 + 13C, ln_f (and
        an untied lm_head). Known before anything is allocated, so a config.json that
        claims far more than its weights file holds is caught first (weights.py)."""
        C, V = self.n_embd, self.vocab_size
        head = 0 if self.tie_word_embeddings else V * C
        return V * C + self.n_ctx * C + self.n_layer * (12 * C * C + 13 * C) + 2 * C + head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_json(cls, path: str | Path) -> "GPT2Config":
        """Read a Hugging Face GPT-2 config.json; raise on options we cannot honour."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: config.json not found; a checkpoint directory needs "
                                    "config.json and model.safetensors") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: must hold a JSON object of GPT-2 settings, got {raw!r:.40}")
        if missing := [k for k in ("n_layer", "n_head", "n_embd") if k not in raw]:
            raise ValueError(f"{path}: lacks the required field(s) {missing}")
        model_type = raw.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ValueError(f"{path}: model_type={model_type!r}; nanoserve runs GPT-2 (model_type 'gpt2') only")
        for key, ok_value in _UNSUPPORTED.items():
            if raw.get(key, ok_value) != ok_value:
                raise ValueError(f"{path}: {key}={raw[key]!r} is not supported by nanoserve "
                                 f"(only {ok_value!r}); this checkpoint would run with wrong logits")
        if raw.get("n_inner") not in (None, 4 * raw["n_embd"]):     # the MLP width; we build 4*n_embd
            raise ValueError(f"{path}: n_inner={raw['n_inner']!r} is not supported (only null or 4*n_embd)")
        kw = dict(
            n_layer=raw["n_layer"], n_head=raw["n_head"], n_embd=raw["n_embd"],
            n_ctx=raw.get("n_positions", raw.get("n_ctx", 1024)),
            vocab_size=raw.get("vocab_size", 50257),
            layer_norm_epsilon=raw.get("layer_norm_epsilon", 1e-5),
            activation_function=raw.get("activation_function", "gelu_new"),
            scale_attn_weights=raw.get("scale_attn_weights", True),
            bos_token_id=raw.get("bos_token_id", 50256) if raw.get("bos_token_id") is not None else 50256,
            eos_token_id=raw.get("eos_token_id", 50256) if raw.get("eos_token_id") is not None else 50256,
            tie_word_embeddings=raw.get("tie_word_embeddings", True),
        )
        try:
            return cls(**kw)
        except ValueError as e:            # name the file: the field alone does not say which one
            raise ValueError(f"{path}: {e}") from None


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None -> float32 on CPU, float16 on CUDA; strings by name; torch dtypes as they are."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype={dtype} is not supported; use float32, float16 or bfloat16")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype={dtype!r} is not supported; use 'float32', 'float16' or 'bfloat16'")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None -> CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} was asked for but torch sees no CUDA device; "
                           "use device='cpu' or install a CUDA build of torch")
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"device={device!r} is not supported; use 'cuda' or 'cpu'")
    return dev


def cdiv(a: int, b: int) -> int:
    """Ceiling division: how many blocks of b hold a items (a tokens in blocks of BS, ...)."""
    return -(-a // b)


def to_device(values: list | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list (or CPU tensor) as a tensor on `device`. To a GPU the copy goes through
    pinned memory, so it is asynchronous: the host goes on preparing the step meanwhile."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


@dataclass(frozen=True)
class EngineConfig:
    """Everything LLM(...) accepts besides the model. Names and defaults follow vLLM."""
    model: str = "gpt2"
    device: str | None = None           # None: CUDA if available, else CPU
    dtype: str | None = None            # None: float32 on CPU, float16 on CUDA
    block_size: int = 16                # tokens per KV block
    num_blocks: int | None = None       # KV blocks in the pool; None: sized from free memory
    gpu_memory_utilization: float = 0.9 # fraction of GPU memory the engine may use in total
    cpu_kv_cache_gb: float = 1.0        # KV pool size on CPU when num_blocks is None
    max_num_seqs: int = 256             # sequences in one step, at most
    max_num_batched_tokens: int | None = None  # tokens in one step, at most; None: 2048 on CPU, 8192 on CUDA
    seed: int = 0                       # seeds the sampler for requests without their own seed
    enable_kv_cache: bool = True        # False: recompute every token's K/V at every step (for comparison)
    enable_prefix_caching: bool = True  # reuse the K/V blocks of prompts that start the same way
    enforce_eager: bool = False         # True: no CUDA graphs
    use_triton: bool | None = None      # None: Triton kernels on CUDA when triton imports
    compile_cpu_attention: bool = False # CPU: torch.compile the decode attention (needs a C++ compiler)
    fused_decode: bool | None = None    # CUDA graphs capture the torch.compile'd decode step (fused.py);
                                        # None: when CUDA graphs are on, falling back to eager if it fails.
                                        # CPU: decode steps of <= 8 sequences run cpu_step.cpp (None, True) where
                                        # cpu_gemv builds, else with True fused.py's compiled step; False: model.py
    gemv: bool | None = None            # decode linears with few rows run gemv.py's Triton kernel, not cuBLAS;
                                        # None: where it applies (CUDA graphs on, Triton kernels in use)
    quantization: str | None = None     # "int8": per-channel int8 weights, made at load (CPU; linear.py)
    async_scheduling: bool | None = None  # schedule step k+1 while the device runs step k (engine.py);
                                        # None: on CUDA (on a CPU nothing runs meanwhile)
    quiet: bool = False                 # no progress bars or info logs
    log_stats_interval: float = 10.0    # seconds between one-line engine stats logs while busy; 0: none
    context_overflow: str = "error"     # a sequence reaching n_ctx: "error" (refused up front) or "shift"
    shift_window: int | None = None     # "shift": tokens kept as the new context; None: n_ctx // 2
    attention_window: int | None = None # sliding window: each token attends to the last W positions
                                        # only, and blocks behind every window are freed; None: full

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size={self.block_size} must be a power of two >= 1 (tokens per KV block)")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks={self.num_blocks} must be >= 1")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs={self.max_num_seqs} must be >= 1")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= 1")
        if self.context_overflow not in ("error", "shift"):
            raise ValueError(f"context_overflow={self.context_overflow!r} must be 'error' (refuse requests "
                             "longer than n_ctx) or 'shift' (keep the last shift_window tokens and go on)")
        if self.shift_window is not None and (not isinstance(self.shift_window, int) or self.shift_window < 1):
            raise ValueError(f"shift_window={self.shift_window!r} must be None (n_ctx // 2) or an int >= 1")
        if self.shift_window is not None and self.context_overflow != "shift":
            raise ValueError(f"shift_window={self.shift_window} does nothing with context_overflow="
                             f"{self.context_overflow!r}; set context_overflow='shift' or drop shift_window")
        if self.attention_window is not None and (not isinstance(self.attention_window, int)
                                                  or self.attention_window < 1):
            raise ValueError(f"attention_window={self.attention_window!r} must be None (full attention) or an "
                             "int >= 1 (positions each token attends to, itself included)")
        if self.log_stats_interval < 0:
            raise ValueError(f"log_stats_interval={self.log_stats_interval} must be >= 0 seconds (0: no stats log)")
        if self.async_scheduling and not self.enable_kv_cache:
            raise ValueError("async_scheduling=True needs the KV cache: with enable_kv_cache=False every step "
                             "recomputes whole sequences, which needs every token's value on the host")
        if self.quantization not in (None, "int8"):
            raise ValueError(f"quantization={self.quantization!r} is not supported; use None or 'int8'")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
