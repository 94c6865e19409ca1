"""Lesson 10: long sequences. Generation past n_ctx by context shifting, and a sliding window
that frees the blocks behind it; the KV pool's usage over time. Read beside it: nanoserve/
scheduler.py (shift, _evict) and nanoserve/engine.py (_apply, get_stats). Try: SHIFT_WINDOW, WINDOW.
"""
# %%
import inspect

from lesson_utils import MODEL_DIR, check, pyplot, save_figure

import nanoserve.scheduler
from nanoserve import LLM, SamplingParams
from nanoserve.config import cdiv

BLOCK_SIZE = 16                 # tokens per KV block
SHIFT_WINDOW = 768              # tokens a context shift keeps (the default: n_ctx // 2)
WINDOW = 128                    # sliding-window attention: positions each token sees
NUM_NEW = 300                   # tokens to generate
# A long prompt: the scheduler's own source, cut to its last 1000 tokens (truncate_prompt_tokens).
long_prompt = inspect.getsource(nanoserve.scheduler)
short_prompt = "import os\nimport sys\n\n\nclass Config:\n    \"\"\"Settings read from the environment.\"\"\"\n"


def watch(llm: LLM, prompt: str, **params) -> tuple[list[int], list[int], object]:
    """Run one greedy request step by step; return the KV blocks in use after each step, the
    steps at which a context shift happened, and the final RequestOutput."""
    eng = llm.engine
    eng.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True, **params))
    used, shift_steps, final = [], [], None
    while eng.has_unfinished_requests():
        shifts_before = eng.get_stats()["num_shifts"]
        final = eng.step()[-1]
        stats = eng.get_stats()
        used.append(stats["num_blocks_used"])
        if stats["num_shifts"] > shifts_before:
            shift_steps.append(len(used) - 1)
    return used, shift_steps, final


# %% [markdown]
# GPT-2 has learned position embeddings for positions 0..1023 only, so a sequence cannot pass
# n_ctx. With `context_overflow="shift"`, when the next token would sit at position 1024 the
# engine keeps the sequence's last SHIFT_WINDOW tokens, frees its blocks, and recomputes the
# kept tokens at positions 0..767 (the preemption path): generation goes on, forgetting the rest.
# We start from a 1000-token prompt, so that 300 new tokens cross n_ctx twice.

# %%
shifter = LLM(str(MODEL_DIR), device="cpu", quiet=True, block_size=BLOCK_SIZE, num_blocks=128,
              context_overflow="shift", shift_window=SHIFT_WINDOW)
n_ctx = shifter.engine.model_config.n_ctx
used_shift, shift_steps, out_shift = watch(shifter, long_prompt, truncate_prompt_tokens=1000)
num_prompt = len(out_shift.prompt_token_ids)
tokens = out_shift.prompt_token_ids + out_shift.outputs[0].token_ids
print(f"prompt {num_prompt} tokens + {len(out_shift.outputs[0].token_ids)} generated = {len(tokens)} tokens, "
      f"n_ctx {n_ctx}; shifts at steps {shift_steps}; metrics: {out_shift.metrics.num_shifts} shifts, "
      f"peak {out_shift.metrics.num_kv_blocks_peak} blocks")
# The first shift comes when the context would pass n_ctx; each later one after n_ctx + 1 - W more tokens.
expected_shifts = 1 + (len(tokens) - 1 - (n_ctx + 1)) // (n_ctx + 1 - SHIFT_WINDOW)
check(f"{len(tokens)} tokens need {expected_shifts} shifts, and the request's metrics count them",
      out_shift.metrics.num_shifts == len(shift_steps) == expected_shifts)
check(f"the sequence never holds more than cdiv(n_ctx, block_size) = {cdiv(n_ctx, BLOCK_SIZE)} blocks",
      max(used_shift) <= cdiv(n_ctx, BLOCK_SIZE))

# %% [markdown]
# What does the model see after the first shift? Exactly the kept 768 tokens, fed from scratch:
# a fresh request for that window (no shifting involved) continues with the same tokens.

# %%
kept = tokens[n_ctx + 1 - SHIFT_WINDOW:n_ctx + 1]          # the context right after the first shift
plain = LLM(str(MODEL_DIR), device="cpu", quiet=True, block_size=BLOCK_SIZE, num_blocks=128)
fresh = plain.generate([kept], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))[0]
after_shift = tokens[n_ctx + 1:n_ctx + 17]
print(f"after the shift: {shifter.tokenizer.decode(after_shift)!r}")
check("the 16 tokens after the shift equal a fresh greedy continuation of the kept window",
      fresh.outputs[0].token_ids == after_shift)

# %% [markdown]
# A sliding window bounds memory without dropping positions: each token attends to the last
# WINDOW positions only, so blocks wholly behind the window are never read again and go back
# to the pool (eviction). We compare it with full attention, from a short prompt.

# %%
windowed = LLM(str(MODEL_DIR), device="cpu", quiet=True, block_size=BLOCK_SIZE, num_blocks=128,
               attention_window=WINDOW)
used_window, _, out_window = watch(windowed, short_prompt)
used_full, _, out_full = watch(plain, short_prompt)
evicted = windowed.engine.get_stats()["num_evicted_blocks"]
print(f"{NUM_NEW} tokens: full attention holds up to {max(used_full)} blocks, the window of {WINDOW} "
      f"up to {max(used_window)} ({evicted} blocks evicted on the way)")
check(f"with the window a sequence holds at most cdiv(W, block_size) + 1 = {cdiv(WINDOW, BLOCK_SIZE) + 1} blocks",
      max(used_window) <= cdiv(WINDOW, BLOCK_SIZE) + 1 < max(used_full))
same = next((i for i, (a, b) in enumerate(zip(out_window.outputs[0].token_ids, out_full.outputs[0].token_ids))
             if a != b), NUM_NEW)
print(f"greedy tokens agree for the first {same} of {NUM_NEW}: the window changes what a token sees only "
      f"once the sequence is longer than {WINDOW} (and this small model looks mostly at recent tokens)")
num_short = len(out_window.prompt_token_ids)
check("the window changes nothing while the sequence is shorter than it", num_short + same >= WINDOW)

# %% [markdown]
# The pool's usage over time: full attention grows with the sequence; the shifting sequence
# (which starts near n_ctx) drops at each shift and climbs again from the kept window; the
# sliding window levels off at W / block_size (+1) blocks.

# %%
plt = pyplot()
if plt is not None:
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(used_full, label="full attention")
    ax.plot(used_shift, label=f"context shifting (keeps {SHIFT_WINDOW})")
    ax.plot(used_window, label=f"sliding window {WINDOW} (evicts)")
    for s in shift_steps:
        ax.axvline(s, color="gray", lw=0.6, ls=":")
    ax.axhline(cdiv(n_ctx, BLOCK_SIZE), color="black", lw=0.8, ls="--", label="cdiv(n_ctx, block_size)")
    ax.set(title="KV blocks held by one long generation", xlabel="engine step (one token each after the prefill)",
           ylabel=f"KV blocks in use ({BLOCK_SIZE} tokens each)")
    ax.legend(fontsize=8)
    figure_path = save_figure(fig, "10_long_sequences.png")
