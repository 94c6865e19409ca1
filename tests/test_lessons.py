"""The lessons in examples/ are specifications too: each one runs here, on the embedded model,
and we assert on what it computed (the variables it leaves behind), not only that it ran.

`run_lesson("01_tokens")` executes examples/01_tokens.py as a script (as `python
examples/01_tokens.py` would) with its figures sent to a temporary folder, and returns the
script's global variables.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def run_lesson(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOSERVE_FIGURES", str(tmp_path))
    monkeypatch.syspath_prepend(str(EXAMPLES))        # for `from lesson_utils import ...`
    # lesson_utils reads NANOSERVE_FIGURES when imported: import it afresh for this tmp_path.
    monkeypatch.delitem(sys.modules, "lesson_utils", raising=False)

    def run(name: str) -> dict:
        (path,) = EXAMPLES.glob(f"{name}.py")
        return runpy.run_path(str(path), run_name="__main__")
    return run


def test_tokens_lesson_pure_python_bpe_matches_tiktoken_and_streams_split_characters(run_lesson):
    """Lesson 1's pure-Python BPE gives tiktoken's ids on every sample string (a few hundred),
    and streaming a text whose characters span tokens holds back the halves and ends equal to decode()."""
    g = run_lesson("01_tokens")
    assert len(g["samples"]) >= 300 and g["num_sample_tokens"] > 1000
    assert g["ours"] == g["theirs"] and g["num_bpe_mismatches"] == 0
    assert g["num_held_back"] > 0
    assert "".join(g["streamed"]) == g["tok"].decode(g["stream_ids"]) == g["stream_text"]


def test_forward_lesson_logits_match_the_dense_reference(run_lesson):
    """Lesson 2's forward over the paged cache gives logits for every prompt position within
    1e-4 of a dense causal GPT-2 over the same weights, and a top-10 sorted by probability."""
    g = run_lesson("02_forward")
    assert tuple(g["logits"].shape) == (g["N"], g["cfg"].vocab_size)
    assert g["max_logit_diff"] < 1e-4
    probs = [p for _, p in g["top_tokens"]]
    assert len(probs) == 10 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1


def test_kv_cache_lesson_recompute_does_quadratic_work_for_the_same_tokens(run_lesson, tmp_path):
    """Lesson 3: with and without the KV cache the tokens are identical; the cache pushes
    P + G - 1 tokens through the model, recomputing G*P + G(G-1)/2, and is faster by the end."""
    g = run_lesson("03_kv_cache")
    P, G = g["P"], g["G"]
    assert g["cached_ids"] == g["recompute_ids"] and len(g["cached_ids"]) == G
    assert g["total_cached"] == P + G - 1
    assert g["total_recompute"] == G * P + G * (G - 1) // 2
    assert g["late_slowdown"] > 1      # paired per step, so a busy machine slows both alike
    assert g["kv_bytes_per_token"] == 2 * 3 * 256 * 4     # L=3, C=256, float32
    assert (tmp_path / "03_kv_cache.png").is_file()
