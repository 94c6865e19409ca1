"""GPT-2's byte-level BPE tokenizer, through tiktoken, plus incremental detokenization.

The vocabulary and merges come from a checkpoint directory's vocab.json + merges.txt when it
has them, otherwise from the embedded model's copies (weights/nanoserve-stdlib-tiny/, GPT-2's
own files, MIT), so tokenizing never needs the network. An installed copy without the repository
(a wheel) falls back to tiktoken's own "gpt2" encoding, which tiktoken downloads once and caches.

A GPT-2 token is a byte string, not a character: "é" or an emoji can span two tokens. The
detokenizer therefore feeds bytes through an incremental UTF-8 decoder, which holds back a
partial character until the token that completes it arrives. Streaming never shows a broken
character, and the final text equals decoding all tokens at once.

References: openai/gpt-2 encoder.py, tiktoken `load.data_gym_to_mergeable_bpe_ranks`.
"""
from __future__ import annotations

import codecs
import functools
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

# GPT-2's pre-tokenization regex: contractions, letters, numbers, punctuation, whitespace.
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"


# GPT-2's merges.txt + vocab.json, committed with the embedded model (an editable install,
# `pip install -e .`, reads them from the repository).
DEFAULT_VOCAB_DIR = Path(__file__).resolve().parent.parent / "weights" / "nanoserve-stdlib-tiny"


def vocab_files(model_dir: str | Path | None = None) -> tuple[Path, Path]:
    """(merges.txt, vocab.json): the model directory's when it has both, else GPT-2's."""
    for d in ([Path(model_dir)] if model_dir is not None else []) + [DEFAULT_VOCAB_DIR]:
        if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            return d / "merges.txt", d / "vocab.json"
    raise FileNotFoundError(f"GPT-2's vocab.json and merges.txt are in neither {model_dir} nor {DEFAULT_VOCAB_DIR}; "
                            "copy them into the model directory (install nanoserve with `pip install -e .`)")


@functools.lru_cache(maxsize=8)
def _load_encoding(merges: str, vocab: str) -> tiktoken.Encoding:
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=merges, encoder_json_file=vocab)
    return tiktoken.Encoding(name="gpt2", pat_str=_GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT: len(ranks)})


class Tokenizer:
    """text <-> token ids for GPT-2. `model_dir` may hold vocab.json + merges.txt."""

    def __init__(self, model_dir: str | Path | None = None) -> None:
        try:
            merges, vocab = vocab_files(model_dir)
            self.enc = _load_encoding(str(merges), str(vocab))
        except FileNotFoundError:
            # Same ranks, pattern and <|endoftext|>; tiktoken checks the files' SHA-256.
            self.enc = tiktoken.get_encoding("gpt2")
        self.eos_token_id: int = self.enc.eot_token       # 50256 for GPT-2
        self.vocab_size: int = self.enc.n_vocab            # 50257

    def encode(self, text: str) -> list[int]:
        # "<|endoftext|>" in the text becomes token 50256, as Hugging Face's GPT2Tokenizer does.
        return self.enc.encode(text, allowed_special="all")

    def decode(self, token_ids: list[int]) -> str:
        return self.enc.decode(list(token_ids), errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self.enc.decode_single_token_bytes(token_id)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text, never splitting a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""          # all complete characters so far

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly "")."""
        delta = self.decoder.decode(self.tokenizer.token_bytes(token_id))
        self.text += delta
        return delta

    def flush(self) -> str:
        """The sequence ended: a held-back partial character becomes U+FFFD, as in decode()."""
        delta = self.decoder.decode(b"", final=True)
        self.text += delta
        return delta
