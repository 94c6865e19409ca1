"""Lesson 6, sampling: what temperature, top-k, top-p, min-p and the penalties do to one real
next-token distribution, and why a seed needs a generator of its own. Read nanoserve/sampler.py.
Try: another PROMPT, other SETTINGS, or N_DRAWS = 500 (the dots scatter more around the bars).
"""
# %% [markdown]
# We run the embedded model on a prompt and catch the logits row the runner hands to the
# sampler: (1, V), the model's raw scores for every next token.

# %%
import torch
from lesson_utils import MODEL_DIR, check, pyplot, save_figure

from nanoserve import LLM, SamplingParams
from nanoserve.sampler import Sampler
from nanoserve.sequence import Sequence

llm = LLM(str(MODEL_DIR), device="cpu", quiet=True, num_blocks=64)
engine, PROMPT = llm.engine, "import os\nimport"
caught, real_sampler = [], engine.runner.sampler


def catch(logits: torch.Tensor, seqs: list[Sequence]):
    """Stands in for the runner's sampler for one call: keep the (S, V) logits, then sample."""
    caught.append(logits[0].float().clone())                          # (V,)
    return real_sampler(logits, seqs)


engine.runner.sampler = catch
reported = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=1, logprobs=5))[0].outputs[0].logprobs[0]
engine.runner.sampler = real_sampler
logits = caught[0]                                                     # (V,)
print(f"logits row: {tuple(logits.shape)}; the engine's top-5 logprobs: "
      + ", ".join(f"{llm.tokenizer.decode([t])!r} {lp:.2f}" for t, lp in sorted(reported.items(), key=lambda x: -x[1])))
check("the caught row is the distribution the engine reports",
      all(abs(torch.log_softmax(logits, -1)[t].item() - lp) < 1e-4 for t, lp in reported.items()))

# %% [markdown]
# Drawing thousands of tokens over all 50,257 is slow on a CPU, so we keep the K most likely
# tokens and sort them: token i of this smaller vocabulary is the model's i-th most likely.

# %%
K, N_DRAWS = 1024, 2000
row, kept = logits.topk(K)                                             # (K,) sorted, (K,) GPT-2 ids
rank = {t: i for i, t in enumerate(kept.tolist())}
print(f"kept {K} of {logits.numel()} tokens, holding {logits.softmax(-1)[kept].sum():.2%} of the probability")
prompt_ranks = [rank[t] for t in llm.tokenizer.encode(PROMPT) if t in rank]   # for the repetition penalty
OUTPUT_SO_FAR = [0, 1, 1]     # stand-in: pretend the output already held token 0 once and token 1 twice
SETTINGS = {"the model (T=1)": SamplingParams(), "temperature=0.5": SamplingParams(temperature=0.5),
            "temperature=1.5": SamplingParams(temperature=1.5), "top_k=5": SamplingParams(top_k=5),
            "top_p=0.8": SamplingParams(top_p=0.8), "min_p=0.1": SamplingParams(min_p=0.1),
            "repetition_penalty=1.2": SamplingParams(repetition_penalty=1.2),
            "presence=1, frequency=0.5": SamplingParams(presence_penalty=1.0, frequency_penalty=0.5)}

# %% [markdown]
# The rules of sampler.py, written out one at a time for one row: this is the distribution
# the real Sampler's draws should follow (it applies the same steps to a whole batch at once).

# %%
def filtered(x: torch.Tensor, p: SamplingParams, seq: Sequence) -> torch.Tensor:
    x = x.clone()                                                      # (K,)
    seen = torch.tensor(seq.token_ids, dtype=torch.long).unique()      # prompt and output tokens
    x[seen] = torch.where(x[seen] > 0, x[seen] / p.repetition_penalty, x[seen] * p.repetition_penalty)
    used, counts = torch.tensor(seq.output_token_ids, dtype=torch.long).unique(return_counts=True)
    x[used] -= p.frequency_penalty * counts + p.presence_penalty       # per use / once
    x = x / p.temperature
    if p.top_k:
        x[x < x.topk(p.top_k).values[-1]] = float("-inf")
    if p.top_p < 1.0:       # (at 1.0 rounding could push the cumulative sum past it: skip)
        probs, order = x.softmax(-1).sort(descending=True)
        x[order[probs.cumsum(-1) - probs >= p.top_p]] = float("-inf")  # mass before a token >= top_p
    probs = x.softmax(-1)
    probs[probs < p.min_p * probs.max()] = 0.0
    return probs / probs.sum()

