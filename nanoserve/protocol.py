"""OpenAI's completions API as data: the request body (CompletionRequest), error objects
(APIError and the handlers that turn every client mistake into one, never a traceback), and
the responses built from engine outputs: one JSON body, or server-sent events chunk by chunk.

Nothing here knows about the engine thread, admission or sockets; server.py does. What a
client sees on the wire is decided in this file, so it reads against OpenAI's reference:
https://platform.openai.com/docs/api-reference/completions

References: vLLM `entrypoints/openai/protocol.py` and `serving_completion.py`.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from .sequence import CompletionOutput, RequestOutput, SamplingParams
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
    include_usage: bool = False           # a last chunk with usage (and "usage": null on the others)
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, every chunk carries its choice's usage


class CompletionRequest(BaseModel):
    # strict: "5" is not an int and true is not a number. forbid: an unknown option is a 400,
    # never a silently ignored setting.
    model_config = ConfigDict(strict=True, extra="forbid")
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)     # None: up to the context length; 0 needs echo
    max_completion_tokens: int | None = Field(None, ge=0)   # OpenAI's newer name (guidellm sends both)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)   # a torch generator's seed is 64 bits
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
    # vLLM's extensions, with vLLM's meaning (null: the default, as vLLM takes it).
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False         # the text keeps the stop string that ended it
    skip_special_tokens: bool = True                 # False: a generated <|endoftext|> is text too
    spaces_between_special_tokens: bool = True       # no effect while special tokens are skipped
    truncate_prompt_tokens: int | None = Field(None, ge=-1)   # keep the last k prompt tokens; -1: n_ctx
    prompt_logprobs: int | None = Field(None, ge=0, le=20)    # vLLM's per-prompt-token dicts in each choice

    @model_validator(mode="after")
    def _one_max_tokens(self) -> "CompletionRequest":
        if self.max_completion_tokens is not None:
            if "max_tokens" in self.model_fields_set and self.max_tokens != self.max_completion_tokens:
                raise ValueError(f"max_tokens={self.max_tokens} and max_completion_tokens="
                                 f"{self.max_completion_tokens} differ; send one of them")
            self.max_tokens = self.max_completion_tokens
        return self

    @property
    def num_candidates(self) -> int:
        """Completions the engine runs per prompt: best_of of them when it asks for more than n
        (not for echo-only scoring, where every candidate would be the same prompt)."""
        return self.n if self.is_echo_only else max(self.n, self.best_of or 1)

    @property
    def is_echo_only(self) -> bool:
        """max_tokens=0 with echo: score the prompt, generate nothing. Evaluation tools ask for
        prompt logprobs this way (lm-evaluation-harness's loglikelihood). The engine runs one
        token anyway, because it scores a prompt as part of a prefill; Responses hides it."""
        return self.echo and self.max_tokens == 0

    @property
    def num_prompt_logprobs(self) -> int | None:
        """Top logprobs per prompt token the engine must compute: for echo with logprobs, and
        for vLLM's prompt_logprobs; the larger, since one run serves both."""
        asked = [k for k in (self.logprobs if self.echo else None, self.prompt_logprobs) if k is not None]
        return max(asked) if asked else None

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """SamplingParams for a request whose max_tokens, resolved, is `max_tokens`."""
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens=0 generates nothing; it is allowed only with echo=true, to score "
                           "the prompt", param="max_tokens")
        if self.suffix:
            raise APIError(400, "suffix is not supported: GPT-2 has no fill-in-the-middle mode", param="suffix")
        if self.truncate_prompt_tokens == 0:
            raise APIError(400, "truncate_prompt_tokens=0 would leave no prompt; use -1 (the context length) or "
                           "a count >= 1", param="truncate_prompt_tokens")
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
                n=self.num_candidates, temperature=self.temperature, top_p=self.top_p,
                top_k=-1 if self.top_k is None else self.top_k, min_p=self.min_p or 0.0,
                seed=self.seed, max_tokens=max(1, max_tokens), min_tokens=self.min_tokens, stop=self.stop,
                stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
                skip_special_tokens=self.skip_special_tokens,
                # ranking best_of candidates needs each one's logprob (logprobs=0: the sampled token's)
                logprobs=0 if self.logprobs is None and self.num_candidates > self.n else self.logprobs,
                prompt_logprobs=self.num_prompt_logprobs,
                repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
                presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                logit_bias={int(k): v for k, v in bias.items()})
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e), param=field_named_in(e)) from None


class TokenizeRequest(BaseModel):
    """vLLM's POST /tokenize body (completions form)."""
    model_config = ConfigDict(strict=True, extra="forbid")
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True   # GPT-2 adds none either way
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    """vLLM's POST /detokenize body."""
    model_config = ConfigDict(strict=True, extra="forbid")
    model: str | None = None
    tokens: list[int]


def field_named_in(error: Exception) -> str | None:
    """The request field a SamplingParams or engine error message names, for "param"."""
    m = re.match(r"(?:SamplingParams\.)?(\w+)", str(error))
    return m.group(1) if m and m.group(1) in CompletionRequest.model_fields else None


# ---- errors: every client mistake becomes an OpenAI error object ------------------------
def api_error(request: Request, exc: APIError) -> JSONResponse:
    """Every error response goes through here, so the server log says why, not just "400"."""
    error = exc.body["error"]
    log.log(logging.WARNING if exc.status >= 500 else logging.INFO, "%s %s -> %d %s: %s", request.method,
            request.url.path, exc.status, error["param"] or error["code"] or error["type"], error["message"])
    return exc.response()


def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if errors and errors[0]["type"] == "json_invalid":
        return api_error(request, APIError(400, f"the request body is not valid JSON (at character "
                                                f"{errors[0]['loc'][-1]})"))
    where = lambda e: ".".join(str(x) for x in e["loc"][1:]) or "body"
    message = "; ".join(f"{where(e)}: {e['msg']}" for e in errors[:3])
    param = str(errors[0]["loc"][1]) if errors and len(errors[0]["loc"]) > 1 else None
    return api_error(request, APIError(400, message or "invalid request", param=param))


def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return api_error(request, APIError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)))


def internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return APIError(500, "internal server error; the server log has the details", type="server_error").response()


def openapi_with_400(app: Any) -> dict:
    """FastAPI's OpenAPI schema, saying what the server sends: a bad body is a 400 with an
    OpenAI error object (FastAPI would document its own 422, which we never send)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        error = {"type": "object", "properties": {"error": {"type": "object", "properties": {
            k: {"type": "string"} for k in ("message", "type", "param", "code")}}}}
        for path in schema["paths"].values():
            for op in path.values():
                if op.get("responses", {}).pop("422", None) is not None:
                    op["responses"]["400"] = {"description": "Bad request (an OpenAI error object)",
                                              "content": {"application/json": {"schema": error}}}
        schema.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
        schema.get("components", {}).get("schemas", {}).pop("ValidationError", None)
        app.openapi_schema = schema
    return app.openapi_schema


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
