"""Lesson 3: the KV cache. Generating with it versus recomputing the whole sequence every step.
Read beside it: nanoserve/kv_cache.py (the pool) and scheduler.py (`enable_kv_cache=False`).
Try: a longer NUM_NEW_TOKENS, or dtype="bfloat16" and watch the KV bytes per token halve.
"""
# %% [markdown]
# To pick token n+1, attention needs the keys and values of all n tokens before it. Without a
# cache, every step pushes the whole sequence through the model again: step k costs k tokens,
# and n tokens cost 1 + 2 + ... + n = O(n^2) work. With a cache, each token's K/V is computed
# once and kept: every step after the prompt pushes one token, and n tokens cost O(n).

# %%
import time
from itertools import accumulate
from statistics import median

import torch

from lesson_utils import MODEL_DIR, check, pyplot, save_figure
from nanoserve import LLM, SamplingParams
from nanoserve.config import PRESETS, GPT2Config
from nanoserve.kv_cache import bytes_per_block

PROMPT = "import os\nimport sys\n\n\ndef main():\n"
NUM_NEW_TOKENS = 160
params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)


def generate_side_by_side(llms: list[LLM]) -> list[tuple[list[int], list[float], list[int]]]:
    """Run PROMPT to completion on each engine, one step of each in turn, so that a busy
    machine slows both alike. Per engine: the generated ids, the wall time of each step (ms),
    and the tokens each step pushed through the model (seen by a hook on the model's input)."""
    engines = [llm.engine for llm in llms]
    step_ms, tokens_in, outputs = [[] for _ in engines], [[] for _ in engines], [[] for _ in engines]
    hooks = [e.model.register_forward_pre_hook(lambda module, args, i=i: tokens_in[i].append(args[0].numel()))
             for i, e in enumerate(engines)]
    for e in engines:
        e.add_request("lesson3", PROMPT, params)
    while any(e.has_unfinished_requests() for e in engines):
        for i, e in enumerate(engines):
            t0 = time.perf_counter()
            outputs[i] += e.step()
            step_ms[i].append(1e3 * (time.perf_counter() - t0))
    for h in hooks:
        h.remove()
    return [(out[-1].outputs[0].token_ids, ms, n) for out, ms, n in zip(outputs, step_ms, tokens_in)]


# %% [markdown]
# Two engines over the same weights; the second forgets every K/V after each step. Each pool
# holds 64 blocks x 16 tokens = n_ctx. One short warm-up run each, so that the first timed
# step does not pay for memory allocation. Both run model.py for every step (fused_decode=False):
# on a CPU with AVX-512, an engine otherwise decodes one sequence in C++ (cpu_step.cpp, the
# same arithmetic), which the hook on model.py's forward would not see.

# %%
cached = LLM(str(MODEL_DIR), device="cpu", quiet=True, num_blocks=64, enable_prefix_caching=False,
             fused_decode=False)
recompute = LLM(str(MODEL_DIR), device="cpu", quiet=True, num_blocks=64, enable_kv_cache=False)
for llm in (cached, recompute):
    llm.generate(PROMPT, SamplingParams(max_tokens=8))
((cached_ids, cached_ms, cached_tokens_in),
 (recompute_ids, recompute_ms, recompute_tokens_in)) = generate_side_by_side([cached, recompute])
P, G = len(cached.tokenizer.encode(PROMPT)), NUM_NEW_TOKENS
print(f"prompt {P} tokens, {NUM_NEW_TOKENS} new tokens, {len(cached_ms)} steps each")
print(f"text: {cached.tokenizer.decode(cached_ids[:40])!r}...")
check("the cache changes the speed, not the tokens", cached_ids == recompute_ids)

# %% [markdown]
# **Where the work goes**: tokens pushed through the model per step. With the cache: the
# prompt, then 1 per step. Without: the prompt, then the whole sequence so far, every step.

