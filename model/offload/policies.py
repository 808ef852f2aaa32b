"""Eviction orders of the expert cache, shared by `ExpertCache` and the routing-trace replay.

Each policy keeps the keys (layer, expert) of one cache scope (the whole cache, or one layer's
quota) in the order it evicts them, and answers `victim`: the first key in that order the caller
may evict. The caller reports what happens to the keys: `touch` (used now: most recent),
`cold` (inserted as the least recent: a prefetched guess), `demanded` (counted for LFU, the
count kept in a `Counter` shared by every scope), `remove`.

"lru" evicts the least recently used; "lfu" the least frequently demanded (all-time counts),
the least recent among equals; "next-use" what the cyclic layer order reaches last (this layer's
others, then the layers just computed), the least recent among equals; "auto" is next-use
while `cycling` (the cache holds less than one token's experts), else lru. A "-layer" suffix
gives each layer its own scope and quota. Pure Python: no MLX.
"""

from __future__ import annotations

import heapq
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable

from ..errors import MixchatError

POLICIES = ("lru", "lfu", "lru-layer", "lfu-layer", "next-use")
DEFAULT_POLICY = "next-use"  # best at every cached share on Mixtral-like routing (BENCHMARKS.md)
AUTO_POLICY = "auto"  # next-use while the cache holds less than one token's experts, else lru

Key = tuple[int, int]  # (layer, expert)
Evictable = Callable[[Key], bool]


def check_policy(policy: str) -> None:
    """Raise MixchatError for a name that is neither one of POLICIES nor AUTO_POLICY."""
    if policy != AUTO_POLICY and policy not in POLICIES:
        raise MixchatError(f"unknown expert cache policy {policy!r} (one of {', '.join(POLICIES)})")


class LeastRecentlyUsed:
    """LRU ("lru"): evicts the least recently used key."""

    def __init__(self, layers: Iterable[int], frequency: Counter):
        self.frequency = frequency  # demands per key, all-time, shared by every scope
        self.order: OrderedDict[Key, None] = OrderedDict()  # least recent first

    def touch(self, key: Key) -> None:
        self.order[key] = None
        self.order.move_to_end(key)

    def cold(self, key: Key) -> None:
        self.order[key] = None
        self.order.move_to_end(key, last=False)

    def demanded(self, key: Key) -> None:
        self.frequency[key] += 1

    def remove(self, key: Key) -> None:
        self.order.pop(key, None)

    def victim(self, layer: int, evictable: Evictable) -> Key | None:
        """The key to evict for a miss of `layer`: the first `evictable` one in eviction order."""
        return next((key for key in self.order if evictable(key)), None)


class LeastFrequentlyUsed(LeastRecentlyUsed):
    """LFU ("lfu"): evicts the least demanded key, the least recent among equals. A heap of
    (demands, recency tick, key), stale items (demanded or touched since) skipped."""

    def __init__(self, layers: Iterable[int], frequency: Counter):
        super().__init__(layers, frequency)
        self.ticks: dict[Key, int] = {}
        self.heap: list[tuple[int, int, Key]] = []
        self.newest = 0  # ticks of touched keys count up, of cold ones down
        self.oldest = 0

    def touch(self, key: Key) -> None:
        self.newest += 1
        self._set(key, self.newest)

    def cold(self, key: Key) -> None:
        self.oldest -= 1
        self._set(key, self.oldest)

    def demanded(self, key: Key) -> None:
        self.frequency[key] += 1
        if key in self.ticks:
            heapq.heappush(self.heap, (self.frequency[key], self.ticks[key], key))

    def remove(self, key: Key) -> None:
        self.ticks.pop(key, None)

    def victim(self, layer: int, evictable: Evictable) -> Key | None:
        held = []
        found = None
        while self.heap:
            item = heapq.heappop(self.heap)
            freq, tick, key = item
            if self.ticks.get(key) != tick or self.frequency[key] != freq:
                continue  # stale: touched or demanded since, or removed
            held.append(item)
            if evictable(key):
                found = key
                break
        for item in held:  # the victim too: it stays until the caller removes it
            heapq.heappush(self.heap, item)
        return found

    def _set(self, key: Key, tick: int) -> None:
        self.ticks[key] = tick
        heapq.heappush(self.heap, (self.frequency[key], tick, key))
        if len(self.heap) > 4 * len(self.ticks) + 64:  # drop the stale items
            self.heap = [(self.frequency[k], t, k) for k, t in self.ticks.items()]
            heapq.heapify(self.heap)


class NextUse(LeastRecentlyUsed):
    """Next use ("next-use"): evicts from the layer the forward pass reaches last, the least
    recent first. Layers are visited in the order of `layers` (another layer's key: as the
    first's)."""

    def __init__(self, layers: Iterable[int], frequency: Counter):
        super().__init__(layers, frequency)
        self.position = {layer: i for i, layer in enumerate(layers)}
        self.by_position: list[OrderedDict[Key, None]] = [
            OrderedDict() for _ in range(max(len(self.position), 1))
        ]  # per layer, least recent first

    def touch(self, key: Key) -> None:
        scope = self._scope(key)
        scope[key] = None
        scope.move_to_end(key)

    def cold(self, key: Key) -> None:
        scope = self._scope(key)
        scope[key] = None
        scope.move_to_end(key, last=False)

    def remove(self, key: Key) -> None:
        self._scope(key).pop(key, None)

    def victim(self, layer: int, evictable: Evictable) -> Key | None:
        n = len(self.by_position)
        here = self.position.get(layer, 0)
        for ahead in range(n - 1, -1, -1):  # reached last first: this layer, then the previous
            scope = self.by_position[(here + 1 + ahead) % n]
            found = next((key for key in scope if evictable(key)), None)
            if found is not None:
                return found
        return None

    def _scope(self, key: Key) -> OrderedDict[Key, None]:
        return self.by_position[self.position.get(key[0], 0)]


class Auto(NextUse):
    """Auto ("auto"): next-use while `cycling` (set by the cache: its capacity is below one token's
    experts, where LRU evicts exactly what comes next), else lru. Keeps both orders."""

    cycling = False

    def touch(self, key: Key) -> None:
        super().touch(key)
        LeastRecentlyUsed.touch(self, key)

    def cold(self, key: Key) -> None:
        super().cold(key)
        LeastRecentlyUsed.cold(self, key)

    def remove(self, key: Key) -> None:
        super().remove(key)
        LeastRecentlyUsed.remove(self, key)

    def victim(self, layer: int, evictable: Evictable) -> Key | None:
        if self.cycling:
            return super().victim(layer, evictable)
        return LeastRecentlyUsed.victim(self, layer, evictable)


_ORDERS = {"lru": LeastRecentlyUsed, "lfu": LeastFrequentlyUsed, "next-use": NextUse,
           AUTO_POLICY: Auto}  # fmt: skip


def eviction_order(policy: str, layers: Iterable[int], frequency: Counter) -> LeastRecentlyUsed:
    """A new scope's eviction order for `policy` ("-layer" policies: one per layer)."""
    check_policy(policy)
    return _ORDERS[policy.removesuffix("-layer")](layers, frequency)


def per_layer(policy: str) -> bool:
    """Whether `policy` gives each layer its own scope and an equal byte quota."""
    return policy.endswith("-layer")
