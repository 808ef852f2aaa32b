"""The byte-budgeted cache of experts, (layer, expert) -> weights, evicting by policy."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .policies import (
    AUTO_POLICY,
    DEFAULT_POLICY,
    Auto,
    Key,
    LeastRecentlyUsed,
    check_policy,
    eviction_order,
    per_layer,
)


@dataclass
class _Entry:
    value: Any  # None while its read is in flight
    nbytes: int
    prefetched: bool = False  # read by a prefetch and not demanded yet


class ExpertCache:
    """Byte-budgeted cache of (layer, expert) -> weights.

    policy: one of model/offload/policies.py's ("lru", "lfu", their "-layer" forms with an
    equal byte quota per layer instead of one pool, "next-use", "auto"). Bytes are reserved
    before a read starts (a placeholder entry), pinned entries are never evicted, and `used`
    never exceeds the capacity (or a layer's quota). Thread-safe.
    """

    def __init__(self, capacity: int, policy: str = DEFAULT_POLICY, layers: Iterable[int] = (0,)):
        check_policy(policy)
        self.layers = list(layers)
        self.frequency: Counter[Key] = Counter()  # demands per key, all-time
        self.auto = policy == AUTO_POLICY  # next-use while the capacity is below `working_set`
        self.policy = "lru" if self.auto else policy
        self.lfu = policy.startswith("lfu")
        self.per_layer = per_layer(policy)
        self._shared = (  # the whole cache's eviction order, or None: one per layer (_orders)
            None if self.per_layer else eviction_order(policy, self.layers, self.frequency)
        )
        self._orders: dict[int, LeastRecentlyUsed] = {}
        self._working_set = 0
        self.capacity = int(capacity)
        self.quota = self.capacity // max(len(self.layers), 1) if self.per_layer else self.capacity
        self.lock = threading.RLock()
        self._entries: dict[Key, _Entry] = {}
        self._pins: Counter[Key] = Counter()
        self._used: Counter[int] = Counter()  # per layer
        self.used = 0
        self.peak = 0
        self.evictions = 0
        self.wasted_prefetches = 0  # prefetched, evicted before any demand

    @property
    def working_set(self) -> int:
        """Bytes of one token's experts (set by `attach`): "auto" is next-use below it."""
        return self._working_set

    @working_set.setter
    def working_set(self, nbytes: int) -> None:
        self._working_set = nbytes
        self._update_auto()

    # queries
    def __contains__(self, key: Key) -> bool:
        return key in self._entries

    def keys(self) -> list[Key]:
        with self.lock:
            return list(self._entries)

    def limit(self, layer: int) -> int:
        """Bytes the scope of `layer` may hold (its quota, or the whole capacity)."""
        return self.quota

    def scope_used(self, layer: int) -> int:
        return self._used[layer] if self.per_layer else self.used

    def pinned_bytes(self, layer: int) -> int:
        with self.lock:
            return sum(
                e.nbytes
                for k, e in self._entries.items()
                if (self._pins[k] or e.value is None) and (not self.per_layer or k[0] == layer)
            )

    def get(self, key: Key) -> Any:
        """The cached value (None if absent or still loading); marks it recently used."""
        with self.lock:
            entry = self._entries.get(key)
            if entry is None or entry.value is None:
                return None
            self._order(key[0]).touch(key)
            return entry.value

    def record_demand(self, key: Key) -> bool:
        """Count a demand for LFU; returns whether the entry had been prefetched (and clears it)."""
        with self.lock:
            self._order(key[0]).demanded(key)
            entry = self._entries.get(key)
            if entry is not None and entry.prefetched:
                entry.prefetched = False
                return True
            return False

    # changes
    def resize(self, capacity: int) -> None:
        """A new capacity (the KV cache grew or shrank); evicts unpinned entries to fit it."""
        with self.lock:
            self.capacity = max(0, int(capacity))
            self.quota = (
                self.capacity // max(len(self.layers), 1) if self.per_layer else self.capacity
            )
            self._update_auto()
            for layer in self.layers if self.per_layer else [self.layers[0]]:
                while self.scope_used(layer) > self.limit(layer):
                    victim = self._order(layer).victim(layer, self._evictable)
                    if victim is None:
                        break
                    self._evict(victim)

    def reserve(self, key: Key, nbytes: int, prefetched: bool = False, cold: bool = True) -> bool:
        """Make room for `key` (evicting unpinned entries by policy) and hold its bytes with a
        placeholder. False, evicting nothing, if it cannot fit. A prefetched entry goes in
        `cold` (first to be evicted unless demanded) or, for near-certain guesses, as recent."""
        with self.lock:
            if key in self._entries:
                return True
            layer = key[0]
            limit = self.limit(layer)
            evictable = sum(
                e.nbytes
                for k, e in self._entries.items()
                if (not self.per_layer or k[0] == layer)
                and e.value is not None
                and not self._pins[k]
            )
            if self.scope_used(layer) - evictable + nbytes > limit:
                return False
            order = self._order(layer)
            while self.scope_used(layer) + nbytes > limit:
                self._evict(order.victim(layer, self._evictable))
            self._entries[key] = _Entry(None, nbytes, prefetched)
            if prefetched and cold:  # a guess goes in cold: evicted first unless demanded
                order.cold(key)
            else:
                order.touch(key)
            self._add(layer, nbytes)
            return True

    def fill(self, key: Key, value: Any) -> None:
        with self.lock:
            entry = self._entries[key]
            entry.value = value
            if not entry.prefetched:  # demanded (maybe while a prefetch read it): most recent
                self._order(key[0]).touch(key)

    def discard(self, key: Key) -> None:
        with self.lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._order(key[0]).remove(key)
                self._add(key[0], -entry.nbytes)
                self._pins.pop(key, None)

    def pin(self, key: Key) -> None:
        with self.lock:
            self._pins[key] += 1

    def unpin(self, key: Key) -> None:
        with self.lock:
            self._pins[key] -= 1
            if self._pins[key] <= 0:
                del self._pins[key]

    def access(self, key: Key, nbytes: int, load: Callable[[], Any] = lambda: True) -> bool:
        """Demand `key` once, loading it on a miss (no pinning): True on a hit. For simulations
        of eviction policies on recorded routing."""
        with self.lock:
            self.record_demand(key)
            if self.get(key) is not None:
                return True
            if self.reserve(key, nbytes):
                self.fill(key, load())
            return False

    def _order(self, layer: int) -> LeastRecentlyUsed:
        """The eviction order of the scope `layer` belongs to."""
        if self._shared is not None:
            return self._shared
        order = self._orders.get(layer)
        if order is None:
            order = self._orders[layer] = eviction_order(self.policy, self.layers, self.frequency)
        return order

    def _evictable(self, key: Key) -> bool:
        """Loaded and not pinned."""
        return self._entries[key].value is not None and not self._pins[key]

    def _update_auto(self) -> None:
        if isinstance(self._shared, Auto):
            self._shared.cycling = self.capacity < self._working_set

    def _evict(self, key: Key) -> None:
        entry = self._entries.pop(key)
        self._order(key[0]).remove(key)
        self._add(key[0], -entry.nbytes)
        self.evictions += 1
        self.wasted_prefetches += entry.prefetched

    def _add(self, layer: int, nbytes: int) -> None:
        self._used[layer] += nbytes
        self.used += nbytes
        self.peak = max(self.peak, self.used)