# %% [markdown]
# Now the real Sampler: N_DRAWS rows of the same logits, one draw each (unseeded rows share
# one generator). The frequencies must match `filtered` within 5 standard errors, and no
# draw may land on a token a filter removed.

# %%
sampler = Sampler(K, llm.engine.model_config.eos_token_id, torch.device("cpu"), seed=0)
expected, observed = {}, {}                                            # name -> (K,) probabilities
for name, p in SETTINGS.items():
    seq = Sequence(0, name, 0, prompt_ranks, p, output_token_ids=list(OUTPUT_SO_FAR))
    expected[name] = filtered(row, p, seq)
    draws = sampler(row.expand(N_DRAWS, K).clone(), [seq] * N_DRAWS).token_ids    # (N_DRAWS,)
    observed[name] = draws.bincount(minlength=K).float() / N_DRAWS
    q = expected[name]
    kept_n = int((q > 0).sum())
    print(f"{name:>26}: {kept_n:4d} tokens kept, top token {q[0]:.3f} (drawn {observed[name][0]:.3f}), "
          f"most likely now {llm.tokenizer.decode([kept[q.argmax()].item()])!r}")
tolerance = {name: 5 * (q * (1 - q) / N_DRAWS).sqrt() + 1 / N_DRAWS for name, q in expected.items()}
check(f"frequencies of {N_DRAWS} draws match each filtered distribution within 5 standard errors",
      all(((observed[n] - expected[n]).abs() <= tolerance[n]).all() for n in SETTINGS))
check("no draw lands on a token that a filter removed",
      all((observed[n][expected[n] == 0] == 0).all() for n in SETTINGS))

# %% [markdown]
# Seeds. A request with a seed gets its own torch.Generator (engine.add_request), so its
# noise, and its tokens, depend only on its seed and its logits: the same alone or batched.
# Unseeded requests share one generator (LLM(seed=...)) that draws noise for the whole batch
# at once: which numbers a request gets depends on who else is in the batch.

# %%
seeded = SamplingParams(temperature=1.0, max_tokens=12, seed=1234)
unseeded = SamplingParams(temperature=1.0, max_tokens=12)
NEIGHBOURS = ["class Stack:\n", "for i in range(", "def main(argv):\n    "]     # unseeded requests


def tokens_of(prompt: str, p: SamplingParams, neighbours: list[str]) -> list[int]:
    """`prompt`'s output tokens when it runs first in a batch with `neighbours`."""
    engine.sampler.generator.manual_seed(0)      # the shared generator, as a fresh LLM(seed=0) starts it
    outs = llm.generate([prompt, *neighbours], [p] + [unseeded] * len(neighbours), use_tqdm=False)
    return outs[0].outputs[0].token_ids


same_seed = {"alone": tokens_of("def ", seeded, []), "batched": tokens_of("def ", seeded, NEIGHBOURS)}
shared = {"alone": tokens_of("def ", unseeded, []), "batched": tokens_of("def ", unseeded, NEIGHBOURS)}
for label, runs in [("seed=1234", same_seed), ("shared generator", shared)]:
    for where, toks in runs.items():
        print(f"{label:>16}, {where:>7}: {llm.tokenizer.decode(toks)!r}")
check("a seeded request gives the same tokens alone and in a batch", same_seed["alone"] == same_seed["batched"])
check("with the shared generator, batch neighbours change a request's tokens", shared["alone"] != shared["batched"])

# %% [markdown]
# The picture: the 20 most likely tokens under each setting's rules (bars) and the real
# Sampler's draw frequencies (dots).

# %%
if (plt := pyplot()) is not None:
    labels = [repr(llm.tokenizer.decode([t])) for t in kept[:20].tolist()]
    fig, axes = plt.subplots(2, 4, figsize=(16, 8), sharex=True, sharey=True, layout="constrained")
    for ax, name in zip(axes.flat, SETTINGS):
        ax.bar(range(20), expected[name][:20].tolist(), color="#1f77b4", label="filtered distribution")
        ax.plot(range(20), observed[name][:20].tolist(), "k.", label=f"frequency in {N_DRAWS} draws")
        ax.set_title(f"{name}\n{int((expected[name] > 0).sum())} of {K} tokens kept", fontsize=10)
    for ax in axes[1]:
        ax.set_xticks(range(20), labels, rotation=90, fontsize=8)
    fig.supxlabel(f"the model's 20 most likely next tokens after {PROMPT!r}, most likely first")
    for ax in axes[:, 0]:
        ax.set_ylabel("probability")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("one next-token distribution of the embedded model under each sampling setting")
    save_figure(fig, "06_sampling.png")
