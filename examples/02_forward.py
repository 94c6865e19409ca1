"""Lesson 2: the forward pass. One prompt through GPT-2, layer by layer, every tensor's shape printed.
Read beside it: nanoserve/model.py (then attention.py for what attn_fn does with the cache).
Try: a longer PROMPT, or compare layer 0's attention output with dense_causal_attention's.
"""
# %% [markdown]
# N = tokens in the step, C = n_embd, H = n_head, D = head_dim, V = vocab_size, L = n_layer,
# NB = KV blocks in the pool, BS = tokens per block (the legend model.py opens with).

# %%
import torch
import torch.nn.functional as F
from safetensors import safe_open

from lesson_utils import MODEL_DIR, check
from nanoserve.attention import AttentionMetadata, dense_causal_attention
from nanoserve.config import GPT2Config
from nanoserve.kv_cache import allocate_kv_cache
from nanoserve.model import GPT2
from nanoserve.tokenizer import Tokenizer
from nanoserve.weights import load_state_dict

torch.manual_seed(0)
cfg = GPT2Config.from_json(MODEL_DIR / "config.json")
print(f"n_layer={cfg.n_layer} n_head={cfg.n_head} n_embd={cfg.n_embd} n_ctx={cfg.n_ctx} vocab_size={cfg.vocab_size}")

# %% [markdown]
# **The checkpoint** is a safetensors file: a JSON header (name, dtype, shape, offset of each
# tensor) and the raw bytes. Every layer has the same 12 tensors; the linear layers are
# stored [in, out] (GPT-2's Conv1D). `load_state_dict` checks every shape and casts to float32.

# %%
with safe_open(str(MODEL_DIR / "model.safetensors"), "pt") as f:
    for name in f.keys():
        if not name.startswith("h.") or name.startswith("h.0."):    # h.1, h.2 repeat h.0
            print(f"  {name:<24} {f.get_slice(name).get_dtype():<4} {f.get_slice(name).get_shape()}")
sd = load_state_dict(MODEL_DIR, cfg)
num_params = sum(t.numel() for t in sd.values())
print(f"{len(sd)} tensors, {num_params:,} parameters ({num_params * 4 / 2**20:.1f} MiB in float32)")

# %%
model = GPT2(cfg)
model.load_weights(sd)     # transposes the Conv1D weights once, to nn.Linear's [out, in]
model.eval()
tok = Tokenizer(MODEL_DIR)
PROMPT = "import os\n\ndef read_file(path):\n    with open(path) as f:\n        return f."
ids = torch.tensor(tok.encode(PROMPT))                      # (N,)
positions = torch.arange(len(ids))                          # (N,)
N, C, H, D = len(ids), cfg.n_embd, cfg.n_head, cfg.head_dim
print(f"prompt: {N} tokens; C={C}, H={H}, D={D}, L={cfg.n_layer}")

# %% [markdown]
# **A KV pool and the step's metadata**, as the runner builds them for one prompt: K/V of token
# p go to slot p (block p // BS, offset p % BS), the block table lists the sequence's blocks.

