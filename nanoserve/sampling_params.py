"""SamplingParams: what a request asks of the sampler and of the stop conditions.

The fields and defaults follow vLLM's SamplingParams (and OpenAI's three knobs: presence and
frequency penalties, logit_bias). Construction does two separate things: it normalises the
forms a caller may use (stop="x" -> ["x"], top_k=-1 -> 0, None -> empty), then checks every
value against a table of rules, raising an error that names the field and its limits.

References: vLLM `sampling_params.py`, OpenAI's completions API.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

_INTS = ("n", "top_k", "max_tokens", "min_tokens")
# Temperatures below this are greedy (vLLM's rule): dividing logits by 1e-40 overflows to inf,
# and softmax of inf - inf is NaN, which would draw token 0 every time.
GREEDY_TEMPERATURE = 1e-5
_NUMBERS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)      # True is an int to Python


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# field -> (rule its value must satisfy, what to tell the caller). Checked after the types.
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n": (lambda v: v >= 1, "must be >= 1"),
    "temperature": (lambda v: v >= 0, "must be >= 0 (0 means greedy)"),
    "top_p": (lambda v: 0.0 < v <= 1.0, "must be in (0, 1]"),
    "top_k": (lambda v: v >= -1, "must be -1, 0 (all tokens) or a positive count"),
    "min_p": (lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]"),
    "max_tokens": (lambda v: v >= 1, "must be >= 1"),
    "repetition_penalty": (lambda v: v > 0, "must be > 0 (1 means no penalty)"),
    "presence_penalty": (lambda v: -2.0 <= v <= 2.0, "must be in [-2, 2] (0 means no penalty)"),
    "frequency_penalty": (lambda v: -2.0 <= v <= 2.0, "must be in [-2, 2] (0 means no penalty)"),
    "logprobs": (lambda v: v is None or (_is_int(v) and v >= 0), "must be None or an int >= 0"),
    "prompt_logprobs": (lambda v: v is None or (_is_int(v) and v >= 0), "must be None or an int >= 0"),
    "truncate_prompt_tokens": (lambda v: v is None or (_is_int(v) and v >= 1),
                               "must be None or an int >= 1 (prompt tokens to keep, from the end)"),
    "logit_bias": (lambda d: all(_is_int(t) and _is_number(b) and -100 <= b <= 100 for t, b in d.items()),
                   "must map token ids (ints) to biases in [-100, 100]"),
    "stop": (lambda v: all(v), "must not contain an empty string (it would match everywhere)"),
}


@dataclass
class SamplingParams:
    n: int = 1                          # completions per prompt
    temperature: float = 1.0            # 0 (or anything below 1e-5) means greedy (argmax)
    top_p: float = 1.0                  # nucleus: smallest set of tokens with this much probability
    top_k: int = 0                      # keep the k most likely tokens; 0 or -1: all
    min_p: float = 0.0                  # drop tokens less likely than min_p * the top token
    seed: int | None = None             # per-request RNG: same tokens alone or in any batch
    max_tokens: int = 16                # tokens to generate, at most
    min_tokens: int = 0                 # EOS and stop token ids are suppressed until this many
    stop: str | list[str] | None = None # stop strings; the text is cut before them
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True    # False: a generated <|endoftext|> shows in the text (except one that stopped it)
    logprobs: int | None = None         # top-k logprobs (plus the sampled token's) per output token
    prompt_logprobs: int | None = None  # same for each prompt token after the first
    repetition_penalty: float = 1.0     # > 1 discourages tokens already in prompt or output
    presence_penalty: float = 0.0       # OpenAI's: subtracted once from each token the output holds
    frequency_penalty: float = 0.0      # OpenAI's: subtracted per time the output holds the token
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (OpenAI's, in [-100, 100])
    truncate_prompt_tokens: int | None = None   # keep only the prompt's last k tokens (vLLM's); None: all

    def __post_init__(self) -> None:
        self._check_types()
        self._normalise()
        for name, (ok, limit) in _RULES.items():
            if not ok(getattr(self, name)):
                raise self._invalid(name, limit)
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise self._invalid("min_tokens", f"must be in [0, max_tokens={self.max_tokens}]")

    def _check_types(self) -> None:
        """TypeError for a value of the wrong kind; NaN and infinities are refused here too,
        since they slip through every comparison in _RULES."""
        for name in _INTS:
            if not _is_int(v := getattr(self, name)):
                raise TypeError(f"SamplingParams.{name} must be an int, got {type(v).__name__} {v!r}")
        for name in _NUMBERS:
            if not _is_number(v := getattr(self, name)):
                raise TypeError(f"SamplingParams.{name} must be a number, got {type(v).__name__} {v!r}")
            if not math.isfinite(v):
                raise self._invalid(name, "must be a finite number")
        if self.seed is not None and not _is_int(self.seed):
            raise TypeError(f"SamplingParams.seed must be an int or None, got {self.seed!r}")
        for name in ("ignore_eos", "skip_special_tokens"):   # "no" is truthy: it would mean True
            if not isinstance(v := getattr(self, name), bool):
                raise TypeError(f"SamplingParams.{name} must be a bool, got {type(v).__name__} {v!r}")
        self._check_list("stop", lambda x: isinstance(x, str), "strings", allow_one=True)
        self._check_list("stop_token_ids", _is_int, "ints")
        if not isinstance(self.logit_bias, (dict, type(None))):
            raise TypeError(f"SamplingParams.logit_bias must be a dict {{token_id: bias}} or None, "
                            f"got {type(self.logit_bias).__name__}")

    def _check_list(self, name: str, ok: Callable[[Any], bool], what: str, allow_one: bool = False) -> None:
        """TypeError unless field `name` is None or a list/tuple of items that pass `ok` (or,
        with allow_one, a single such item)."""
        v = getattr(self, name)
        if v is None or (allow_one and ok(v)):
            return
        if not isinstance(v, (list, tuple)) or not all(ok(x) for x in v):
            one = "one or " if allow_one else ""
            raise TypeError(f"SamplingParams.{name} must be {one}a list of {what}, got {v!r:.80}")

    def _normalise(self) -> None:
        """One form per field, so that nothing downstream meets None or a bare string."""
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = dict(self.logit_bias or {})
        if self.top_k == -1:
            self.top_k = 0                  # vLLM spells "all tokens" -1; we keep one spelling

    def _invalid(self, name: str, limit: str) -> ValueError:
        return ValueError(f"SamplingParams.{name}={getattr(self, name)!r} is invalid: {limit}")

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ValueError if a token id or a logprobs count does not fit a vocabulary of
        `vocab_size` tokens (known only once the model is: the engine calls this). The engine
        passes the ids both the model and the tokenizer know, so a checkpoint's padded ids
        (nanoGPT's 50257..50303) are refused here: logit_bias can never force one."""
        V = vocab_size
        for name, token_ids in [("stop_token_ids", self.stop_token_ids), ("logit_bias", list(self.logit_bias))]:
            if bad := [t for t in token_ids if not 0 <= t < V]:
                raise ValueError(f"{name} has token ids {bad[:5]} outside the vocabulary [0, {V})")
        for name in ("logprobs", "prompt_logprobs"):
            if (k := getattr(self, name)) is not None and k > V:
                raise ValueError(f"{name}={k} asks for more tokens than the vocabulary has ({V})")

    @property
    def needs_output_history(self) -> bool:
        """Whether the next token's logits depend on the output so far (penalties, min_tokens):
        such a sequence cannot be scheduled before its last token is known (async scheduling)."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.min_tokens > 0)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def plain_greedy(self) -> bool:
        """The next token is the argmax of the model's logits, and nothing else is asked:
        the sampler's fast path."""
        return self.is_greedy and self.logprobs is None and not self.logit_bias and not self.needs_output_history
