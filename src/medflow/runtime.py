"""Process-level helpers for the TensorFlow-heavy stages (embed, train)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

_gc_frozen_here = False  # a gc_frozen() block is open


@contextmanager
def gc_frozen() -> Iterator[None]:
    """Let the cyclic GC's full passes skip every object that exists on entry, until exit.

    TensorFlow and Keras keep ~450k objects alive, and a full pass over them costs ~0.3 s; tracing and
    loading models allocate enough to trigger such passes. Frozen (``gc.freeze``), the pre-existing objects
    are left out, so passes scan only what the block creates. No-op inside another such block, or when the
    caller froze objects itself.
    """
    global _gc_frozen_here
    if _gc_frozen_here or gc.get_freeze_count():  # (the count walks every frozen object: checked last)
        yield
        return
    _gc_frozen_here = True
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        _gc_frozen_here = False
