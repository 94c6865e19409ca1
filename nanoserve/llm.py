"""Offline inference in one call, vLLM's `LLM`: build an engine, queue every prompt, step
until all are done, and return the outputs in input order.

    llm = LLM("gpt2")
    outs = llm.generate(["Hello, my name is"], SamplingParams(temperature=0, max_tokens=16))

Everything here is a loop around LLMEngine (engine.py): add_request for each prompt, then
step() until nothing is left. A server drives the same engine step by step instead
(async_engine.py), to stream and to admit requests while others run.

References: vLLM `LLM` (vllm/entrypoints/llm.py).
"""
from __future__ import annotations

from typing import Any

from .config import EngineConfig
from .engine import LLMEngine, PromptType
from .sequence import RequestOutput, SamplingParams


class LLM:
    """Offline inference, vLLM-style:  LLM("gpt2").generate(prompts, SamplingParams(...))."""

    def __init__(self, model: str = "gpt2", **kwargs: Any) -> None:
        unknown = set(kwargs) - set(EngineConfig.field_names())
        if unknown:
            raise TypeError(f"LLM() got unknown keyword(s) {sorted(unknown)}; known: {EngineConfig.field_names()[1:]}")
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: PromptType | list[PromptType],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion; results in input order.

        All prompts are validated before any runs: one bad prompt raises and queues nothing.
        Requests added through `self.engine` and still unfinished make it raise RuntimeError:
        generate would have to run them to completion and could return their outputs to no one.
        Drive those with `engine.step()` (or abort them) first."""
        self._check_no_foreign_requests()
        prompts, params = _pair_up(prompts, sampling_params)
        eng = self.engine
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(eng.add_request(None, prompt, p))
        except Exception:
            for rid in ids:                   # leave the engine as we found it
                eng.abort_request(rid)
            raise
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm and len(ids) > 1 and not eng.config.quiet:
            from tqdm import tqdm
            bar = tqdm(total=len(ids), desc="generate", unit="req")
        try:
            while eng.has_unfinished_requests():
                for out in eng.step(finished_only=True):
                    if out.finished:
                        results[out.request_id] = out
                        if bar:
                            bar.update(1)
        except BaseException:                 # an error or Ctrl-C mid-run: free what we queued
            for rid in ids:
                eng.abort_request(rid)
            raise
        finally:
            if bar:
                bar.close()
        return [results[r] for r in ids]

    def _check_no_foreign_requests(self) -> None:
        if n := self.engine.get_num_unfinished_requests():
            some = list(self.engine.requests)[:3]
            raise RuntimeError(f"LLM.generate: {n} request(s) added through llm.engine are unfinished "
                               f"(e.g. {some}); generate would run them and drop their outputs. Call "
                               f"llm.engine.step() until llm.engine.has_unfinished_requests() is False, "
                               f"or llm.engine.abort_request(id), before generate")


def _pair_up(prompts: PromptType | list[PromptType], sampling_params: SamplingParams | list[SamplingParams] | None
             ) -> tuple[list[PromptType], list[SamplingParams]]:
    """generate's arguments as two equal lists: one prompt (a str, a dict or one list of token
    ids) becomes a list of one; one SamplingParams (or None: the defaults) serves every prompt."""
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                           and all(isinstance(t, int) for t in prompts)):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a str or a list, got {type(prompts).__name__}")
    if isinstance(sampling_params, (list, tuple)):
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} SamplingParams for {len(prompts)} prompts")
        return list(prompts), list(sampling_params)
    return list(prompts), [sampling_params or SamplingParams()] * len(prompts)
