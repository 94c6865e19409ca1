"""The benchmarks: a missing vLLM is reported as not run, never as a number; the CPU benchmark
runs the mode it is asked for and records it (nanoserve/bench.py, bench_gpu.py)."""
from __future__ import annotations

import json
import subprocess
import sys

from nanoserve.bench_gpu import vllm_compare


def test_vllm_comparison_says_so_when_vllm_is_not_importable(monkeypatch, capsys, tmp_path):
    """`--compare vllm` without an importable vLLM records why, prints it with DESIGN.md's dated
    figures, and returns no vLLM throughput."""
    monkeypatch.setitem(sys.modules, "vllm", None)          # `import vllm` now raises ImportError
    row, = vllm_compare(tmp_path, [([[1, 2, 3]], 4)], [[1, 2]])
    assert "vllm_tok_s" not in row and "import of vllm" in row["vllm_error"]
    out = capsys.readouterr().out
    assert "vLLM: not run" in out and "2026-11-30" in out


def test_bench_cpu_with_int8_records_its_mode_and_every_workload(tiny_ckpt, tmp_path):
    """`bench cpu --quantization int8 --quick` measures the three CPU workloads and the KV-cache
    pair in int8 and writes them, with the mode and the load average, to a JSON named after it."""
    r = subprocess.run([sys.executable, "-m", "nanoserve", "bench", "cpu", "--model", str(tiny_ckpt), "--quick",
                        "--quantization", "int8", "--no-compare-hf", "--no-compile", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    info = json.loads((tmp_path / f"bench_cpu_{tiny_ckpt.name}_int8.json").read_text())
    assert info["quantization"] == "int8" and len(info["loadavg"]) == 3
    assert all(row["nanoserve_tok_s"] > 0 for row in info["rows"]) and len(info["rows"]) == 6
