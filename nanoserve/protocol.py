"""OpenAI's completions API as data: the request body (CompletionRequest), error objects
(APIError and the handlers that turn every client mistake into one, never a traceback), and
the responses built from engine outputs: one JSON body, or server-sent events chunk by chunk.

Nothing here knows about the engine thread, admission or sockets; server.py does. What a
client sees on the wire is decided in this file, so it reads against OpenAI's reference:
https://platform.openai.com/docs/api-reference/completions

References: vLLM `entrypoints/openai/protocol.py` and `serving_completion.py`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .sequence import RequestOutput, SamplingParams
from .tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger("nanoserve.server")


# ---- requests and errors -------------------------------------------------------------------
class APIError(Exception):
    """A client-visible error, rendered as OpenAI's {"error": {...}} object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, self.status, headers=self.headers)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False      # a last chunk with usage (and "usage": null on the others)


class CompletionRequest(BaseModel):
    # strict: "5" is not an int and true is not a number. forbid: an unknown option is a 400,
    # never a silently ignored setting.
    model_config = ConfigDict(strict=True, extra="forbid")
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)     # None: up to the context length; 0 needs echo
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None                          # accepted for compatibility; unused
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None       # {"50256": -100}: token ids as strings, as OpenAI sends
    best_of: int | None = Field(None, ge=1, le=20)   # candidates per prompt; the n best are returned
    suffix: str | None = None                        # not for GPT-2: accepted only empty
    # vLLM's extensions, passed straight to SamplingParams.
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None

    @property
    def num_candidates(self) -> int:
        """Completions the engine runs per prompt: best_of of them when it asks for more than n."""
        return max(self.n, self.best_of or 1)

    @property
    def is_echo_only(self) -> bool:
        """max_tokens=0 with echo: score the prompt, generate nothing. Evaluation tools ask for
        prompt logprobs this way (lm-evaluation-harness's loglikelihood). The engine runs one
        token anyway, because it scores a prompt as part of a prefill; Responses hides it."""
        return self.echo and self.max_tokens == 0

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """SamplingParams for a request whose max_tokens, resolved, is `max_tokens`."""
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens=0 generates nothing; it is allowed only with echo=true, to score "
                           "the prompt", param="max_tokens")
        if self.suffix:
            raise APIError(400, "suffix is not supported: GPT-2 has no fill-in-the-middle mode", param="suffix")
        if self.best_of is not None and self.best_of < self.n:
            raise APIError(400, f"best_of={self.best_of} must be >= n={self.n}", param="best_of")
        if self.num_candidates > self.n and self.stream:
            raise APIError(400, f"best_of={self.best_of} > n cannot be streamed: the best are known only at the "
                           "end", param="best_of")
        bias = self.logit_bias or {}
        if bad := [k for k in bias if not (k.isascii() and k.isdigit())]:      # "²".isdigit() is True
            raise APIError(400, f"logit_bias keys must be token ids written as strings, like \"50256\"; got "
                           f"{bad[:5]}", param="logit_bias")
        try:
            return SamplingParams(
                n=self.num_candidates, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                seed=self.seed, max_tokens=max(1, max_tokens), min_tokens=self.min_tokens, stop=self.stop,
                stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
                # ranking best_of candidates needs each one's logprob (logprobs=0: the sampled token's)
                logprobs=0 if self.logprobs is None and self.num_candidates > self.n else self.logprobs,
                # echo + logprobs scores the prompt too, as OpenAI's API does
                prompt_logprobs=self.logprobs if self.echo else None, repetition_penalty=self.repetition_penalty,
                presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                logit_bias={int(k): v for k, v in bias.items()})
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e), param=field_named_in(e)) from None


def field_named_in(error: Exception) -> str | None:
    """The request field a SamplingParams or engine error message names, for "param"."""
    m = re.match(r"(?:SamplingParams\.)?(\w+)", str(error))
    return m.group(1) if m and m.group(1) in CompletionRequest.model_fields else None


# ---- errors: every client mistake becomes an OpenAI error object ------------------------
def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if errors and errors[0]["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON (at character {errors[0]['loc'][-1]})").response()
    where = lambda e: ".".join(str(x) for x in e["loc"][1:]) or "body"
    message = "; ".join(f"{where(e)}: {e['msg']}" for e in errors[:3])
    param = str(errors[0]["loc"][1]) if errors and len(errors[0]["loc"]) > 1 else None
    return APIError(400, message or "invalid request", param=param).response()


def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return APIError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)).response()


def internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return APIError(500, "internal server error; the server log has the details", type="server_error").response()


# ---- engine outputs -> responses ------------------------------------------------------------
def usage(outputs: Any) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)       # once per prompt, not per choice
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@dataclass(slots=True)
class _StreamChoice:
    """How much of one choice a stream has sent so far."""
    detok: IncrementalDetokenizer  # the tokens sent so far, as text: text_offset counts from it
    num_chars: int = 0             # characters of text sent
    num_tokens: int = 0            # tokens sent (their logprobs)
    done: bool = False


