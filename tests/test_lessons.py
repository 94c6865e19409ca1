"""The lessons in examples/ are specifications too: each one runs here, on the embedded model,
and we assert on what it computed (the variables it leaves behind), not only that it ran.

`run_lesson("01_tokens")` executes examples/01_tokens.py as a script (as `python
examples/01_tokens.py` would) with its figures sent to a temporary folder, and returns the
script's global variables.
"""
from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def run_lesson(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOSERVE_FIGURES", str(tmp_path))
    monkeypatch.syspath_prepend(str(EXAMPLES))        # for `from lesson_utils import ...`

    def run(name: str) -> dict:
        (path,) = EXAMPLES.glob(f"{name}.py")
        return runpy.run_path(str(path), run_name="__main__")
    return run


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
    assert lesson["gpu_rows"] and all(row.get("nanoserve") for row in lesson["gpu_rows"])
    assert lesson["figure_path"].is_file()
