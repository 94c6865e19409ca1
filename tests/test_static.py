"""Static checks on the package's source."""
from pathlib import Path

import pyflakes.api
import pyflakes.messages
import pyflakes.reporter

PACKAGE = Path(__file__).resolve().parent.parent / "nanoserve"


class _Collect(pyflakes.reporter.Reporter):
    def __init__(self) -> None:
        super().__init__(None, None)
        self.messages: list = []

    def flake(self, message) -> None:
        self.messages.append(message)

    def syntaxError(self, filename, msg, lineno, offset, text) -> None:
        self.messages.append(f"{filename}:{lineno}: syntax error: {msg}")

    def unexpectedError(self, filename, msg) -> None:
        self.messages.append(f"{filename}: {msg}")


def test_no_module_uses_an_undefined_name():
    """pyflakes finds no undefined name in nanoserve/. Branches the CPU suite never runs (CUDA
    only, servers, benchmarks) still cannot fail with a NameError: one did, on the GPU, when
    engine.py called torch.cuda.empty_cache() without importing torch."""
    report = _Collect()
    pyflakes.api.checkRecursive([str(PACKAGE)], report)
    undefined = (pyflakes.messages.UndefinedName, pyflakes.messages.UndefinedLocal,
                 pyflakes.messages.UndefinedExport)
    bad = [str(m) for m in report.messages if isinstance(m, str) or isinstance(m, undefined)]
    assert not bad, "\n".join(bad)
