"""GPT-2, written out by hand, over a flat batch of tokens from many sequences.

A serving step is not a (B, T) rectangle: it mixes whole prompts, chunks of long prompts and
single decode tokens of different sequences. So the model takes the step flattened to N
tokens, with each token's absolute position, and leaves "who attends to whom" to the
attention metadata (block tables into the paged KV cache, see attention.py). Every layer but
attention is per-token, which is why flattening costs nothing there.

The parameters keep the checkpoint's names, so a state dict maps 1:1. One layout changes: the
checkpoint stores Conv1D weights as [in, out]; `load_weights` transposes them once to
[out, in], nn.Linear's layout, where each output is a contiguous dot product. For a one-token
decode on a CPU that made the projections about 3x faster (a gemv over rows, not columns).

N = tokens in this step (all sequences, flattened)   S = sequences in batch
C = n_embd  H = n_head  D = head_dim (C = H*D)  V = vocab_size  L = n_layer
NB = KV blocks in pool   BS = tokens per block   MB = max blocks per sequence

References: OpenAI gpt-2 `model.py`, nanoGPT `model.py`, Hugging Face `modeling_gpt2.py`.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import attention
from .attention import AttentionFn, AttentionMetadata
from .config import GPT2Config

WriteKVFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


class Conv1D(nn.Module):
    """GPT-2's linear layer (named Conv1D in the checkpoint): y = x @ W.T + b."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_out, n_in))   # (out, in), transposed at load
        self.bias = nn.Parameter(torch.empty(n_out))           # (out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:       # (N, in) -> (N, out)
        return F.linear(x, self.weight, self.bias)


class Attention(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.c_attn = Conv1D(cfg.n_embd, 3 * cfg.n_embd)      # q, k, v projections, fused
        self.c_proj = Conv1D(cfg.n_embd, cfg.n_embd)
        self.scale = 1.0 / math.sqrt(self.head_dim) if cfg.scale_attn_weights else 1.0

    def forward(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, attn_fn: AttentionFn, write_fn: WriteKVFn | None) -> torch.Tensor:
        N, C = x.shape
        qkv = self.c_attn(x)                                   # (N, 3C)
        q, k, v = qkv.view(N, 3, self.n_head, self.head_dim).unbind(1)   # 3 x (N, H, D)
        if write_fn is not None:
            # This step's keys/values go into the cache first, so that attention below finds a
            # sequence's whole history, this step included, in one place.
            write_fn(k, v, k_cache, v_cache, meta.slot_mapping)
            y = attn_fn(q, k_cache, v_cache, meta, self.scale)     # (N, H, D)
        else:   # fused.py's decode attention writes them itself (one kernel where there were two)
            y = attn_fn(q, k_cache, v_cache, meta, self.scale, new_kv=(k, v))
        return self.c_proj(y.reshape(N, C))                    # (N, C)


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.c_fc = Conv1D(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = Conv1D(4 * cfg.n_embd, cfg.n_embd)
        # gelu_new is the tanh approximation of GELU; the erf form differs in the 4th decimal.
        self.approximate = "none" if cfg.activation_function == "gelu" else "tanh"
        self.fc_applies_gelu = False      # gemv.py's c_fc may apply the GELU inside its kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:       # (N, C) -> (N, C)
        h = self.c_fc(x)                                       # (N, 4C)
        if not self.fc_applies_gelu:
            h = F.gelu(h, approximate=self.approximate)
        return self.c_proj(h)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, attn_fn: AttentionFn, write_fn: WriteKVFn | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), k_cache, v_cache, meta, attn_fn, write_fn)   # (N, C)
        return x + self.mlp(self.ln_2(x))                                            # (N, C)


