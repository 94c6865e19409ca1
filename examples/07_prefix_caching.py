"""Lesson 7: prefix caching. Prompts that start the same way share the KV blocks of that start,
found by a chained SHA-256 hash of each full block. Read beside it: nanoserve/scheduler.py
(_hash_blocks, _take_cached_prefix, computed) and nanoserve/kv_cache.py (BlockAllocator).
Try: change BLOCK_SIZE, or give the questions a shared opening line too.
"""
# %%
import array
import hashlib
import time

from lesson_utils import MODEL_DIR, check

import nanoserve.kv_cache as kv_cache
from nanoserve import LLM, SamplingParams
from nanoserve.scheduler import Scheduler
from nanoserve.sequence import Sequence
from nanoserve.tokenizer import Tokenizer

BLOCK_SIZE = 16                          # tokens per KV block
tok = Tokenizer()
scheduler = Scheduler(kv_cache.BlockAllocator(64), BLOCK_SIZE, max_num_seqs=8, max_num_batched_tokens=2048)


def block_hashes(token_ids: list[int]) -> list[bytes]:
    """The scheduler's hash of every full block of `token_ids` (a last, partial block has none)."""
    seq = Sequence(seq_id=0, request_id="0", index=0, prompt_token_ids=token_ids, params=SamplingParams())
    scheduler._hash_blocks(seq, len(token_ids) // BLOCK_SIZE)
    return seq.block_hashes


def num_common(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# %% [markdown]
# Two prompts share a system prompt, then ask different things. We join token ids, not text,
# so the shared part tokenizes the same in both. Blocks made only of shared tokens hash equal;
# from the block where the prompts part, every hash differs.

# %%
system_ids = tok.encode("You are a careful Python reviewer. Read the code below, find the bugs, and "
                        "answer in one short sentence; say 'fine' when there is nothing to fix.\n")
prompt_a = system_ids + tok.encode("def double(x):\n    return x * 2\n")
prompt_b = system_ids + tok.encode("for i in range(10):\n    print(i)\n")
hashes_a, hashes_b = block_hashes(prompt_a), block_hashes(prompt_b)
num_shared_blocks = len(system_ids) // BLOCK_SIZE     # full blocks of shared tokens only
print(f"system prompt: {len(system_ids)} tokens = {num_shared_blocks} full blocks of {BLOCK_SIZE} "
      f"+ {len(system_ids) % BLOCK_SIZE}; prompts A and B: {len(prompt_a)} and {len(prompt_b)} tokens")
for j, (ha, hb) in enumerate(zip(hashes_a, hashes_b)):
    print(f"  block {j}: A {ha.hex()[:12]}...  B {hb.hex()[:12]}...  {'equal' if ha == hb else 'different'}")
check("the shared full blocks hash equal", hashes_a[:num_shared_blocks] == hashes_b[:num_shared_blocks])
check("every block from the first mixed one on hashes differently",
      all(ha != hb for ha, hb in zip(hashes_a[num_shared_blocks:], hashes_b[num_shared_blocks:])))

# %% [markdown]
# Block j's hash is SHA-256(block j-1's hash + block j's token ids as int64 bytes). The chain
# is what makes sharing safe: a token's K/V depend on every token before it (attention mixes
# them in from layer 1 on), so the same 16 tokens after a different start are different K/V.

# %%
block_1 = prompt_a[BLOCK_SIZE:2 * BLOCK_SIZE]
by_hand = hashlib.sha256(hashes_a[0] + array.array("q", block_1).tobytes()).digest()
check("block 1's hash is sha256(block 0's hash + block 1's tokens)", by_hand == hashes_a[1])
other_block_0 = tok.encode(" " + "another start " * BLOCK_SIZE)[:BLOCK_SIZE]
moved = other_block_0 + block_1                       # the same block 1 after another block 0
check("the same block tokens after a different prefix hash differently", block_hashes(moved)[1] != hashes_a[1])
unchained = [hashlib.sha256(array.array("q", b).tobytes()).digest() for b in (block_1, moved[BLOCK_SIZE:])]
print(f"  a per-block hash (no chain) would call them equal: {unchained[0] == unchained[1]} "
      "(and hand out K/V computed after the wrong prefix)")

# %% [markdown]
# Now the engine. A shared document (kv_cache.py's docstring) with a different question
# after it: the first request pays for the document, the next eight find its full blocks in
# the cache and prefill only their question. We run the same requests with the cache off and on.
# (examples/prefix_caching.py is the benchmark of this at GPT-2 124M's size; BENCHMARKS.md.)

# %%
document_ids = tok.encode(kv_cache.__doc__)
questions = ["def allocate(", "class Pool:", "# Why blocks?", "import torch", "assert n > 0",
             "return ids", "@property", "for i in ids:", "print(blocks)"]
first, *batch = [document_ids + tok.encode("\n" * 2 + q) for q in questions]
params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
num_batch_prompt_tokens = sum(map(len, batch))
print(f"document: {len(document_ids)} tokens; {len(batch)} more requests of "
      f"{min(map(len, batch))}-{max(map(len, batch))} prompt tokens, {params.max_tokens} new tokens each")


def run(enable_prefix_caching: bool) -> tuple[LLM, list, int, float]:
    """The first request alone, then the batch: (llm, the batch's outputs, cache hits, seconds)."""
    llm = LLM(str(MODEL_DIR), device="cpu", quiet=True, num_blocks=512, block_size=BLOCK_SIZE,
              enable_prefix_caching=enable_prefix_caching)
    llm.generate(first, params, use_tqdm=False)
    hits_before, t0 = llm.engine.scheduler.num_cached_tokens, time.perf_counter()
    outs = llm.generate(batch, params, use_tqdm=False)
    return llm, outs, llm.engine.scheduler.num_cached_tokens - hits_before, time.perf_counter() - t0


def mean_ttft(outs: list) -> float:
    """Mean seconds from arrival to first token: what a prefix hit shortens."""
    return sum(o.metrics.first_token_time - o.metrics.arrival_time for o in outs) / len(outs)


_, outs_off, cached_off, seconds_off = run(enable_prefix_caching=False)
llm, outs_on, cached_on, seconds_on = run(enable_prefix_caching=True)
tokens_off, tokens_on = ([o.outputs[0].token_ids for o in outs] for outs in (outs_off, outs_on))
ttft_off, ttft_on = mean_ttft(outs_off), mean_ttft(outs_on)
hit_rate = cached_on / num_batch_prompt_tokens
print(f"{'prefix cache':>12} {'cached tokens':>14} {'prefilled':>10} {'mean TTFT ms':>13} {'batch s':>8}")
for name, cached, ttft, seconds in [("off", cached_off, ttft_off, seconds_off), ("on", cached_on, ttft_on, seconds_on)]:
    print(f"{name:>12} {cached:>14} {num_batch_prompt_tokens - cached:>10} {1e3 * ttft:>13.0f} {seconds:>8.3f}")
print(f"hit rate {hit_rate:.0%} of the batch's prompt tokens; time saved {seconds_off - seconds_on:.3f} s in all, "
      f"first tokens {ttft_off / ttft_on:.1f}x sooner (timings vary with the machine's load)")
# A request takes the full blocks it shares with the first, but never its last prompt token:
# that token's logits are what its first step is for.
expected = sum(min(num_common(first, p), len(p) - 1) // BLOCK_SIZE * BLOCK_SIZE for p in batch)
check("without the cache every prompt token is prefilled", cached_off == 0)
check(f"with it, each request takes every full block it shares with the first ({expected} tokens)",
      cached_on == expected)
check("the cache changes no generated token", tokens_on == tokens_off)
check("first tokens come sooner with the cache (by ~10x here, so load noise cannot flip it)", ttft_on < ttft_off)

# %% [markdown]
# Where the sharing lives: two new requests admitted in one step hold the same physical block
# ids for the document; the allocator counts two holders on each of them.

# %%
engine = llm.engine
for rid, prompt in [("x", batch[0]), ("y", batch[1])]:
    engine.add_request(rid, prompt, params)
engine.step()                                         # admits both: each takes the cached blocks
tables = [seq.block_table for seq in engine.scheduler.running]
num_shared = min(num_common(first, batch[0]), num_common(first, batch[1])) // BLOCK_SIZE
for seq in engine.scheduler.running:
    print(f"  request {seq.request_id}: block table {seq.block_table[:5]} ... {seq.block_table[-3:]} "
          f"({len(seq.block_table)} blocks)")
check(f"both hold the same {num_shared} blocks of the document, each block with 2 holders",
      tables[0][:num_shared] == tables[1][:num_shared]
      and all(engine.allocator.ref_counts[b] == 2 for b in tables[0][:num_shared]))
for rid in ("x", "y"):
    engine.abort_request(rid)
