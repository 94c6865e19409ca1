"""What a sliding window costs a model trained with full attention: the embedded model's
held-out loss with attention_window 512 / 256 / 128 / 64 against full attention (the README's
table). Measured as in weights/nanoserve-stdlib-tiny/README.md: tests/data/heldout_stdlib.txt
cut into non-overlapping windows of n_ctx - 1 tokens, mean next-token NLL from prompt_logprobs.

    OMP_NUM_THREADS=1 python examples/window_loss.py      # about 2 minutes on a 2-core CPU
"""
from __future__ import annotations

import math
from pathlib import Path

from nanoserve import LLM, SamplingParams
from nanoserve.weights import EMBEDDED_MODEL, WEIGHTS_DIR

HELDOUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "heldout_stdlib.txt"
FAR = 512          # also report the loss of positions >= FAR in their window: every window here cuts there


def heldout_nll(attention_window: int | None) -> tuple[float, float]:
    """Mean NLL (nats/token) over all predicted positions, and over positions >= FAR."""
    llm = LLM(str(WEIGHTS_DIR / EMBEDDED_MODEL), device="cpu", quiet=True, attention_window=attention_window)
    ids = llm.tokenizer.encode(HELDOUT.read_text())
    n = llm.engine.model_config.n_ctx - 1              # one slot stays for max_tokens=1
    chunks = [c for c in (ids[i:i + n] for i in range(0, len(ids), n)) if len(c) > 1]
    outs = llm.generate(chunks, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    nll = [(j, -entry[c[j]]) for c, o in zip(chunks, outs) for j, entry in enumerate(o.prompt_logprobs) if j > 0]
    far = [x for j, x in nll if j >= FAR]
    return sum(x for _, x in nll) / len(nll), sum(far) / len(far)


if __name__ == "__main__":
    full, full_far = heldout_nll(None)
    print("| attention_window | held-out loss (nats/token) | perplexity | vs full | loss at positions >= 512 |")
    print("| --- | --- | --- | --- | --- |")
    for w in (None, 512, 256, 128, 64):
        loss, far = (full, full_far) if w is None else heldout_nll(w)
        print(f"| {w or 'full (1024)'} | {loss:.4f} | {math.exp(loss):.3f} | {100 * (loss / full - 1):+.1f}% | {far:.4f} |")
