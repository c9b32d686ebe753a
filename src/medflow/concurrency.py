"""Ordered, bounded parallel map on threads (for work that releases the GIL: OpenCV, hashing, I/O, TF)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, *, depth: int | None = None,
                name: str = "medflow") -> Iterator[R]:
    """``fn`` over ``items`` on ``workers`` threads, results in input order; at most ``depth`` (default
    ``workers``) calls are submitted ahead of the consumer, so items are drawn lazily and memory stays bounded."""
    depth = max(depth or workers, 1)
    with ThreadPoolExecutor(workers, thread_name_prefix=name) as pool:
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
