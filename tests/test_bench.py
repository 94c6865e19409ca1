"""The benchmark's peers: a missing vLLM is reported as not run, never as a number."""
from __future__ import annotations

import sys

from nanoserve.bench_gpu import vllm_compare


def test_vllm_comparison_says_so_when_vllm_is_not_importable(monkeypatch, capsys, tmp_path):
    """`--compare vllm` without an importable vLLM records why, prints it with DESIGN.md's dated
    figures, and returns no vLLM throughput."""
    monkeypatch.setitem(sys.modules, "vllm", None)          # `import vllm` now raises ImportError
    row = vllm_compare(tmp_path, [[1, 2, 3]], 4, [[1, 2]])
    assert "vllm_tok_s" not in row and "import of vllm" in row["vllm_error"]
    out = capsys.readouterr().out
    assert "vLLM: not run" in out and "2026-11-30" in out
