"""OpenAI's completions API as data: the request body (CompletionRequest) and error objects
(APIError and the handlers that turn every client mistake into one, never a traceback). The
responses built from engine outputs are responses.py's.

Nothing here knows about the engine thread, admission or sockets; server.py does. What a
client sees on the wire is decided in this file, so it reads against OpenAI's reference:
https://platform.openai.com/docs/api-reference/completions

References: vLLM `entrypoints/openai/protocol.py`.
"""
from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from .sequence import SamplingParams

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
