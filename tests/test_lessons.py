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
def test_paging_lesson_holds_under_one_block_of_waste_per_sequence_and_no_shared_slots(run_lesson, tmp_path):
    """Lesson 4: paged, each sequence wastes less than one block; no two sequences share a
    slot; a contiguous cache reserving prompt + max_tokens wastes more, n_ctx more still."""
    g = run_lesson("04_paging")
    BS = g["BLOCK_SIZE"]
    assert len(g["seqs"]) == len(g["PROMPT_LENS"])          # all still running at the snapshot
    for seq_id, used, paged, contiguous, n_ctx in g["rows"]:
        assert used <= paged < used + BS <= contiguous + BS
    owned = [set(v) for v in g["slots"].values()]
    assert sum(map(len, owned)) == len(set().union(*owned))
    assert g["written"] == set().union(*owned)
    assert g["waste"]["paged"] < g["waste"]["prompt+max"] < g["waste"]["n_ctx"]
    assert (tmp_path / "04_paging.png").stat().st_size > 0


def test_batching_lesson_timeline_shows_preemption_chunking_and_a_prefix_hit_with_unchanged_tokens(run_lesson, tmp_path):
    """Lesson 5: on a 12-block pool with a 24-token budget, the recorded timeline holds a
    preemption, the 60-token prompt runs in several chunks within the budget, D takes A's
    cached blocks, and every request's greedy tokens equal its tokens run alone."""
    g = run_lesson("05_continuous_batching")
    kinds = [kind for row in g["timeline"] for kind, _ in row.values()]
    assert "preempted" in kinds and "recompute" in kinds
    assert g["engine"].scheduler.num_preemptions == kinds.count("preempted")
    assert len(g["chunks_of_a"]) >= 2 and sum(g["chunks_of_a"]) == 60 and max(g["chunks_of_a"]) <= g["BUDGET"]
    assert any(name == "D" and n >= g["BLOCK_SIZE"] for (name, _), n in g["hits"].items())
    assert g["batched"] == g["alone"] and all(len(t) > 0 for t in g["batched"].values())
    assert (tmp_path / "05_continuous_batching.png").stat().st_size > 0


def test_sampling_lesson_draws_follow_each_filtered_distribution_and_seeds_are_batch_invariant(run_lesson, tmp_path):
    """Lesson 6: the real Sampler's draw frequencies match the lesson's filtered distribution
    for every setting (within 5 standard errors, never outside its support); top-k keeps k
    tokens and top-p/min-p fewer than all; a seeded request's tokens are the same alone and
    batched, while the shared generator's change with the batch."""
    g = run_lesson("06_sampling")
    K, N = g["K"], g["N_DRAWS"]
    for name, q in g["expected"].items():
        f = g["observed"][name]
        assert abs(q.sum().item() - 1) < 1e-5 and abs(f.sum().item() - 1) < 1e-6
        assert ((f - q).abs() <= 5 * (q * (1 - q) / N).sqrt() + 1 / N).all(), name
        assert (f[q == 0] == 0).all(), name
    kept = {name: int((q > 0).sum()) for name, q in g["expected"].items()}
    assert kept["top_k=5"] == 5 and kept["the model (T=1)"] == K
    assert 1 < kept["top_p=0.8"] < K and 1 < kept["min_p=0.1"] < K
    assert g["expected"]["temperature=0.5"][0] > g["expected"]["the model (T=1)"][0] > g["expected"]["temperature=1.5"][0]
    assert g["same_seed"]["alone"] == g["same_seed"]["batched"] and len(g["same_seed"]["alone"]) == 12
    assert g["shared"]["alone"] != g["shared"]["batched"]
    assert (tmp_path / "06_sampling.png").stat().st_size > 0


def test_prefix_caching_lesson_shares_exactly_the_common_full_blocks(run_lesson):
    """Lesson 7: blocks of a shared prefix hash equal and later ones differ; a block's hash
    depends on the tokens before it; with the cache on, the batch takes every full block it
    shares with the first request from the cache (and no token changes), with it off none."""
    lesson = run_lesson("07_prefix_caching")
    n = lesson["num_shared_blocks"]
    assert n >= 2 and lesson["hashes_a"][:n] == lesson["hashes_b"][:n]
    assert all(a != b for a, b in zip(lesson["hashes_a"][n:], lesson["hashes_b"][n:]))
    assert lesson["block_hashes"](lesson["moved"])[1] != lesson["hashes_a"][1]
    assert lesson["cached_off"] == 0
    assert lesson["cached_on"] == lesson["expected"] > 0.9 * lesson["num_batch_prompt_tokens"]
    assert lesson["tokens_on"] == lesson["tokens_off"]


def test_serving_lesson_matches_generate_frees_a_cancelled_stream_and_shuts_down(run_lesson):
    """Lesson 8: the server's greedy text equals LLM.generate's and its stream adds up to it; a
    stream closed midway shows in /metrics as aborted with no KV block left in use; afterwards
    the server is gone (its thread ended, its port refuses connections). Every wait in the
    lesson has a deadline, so this test cannot hang."""
    for module in ("fastapi", "uvicorn", "httpx", "openai"):
        pytest.importorskip(module, reason="pip install -e '.[lessons]' to run the serving lesson")
    import httpx
    lesson = run_lesson("08_serving")
    assert lesson["server_text"] == lesson["offline_text"] == lesson["streamed_text"] != ""
    metric, after = lesson["metric"], lesson["after_cancel"]
    assert lesson["blocks_while_streaming"] > 0
    assert metric(after, "finish", "abort") == 1 and metric(after, "blocks", "used") == 0
    assert not lesson["server_thread"].is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(lesson["base"] + "/health", timeout=5)


def test_benchmarking_lesson_measures_latency_throughput_and_a_profile(run_lesson):
    """Lesson 9: one request's TTFT comes before its finish; 8 requests in one call make more
    output tokens/s than one; the profile of decode steps has operator rows; the GPU table of
    BENCHMARKS.md parses into rows; the throughput figure is written."""
    lesson = run_lesson("09_benchmarking")
    one, batch = lesson["results"][1], lesson["results"][8]
    assert 0 < one["ttft"] <= one["total"] <= one["wall"]
    assert batch["tok_per_s"] > one["tok_per_s"]
    assert len(lesson["profile_rows"]) > 0
    assert lesson["gpu_rows"] and all(row.get(lesson["ours"]) and row.get(lesson["hf"]) for row in lesson["gpu_rows"])
    assert lesson["figure_path"].is_file()


def test_long_sequences_lesson_shifts_past_n_ctx_and_a_window_bounds_memory(run_lesson):
    """Lesson 10: 1000 prompt tokens + 300 new cross n_ctx twice, each shift counted and the
    sequence never above cdiv(n_ctx, block_size) blocks; after the first shift the tokens equal
    a fresh continuation of the kept window; a sliding window of 128 holds at most 9 blocks
    where full attention grows past it; the pool-usage figure is written."""
    lesson = run_lesson("10_long_sequences")
    assert lesson["out_shift"].metrics.num_shifts == len(lesson["shift_steps"]) == 2
    assert max(lesson["used_shift"]) == 64 and 0 in lesson["used_shift"]
    assert lesson["fresh"].outputs[0].token_ids == lesson["after_shift"] and len(lesson["after_shift"]) == 16
    assert max(lesson["used_window"]) <= 9 < max(lesson["used_full"])
    assert lesson["evicted"] > 0
    assert lesson["figure_path"].is_file()
