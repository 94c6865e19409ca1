"""Lesson 5, continuous batching: what the scheduler decides at every step, on a pool too small.
Read nanoserve/scheduler.py (Scheduler.schedule) beside it, then LLMEngine.step in engine.py.
Try: NUM_BLOCKS = 40 (no preemption), BUDGET = 64 (no chunking), or ARRIVALS at other steps.
"""
# %% [markdown]
# The batch is re-decided at every step: finished sequences leave, new ones join. We add
# requests at chosen steps, call `engine.step()` (schedule -> one forward and sampling ->
# append tokens, stop, free blocks), and read `engine.last_step` after each one: the
# scheduler's decision, recorded as plain values when it was made.

# %%
from lesson_utils import MODEL_DIR, check, pyplot, save_figure

from nanoserve import LLM, SamplingParams

BLOCK_SIZE, NUM_BLOCKS, BUDGET = 8, 12, 24     # a 96-token pool; 24 tokens per step, at most
llm = LLM(str(MODEL_DIR), device="cpu", quiet=True, block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS,
          max_num_batched_tokens=BUDGET, max_num_seqs=4)
engine = llm.engine
text = ("class Queue:\n    \"\"\"A first-in, first-out queue of items.\"\"\"\n\n    def __init__(self, maxsize=0):\n"
        "        self.maxsize = maxsize\n        self.items = []\n\n    def put(self, item):\n"
        "        if self.maxsize and len(self.items) >= self.maxsize:\n            raise Full\n")
ids = llm.tokenizer.encode(text)
# step -> requests arriving then: (name, prompt ids, max_tokens). D repeats A's first 32 tokens.
ARRIVALS = {0: [("A", ids[:60], 10), ("B", ids[60:70], 24), ("C", ids[70:76], 30)],
            3: [("D", ids[:32] + ids[80:86], 10)],
            6: [("E", ids[86:98], 20)]}
print(f"pool {NUM_BLOCKS} blocks x {BLOCK_SIZE} tokens, step budget {BUDGET} tokens; "
      + ", ".join(f"{name}: {len(p)}+{m} tokens at step {t}" for t, reqs in ARRIVALS.items() for name, p, m in reqs))

# %% [markdown]
# Each scheduled sequence gets n tokens: a prefill chunk (prompt tokens; the last chunk also
# samples the first output token), a decode (1 token), or a recompute (a preempted sequence
# redoing prompt and output, since its blocks were freed). A sequence admitted with
# num_computed_tokens > 0 took those tokens' blocks from the prefix cache.

