"""Lesson 1: tokens. GPT-2's byte-level BPE written out in pure Python, next to tiktoken's.
Read beside it: nanoserve/tokenizer.py (tiktoken + the incremental detokenizer).
Try: add your own strings to EXTRA, or print the merges that build one long word.
"""
# %% [markdown]
# A model reads integers, not text. GPT-2 turns text into ids in three moves:
# 1. text -> UTF-8 bytes, each byte shown as one printable character (the byte-to-unicode trick);
# 2. a regex cuts the text into words, so that merges never cross a word boundary;
# 3. inside each word, BPE merges the adjacent pair with the best (lowest) rank, again and again.

# %%
import json
import textwrap
import time
from pathlib import Path

import regex   # like `re`, plus the \p{L} (any letter) and \p{N} (any number) classes

from lesson_utils import MODEL_DIR, check
from nanoserve.tokenizer import IncrementalDetokenizer, Tokenizer, vocab_files

tok = Tokenizer(MODEL_DIR)
merges_path, vocab_path = vocab_files(MODEL_DIR)   # the same two files nanoserve's Tokenizer reads
print(f"vocab:  {vocab_path}\nmerges: {merges_path}")

# %% [markdown]
# **The byte-to-unicode trick.** BPE works on strings, and vocab.json stores tokens as strings,
# but a token is really a byte string. GPT-2 maps each of the 256 bytes to one printable
# character: the 188 printable Latin-1 bytes stand for themselves, the other 68 (space, control
# bytes, ...) move to code points from 256 on. So a space is "Ġ" and a newline "Ċ" in vocab.json.

# %%
def bytes_to_unicode() -> dict[int, str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in printable]   # each gets the next code point from 256
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(moved)}


byte_to_char = bytes_to_unicode()
print(f"{len(set(byte_to_char.values()))} distinct characters for 256 bytes; "
      f"space -> {byte_to_char[32]!r}, newline -> {byte_to_char[10]!r}, 'A' -> {byte_to_char[65]!r}")

# %% [markdown]
# **Pre-tokenization.** The regex splits off contractions ('s 't 're 've 'm 'll 'd), words with
# their leading space, numbers, runs of punctuation, and whitespace (a run of spaces keeps its
# last space for the word after it: `\s+(?!\S)`). It is the pattern nanoserve gives tiktoken.

# %%
PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
word_re = regex.compile(PATTERN)
print(word_re.findall("We'll cache   42 K/V blocks, won't we?"))
check("our regex is the one nanoserve's tiktoken encoding uses", PATTERN == tok.enc._pat_str)

# %% [markdown]
# **BPE.** merges.txt lists 50,000 pairs, best first; vocab.json maps each final token string
# to its id. The loop: find the pair of neighbours with the lowest rank, merge every
# occurrence of it, repeat until no neighbouring pair is in the list.

# %%
merge_lines = Path(merges_path).read_text(encoding="utf-8").splitlines()[1:]   # line 0: "#version"
merge_rank = {tuple(line.split()): rank for rank, line in enumerate(merge_lines) if line}
vocab = json.loads(Path(vocab_path).read_text(encoding="utf-8"))              # token string -> id
print(f"{len(merge_rank):,} merges, {len(vocab):,} tokens; the first merges: {merge_lines[:4]}")


def bpe(word: str) -> list[str]:
    """One pre-tokenized word (in byte-characters) -> its BPE tokens."""
    parts = list(word)                                  # start from single bytes
    while len(parts) > 1:
        pairs = set(zip(parts, parts[1:]))
        best = min(pairs, key=lambda p: merge_rank.get(p, float("inf")))
        if best not in merge_rank:
            break                                       # no mergeable neighbours left
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def encode(text: str) -> list[int]:
    ids = []
    for word in word_re.findall(text):
        chars = "".join(byte_to_char[b] for b in word.encode("utf-8"))
        ids += [vocab[t] for t in bpe(chars)]
    return ids


example = " tokenization"
print(f"{example!r} -> {bpe(example.replace(' ', byte_to_char[32]))} -> {encode(example)}")

# %% [markdown]
# **Checked against tiktoken** (nanoserve's Tokenizer) on every line of a stdlib source file
# plus strings that stress the edges: contractions, runs of whitespace, accents, CJK, emoji.

# %%
EXTRA = ["I'm sure they'll say it's done, we've seen it", "don't DON'T Don't", "   four spaces",
         "tabs\tand\n\nnewlines  \n", "naïve café résumé", "日本語のテキスト", "東京 😀🚀 👍🏽",
         "x² + y³ = ½", "3.14159 1,000,000", "emoji🤗inside", "  trailing   ", "Ω≈ç√∫˜µ≤≥÷"]
samples = Path(textwrap.__file__).read_text(encoding="utf-8").splitlines() + EXTRA
t0 = time.perf_counter()
ours = [encode(s) for s in samples]
t1 = time.perf_counter()
theirs = [tok.encode(s) for s in samples]
t2 = time.perf_counter()
num_bpe_mismatches = sum(a != b for a, b in zip(ours, theirs))
num_sample_tokens = sum(map(len, theirs))
print(f"{len(samples)} strings, {num_sample_tokens:,} tokens: pure Python {1e3 * (t1 - t0):.0f} ms, "
      f"tiktoken {1e3 * (t2 - t1):.1f} ms")
check(f"pure-Python BPE gives tiktoken's ids on all {len(samples)} strings", num_bpe_mismatches == 0)

# %% [markdown]
# **Streaming text.** A token is bytes, so one character can be split across tokens: an emoji
# is 4 bytes, a CJK character 3. Decoding each token alone shows "�" halves. nanoserve's
# IncrementalDetokenizer feeds bytes through an incremental UTF-8 decoder, which holds back a
# partial character until the token that completes it arrives.

# %%
stream_text = "Hi 🤗 東京"
stream_ids = tok.encode(stream_text)
detok = IncrementalDetokenizer(tok)
streamed = []                                  # what a client sees after each token
print(f"{'id':>6}  {'bytes':<16} {'alone':<8} streamed")
for t in stream_ids:
    streamed.append(detok.push(t))
    print(f"{t:>6}  {str(tok.token_bytes(t)):<16} {tok.decode([t])!r:<8} {streamed[-1]!r}")
streamed.append(detok.flush())
num_held_back = sum(d == "" for d in streamed[:-1])
print(f"{len(stream_ids)} tokens for {len(stream_text)} characters; {num_held_back} pushes showed nothing yet")
check("a character is split across tokens (some token alone is not valid UTF-8)",
      any("\ufffd" in tok.decode([t]) for t in stream_ids))
check("streaming never shows a broken character", not any("\ufffd" in d for d in streamed))
check("the streamed text equals decode() of all tokens", "".join(streamed) == tok.decode(stream_ids) == stream_text)
