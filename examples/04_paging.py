"""Lesson 4, paging: the KV pool is cut into blocks; each sequence holds a list of block ids.
Read nanoserve/kv_cache.py (the pool, BlockAllocator) and Scheduler._grow in scheduler.py.
Try: BLOCK_SIZE = 32 or 4, other PROMPT_LENS, or more STEPS, and watch the waste columns move.
"""
# %% [markdown]
# A sequence's length is unknown when it starts. A contiguous cache must reserve room for the
# longest it may grow; a paged cache hands out fixed-size blocks as tokens arrive. We run four
# requests of different lengths on the real engine, stop it mid-generation, and look inside.

# %%
from lesson_utils import MODEL_DIR, check, pyplot, save_figure

from nanoserve import LLM, SamplingParams
from nanoserve.kv_cache import allocate_kv_cache, bytes_per_block

BLOCK_SIZE, NUM_BLOCKS = 8, 24            # BS tokens per block, NB blocks in the pool
llm = LLM(str(MODEL_DIR), device="cpu", quiet=True, block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS,
          enable_prefix_caching=False)
engine, cfg = llm.engine, llm.engine.model_config
print(f"pool: {NUM_BLOCKS} blocks x {BLOCK_SIZE} tokens = {NUM_BLOCKS * BLOCK_SIZE} token slots, "
      f"{bytes_per_block(cfg, BLOCK_SIZE, engine.dtype) / 1024:.0f} KiB per block (K and V of {cfg.n_layer} layers)")

# %% [markdown]
# The pool is one tensor (L, 2, NB, BS, H, D); the allocator only knows block ids. Stored
# head-major: one head's BS keys are one contiguous (BS, D) matrix (see the strides).

# %%
demo = allocate_kv_cache(cfg, 2, BLOCK_SIZE, engine.dtype, engine.device)
print(f"allocate_kv_cache(cfg, 2, {BLOCK_SIZE}, ...) -> shape {tuple(demo.shape)}, strides {demo.stride()}")
print(f"the engine's pool: shape {tuple(engine.kv_cache.shape)}; allocator: {engine.allocator.num_free} free blocks")

# %% [markdown]
# Four requests with prompts of different lengths. One step admits and prefills them all;
# each later step decodes one token per sequence. We stop after STEPS steps, before any ends.

# %%
text = ("import os\nimport sys\n\n\ndef main(argv=None):\n    \"\"\"Run the command line tool.\"\"\"\n"
        "    parser = argparse.ArgumentParser(description=__doc__)\n    parser.add_argument('path')\n"
        "    args = parser.parse_args(argv)\n    with open(args.path) as f:\n        return f.read()\n")
ids = llm.tokenizer.encode(text)
PROMPT_LENS, MAX_TOKENS, STEPS = [5, 13, 29, 44], [12, 40, 20, 60], 6
for n, m in zip(PROMPT_LENS, MAX_TOKENS):
    engine.add_request(None, ids[:n], SamplingParams(temperature=0, max_tokens=m, ignore_eos=True))
for _ in range(STEPS):
    engine.step()
seqs = sorted(engine.scheduler.running, key=lambda s: s.seq_id)
print(f"after {STEPS} steps: {len(seqs)} sequences running, {engine.allocator.num_free} blocks free")

# %% [markdown]
# A token's place in the pool is its slot: block_table[pos // BS] * BS + pos % BS. The
# block table is in token order, but its ids need not be adjacent: a block is taken only
# when the last one is full, from wherever the pool has one free.

# %%
slots = {}       # seq_id -> slot of each token whose K/V are in the cache
for s in seqs:
    slots[s.seq_id] = [s.block_table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
                       for p in range(s.num_computed_tokens)]
    print(f"seq {s.seq_id}: {s.num_computed_tokens:2d} tokens in cache, block table {s.block_table}")
    runs = [(x, x) for x in slots[s.seq_id][:1]]            # consecutive slots as (first, last)
    for x in slots[s.seq_id][1:]:
        runs[-1:] = [(runs[-1][0], x)] if x == runs[-1][1] + 1 else [runs[-1], (x, x)]
    print(f"        slots {', '.join(f'{a}..{b}' for a, b in runs)}")
