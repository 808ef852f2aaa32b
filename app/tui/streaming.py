"""Thread-safe hand-over points between the generation thread and the UI.

The generation worker only appends to these (cheap, under a lock, never waits on the UI); the UI
drains them on a timer at a bounded rate. Decoding never blocks on rendering, and the screen gets
at most one update per tick however fast tokens come.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np


class TextBuffer:
    """Text chunks written by the generation thread, drained by the UI."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self.chunks_received = 0
        self.first_text_at: float | None = None

    def append(self, text: str) -> None:
        if not text:
            return
        with self._lock:
            if self.first_text_at is None:
                self.first_text_at = time.perf_counter()
            self._pending.append(text)
            self.chunks_received += 1

    def drain(self) -> str:
        with self._lock:
            if not self._pending:
                return ""
            text = "".join(self._pending)
            self._pending.clear()
            return text


class RoutingAccumulator:
    """Sums the per-token routing counts ([layers, experts] int arrays) of one reply.

    ``observe`` is the engine's ``routing_observer``: it runs in the generation thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: np.ndarray | None = None
        self._version = 0
        self._tokens = 0

    def observe(self, counts: Any) -> None:
        array = np.asarray(counts)
        with self._lock:
            if self._counts is None or self._counts.shape != array.shape:
                self._counts = np.zeros(array.shape, dtype=np.int64)
            self._counts += array
            self._tokens += 1
            self._version += 1

    def load(self, counts: Any, tokens: int) -> None:
        """Replace the counts by a whole reply's (the engine's ``last_routing``)."""
        with self._lock:
            self._counts = np.array(counts, dtype=np.int64)
            self._tokens = tokens
            self._version += 1

    def reset(self) -> None:
        with self._lock:
            self._counts = None
            self._tokens = 0
            self._version += 1

    @property
    def version(self) -> int:
        return self._version

    def snapshot(self) -> tuple[np.ndarray | None, int]:
        """A copy of the counts so far and the number of tokens they cover."""
        with self._lock:
            counts = None if self._counts is None else self._counts.copy()
            return counts, self._tokens


class UpdatePacer:
    """When the next screen update of a streaming reply may happen.

    At most ``max_rate`` updates a second; and since every update (Markdown parse, layout,
    render) costs the UI thread CPU, and that thread shares the GIL with decoding, updates are
    spaced so that the UI thread's CPU time stays near ``cpu_budget`` of the wall time: the cost
    of the last update (UI-thread CPU since the one before) divided by the budget is the wait
    before the next. Cheap updates go at ``max_rate``; expensive ones (a long code block on a
    big screen) come less often, never less than once every ``max_interval`` seconds.
    """

    def __init__(
        self,
        *,
        max_rate: float = 30.0,
        cpu_budget: float = 0.05,
        max_interval: float = 1.0,
        clock=time.perf_counter,
        cpu_clock=time.thread_time,
    ) -> None:
        self.min_interval = 1.0 / max_rate
        self.cpu_budget = cpu_budget
        self.max_interval = max_interval
        self._clock = clock
        self._cpu_clock = cpu_clock
        self._next_update_at = 0.0
        self._cpu_mark: float | None = None
        self.interval = self.min_interval
        self.updates = 0

    def due(self) -> bool:
        return self._clock() >= self._next_update_at

    def updated(self) -> None:
        """Call right after an update was handed to the screen."""
        now, cpu = self._clock(), self._cpu_clock()
        if self._cpu_mark is not None:
            cost = max(0.0, cpu - self._cpu_mark)
            self.interval = min(max(cost / self.cpu_budget, self.min_interval), self.max_interval)
        self._cpu_mark = cpu
        self._next_update_at = now + self.interval
        self.updates += 1
