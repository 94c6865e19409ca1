"""OpenAI's completions API, the way back: engine outputs (RequestOutput) as one JSON body, or
as server-sent events chunk by chunk; echo, logprobs with their text offsets, prompt logprobs,
stop strings held back until they cannot be one, usage. protocol.py has the request side.

Nothing here knows about the engine thread, admission or sockets; server.py does. What a
client sees on the wire is decided here and in protocol.py, so both read against OpenAI's
reference: https://platform.openai.com/docs/api-reference/completions

References: vLLM `entrypoints/openai/serving_completion.py`.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import json
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from .protocol import APIError, CompletionRequest
from .sequence import CompletionOutput, RequestOutput
from .tokenizer import IncrementalDetokenizer, Tokenizer


# ---- engine outputs -> responses ------------------------------------------------------------
def usage(outputs: Any) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)       # once per prompt, not per choice
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def dumps(data: Any) -> str:
    """JSON every client can parse. A NaN or infinite logprob (a model with broken weights)
    would be written as the literal NaN, which is not JSON: that is a clear error instead."""
    try:
        return json.dumps(data, allow_nan=False)
    except ValueError:
        raise APIError(500, "the model produced a NaN or infinite logprob (are its weights broken?); there is no "
                       "valid JSON to send", type="server_error", code="invalid_model_output") from None


def _top(lp: dict[int, float], k: int, token: int) -> dict[int, float]:
    """The k most likely entries of `lp`, plus `token`'s (the engine may have computed more)."""
    if len(lp) <= k + 1:
        return lp
    top = dict(heapq.nlargest(k, lp.items(), key=lambda kv: kv[1]))
    return {**top, token: lp[token]}


@dataclass(slots=True)
class _StreamChoice:
    """How much of one choice a stream has sent so far."""
    detok: IncrementalDetokenizer  # the tokens sent so far, as text: text_offset counts from it
    num_chars: int = 0             # characters of the completion's text sent
    num_sent: int = 0              # characters of the choice sent, the echoed prompt included
    num_tokens: int = 0            # tokens sent (their logprobs)
    done: bool = False


