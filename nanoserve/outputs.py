"""From sampled tokens to what the caller reads: stop conditions, detokenization, and the
RequestOutput snapshots that LLMEngine.step returns.

Text is made lazily: a sequence's tokens are detokenized only when someone looks (a streamed
step, a finished request) or when a stop string has to be searched for. A request nobody
streams is decoded once, in bulk, when it finishes.

References: vLLM v1 `OutputProcessor`, `Detokenizer` and `check_stop`.
"""
from __future__ import annotations

from .sequence import CompletionOutput, Request, RequestMetrics, RequestOutput, Sequence
from .tokenizer import Tokenizer


class StopStrings:
    """A request's stop strings, as a trie of the strings reversed, so that a token's check
    costs the same for 1 stop string or 10,000 (a server cannot let one request's list slow
    every step). A match must end in the text the token added: from each new character we
    walk the trie backwards through the text, as far as the text still spells the end of some
    stop string: at most the longest one's length, and usually a step or two."""

    _END = ""                      # key marking "a stop string starts here"; no character is ""

    def __init__(self, stops: list[str]) -> None:
        self.trie: dict = {}
        for s in stops:
            node = self.trie
            for ch in reversed(s):
                node = node.setdefault(ch, {})
            node[self._END] = True

    def find(self, text: str, new_from: int) -> int | None:
        """Where the earliest stop string ending after text[:new_from] starts, or None."""
        best = None
        for end in range(new_from, len(text)):        # each new character, as a match's last
            node, i = self.trie, end
            while i >= 0 and (node := node.get(text[i])) is not None:
                if self._END in node and (best is None or i < best):
                    best = i
                i -= 1
        return best


class OutputProcessor:
    """Appends sampled tokens to sequences, decides when they stop, and builds outputs."""

    def __init__(self, tokenizer: Tokenizer, eos_token_id: int, n_ctx: int) -> None:
        self.tokenizer, self.eos_token_id, self.n_ctx = tokenizer, eos_token_id, n_ctx

    def append(self, seq: Sequence, token: int, logprobs: dict[int, float] | None) -> str | None:
        """Add a sampled token; return why the sequence must finish ("stop" or "length"), or
        None. The conditions go in vLLM's order: EOS, stop token ids, stop strings (the text
        is cut before the match), then length."""
        p = seq.params
        seq.output_token_ids.append(token)
        if logprobs is not None:
            seq.logprobs.append(logprobs)
            seq.cumulative_logprob += logprobs[token]
        num_out = len(seq.output_token_ids)
        if token == self.eos_token_id and not p.ignore_eos and num_out >= p.min_tokens:
            return "stop"
        if token in p.stop_token_ids and num_out >= p.min_tokens:
            return "stop"
        if p.stop:
            # Stop strings need the text now; otherwise it is made when someone asks (output()).
            old = len(seq.text)
            self.detokenize(seq)
            if num_out >= p.min_tokens:
                seq.stop_strings = seq.stop_strings or StopStrings(p.stop)    # built once per sequence
                if (cut := seq.stop_strings.find(seq.text, old)) is not None:
                    seq.text = seq.text[:cut]
                    return "stop"
        # Past n_ctx + 1 tokens the next step would feed one at position n_ctx: wpe has no row for it.
        if num_out >= p.max_tokens or seq.num_prompt_tokens + num_out > self.n_ctx:
            if p.stop:   # the text is current already, so output() won't flush a held-back partial character
                seq.text += seq.detok.flush()
            return "length"
        return None

    def _text_ids(self, seq: Sequence, start: int) -> list[int]:
        """The output tokens from `start` on that become text. <|endoftext|> is a special
        token, not text, unless skip_special_tokens is off; even then, one that ended the
        sequence is left out, as vLLM leaves out a stop token."""
        eos, out = self.eos_token_id, seq.output_token_ids
        if seq.params.skip_special_tokens:
            return [t for t in out[start:] if t != eos]
        ids = out[start:]
        if ids and ids[-1] == eos and seq.finish_reason == "stop":   # EOS, or a stop token id (ignore_eos too)
            ids = ids[:-1]
        return ids

    def detokenize(self, seq: Sequence) -> None:
        """Bring seq.text up to date with its output tokens (see _text_ids for which count)."""
        out = seq.output_token_ids
        if seq.num_detok == len(out):
            return
        if seq.num_detok == 0 and seq.is_finished:
            # Nobody streamed this sequence: one bulk decode (in Rust) beats a push per token.
            seq.text = self.tokenizer.decode(self._text_ids(seq, 0))
        else:
            for t in self._text_ids(seq, seq.num_detok):
                seq.detok.push(t)
            if seq.is_finished:
                seq.detok.flush()
            seq.text = seq.detok.text
        seq.num_detok = len(out)

    def output(self, req: Request) -> RequestOutput:
        """A snapshot for the caller: lists are copied, since the sequences keep growing."""
        for s in req.seqs:
            self.detokenize(s)      # a no-op once text is current (a stop-string cut included)
        comps = [CompletionOutput(index=s.index, text=s.text, token_ids=list(s.output_token_ids),
                                  cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
                                  logprobs=list(s.logprobs) if s.logprobs is not None else None,
                                  finish_reason=s.finish_reason) for s in req.seqs]
        first = req.seqs[0]
        return RequestOutput(request_id=req.request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
                             prompt_logprobs=list(first.prompt_logprobs) if first.prompt_logprobs is not None else None,
                             outputs=comps, finished=req.is_finished,
                             metrics=RequestMetrics(req.arrival_time, req.first_token_time, req.finished_time,
                                                    num_kv_blocks_peak=sum(s.peak_num_blocks for s in req.seqs),
                                                    num_preemptions=sum(s.num_preemptions for s in req.seqs),
                                                    num_shifts=sum(s.num_shifts for s in req.seqs)),
                             error=req.error)
