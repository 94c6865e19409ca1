"""What every lesson shares: where the embedded model is, where figures go, and `check`, which
prints the claim a lesson just verified and stops the lesson loudly if it does not hold (the
habit of llm.c's test_gpt2.c: say what was checked, and whether it held).

Lessons import it as `from lesson_utils import ...`; it sits next to them in examples/.
"""
from __future__ import annotations

import os
from pathlib import Path

from nanoserve.weights import EMBEDDED_MODEL, WEIGHTS_DIR

# The small GPT-2 this project trained on Python's standard library: committed, so every
# lesson runs offline, on a CPU, in seconds.
MODEL_DIR = WEIGHTS_DIR / EMBEDDED_MODEL
# Figures land in docs/lessons/ (the README shows some); tests point this at a temporary folder.
FIGURES = Path(os.environ.get("NANOSERVE_FIGURES", Path(__file__).resolve().parent.parent / "docs" / "lessons"))


def check(claim: str, holds: bool) -> None:
    """Print `claim` with [ok]; raise AssertionError naming it if it does not hold."""
    print(f"  [{'ok' if holds else 'FAILED'}] {claim}")
    if not holds:
        raise AssertionError(f"lesson check failed: {claim}")


def pyplot():
    """matplotlib.pyplot drawing to files (no screen needed), or None when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        print("  (matplotlib is not installed, so no figure: pip install -e '.[lessons]')")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, name: str) -> Path:
    """Write `fig` as FIGURES/name (a PNG) and close it; return the path."""
    FIGURES.mkdir(parents=True, exist_ok=True)
    path = FIGURES / name
    fig.savefig(path, dpi=110, bbox_inches="tight")
    fig.clf()
    print(f"  figure written: {path}")
    return path