# %%
seq_of, timeline, hits = {}, [], {}   # name -> Sequence; per step {name: (kind, n)}; (name, step) -> tokens
was_preempted: set[str] = set()       # a preempted request's next prefill is a recompute
step = 0
while engine.has_unfinished_requests() or step <= max(ARRIVALS):
    for name, prompt, max_tokens in ARRIVALS.get(step, []):
        engine.add_request(name, prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        seq_of[name] = engine.requests[name].seqs[0]
    row = {}
    if engine.has_unfinished_requests():
        engine.step()
        decided = engine.last_step
        for s in decided.scheduled:
            if s.num_cached_tokens:
                hits[s.request_id, step] = s.num_cached_tokens
            kind = "recompute" if s.phase == "prefill" and s.request_id in was_preempted else s.phase
            row[s.request_id] = (kind, s.num_new_tokens)
        name_of = {seq.seq_id: name for name, seq in seq_of.items()}
        for seq_id in decided.preempted_seq_ids:
            row[name_of[seq_id]] = ("preempted", 0)
            was_preempted.add(name_of[seq_id])
        row |= {seq.request_id: ("waiting", 0) for seq in engine.scheduler.waiting if seq.request_id not in row}
    timeline.append(row)
    step += 1
print(f"{len(timeline)} steps, {engine.scheduler.num_preemptions} preemptions, "
      f"{engine.scheduler.num_cached_tokens} prompt tokens taken from the prefix cache")

# %% [markdown]
# The timeline as text: P prefill chunk, * admitted on cached blocks (a prefix hit), d decode,
# R recompute, X preempted (its blocks freed), . waiting; blank: not arrived or finished.

# %%
MARK = {"prefill": "P", "decode": "d", "recompute": "R", "preempted": "X", "waiting": "."}
print("      " + "".join(str(t % 10) for t in range(len(timeline))) + "   (step mod 10)")
for name in seq_of:
    cells = ["*" if (name, t) in hits else MARK[r[name][0]] if name in r else " "
             for t, r in enumerate(timeline)]
    print(f"  {name}:  {''.join(cells)}")
print("tokens per step: " + " ".join(str(sum(n for _, n in r.values())) for r in timeline))
chunks_of_a = [n for r in timeline for kind, n in [r.get("A", ("", 0))] if kind == "prefill"]
print(f"A's prompt ({len(seq_of['A'].prompt_token_ids)} tokens) ran in prefill chunks of {chunks_of_a} tokens")

# %%
check("a small pool forces at least one preemption", any(k == "preempted" for r in timeline for k, _ in r.values()))
check("chunked prefill splits the long prompt into chunks within the budget",
      len(chunks_of_a) >= 2 and max(chunks_of_a) <= BUDGET)
check("D starts on A's cached blocks (a prefix-cache hit)",
      any(n >= BLOCK_SIZE for (name, _), n in hits.items() if name == "D"))
check("no step runs more tokens than the budget", all(sum(n for _, n in r.values()) <= BUDGET for r in timeline))

# %% [markdown]
# Batching, chunking, preemption and the prefix cache change when each token is computed,
# never which token: each request, run alone on a roomy engine, gives the same greedy tokens.

# %%
roomy = LLM(str(MODEL_DIR), device="cpu", quiet=True, num_blocks=64, enable_prefix_caching=False)
batched = {name: seq.output_token_ids for name, seq in seq_of.items()}
alone = {name: roomy.generate(p, SamplingParams(temperature=0, max_tokens=m, ignore_eos=True), use_tqdm=False)
         [0].outputs[0].token_ids for reqs in ARRIVALS.values() for name, p, m in reqs}
print("batched == alone:", {name: batched[name] == alone[name] for name in batched})
check("batched output tokens equal each request run alone (greedy)", batched == alone)

# %% [markdown]
# The same timeline as a picture, with the tokens each step ran against the budget.

# %%
if (plt := pyplot()) is not None:
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    kinds = ["waiting", "prefill", "decode", "recompute", "preempted"]
    colours = ["#dddddd", "#1f77b4", "#2ca02c", "#ff7f0e", "#d62728"]
    names = list(seq_of)
    grid = [[kinds.index(r[name][0]) + 1 if name in r else 0 for r in timeline] for name in names]   # (seqs, steps)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 5), sharex=True, gridspec_kw={"height_ratios": [2.2, 1]})
    ax1.imshow(grid, cmap=ListedColormap(["white", *colours]), vmin=0, vmax=len(kinds), aspect="auto")
    for i, name in enumerate(names):
        for t, r in enumerate(timeline):
            if name in r and r[name][0] in ("prefill", "recompute"):
                ax1.text(t, i, r[name][1], ha="center", va="center", fontsize=7, color="white")
    for name, t in hits:
        ax1.plot(t - 0.3, names.index(name) - 0.3, "*", color="gold", markersize=10, markeredgecolor="black")
    ax1.set(title=f"continuous batching on a {NUM_BLOCKS}-block pool: who runs at each step (numbers: tokens)",
            ylabel="request", yticks=range(len(names)), yticklabels=names)
    ax1.legend(handles=[Patch(color=c, label=k) for k, c in zip(kinds, colours)]
               + [plt.Line2D([], [], marker="*", color="gold", markeredgecolor="black", ls="",
                             label="prefix-cache hit")],
               loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax2.bar(range(len(timeline)), [sum(n for _, n in r.values()) for r in timeline], color="#555555")
    ax2.axhline(BUDGET, color="red", linestyle="--", label=f"budget ({BUDGET} tokens)")
    ax2.set(xlabel="step", ylabel="tokens in step")
    ax2.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    save_figure(fig, "05_continuous_batching.png")