class Responses:
    """RequestOutputs -> OpenAI completion responses."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def _head(self, cid: str, req: CompletionRequest) -> dict:
        # The name the client asked for: a model served under several names answers to each.
        return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": req.model}

    def _logprobs(self, ids: list[int], lps: list[dict[int, float] | None], detok: IncrementalDetokenizer,
                  k: int, num_echo: int, limit: int, final: bool) -> tuple[dict, int]:
        """OpenAI's logprobs object for the leading tokens of `ids`, of which the first
        `num_echo` are the echoed prompt, and how many tokens it covers. `detok` holds the
        choice's text before them (text_offset indexes the returned text) and gets them pushed.
        `limit` is the length of the choice's text sent so far: no offset passes it (tokens
        after a stop string's cut start at its end), and unless `final`, a generated token that
        starts there (its text is held back) waits for a later chunk."""
        offsets: list[int] = []
        for j, t in enumerate(ids):
            if not final and j >= num_echo and len(detok.text) >= limit:
                break
            offsets.append(min(len(detok.text), limit))
            if j < num_echo or t != self.tokenizer.eos_token_id:   # a generated EOS is not text
                detok.push(t)
        ids, lps, word = ids[:len(offsets)], lps[:len(offsets)], self._token_string
        return {"tokens": [word(t) for t in ids],
                "token_logprobs": [None if lp is None else lp[t] for t, lp in zip(ids, lps)],
                "top_logprobs": [None if lp is None else {word(i): v for i, v in _top(lp, k, t).items()}
                                 for t, lp in zip(ids, lps)],
                "text_offset": offsets}, len(offsets)

    def _prompt_logprobs(self, req: CompletionRequest, out: RequestOutput) -> list | None:
        """vLLM's prompt_logprobs: per prompt token (the first: None), {id: {logprob, rank,
        decoded_token}} for the top k and the prompt token. rank is 1-based among the top k;
        None for a prompt token outside them (the engine does not rank the whole vocabulary)."""
        if req.prompt_logprobs is None:
            return None
        k, result = req.prompt_logprobs, []
        for t, lp in zip(out.prompt_token_ids, out.prompt_logprobs or []):
            ranked = None if lp is None else sorted(_top(lp, k, t).items(), key=lambda kv: -kv[1])
            result.append(None if ranked is None else {
                str(i): {"logprob": v, "rank": r + 1 if r < k else None, "decoded_token": self._token_string(i)}
                for r, (i, v) in enumerate(ranked)})
        return result

    def _token_string(self, token_id: int) -> str:
        """A token as logprobs show it. A GPT-2 token may hold part of a UTF-8 character (one
        emoji can be three tokens); OpenAI writes such a token as "bytes:\\xf0\\x9f", which
        keeps every token distinct and the bytes recoverable (U+FFFD would lose both)."""
        raw = self.tokenizer.token_bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def _shown(self, req: CompletionRequest, out: RequestOutput) -> RequestOutput:
        """What the client sees of `out`: all of it, except
        - echo-only: no generated tokens (the engine's one token leaves text, logprobs, usage);
        - best_of > n: the n candidates with the highest logprob per token (OpenAI's "best"),
          renumbered 0..n-1, without the logprobs the ranking needed unless they were asked for;
        - include_stop_str_in_output: a choice ended by a stop string keeps it (vLLM's option)."""
        if req.is_echo_only:
            hide = lambda c: dataclasses.replace(c, text="", token_ids=[], logprobs=None if c.logprobs is None else [],
                                                 finish_reason=c.finish_reason and "length")
            return dataclasses.replace(out, outputs=[hide(c) for c in out.outputs])
        if req.include_stop_str_in_output:
            out = dataclasses.replace(out, outputs=[self._with_stop_string(req, c) for c in out.outputs])
        if req.num_candidates > req.n and out.finished:
            per_token = lambda c: c.cumulative_logprob / max(1, len(c.token_ids))
            best = sorted(out.outputs, key=per_token, reverse=True)[:req.n]
            asked = req.logprobs is not None
            return dataclasses.replace(out, outputs=[
                dataclasses.replace(c, index=i, logprobs=c.logprobs if asked else None,
                                    cumulative_logprob=c.cumulative_logprob if asked else None)
                for i, c in enumerate(best)])
        return out

    def _with_stop_string(self, req: CompletionRequest, c: CompletionOutput) -> CompletionOutput:
        """The engine cuts the text before the stop string that matched; put that string back.
        It starts right at the cut in the text of all the tokens (the first of the request's
        stop strings that does, as vLLM checks them in order)."""
        if c.finish_reason != "stop":
            return c
        full = self.tokenizer.decode([t for t in c.token_ids if t != self.tokenizer.eos_token_id])
        stops = [req.stop] if isinstance(req.stop, str) else req.stop or []
        hit = next((s for s in stops if full.startswith(s, len(c.text))), "")
        return dataclasses.replace(c, text=c.text + hit)

    def _echo(self, req: CompletionRequest, text: str | None, out: RequestOutput) -> tuple[str, list, list]:
        """What a choice starts with: with echo, the prompt's text, token ids and logprobs."""
        if not req.echo:
            return "", [], []
        text = text if text is not None else self.tokenizer.decode(out.prompt_token_ids)
        return text, list(out.prompt_token_ids), list(out.prompt_logprobs or [])

    async def collect(self, cid: str, req: CompletionRequest, texts: list[str | None],
                      results: AsyncIterator) -> bytes:
        """One JSON body with every choice, once all of `results` ((prompt index, output)
        pairs) are in. `texts` are the prompts as sent (None for token ids), for echo. The
        body is built in a worker thread: a large one (many choices with logprobs) would
        otherwise stall the event loop, and with it every other client, while it is built."""
        final: dict[int, RequestOutput] = {}
        async with contextlib.aclosing(results):
            async for i, out in results:
                final[i] = self._shown(req, out)
        return await asyncio.to_thread(self.body, cid, req, texts, final)

    def body(self, cid: str, req: CompletionRequest, texts: list[str | None], final: dict[int, RequestOutput]) -> bytes:
        choices = []
        for i, out in sorted(final.items()):
            for c in out.outputs:
                text, ids, lps = self._echo(req, texts[i], out)
                lp = None if req.logprobs is None else self._logprobs(
                    ids + c.token_ids, lps + c.logprobs, IncrementalDetokenizer(self.tokenizer), req.logprobs,
                    len(ids), len(text + c.text), final=True)[0]
                choice = {"index": i * req.n + c.index, "text": text + c.text, "logprobs": lp,
                          "finish_reason": c.finish_reason}
                if req.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = self._prompt_logprobs(req, out)
                choices.append(choice)
        return dumps({**self._head(cid, req), "choices": choices, "usage": usage(final.values())}).encode()

    async def stream(self, cid: str, req: CompletionRequest, texts: list[str | None], hold: int,
                     results: AsyncIterator) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, then `data: [DONE]`. The last `hold`
        characters of an unfinished choice wait for the next token (a stop string may be forming
        there). A client hang-up cancels this generator at an await; closing `results` then
        aborts the request."""
        head = self._head(cid, req)
        opts = req.stream_options
        with_usage = opts is not None and opts.include_usage
        continuous = with_usage and opts.continuous_usage_stats
        if with_usage:
            head["usage"] = None
        event = lambda data: f"data: {dumps({**head, **data})}\n\n"
        states: dict[int, _StreamChoice] = {}
        final: dict[int, RequestOutput] = {}
        try:
            async with contextlib.aclosing(results):
                async for i, out in results:
                    final[i] = out = self._shown(req, out)
                    for c in out.outputs:
                        k, text, ids, lps, extra = i * req.n + c.index, "", [], [], {}
                        if k not in states:                   # this choice's first chunk
                            states[k] = _StreamChoice(IncrementalDetokenizer(self.tokenizer))
                            text, ids, lps = self._echo(req, texts[i], out)
                            if req.prompt_logprobs is not None:
                                extra["prompt_logprobs"] = self._prompt_logprobs(req, out)
                        st, num_echo = states[k], len(ids)
                        if st.done:
                            continue
                        end = len(c.text) if c.finish_reason else max(st.num_chars, len(c.text) - hold)
                        text += c.text[st.num_chars:end]
                        st.num_chars, st.num_sent = end, st.num_sent + len(text)
                        st.done = c.finish_reason is not None
                        lp = None
                        if req.logprobs is not None:
                            ids += c.token_ids[st.num_tokens:]
                            lps += (c.logprobs or [])[st.num_tokens:]
                            lp, num = self._logprobs(ids, lps, st.detok, req.logprobs, num_echo, st.num_sent, st.done)
                            st.num_tokens += num - num_echo
                        if text or st.done or extra or (lp and lp["tokens"]):
                            # vLLM's continuous usage: this choice's prompt and its tokens so far
                            now = {"usage": usage([dataclasses.replace(out, outputs=[c])])} if continuous else {}
                            yield event({"choices": [{"index": k, "text": text, "logprobs": lp,
                                                      "finish_reason": c.finish_reason, **extra}], **now})
            if with_usage:
                yield event({"choices": [], "usage": usage(final.values())})
        except APIError as e:                  # timeout, shutdown, NaN: the stream ends with the error
            yield f"data: {json.dumps(e.body)}\n\n"
        yield "data: [DONE]\n\n"
