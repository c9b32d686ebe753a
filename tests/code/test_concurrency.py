"""ordered_map: results in input order, items drawn lazily (bounded look-ahead), errors propagate."""

from __future__ import annotations

import threading
import time

import pytest

from medflow.concurrency import ordered_map


def test_results_keep_input_order_and_use_several_threads() -> None:
    threads: set[str] = set()

    def slow_first(i: int) -> int:
        threads.add(threading.current_thread().name)
        time.sleep(0.02 if i % 3 == 0 else 0.0)  # early items finish last
        return i * i

    assert list(ordered_map(slow_first, range(12), 3, name="t")) == [i * i for i in range(12)]
    assert len(threads) > 1 and all(t.startswith("t") for t in threads)


def test_items_are_drawn_at_most_depth_ahead_of_the_consumer() -> None:
    drawn: list[int] = []

    def source():
        for i in range(100):
            drawn.append(i)
            yield i

    results = ordered_map(lambda i: i, source(), 2, depth=4)
    assert next(results) == 0
    assert len(drawn) <= 4
    assert list(results) == list(range(1, 100))


def test_an_error_in_a_call_reaches_the_consumer() -> None:
    def fail_on_5(i: int) -> int:
        if i == 5:
            raise ValueError("bad item 5")
        return i

    with pytest.raises(ValueError, match="bad item 5"):
        list(ordered_map(fail_on_5, range(10), 2))
