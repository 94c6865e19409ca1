"""The smallest tour of nanoserve's API: batch generation, sampling knobs, streaming.

    python examples/example.py [model]      # default: gpt2 (the embedded model when offline)
"""
import sys

from nanoserve import LLM, SamplingParams

model = sys.argv[1] if len(sys.argv) > 1 else "gpt2"
llm = LLM(model)

# 1. Several prompts in one call: they are batched together, step by step.
prompts = ["def fibonacci(n):", "import os\n", "class Stack:\n    def push(self, item):"]
for out in llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24)):
    print(repr(out.prompt), "->", repr(out.outputs[0].text), f"[{out.outputs[0].finish_reason}]")

# 2. Sampling: n completions, nucleus sampling, a seed (same text every run), stop strings,
#    and the model's own logprobs of the chosen tokens.
params = SamplingParams(n=2, temperature=0.8, top_p=0.95, seed=0, max_tokens=32, stop=["\n\n"], logprobs=1)
for c in llm.generate("def main():", params)[0].outputs:
    print(f"completion {c.index}: {c.text!r} (logprob {c.cumulative_logprob:.2f}, {c.finish_reason})")

# 3. The engine underneath: add requests, call step(), stream partial outputs.
engine = llm.engine
engine.add_request("stream-me", "for i in range(", SamplingParams(temperature=0.0, max_tokens=16))
shown = 0
while engine.has_unfinished_requests():
    for out in engine.step():
        text = out.outputs[0].text
        print(text[shown:], end="", flush=True)
        shown = len(text)
print()
