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