class GPT2(nn.Module):
    def __init__(self, cfg: GPT2Config, num_logits: int | None = None) -> None:
        """num_logits: how many token ids get logits (default: all vocab_size). nanoGPT pads
        vocab_size from the tokenizer's 50,257 to 50,304 (a multiple of 64, for faster
        matmuls); the padded rows were never trained and no tokenizer can decode them, so the
        engine asks for the tokenizer's count and no sampler or logprob ever sees a padded id."""
        super().__init__()
        self.config = cfg
        self.num_logits = min(num_logits or cfg.vocab_size, cfg.vocab_size)
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)   # (V, C), also the output head
        self.wpe = nn.Embedding(cfg.n_ctx, cfg.n_embd)        # (n_ctx, C)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.lm_head: nn.Parameter | None = None              # (V, C) only for untied fine-tunes
        # On a CPU, linear.py replaces the Conv1Ds and sets this to a prepacked (or int8) copy
        # of the output head: (M, C) -> (M, V).
        self.fast_head: nn.Module | None = None
        # On CUDA, pad_head sets this to the head's first num_logits rows padded with zero rows
        # to a multiple of 64, (R, C); compute_logits slices the extra logits off.
        self.padded_head: torch.Tensor | None = None
        # The attention implementation is swappable: the PyTorch reference here; the engine
        # swaps in a fast path (fast_paths.swap_in: Triton on a GPU, cpu_attention.py on a CPU).
        self.attn_fn: AttentionFn = attention.paged_attention
        self.write_fn: WriteKVFn = attention.write_kv

    def load_weights(self, sd: dict[str, torch.Tensor]) -> None:
        """Load a checkpoint's tensors (weights.load_state_dict's names, Conv1D as [in, out])."""
        if "lm_head.weight" in sd:
            self.lm_head = nn.Parameter(torch.empty_like(sd["lm_head.weight"]))
        conv1d = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")
        self.load_state_dict({k.replace("lm_head.weight", "lm_head"): v.t().contiguous() if k.endswith(conv1d) else v
                              for k, v in sd.items()}, strict=True)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, attn_fn: AttentionFn | None = None,
                write_fn: WriteKVFn | None = None, attn_writes_kv: bool = False) -> torch.Tensor:
        """One step: (N,) token ids at (N,) positions -> (N, C) final hidden states.

        kv_cache: (L, 2, NB, BS, H, D); layer i reads and writes kv_cache[i, 0] (K) and [i, 1] (V).
        Logits are computed separately (compute_logits) and only for the rows that need them:
        projecting every prompt token onto 50,257 words would be most of a prefill's work.
        attn_fn / write_fn override the model's own for this call (fused.py passes its custom ops);
        with attn_writes_kv, no write_fn runs and attn_fn gets this step's K/V as new_kv=(k, v).
        """
        attn_fn, write_fn = attn_fn or self.attn_fn, None if attn_writes_kv else write_fn or self.write_fn
        x = self.wte(input_ids) + self.wpe(positions)          # (N, C)
        for i, block in enumerate(self.h):
            x = block(x, kv_cache[i, 0], kv_cache[i, 1], meta, attn_fn, write_fn)   # (N, C)
        return self.ln_f(x)                                    # (N, C)

    def head_weight(self) -> torch.Tensor:
        """The (R, C) rows of the output head that compute_logits multiplies by: its first
        num_logits rows (a view: dropping padded ids is free), or pad_head's padded rows."""
        if self.padded_head is not None:
            return self.padded_head
        head = self.lm_head if self.lm_head is not None else self.wte.weight   # (V, C)
        return head[:self.num_logits]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:   # (M, C) -> (M, num_logits)
        if self.fast_head is not None:    # linear.py's CPU copy of head_weight(), or gemv.py's GemvLinear over it
            logits = self.fast_head(hidden)                    # (M, R)
        else:
            logits = F.linear(hidden, self.head_weight())      # (M, R)
        return logits[:, :self.num_logits]                     # a view: drops pad_head's extra columns

    @torch.no_grad()
    def pad_head(self, multiple: int = 64) -> None:
        """Multiply by a head of a multiple of `multiple` rows (zero rows added as needed).

        cuBLAS picks its tile kernels by the alignment of the output's row length: for 50,257
        logits per row it fell back to a kernel for unaligned rows (cutlass "align1"), which
        took 0.21 ms of an H200's 2.3 ms decode step at batch 256 (issue 11's profile). With
        50,304 columns (nanoGPT's padded vocabulary) the aligned kernels run, and the extra
        logits are sliced off. wte (or lm_head) becomes a view of the padded tensor: no copy."""
        head = self.lm_head if self.lm_head is not None else self.wte.weight   # (V, C)
        V, C = head.shape
        rows = -(-self.num_logits // multiple) * multiple
        if rows <= V:                      # the checkpoint has the rows already (nanoGPT's 50,304)
            self.padded_head = head[:rows]
            return
        padded = head.new_zeros(rows, C)                       # (R, C)
        padded[:V] = head
        if self.lm_head is not None:
            self.lm_head = nn.Parameter(padded[:V], requires_grad=head.requires_grad)
        else:
            self.wte.weight = nn.Parameter(padded[:V], requires_grad=head.requires_grad)
        self.padded_head = padded