all_slots = [x for v in slots.values() for x in v]
check("slots of different sequences never collide", len(set(all_slots)) == len(all_slots))
k_layer0 = engine.kv_cache[0, 0].reshape(NUM_BLOCKS * BLOCK_SIZE, -1)      # (NB*BS, H*D) keys of layer 0
written = set(k_layer0.abs().sum(-1).nonzero()[:, 0].tolist())
check("the model wrote K/V exactly in the slots the block tables name", written == set(all_slots))

# %% [markdown]
# The same requests in a contiguous cache: each reserves prompt + max_tokens slots up front
# (or n_ctx, if max_tokens is unknown). Paged, a sequence holds only its blocks.

# %%
rows = []        # (seq_id, tokens in cache, paged slots held, contiguous reserve, n_ctx reserve)
for s in seqs:
    rows.append((s.seq_id, s.num_computed_tokens, len(s.block_table) * BLOCK_SIZE,
                 s.num_prompt_tokens + s.params.max_tokens, cfg.n_ctx))
print(f"{'seq':>4} {'used':>5} {'paged':>6} {'prompt+max':>11} {'n_ctx':>6}   (token slots)")
for r in rows:
    print(f"{r[0]:>4} {r[1]:>5} {r[2]:>6} {r[3]:>11} {r[4]:>6}")
used = sum(r[1] for r in rows)
waste = {name: 1 - used / sum(r[i] for r in rows) for i, name in [(2, "paged"), (3, "prompt+max"), (4, "n_ctx")]}
print("waste: " + ", ".join(f"{name} {100 * w:.1f}%" for name, w in waste.items()))
check("paged waste is under one block per sequence", all(r[2] - r[1] < BLOCK_SIZE for r in rows))
check("paging wastes less than either contiguous reserve", waste["paged"] < waste["prompt+max"] < waste["n_ctx"])

# %% [markdown]
# The picture: each column is a block, each cell a token slot, coloured by the sequence that
# owns it (pale: held but not yet written); blank columns are free blocks.

# %%
if (plt := pyplot()) is not None:
    import numpy as np
    colours = plt.get_cmap("tab10").colors
    grid = np.ones((BLOCK_SIZE, NUM_BLOCKS, 3))                           # (BS, NB, RGB), white = free
    for k, s in enumerate(seqs):
        for b in s.block_table:
            grid[:, b] = 0.75 + 0.25 * np.array(colours[k])                   # held, not yet written
        for x in slots[s.seq_id]:
            grid[x % BLOCK_SIZE, x // BLOCK_SIZE] = colours[k]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 3.8), gridspec_kw={"width_ratios": [1.6, 1]})
    ax1.imshow(grid, aspect="auto", extent=(-0.5, NUM_BLOCKS - 0.5, BLOCK_SIZE - 0.5, -0.5))
    ax1.set(title=f"KV pool after {STEPS} steps: {NUM_BLOCKS} blocks x {BLOCK_SIZE} slots",
            xlabel="block id", ylabel="slot offset in block", xticks=range(NUM_BLOCKS))
    ax1.set_xticks(np.arange(NUM_BLOCKS) - 0.5, minor=True)
    ax1.grid(which="minor", color="grey", linewidth=0.5)
    for k, r in enumerate(rows):
        for y, (reserved, label) in enumerate([(r[2], "paged"), (r[3], "contiguous")]):
            ax2.barh(2.6 * k + y, r[1], color=colours[k], label=f"seq {r[0]}" if y == 0 else None)
            ax2.barh(2.6 * k + y, reserved - r[1], left=r[1], color=colours[k], alpha=0.3, hatch="//")
            ax2.text(reserved + 1, 2.6 * k + y, label, va="center", fontsize=8)
    ax2.set(title="used (solid) vs reserved but unused (hatched)", xlabel="token slots",
            yticks=[], xlim=(0, max(r[3] for r in rows) * 1.3))
    ax2.legend(fontsize=8, loc="lower right")
    save_figure(fig, "04_paging.png")