# %%
for step in (0, 1, 2, NUM_NEW_TOKENS // 2, NUM_NEW_TOKENS - 1):
    print(f"  step {step:>3}: cached {cached_tokens_in[step]:>3} tokens, "
          f"recompute {recompute_tokens_in[step]:>3} tokens")
total_cached, total_recompute = sum(cached_tokens_in), sum(recompute_tokens_in)
print(f"total tokens processed: cached {total_cached:,}, recompute {total_recompute:,} "
      f"({total_recompute / total_cached:.0f}x the work)")
check("cached: the prompt once, then one token per step", cached_tokens_in == [P] + [1] * (G - 1))
check("recompute: step k pushes all P + k tokens", recompute_tokens_in == [P + k for k in range(G)])

# %% [markdown]
# **Time per token** as the sequence grows. Both engines pay the same fixed cost per step
# (the output head, 50,257 x 256, and the sampler: most of a cached step for a model this
# small); recomputing adds work that grows with the sequence. Timings on a shared CPU are
# noisy, so we compare medians over windows of steps, and only by a safe factor.

# %%
window = 32
slowdown = [r / c for r, c in zip(recompute_ms, cached_ms)]   # same step, same load
early_slowdown = median(slowdown[1:1 + window])               # step 0 is the prefill
late_slowdown = median(slowdown[-window:])
late_cached_ms = median(cached_ms[-window:])
late_recompute_ms = median(recompute_ms[-window:])
print(f"median ms per token, last {window} steps: cached {late_cached_ms:.1f}, recompute {late_recompute_ms:.1f}")
print(f"recompute / cached time per step: {early_slowdown:.2f}x early, {late_slowdown:.2f}x late")
print(f"total: cached {sum(cached_ms) / 1e3:.2f} s, recompute {sum(recompute_ms) / 1e3:.2f} s")
check("at the end, recomputing is slower than reading the cache", late_slowdown > 1.5)
check("and its cost grows with the sequence", late_slowdown > 1.3 * early_slowdown)

# %% [markdown]
# **What the cache costs**: memory. Each token keeps a K and a V vector of C numbers in each
# of L layers: 2 x L x C x (bytes per number).

# %%
engine, mc = cached.engine, cached.engine.model_config
kv_bytes_per_token = 2 * mc.n_layer * mc.n_embd * engine.kv_cache.element_size()
print(f"this model (L={mc.n_layer}, C={mc.n_embd}, {engine.kv_cache.dtype}): {kv_bytes_per_token:,} bytes = "
      f"{kv_bytes_per_token / 1024:.0f} KiB per token; {P + G} tokens hold "
      f"{(P + G) * kv_bytes_per_token / 2**20:.2f} MiB")
check("2 x L x C x dtype size is what the engine's pool spends per token",
      kv_bytes_per_token == bytes_per_block(mc, 1, engine.kv_cache.dtype)
      == engine.kv_cache.nbytes // (engine.num_blocks * engine.config.block_size))
gpt2 = GPT2Config(**{k: PRESETS["gpt2"][k] for k in ("n_layer", "n_head", "n_embd")})
print(f"GPT-2 124M in float16: {bytes_per_block(gpt2, 1, torch.float16) / 1024:.0f} KiB per token, "
      f"{bytes_per_block(gpt2, 1, torch.float16) * gpt2.n_ctx / 2**20:.0f} MiB for one full {gpt2.n_ctx}-token context")

# %%
def rolling_median(xs: list[float], k: int = 9) -> list[float]:
    """The median of k neighbouring steps: keeps the trend, drops a busy machine's spikes."""
    return [median(xs[max(0, i - k // 2):i + k // 2 + 1]) for i in range(len(xs))]


plt = pyplot()
if plt is not None:
    positions = [P + k for k in range(G)]                      # length of the sequence at each step
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for ms, label, color in [(recompute_ms, "recompute (no cache)", "C0"), (cached_ms, "KV cache", "C1")]:
        ax1.plot(positions[1:], ms[1:], ".", color=color, ms=2, alpha=0.4)       # every step
        ax1.plot(positions[1:], rolling_median(ms[1:]), color=color, label=f"{label}, median of 9")
    ax1.set_ylim(0, 1.5 * max(rolling_median(recompute_ms[1:])))   # a busy machine's spikes go off the top
    ax1.set(title="Time per generated token", xlabel="sequence length (tokens)", ylabel="ms per token")
    for tokens_in, label in [(recompute_tokens_in, "recompute: O(n^2)"), (cached_tokens_in, "KV cache: O(n)")]:
        ax2.plot(range(1, G + 1), list(accumulate(tokens_in)), label=f"{label}, {sum(tokens_in):,} in all")
    ax2.set(title="Cumulative work", xlabel="tokens generated", ylabel="tokens pushed through the model")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    save_figure(fig, "03_kv_cache.png")
