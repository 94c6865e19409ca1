"""Prefix caching, measured: many requests that start with the same long prompt (a shared
system prompt, few-shot examples, a document with several questions) need its K/V only once.

    python examples/prefix_caching.py [model]   # default: random weights of GPT-2 124M's shape

16 requests = one 448-token shared prefix + 16 tokens of their own, 16 new tokens each. The
same requests run with enable_prefix_caching off and on, in this order, twice; the tokens must
match. With the cache, only the first requests (admitted in the same step, before any block
is computed) prefill the prefix; the others take its blocks and prefill just their own tail.
For how it works, step by step on the embedded model, see the lesson examples/07_prefix_caching.py.
"""
import random
import sys
import tempfile
import time
from pathlib import Path

from nanoserve import LLM, SamplingParams
from nanoserve.bench import checkpoint_for   # random-weight checkpoints need transformers (dev extra)

with tempfile.TemporaryDirectory() as tmp:
    ckpt = checkpoint_for(sys.argv[1] if len(sys.argv) > 1 else "gpt2", Path(tmp))
    rng = random.Random(0)
    shared = [rng.randrange(50257) for _ in range(448)]
    prompts = [shared + [rng.randrange(50257) for _ in range(16)] for _ in range(16)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    tokens = {}
    for caching in (False, True, False, True):
        llm = LLM(str(ckpt), device="cpu", quiet=True, enable_prefix_caching=caching, compile_cpu_attention=True)
        llm.generate([prompts[0][:20]], params, use_tqdm=False)          # warm-up (and compile)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        tokens.setdefault(caching, [o.outputs[0].token_ids for o in outs])
        print(f"enable_prefix_caching={caching!s:5}  {seconds:6.2f} s  {16 * 16 / seconds:6.1f} output tok/s  "
              f"prompt tokens from the cache: {llm.engine.scheduler.num_cached_tokens}")
    assert tokens[True] == tokens[False], "prefix caching must not change a single token"
    print("same tokens with and without the cache")
