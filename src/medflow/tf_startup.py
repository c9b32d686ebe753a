"""Quiet TensorFlow's start-up notices, which ``TF_CPP_MIN_LOG_LEVEL`` cannot reach.

TensorFlow 2.20+ logs through Abseil, and Abseil writes every message issued before
``absl::InitializeLog()`` to stderr whatever the level (abseil/abseil-cpp#1957). So every process that
imports TensorFlow printed, twice, "All log messages before absl::InitializeLog() ...", the oneDNN notice and
"Could not find cuda drivers", and then, on a machine without a GPU driver, an alarming
``E0000 ... failed call to cuInit`` line. :func:`install` makes the first ``import tensorflow`` run with
stderr (file descriptor 2) captured, initialises the devices inside the same capture (where the cuInit line
comes from), and writes back every captured line except those notices; anything else TensorFlow says is kept.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TypeVar

T = TypeVar("T")
_NOTICES = re.compile(rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
                      rb"|I\d{4} [^\]]*\] (oneDNN custom operations are on"
                      rb"|Could not find cuda drivers on your machine, GPU will not be used)")
_NO_DRIVER_ERROR = re.compile(rb"E\d{4} [^\]]*\] failed call to cuInit")


def drop_notices(lines: Sequence[bytes]) -> list[bytes]:
    """``lines`` without TensorFlow's start-up notices; the cuInit error is dropped only when TensorFlow
    also said it found no CUDA driver (no GPU is expected then: it is not an error)."""
    no_driver = any(b"Could not find cuda drivers" in line for line in lines)
    return [line for line in lines if not _NOTICES.match(line) and not (no_driver and _NO_DRIVER_ERROR.match(line))]


def quietly(fn: Callable[[], T]) -> T:
    """``fn()`` with file descriptor 2 captured; the captured lines, less :func:`drop_notices`', are written
    back to it afterwards (also when ``fn`` raises)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            return fn()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            if kept := drop_notices(captured.read().splitlines(keepends=True)):
                os.write(2, b"".join(kept))


class _QuietTensorFlow(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` through the normal path finder and makes its loading go through :func:`quietly`."""

    def find_spec(self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once per process
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        loader = spec.loader if spec else None
        if spec is None or loader is None or not hasattr(loader, "exec_module"):
            return spec
        load = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            quietly(lambda: (load(module), module.config.list_physical_devices()))

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Quiet the first ``import tensorflow`` of this process (no-op when it already happened)."""
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietTensorFlow) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlow())
