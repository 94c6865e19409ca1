"""GPT-2 BPE through tiktoken, against Hugging Face's GPT2Tokenizer, and streaming detokenization."""
from __future__ import annotations

import json

import pytest

from nanoserve.tokenizer import IncrementalDetokenizer, Tokenizer, _bundled_files

TEXTS = ["Hello, my name is", "def fibonacci(n):\n    return n if n < 2 else fibonacci(n-1)",
         "  leading spaces and\ttabs\n\n", "naïve café — 東京 😀🚀", "it's we'll they've I'M",
         "<|endoftext|>next document", "1234567890 3.14159"]


@pytest.fixture(scope="module")
def hf_tok():
    import transformers
    from transformers import GPT2Tokenizer
    merges, vocab = _bundled_files()
    if int(transformers.__version__.split(".")[0]) >= 5:     # v5 renamed the file arguments
        return GPT2Tokenizer(vocab=str(vocab), merges=str(merges))
    return GPT2Tokenizer(vocab_file=str(vocab), merges_file=str(merges))


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match_hugging_face(hf_tok, text):
    tok = Tokenizer()
    assert tok.encode(text) == hf_tok.encode(text)
    assert tok.decode(tok.encode(text)) == text


def test_streaming_never_emits_a_broken_character():
    """Emoji span several byte-level tokens; each pushed delta is whole characters only."""
    tok = Tokenizer()
    text = "a😀b🚀東京"
    ids = tok.encode(text)
    assert len(ids) > len(text)                           # some characters span tokens
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text == detok.text
    assert "" in deltas                                   # a partial character was held back


def test_checkpoint_vocab_files_take_precedence(tmp_path):
    """A model directory's vocab.json + merges.txt are used when present, not the bundled
    GPT-2 files: a checkpoint with only GPT-2's first 1,000 merges tokenizes with them."""
    merges, vocab = _bundled_files()
    lines = merges.read_text(encoding="utf-8").split("\n")
    K = 1000                                          # keep the header line and K merges
    (tmp_path / "merges.txt").write_text("\n".join(lines[:1 + K]) + "\n", encoding="utf-8")
    full = json.loads(vocab.read_text(encoding="utf-8"))
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for t, i in full.items() if i < 256 + K}))
    tok = Tokenizer(tmp_path)
    ids = tok.encode("Hello world")
    assert Tokenizer().encode("Hello world") == [15496, 995]     # GPT-2's full vocabulary
    assert ids != [15496, 995] and max(ids) < 256 + K            # the small one: more, smaller ids
    assert tok.decode(ids) == "Hello world"
    assert tok.eos_token_id == tok.vocab_size - 1 == 256 + K     # <|endoftext|> follows the merges
