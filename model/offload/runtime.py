"""The runtime shared by a model's OffloadedExperts: demand reads, prefetch, statistics.

Experts not in the cache are read by a thread pool (several in flight) into bytes the cache
reserved first; what a layer uses is pinned until the next layer's sync (`release`), so an
eviction always frees memory. The cache's capacity shrinks as the KV cache grows
(`set_kv_bytes`), so experts + KV cache never pass their share of the budget.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import mlx.nn as nn

from ..errors import MixchatError
from .cache import ExpertCache
from .policies import Key
from .store import CachedExpert, ExpertStore


@dataclass
class OffloadCounters:
    demanded: int = 0  # experts the routers asked for
    hits: int = 0  # found in the cache (including ones a prefetch had read)
    prefetch_hits: int = 0  # hits thanks to a prefetch
    misses: int = 0
    reads: int = 0  # experts read from disk (demand + prefetch)
    prefetch_reads: int = 0
    bytes_read: int = 0
    load_seconds: float = 0.0  # time the forward pass waited for reads
    forward_passes: int = 0

    def minus(self, other: OffloadCounters) -> OffloadCounters:
        return OffloadCounters(
            **{k: getattr(self, k) - getattr(other, k) for k in self.__dataclass_fields__}
        )

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.demanded if self.demanded else None


class OffloadRuntime:
    """Shared by a model's OffloadedExperts: the store, the cache, the I/O threads, counters.

    `capacity` is what the cache may hold with an empty KV cache; `set_kv_bytes` gives the
    cache whatever the KV cache does not use, so a growing chat takes memory from the experts
    and the total never passes the budget."""

    def __init__(self, store: ExpertStore, cache: ExpertCache, top_k: int, *, prefetch: bool = False,
                 io_threads: int = 4):  # fmt: skip
        self.store = store
        self.cache = cache
        self.capacity = cache.capacity  # with an empty KV cache (at most every expert)
        self.room = cache.capacity  # the expert and KV caches' share of the budget, uncapped
        self.kv_bytes = 0
        self.top_k = top_k
        self.num_experts = 0
        self.held = range(0)  # the experts of each layer this process holds: all but on a rank
        self.prefetch_enabled = prefetch
        self.counters = OffloadCounters()
        self.gates: dict[int, nn.Module] = {}  # layer -> router, for prefetch guesses
        self.next_layer: dict[int, int] = {}
        self.specs: dict[int, dict[str, tuple | None]] = {}  # layer -> proj -> quantization
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="mixchat-experts")
        self._futures: dict[Key, Future] = {}
        self._pinned: list[Key] = []

    def describe(self) -> str:
        """One line for the user: how much of the experts the cache holds."""
        from ..sizes import format_bytes

        total = sum(self.store.memory_bytes[layer] * len(self.held) for layer in self.specs)
        share = self.cache.capacity / total if total else 1.0
        return (
            f"experts stream from disk: a {format_bytes(self.cache.capacity)} cache holds "
            f"{min(share, 1):.0%} of their {format_bytes(total)}"
        )

    def set_kv_bytes(self, nbytes: int) -> None:
        """The KV cache now takes `nbytes`: the expert cache gets what it leaves of their share
        of the budget (`room`), at most `capacity` (never less than one layer's k experts: the
        budget's minimum reserved the whole context)."""
        floor = self.top_k * max(self.store.memory_bytes.values(), default=0)
        self.cache.resize(max(floor, min(self.capacity, self.room - nbytes)))
        self.kv_bytes = nbytes

    def snapshot(self) -> OffloadCounters:
        with self.cache.lock:
            return replace(self.counters)

    # reads
    def _read(self, key: Key) -> Any:
        try:
            value, nbytes = self.store.read(*key)
        except BaseException:
            with self.cache.lock:
                self.cache.discard(key)
                self._futures.pop(key, None)
            raise
        with self.cache.lock:
            self.cache.fill(key, value)
            self.counters.reads += 1
            self.counters.bytes_read += nbytes
            self._futures.pop(key, None)
        return value

    def _submit(self, key: Key, prefetched: bool, cold: bool = True) -> Future | None:
        if not self.cache.reserve(key, self.store.expert_bytes(key[0]), prefetched, cold):
            return None
        future = self._pool.submit(self._read, key)
        self._futures[key] = future
        if prefetched:
            self.counters.prefetch_reads += 1
        return future

    def release(self) -> None:
        """Unpin what the previous layer used: its computation has been evaluated."""
        with self.cache.lock:
            for key in self._pinned:
                self.cache.unpin(key)
            self._pinned = []

    def group_size(self, layer: int) -> int:
        """How many experts of `layer` can be pinned at once."""
        free = self.cache.limit(layer) - self.cache.pinned_bytes(layer)
        return max(1, free // self.store.expert_bytes(layer))

    def demand(self, layer: int, experts: list[int], prefetch: Prefetch | None = None
               ) -> dict[int, CachedExpert]:  # fmt: skip
        """The weights of `experts` of `layer`, pinned until `release()`; reads the missing ones
        (in parallel), then queues the `prefetch` reads and waits for its own."""
        start = time.perf_counter()
        found: dict[int, CachedExpert] = {}
        waits: dict[int, Future] = {}
        cache = self.cache
        with cache.lock:
            self._cancel_prefetches(keep={(layer, e) for e in experts})
            missing = []
            for e in experts:  # hits first: pinned before any miss makes room
                key = (layer, e)
                self.counters.demanded += 1
                was_prefetched = cache.record_demand(key)
                value = cache.get(key)
                if value is None:
                    missing.append(e)
                    continue
                self.counters.hits += 1
                self.counters.prefetch_hits += was_prefetched
                found[e] = value
                cache.pin(key)
                self._pinned.append(key)
            for e in missing:
                key = (layer, e)
                self.counters.misses += 1
                future = self._futures.get(key)  # a prefetch may be reading it
                if future is None:
                    future = self._submit(key, prefetched=False)
                if future is None:  # only reads in flight hold the room: let them land
                    self._drain()
                    future = self._submit(key, prefetched=False)
                if future is None:
                    raise MixchatError(
                        f"expert cache of {self.cache.capacity} bytes cannot hold the experts "
                        f"layer {layer} needs"
                    )
                waits[e] = future
                cache.pin(key)
                self._pinned.append(key)
            if prefetch is not None:
                for e in prefetch.experts:
                    key = (prefetch.layer, e)
                    if key not in cache and key not in self._futures:
                        if self._submit(key, prefetched=True, cold=prefetch.cold) is None:
                            break  # no room left without evicting what is in use
        for e, future in waits.items():
            found[e] = future.result()
        self.counters.load_seconds += time.perf_counter() - start
        return found

    def _cancel_prefetches(self, keep: set[Key]) -> None:
        for key, future in list(self._futures.items()):
            if key not in keep and future.cancel():
                self._futures.pop(key, None)
                self.cache.discard(key)

    def _drain(self) -> None:
        """Wait for in-flight reads (called with the lock held; the readers need it briefly)."""
        futures = list(self._futures.values())
        self.cache.lock.release()
        try:
            for future in futures:
                try:
                    future.result()
                except Exception:
                    pass
        finally:
            self.cache.lock.acquire()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.store.close()


@dataclass(frozen=True)
class Prefetch:
    """Experts of another layer to read in the background while this layer computes."""

    layer: int
    experts: list[int]
    cold: bool = True  # a guess (evicted first unless demanded), or near-certain (recent)
