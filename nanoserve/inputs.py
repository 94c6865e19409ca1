"""What a request may ask for: turning a user's prompt and SamplingParams into token ids and
a private, checked copy of the params, or a clear error. Every check happens here, before the
engine creates any sequence, so a rejected request leaves nothing behind (outputs.py is the
other end: tokens back into text and RequestOutputs).

A prompt is a string (tokenized here), a list of token ids, or vLLM's dict form
{"prompt": ...} / {"prompt_token_ids": [...]}. The checks, in order:
  - types: SamplingParams, token ids that are ints inside the vocabulary;
  - the params' token ids (stop_token_ids, logit_bias, logprobs k) inside the vocabulary;
  - length: the tokens the model runs, prompt + max_tokens - 1 (the last sampled token is
    never fed back), fit n_ctx, the whole KV pool, and without a KV cache one step.
    `truncate_prompt_tokens` keeps the end of a long prompt first; with context shifting a
    request may run past n_ctx, but its prompt must fit.

References: vLLM v1 `Processor` (vllm/v1/engine/processor.py).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from .sampling_params import SamplingParams
from .tokenizer import Tokenizer

PromptType = str | list[int] | dict


class InputProcessor:
    """Checks requests against one engine's limits (see the module docstring)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, n_ctx: int, kv_capacity: int,
                 shift_window: int | None, max_tokens_per_step: int | None) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size                    # ids a request may use: model and tokenizer both know them
        self.n_ctx = n_ctx
        self.kv_capacity = kv_capacity                  # tokens the whole KV pool holds
        self.shift_window = shift_window                # None: no context shifting
        self.max_tokens_per_step = max_tokens_per_step  # only without a KV cache: one step recomputes it all

    def process(self, prompt: PromptType, params: SamplingParams) -> tuple[str | None, list[int], SamplingParams]:
        """(prompt text or None, prompt token ids, the request's own copy of params); raises
        ValueError/TypeError naming the problem and the limit."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        params.check_vocab(self.vocab_size)
        params = dataclasses.replace(params)    # a copy, validated anew by __post_init__
        text, ids = self.prompt_ids(prompt)
        if (k := params.truncate_prompt_tokens) is not None and len(ids) > k:
            ids = ids[-k:]          # the end of a prompt matters most to its continuation
        self.check_fits(len(ids), params)
        return text, ids, params

    def prompt_ids(self, prompt: Any) -> tuple[str | None, list[int]]:
        """(text or None, token ids) for the prompt forms the API accepts; raises on others."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = prompt["prompt_token_ids"]
                if not isinstance(prompt, (list, tuple)):   # a str here would be tokenized as text
                    raise TypeError(f"prompt_token_ids must be a list of token ids (ints), "
                                    f"got {type(prompt).__name__} {prompt!r:.40}")
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise TypeError(f"a dict prompt needs 'prompt' or 'prompt_token_ids', got keys {list(prompt)}")
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if bad := [t for t in prompt if not 0 <= t < self.vocab_size]:
                raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
            return None, list(prompt)
        raise TypeError(f"prompt must be a str, a list of token ids, or a dict with 'prompt_token_ids'; "
                        f"got {type(prompt).__name__}")

    def check_fits(self, num_prompt: int, params: SamplingParams) -> None:
        """The tokens that run through the model must fit n_ctx, the KV pool, and (without a
        KV cache) one step. That is prompt + max_tokens - 1: the last sampled token is never
        fed back. So a full n_ctx-token window can be scored (prompt_logprobs, max_tokens=1)."""
        if num_prompt == 0:
            raise ValueError("prompt is empty; give at least one token")
        total, n_ctx = num_prompt + params.max_tokens, self.n_ctx
        if self.shift_window is not None:
            if num_prompt > n_ctx:
                raise ValueError(f"prompt is {num_prompt} tokens > n_ctx={n_ctx}; context shifting starts from a "
                                 "prompt that fits: shorten it or set SamplingParams.truncate_prompt_tokens")
            # A context grows to n_ctx computed tokens (positions 0..n_ctx-1) before it shifts:
            # the shift comes when a token would be fed at position n_ctx.
            total = min(total, n_ctx + 1)
        num_run = total - 1                     # positions 0 .. total-2 go through the model
        what = "prompt + max_tokens - 1" if self.shift_window is None else "min(prompt + max_tokens - 1, n_ctx)"
        if num_run > n_ctx:
            raise ValueError(f"prompt is {num_prompt} tokens and max_tokens is {params.max_tokens}: {total} > "
                             f"n_ctx + 1 = {n_ctx + 1} (n_ctx={n_ctx}; the last token is never fed back); shorten "
                             "the prompt (SamplingParams.truncate_prompt_tokens keeps its end) or lower max_tokens")
        if num_run > self.kv_capacity:
            raise ValueError(f"{what} = {num_run} tokens need KV slots but the whole KV pool "
                             f"has {self.kv_capacity}; raise num_blocks or lower max_tokens")
        if self.max_tokens_per_step is not None and num_run > self.max_tokens_per_step:
            raise ValueError(f"without a KV cache every step recomputes the whole sequence, and {what} = "
                             f"{num_run} tokens exceeds max_num_batched_tokens={self.max_tokens_per_step}; "
                             "raise it or lower max_tokens")
