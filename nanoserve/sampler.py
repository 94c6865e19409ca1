"""Turning a batch of logits into next tokens, one row per sequence, in one vectorized pass.

Per row, in order (vLLM's order):
  raw logits -> logprobs are taken here (the model's own distribution, before any knob)
  -> min_tokens: forbid EOS / stop tokens until enough tokens exist
  -> logit_bias (add a fixed amount to chosen tokens)
  -> repetition penalty (divide positive logits of seen tokens, multiply negative ones)
  -> presence / frequency penalties (subtract, for tokens already in the output: once / per use)
  -> temperature -> top-k -> top-p -> min-p  (masking to -inf)
  -> draw: argmax for greedy rows; for the others, argmax(probs / E) with E ~ Exponential(1),
     which samples exactly from probs (the "exponential race", a form of the Gumbel-max trick).

Why the exponential race: it splits sampling into "make noise" and "argmax". A seeded request
makes its noise from its own torch.Generator, so its tokens depend only on its seed and its
logits: the same alone or in any batch. Unseeded rows share one generator and one call.

S = sequences in batch   V = vocab_size

References: vLLM `v1/sample/sampler.py` and `ops/topk_topp_sampler.py`, HF `LogitsProcessor`s.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import to_device
from .sequence import Sequence


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor                  # (S,) int64, on device
    logprobs: torch.Tensor | None = None     # (S, K+1) fp32: sampled token first, then top-K
    logprob_ids: torch.Tensor | None = None  # (S, K+1) int64 matching token ids


class Sampler:
    def __init__(self, vocab_size: int, eos_token_id: int, device: torch.device, seed: int) -> None:
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.device = device
        # One generator for all unseeded rows: LLM(seed=...) makes a whole run reproducible.
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def make_generator(self, seed: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(seed)
        return g

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """logits (S, V) any float dtype -> SamplerOutput. `seqs` gives each row's params."""
        if all(s.plain_greedy for s in seqs):
            # Plain greedy decoding, the common case: the argmax of the model's own dtype. Casting
            # fp16 or bf16 to fp32 is exact, so the winner is the same, and we skip writing a
            # float copy of the logits every step (51 MB at batch 256). (A CPU's argmax over bf16
            # is the exception: ~190 us a row against ~100 with the cast, so there we cast.)
            # A CPU's decode steps of up to 8 such sequences never get here: cpu_step.cpp takes
            # their argmax itself (runner._launch_cpu_decode says why).
            if logits.dtype == torch.bfloat16 and logits.device.type == "cpu":
                logits = logits.float()
            return SamplerOutput(token_ids=logits.argmax(dim=-1))  # (S,)
        params = [s.params for s in seqs]
        logits = logits.float()                                    # (S, V)
        S, V = logits.shape

        out_lp = None
        max_lp = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        if max_lp is not None:
            out_lp = torch.log_softmax(logits, dim=-1)             # (S, V) raw-model logprobs

        logits = self._apply_penalties(logits, seqs)
        if all(p.is_greedy for p in params):
            token_ids = logits.argmax(dim=-1)                      # (S,)
        else:
            token_ids = self._sample(logits, seqs)                 # (S,)

        res = SamplerOutput(token_ids=token_ids)
        if out_lp is not None:
            top_lp, top_ids = out_lp.topk(max_lp, dim=-1) if max_lp > 0 else (
                out_lp[:, :0], token_ids[:, None][:, :0])          # (S, K)
            sampled_lp = out_lp.gather(1, token_ids[:, None])      # (S, 1)
            res.logprobs = torch.cat([sampled_lp, top_lp], dim=1)  # (S, K+1)
            res.logprob_ids = torch.cat([token_ids[:, None], top_ids], dim=1)
        return res

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        # One Python pass over the rows; a row does tensor work only for the features it uses,
        # and most requests use none of them.
        for row, s in enumerate(seqs):
            p = s.params
            if len(s.output_token_ids) < p.min_tokens:
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else [self.eos_token_id])
                if banned:
                    logits[row, banned] = float("-inf")
            if p.logit_bias:
                logits[row, list(p.logit_bias)] += torch.tensor(list(p.logit_bias.values()), device=logits.device)
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(s.token_ids, device=logits.device).unique()   # (U,)
                x = logits[row, seen]
                logits[row, seen] = torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty)
            if (p.presence_penalty or p.frequency_penalty) and s.output_token_ids:
                used, counts = torch.tensor(s.output_token_ids, device=logits.device).unique(return_counts=True)
                logits[row, used] -= p.frequency_penalty * counts + p.presence_penalty   # (U,)
        return logits

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        S, V = logits.shape
        dev = logits.device
        params = [s.params for s in seqs]
        greedy = to_device([p.is_greedy for p in params], torch.bool, dev)            # (S,)
        temp = to_device([1.0 if p.is_greedy else p.temperature for p in params],
                         torch.float32, dev)                                         # (S,)
        logits = logits / temp[:, None]                                              # (S, V)

        top_k = [p.top_k if 0 < p.top_k < V else V for p in params]
        use_top_k, use_top_p = any(k < V for k in top_k), any(p.top_p < 1.0 for p in params)
        if use_top_k or use_top_p:
            # Sort once; top-k and top-p are both "keep a prefix of the sorted row".
            sorted_logits, order = logits.sort(dim=-1, descending=True)             # (S, V)
            keep = torch.ones_like(sorted_logits, dtype=torch.bool)                  # (S, V)
            rank = torch.arange(V, device=dev)                                       # (V,)
            if use_top_k:
                keep &= rank[None, :] < to_device(top_k, torch.int64, dev)[:, None]
            if use_top_p:
                probs = sorted_logits.masked_fill(~keep, float("-inf")).softmax(-1)  # (S, V)
                mass_before = probs.cumsum(-1) - probs                               # (S, V)
                keep &= mass_before < to_device([p.top_p for p in params], torch.float32, dev)[:, None]
            keep[:, 0] = True                                                        # never empty
            mask = torch.empty_like(keep).scatter_(1, order, keep)                   # back to vocab order
            logits = logits.masked_fill(~mask, float("-inf"))
        probs = logits.softmax(dim=-1)                                               # (S, V)
        if any(p.min_p > 0 for p in params):
            min_p = to_device([p.min_p for p in params], torch.float32, dev)         # (S,)
            probs = probs.masked_fill(probs < min_p[:, None] * probs.max(-1, keepdim=True).values, 0.0)

        # Exponential race. Unseeded rows: one call on the shared generator; seeded rows: their own.
        noise = torch.empty_like(probs).exponential_(generator=self.generator)       # (S, V)
        for row, s in enumerate(seqs):
            if s.generator is not None and not s.params.is_greedy:
                noise[row].exponential_(generator=s.generator)
        sampled = (probs / noise).argmax(dim=-1)                                     # (S,)
        return torch.where(greedy, logits.argmax(dim=-1), sampled)