class Responses:
    """RequestOutputs -> OpenAI completion responses, for one served model."""

    def __init__(self, tokenizer: Tokenizer, model_name: str) -> None:
        self.tokenizer, self.model_name = tokenizer, model_name

    def _head(self, cid: str) -> dict:
        return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": self.model_name}

    def _logprobs(self, ids: list[int], lps: list[dict[int, float] | None],
                  detok: IncrementalDetokenizer, num_echo: int = 0) -> dict:
        """OpenAI's logprobs object for `ids`, of which the first `num_echo` are the echoed
        prompt; `detok` holds the choice's text before them (text_offset indexes the returned
        text) and gets them pushed. A generated EOS is not in the text, so it takes no room."""
        offsets = []
        for j, t in enumerate(ids):
            offsets.append(len(detok.text))
            if j < num_echo or t != self.tokenizer.eos_token_id:
                detok.push(t)
        word = self._token_string
        return {"tokens": [word(t) for t in ids],
                "token_logprobs": [None if lp is None else lp[t] for t, lp in zip(ids, lps)],
                "top_logprobs": [None if lp is None else {word(k): v for k, v in lp.items()} for lp in lps],
                "text_offset": offsets}

    def _token_string(self, token_id: int) -> str:
        """A token as logprobs show it. A GPT-2 token may hold part of a UTF-8 character (one
        emoji can be three tokens); OpenAI writes such a token as "bytes:\\xf0\\x9f", which
        keeps every token distinct and the bytes recoverable (U+FFFD would lose both)."""
        raw = self.tokenizer.token_bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    @staticmethod
    def _shown(req: CompletionRequest, out: RequestOutput) -> RequestOutput:
        """What the client sees of `out`: all of it, except
        - echo-only: no generated tokens (the engine's one token leaves text, logprobs, usage);
        - best_of > n: the n candidates with the highest logprob per token (OpenAI's "best"),
          renumbered 0..n-1, without the logprobs the ranking needed unless they were asked for."""
        if req.is_echo_only:
            hide = lambda c: dataclasses.replace(c, text="", token_ids=[], logprobs=None if c.logprobs is None else [],
                                                 finish_reason=c.finish_reason and "length")
            return dataclasses.replace(out, outputs=[hide(c) for c in out.outputs])
        if req.num_candidates > req.n and out.finished:
            per_token = lambda c: c.cumulative_logprob / max(1, len(c.token_ids))
            best = sorted(out.outputs, key=per_token, reverse=True)[:req.n]
            asked = req.logprobs is not None
            return dataclasses.replace(out, outputs=[
                dataclasses.replace(c, index=i, logprobs=c.logprobs if asked else None,
                                    cumulative_logprob=c.cumulative_logprob if asked else None)
                for i, c in enumerate(best)])
        return out

    def _echo(self, req: CompletionRequest, text: str | None, out: RequestOutput) -> tuple[str, list, list]:
        """What a choice starts with: with echo, the prompt's text, token ids and logprobs."""
        if not req.echo:
            return "", [], []
        text = text if text is not None else self.tokenizer.decode(out.prompt_token_ids)
        return text, list(out.prompt_token_ids), list(out.prompt_logprobs or [])

    async def collect(self, cid: str, req: CompletionRequest, texts: list[str | None],
                      results: AsyncIterator) -> dict:
        """One JSON body with every choice, once all of `results` ((prompt index, output)
        pairs) are in. `texts` are the prompts as sent (None for token ids), for echo."""
        final: dict[int, RequestOutput] = {}
        async with contextlib.aclosing(results):
            async for i, out in results:
                final[i] = self._shown(req, out)
        choices = []
        for i, out in sorted(final.items()):
            for c in out.outputs:
                text, ids, lps = self._echo(req, texts[i], out)
                lp = None if req.logprobs is None else self._logprobs(
                    ids + c.token_ids, lps + c.logprobs, IncrementalDetokenizer(self.tokenizer), len(ids))
                choices.append({"index": i * req.n + c.index, "text": text + c.text, "logprobs": lp,
                                "finish_reason": c.finish_reason})
        return {**self._head(cid), "choices": choices, "usage": usage(final.values())}

    async def stream(self, cid: str, req: CompletionRequest, texts: list[str | None], hold: int,
                     results: AsyncIterator) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, then `data: [DONE]`. The last `hold`
        characters of an unfinished choice wait for the next token (a stop string may be forming
        there). A client hang-up cancels this generator at an await; closing `results` then
        aborts the request."""
        head = self._head(cid)
        with_usage = req.stream_options is not None and req.stream_options.include_usage
        if with_usage:
            head["usage"] = None
        event = lambda data: f"data: {json.dumps({**head, **data})}\n\n"
        states: dict[int, _StreamChoice] = {}
        final: dict[int, RequestOutput] = {}
        try:
            async with contextlib.aclosing(results):
                async for i, out in results:
                    final[i] = out = self._shown(req, out)
                    for c in out.outputs:
                        k, text, ids, lps = i * req.n + c.index, "", [], []
                        if k not in states:                   # this choice's first chunk
                            states[k] = _StreamChoice(IncrementalDetokenizer(self.tokenizer))
                            text, ids, lps = self._echo(req, texts[i], out)
                        st, num_echo = states[k], len(ids)
                        if st.done:
                            continue
                        end = len(c.text) if c.finish_reason else max(st.num_chars, len(c.text) - hold)
                        text += c.text[st.num_chars:end]
                        ids += c.token_ids[st.num_tokens:]
                        lps += (c.logprobs or [])[st.num_tokens:]
                        st.num_chars, st.num_tokens, st.done = end, len(c.token_ids), c.finish_reason is not None
                        if text or st.done or (ids and req.logprobs is not None):
                            lp = None if req.logprobs is None else self._logprobs(ids, lps, st.detok, num_echo)
                            yield event({"choices": [{"index": k, "text": text, "logprobs": lp,
                                                      "finish_reason": c.finish_reason}]})
            if with_usage:
                yield event({"choices": [], "usage": usage(final.values())})
        except APIError as e:                  # timeout, shutdown: the stream ends with the error
            yield f"data: {json.dumps(e.body)}\n\n"
        yield "data: [DONE]\n\n"