# %%
BS = 16
NB = -(-N // BS)                                            # blocks to hold N tokens
kv_cache = allocate_kv_cache(cfg, NB, BS, torch.float32, torch.device("cpu"))   # (L, 2, NB, BS, H, D)
meta = AttentionMetadata(
    slot_mapping=positions.clone(),                         # (N,) block 0 holds 0..15, ...
    block_tables=torch.arange(NB, dtype=torch.int32)[None],  # (S=1, NB)
    context_lens=torch.tensor([N], dtype=torch.int32),       # (1,)
    query_start_loc=torch.tensor([0, N], dtype=torch.int32),  # (2,)
    max_query_len=N, max_context_len=N)
print(f"kv_cache {tuple(kv_cache.shape)}, block table {meta.block_tables.tolist()}")

# %% [markdown]
# **The forward, step by step**, through the model's own modules (what GPT2.forward runs).

# %%
def show(name: str, t: torch.Tensor) -> None:
    print(f"  {name:<28} {str(tuple(t.shape)):<16} std {t.std():.3f}")


with torch.inference_mode():
    x = model.wte(ids) + model.wpe(positions)               # (N, C) token + position embedding
    show("wte(ids) + wpe(positions)", x)
    for i, block in enumerate(model.h):
        attn = block.attn
        qkv = attn.c_attn(block.ln_1(x))                    # (N, 3C)
        q, k, v = qkv.view(N, 3, H, D).unbind(1)            # 3 x (N, H, D)
        model.write_fn(k, v, kv_cache[i, 0], kv_cache[i, 1], meta.slot_mapping)
        y = model.attn_fn(q, kv_cache[i, 0], kv_cache[i, 1], meta, attn.scale)   # (N, H, D)
        attn_out = attn.c_proj(y.reshape(N, C))             # (N, C)
        x = x + attn_out                                    # residual
        mlp_hidden = F.gelu(block.mlp.c_fc(block.ln_2(x)), approximate=block.mlp.approximate)   # (N, 4C)
        mlp_out = block.mlp.c_proj(mlp_hidden)              # (N, C)
        x = x + mlp_out                                     # residual
        for name, t in [("qkv", qkv), ("q (k, v alike)", q), ("attention", y), ("attn c_proj", attn_out),
                        ("mlp c_fc + gelu", mlp_hidden), ("mlp c_proj", mlp_out), ("block output", x)]:
            show(f"h.{i} {name}", t)
    hidden = model.ln_f(x)                                  # (N, C)
    show("ln_f", hidden)
    logits = model.compute_logits(hidden)                   # (N, V): every position's next-token scores
    show("logits", logits)
    # The engine's own forward, on a fresh pool, must give the same numbers.
    engine_hidden = model(ids, positions, torch.zeros_like(kv_cache), meta)   # (N, C)
check("walking the modules by hand equals GPT2.forward", torch.allclose(hidden, engine_hidden, atol=1e-6))

# %% [markdown]
# **The next-token distribution**: softmax of the last position's logits.

# %%
probs = logits[-1].softmax(-1)                              # (V,)
top_probs, top_ids = probs.topk(10)
top_tokens = [(tok.decode([t]), p) for t, p in zip(top_ids.tolist(), top_probs.tolist())]
print(f"after {PROMPT[-30:]!r}:")
for text, p in top_tokens:
    print(f"  {p:6.1%}  {text!r}")
check("the probabilities sum to 1", abs(probs.sum().item() - 1) < 1e-5)

# %% [markdown]
# **A dense reference**: the same math with plain torch ops over the checkpoint's tensors
# (still [in, out], so `x @ W + b`), no cache, no block tables: causal attention over the
# whole sequence at once. The paged path must agree with it.

# %%
def dense_gpt2(ids: torch.Tensor) -> torch.Tensor:          # (T,) -> (T, V)
    T, eps = len(ids), cfg.layer_norm_epsilon
    ln = lambda t, p: F.layer_norm(t, (C,), sd[p + ".weight"], sd[p + ".bias"], eps)   # noqa: E731
    lin = lambda t, p: t @ sd[p + ".weight"] + sd[p + ".bias"]                          # noqa: E731
    x = sd["wte.weight"][ids] + sd["wpe.weight"][:T]                       # (T, C)
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        q, k, v = lin(ln(x, p + "ln_1"), p + "attn.c_attn").view(T, 3, H, D).unbind(1)   # (T, H, D)
        y = dense_causal_attention(q, k, v, scale=D ** -0.5)               # (T, H, D)
        x = x + lin(y.reshape(T, C), p + "attn.c_proj")
        x = x + lin(F.gelu(lin(ln(x, p + "ln_2"), p + "mlp.c_fc"), approximate="tanh"), p + "mlp.c_proj")
    return ln(x, "ln_f") @ sd["wte.weight"].T                              # (T, V), tied head


with torch.inference_mode():
    max_logit_diff = (dense_gpt2(ids) - logits).abs().max().item()
print(f"max |paged - dense| over {N} x {cfg.vocab_size} logits: {max_logit_diff:.2e}")
check("the paged forward matches the dense reference within 1e-4", max_logit_diff < 1e-4)
