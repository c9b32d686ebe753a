"""Progress bars for the long steps (ingest, shards, embedding, batch prediction)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm


def progress_bar(iterable: Iterable[Any] | None = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr, drawn only when stderr is a terminal (tqdm's ``disable=None``). In a log its
    ``\\r`` redraws pile up and the final state appears twice (the last update's and ``close()``'s), so there
    each step's own summary line is all that is printed."""
    return tqdm(iterable, file=sys.stderr, disable=None if enabled else True, **kwargs)
