"""The command line: generate streams text and ends with a statistics line."""
from __future__ import annotations

import subprocess
import sys


def test_generate_streams_text_and_prints_statistics(tiny_ckpt):
    r = subprocess.run([sys.executable, "-m", "nanoserve", "generate", "--model", str(tiny_ckpt), "--device", "cpu",
                        "--prompt", "Hello, my name is", "--max-tokens", "8", "--ignore-eos"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hello, my name is") and len(r.stdout) > len("Hello, my name is\n")
    stats = r.stderr.strip().splitlines()[-1]
    for key in ("prompt_tokens=5", "generated_tokens=8", "ttft=", "tok/s", "kv_blocks_peak=1 ", "shifts=0"):
        assert key in stats


def test_prompt_may_be_positional(tiny_ckpt):
    r = subprocess.run([sys.executable, "-m", "nanoserve", "generate", "Hello", "--model", str(tiny_ckpt),
                        "--device", "cpu", "--max-tokens", "3"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("Hello") and "generated_tokens=" in r.stderr


def test_help_lists_engine_flags_with_defaults():
    r = subprocess.run([sys.executable, "-m", "nanoserve", "generate", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for flag in ("--block-size", "--num-blocks", "--max-num-seqs", "--temperature", "--top-p", "(default: 16)"):
        assert flag in r.stdout


def test_bad_sampling_flag_is_a_clear_error(tiny_ckpt):
    r = subprocess.run([sys.executable, "-m", "nanoserve", "generate", "--model", str(tiny_ckpt), "--device", "cpu",
                        "--prompt", "x", "--top-p", "1.5"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "top_p" in r.stderr


def test_example_script_runs_on_the_embedded_model():
    """examples/example.py (the README's tour) runs end to end."""
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    model = root / "weights" / "nanoserve-stdlib-tiny"
    r = subprocess.run([sys.executable, str(root / "examples" / "example.py"), str(model)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "completion 0:" in r.stdout and "completion 1:" in r.stdout and "[length]" in r.stdout
