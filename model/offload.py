"""Experts read on demand from the checkpoint, into a cache that stays within a memory budget.

After `weights.build_model` has built a model with its expert tensors left unread, `attach`
swaps each MoE layer's `switch_mlp` for an `OffloadedExperts`. Per layer, per forward pass:

1. the router's choices are evaluated (one sync per layer, inherent to choosing what to read);
   with prefetch on (MIXCHAT_OFFLOAD_PREFETCH=1; off by default: on the benchmark model its
   guesses evicted more useful experts than they supplied, see benchmarks/bench_offload.py),
   the *next* layer's router is applied to this layer's hidden state in the same sync, and the
   experts it picks are read in the background, entering the cache as least recently used;
2. experts not in the cache are read with positioned reads of their byte ranges (expert e of a
   stacked [E, ...] safetensors tensor is one contiguous slice) into numpy, then `mx.array`;
3. each chosen expert is applied to its tokens with `mx.gather_qmm` on the cached arrays (the
   same kernel and shapes as `mixtral.Experts`, so greedy tokens are identical).

The cache (`ExpertCache`) counts bytes exactly (the arrays' `nbytes`), reserves them before a
read starts, and never holds more than its capacity: LRU (the default) or LFU, over all layers
or with an equal quota per layer (MIXCHAT_OFFLOAD_POLICY; all four hit within ~2 points of each
other on the benchmark, so the simplest won). Experts in use by the layer being computed are
pinned until the next sync, so an eviction always frees memory. When a layer needs more experts
than the cache can hold (a long prompt under a small budget), they are computed in groups.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import CheckpointError, MixchatError
from .safetensors_header import read_safetensors_header

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
POLICIES = ("lru", "lfu", "lru-layer", "lfu-layer")
DEFAULT_POLICY = "lru"
_NP_DTYPES = {"U32": np.uint32, "I32": np.int32, "U8": np.uint8, "I8": np.int8, "U16": np.uint16,
              "I16": np.int16, "F32": np.float32, "F16": np.float16}  # fmt: skip
PREFETCH_MAX_TOKENS = 4  # guess the next layer's experts only for decode-sized batches

Key = tuple[int, int]  # (layer, expert)


def tensor_locations(file: Path) -> dict[str, tuple[int, int, str, tuple[int, ...]]]:
    """name -> (absolute start, stop, dtype, shape) of each tensor in a safetensors file."""
    return {
        name: (spec.offset, spec.offset + spec.nbytes, spec.dtype, spec.shape)
        for name, spec in read_safetensors_header(file).items()
    }


# --- reading experts --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Slice:
    fd: int
    offset: int  # absolute offset of expert 0's bytes
    stride: int  # bytes per expert
    dtype: str
    shape: tuple[int, ...]  # one expert's shape, with a leading 1: [1, out, in...]


ExpertWeights = dict  # projection -> (weight, scales | None, biases | None), each [1, ...]


class ExpertStore:
    """Reads single experts of stacked `switch_mlp` tensors with positioned reads."""

    def __init__(self, checkpoint, layers: Iterable[int], dtype: mx.Dtype, drop_page_cache=False):
        self.dtype = dtype
        self.drop_page_cache = drop_page_cache
        self._fds: list[int] = []
        locations: dict[str, tuple[int, int, int, str, tuple]] = {}
        for file in checkpoint.files:
            fd = os.open(file, os.O_RDONLY)
            self._fds.append(fd)
            if drop_page_cache and sys.platform == "darwin":
                import fcntl

                fcntl.fcntl(fd, getattr(fcntl, "F_NOCACHE", 48), 1)
            for name, (start, stop, dt, shape) in tensor_locations(file).items():
                locations[name] = (fd, start, stop, dt, shape)
        self.slices: dict[int, dict[str, dict[str, _Slice]]] = {}
        self.disk_bytes: dict[int, int] = {}
        self.memory_bytes: dict[int, int] = {}
        self.max_stride = 0
        for layer in layers:
            parts: dict[str, dict[str, _Slice]] = {}
            for proj in PROJECTIONS:
                parts[proj] = {}
                for part in ("weight", "scales", "biases"):
                    name = f"model.layers.{layer}.block_sparse_moe.switch_mlp.{proj}.{part}"
                    if name not in locations:
                        if part == "weight":
                            raise CheckpointError(f"checkpoint lacks tensor {name}")
                        continue
                    fd, start, stop, dt, shape = locations[name]
                    if dt not in _NP_DTYPES and dt != "BF16":
                        raise CheckpointError(f"tensor {name} has unsupported dtype {dt}")
                    experts = shape[0]
                    if (stop - start) % experts:
                        raise CheckpointError(
                            f"tensor {name} does not split into {experts} experts"
                        )
                    stride = (stop - start) // experts
                    parts[proj][part] = _Slice(fd, start, stride, dt, (1, *shape[1:]))
                    self.max_stride = max(self.max_stride, stride)
            self.slices[layer] = parts
            self.disk_bytes[layer] = sum(s.stride for p in parts.values() for s in p.values())
            self.memory_bytes[layer] = sum(
                self._memory_nbytes(s) for p in parts.values() for s in p.values()
            )
        self._local = threading.local()

    def _memory_nbytes(self, s: _Slice) -> int:
        if s.dtype in ("F32", "F16", "BF16"):
            return int(np.prod(s.shape)) * self.dtype.size
        return s.stride

    def expert_bytes(self, layer: int) -> int:
        """Bytes one expert of `layer` takes in the cache."""
        return self.memory_bytes[layer]

    def read(self, layer: int, expert: int) -> tuple[ExpertWeights, int]:
        """(the expert's arrays, bytes read from disk)."""
        out: ExpertWeights = {}
        total = 0
        for proj, parts in self.slices[layer].items():
            arrays = []
            for part in ("weight", "scales", "biases"):
                s = parts.get(part)
                if s is None:
                    arrays.append(None)
                    continue
                raw = self._pread(s.fd, s.offset + expert * s.stride, s.stride)
                arrays.append(self._to_array(raw, s))
                total += s.stride
            out[proj] = tuple(arrays)
        return out, total

    def _pread(self, fd: int, offset: int, size: int) -> np.ndarray:
        scratch = getattr(self._local, "scratch", None)
        if scratch is None or scratch.nbytes < size:
            scratch = self._local.scratch = np.empty(max(size, self.max_stride), np.uint8)
        buf = scratch[:size]
        done = 0
        while done < size:
            if hasattr(os, "preadv"):
                n = os.preadv(fd, [memoryview(buf[done:])], offset + done)
            else:  # no preadv (older macOS Pythons): one extra copy
                data = os.pread(fd, size - done, offset + done)
                n = len(data)
                buf[done : done + n] = np.frombuffer(data, np.uint8)
            if n <= 0:
                raise CheckpointError(f"unexpected end of file reading experts at byte {offset}")
            done += n
        if self.drop_page_cache and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, offset, size, os.POSIX_FADV_DONTNEED)
        return buf

    def _to_array(self, raw: np.ndarray, s: _Slice) -> mx.array:
        """Bytes -> mx.array (a copy), floating tensors converted to the compute dtype with
        the same rounding `astype` applies when the model is loaded whole. Conversions are done
        in numpy so that no MLX operation is created on this (I/O) thread: bfloat16 is kept as
        its uint16 bits, viewed as bfloat16 where it is used (`_as_float`)."""
        if s.dtype not in ("F32", "F16", "BF16"):
            return mx.array(raw.view(_NP_DTYPES[s.dtype]).reshape(s.shape))
        target = self.dtype
        if s.dtype == "BF16" and target == mx.bfloat16:
            return mx.array(raw.view(np.uint16).reshape(s.shape))
        if (s.dtype, target) in (("F16", mx.float16), ("F32", mx.float32)):
            return mx.array(raw.view(_NP_DTYPES[s.dtype]).reshape(s.shape))
        if s.dtype == "BF16":
            values = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            values = raw.view(_NP_DTYPES[s.dtype]).astype(np.float32)
        values = values.reshape(s.shape)
        if target == mx.float32:
            return mx.array(values)
        if target == mx.float16:
            return mx.array(values.astype(np.float16))
        bits = values.view(np.uint32)  # float32 -> bfloat16 bits, rounding to nearest even
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return mx.array(np.where(np.isnan(values), 0x7FC0, rounded).astype(np.uint16))

    def close(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []


# --- the cache --------------------------------------------------------------------------------


@dataclass
class _Entry:
    value: Any  # None while its read is in flight
    nbytes: int
    prefetched: bool = False  # read by a prefetch and not demanded yet


class ExpertCache:
    """Byte-budgeted cache of (layer, expert) -> weights.

    policy: "lru" | "lfu" (least frequently demanded, all-time counts, ties by recency), with a
    "-layer" suffix for an equal byte quota per layer instead of one pool. Bytes are reserved
    before a read starts (a placeholder entry), pinned entries are never evicted, and `used`
    never exceeds the capacity (or a layer's quota). Thread-safe.
    """

    def __init__(self, capacity: int, policy: str = DEFAULT_POLICY, layers: Iterable[int] = (0,)):
        if policy not in POLICIES:
            raise MixchatError(
                f"unknown expert cache policy {policy!r} (one of {', '.join(POLICIES)})"
            )
        self.capacity = int(capacity)
        self.policy = policy
        self.lfu = policy.startswith("lfu")
        self.per_layer = policy.endswith("-layer")
        self.layers = list(layers)
        self.quota = self.capacity // max(len(self.layers), 1) if self.per_layer else self.capacity
        self.lock = threading.RLock()
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()  # least recently used first
        self._pins: Counter[Key] = Counter()
        self.frequency: Counter[Key] = Counter()
        self._used: Counter[int] = Counter()  # per layer
        self.used = 0
        self.peak = 0
        self.evictions = 0
        self.wasted_prefetches = 0  # prefetched, evicted before any demand

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
            self._entries.move_to_end(key)
            return entry.value

    def record_demand(self, key: Key) -> bool:
        """Count a demand for LFU; returns whether the entry had been prefetched (and clears it)."""
        with self.lock:
            self.frequency[key] += 1
            entry = self._entries.get(key)
            if entry is not None and entry.prefetched:
                entry.prefetched = False
                return True
            return False

    # changes
    def reserve(self, key: Key, nbytes: int, prefetched: bool = False) -> bool:
        """Make room for `key` (evicting unpinned entries by policy) and hold its bytes with a
        placeholder. False, evicting nothing, if it cannot fit."""
        with self.lock:
            if key in self._entries:
                return True
            layer = key[0]
            limit = self.limit(layer)
            victims = self._victims(layer)
            evictable = sum(self._entries[k].nbytes for k in victims)
            if self.scope_used(layer) - evictable + nbytes > limit:
                return False
            for victim in victims:
                if self.scope_used(layer) + nbytes <= limit:
                    break
                self._evict(victim)
            self._entries[key] = _Entry(None, nbytes, prefetched)
            if prefetched:  # a guess goes in cold: evicted first unless demanded (then touched)
                self._entries.move_to_end(key, last=False)
            self._add(layer, nbytes)
            return True

    def fill(self, key: Key, value: Any) -> None:
        with self.lock:
            entry = self._entries[key]
            entry.value = value
            if not entry.prefetched:  # demanded (maybe while a prefetch read it): most recent
                self._entries.move_to_end(key)

    def discard(self, key: Key) -> None:
        with self.lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
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

    def _victims(self, layer: int) -> list[Key]:
        """Evictable keys in eviction order."""
        keys = [
            k
            for k, e in self._entries.items()
            if e.value is not None and not self._pins[k] and (not self.per_layer or k[0] == layer)
        ]
        if self.lfu:  # stable sort: least frequent first, least recent among equals
            keys.sort(key=lambda k: self.frequency[k])
        return keys

    def _evict(self, key: Key) -> None:
        entry = self._entries.pop(key)
        self._add(key[0], -entry.nbytes)
        self.evictions += 1
        self.wasted_prefetches += entry.prefetched

    def _add(self, layer: int, nbytes: int) -> None:
        self._used[layer] += nbytes
        self.used += nbytes
        self.peak = max(self.peak, self.used)


# --- the runtime: demand loads, prefetch, statistics ------------------------------------------


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
    """Shared by a model's OffloadedExperts: the store, the cache, the I/O threads, counters."""

    def __init__(self, store: ExpertStore, cache: ExpertCache, top_k: int, *, prefetch: bool = False,
                 io_threads: int = 2):  # fmt: skip
        self.store = store
        self.cache = cache
        self.top_k = top_k
        self.num_experts = 0
        self.prefetch_enabled = prefetch
        self.counters = OffloadCounters()
        self.gates: dict[int, nn.Module] = {}  # layer -> router, for prefetch guesses
        self.next_layer: dict[int, int] = {}
        self.specs: dict[int, dict[str, tuple | None]] = {}  # layer -> proj -> quantization
        self.budget = 0
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="mixchat-experts")
        self._futures: dict[Key, Future] = {}
        self._pinned: list[Key] = []

    def describe(self) -> str:
        """One line for the user: how much of the experts the cache holds."""
        from .sizes import format_bytes

        total = sum(self.store.memory_bytes[layer] * self.num_experts for layer in self.specs)
        share = self.cache.capacity / total if total else 1.0
        return (
            f"experts stream from disk: a {format_bytes(self.cache.capacity)} cache holds "
            f"{min(share, 1):.0%} of their {format_bytes(total)}"
        )

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

    def _submit(self, key: Key, prefetched: bool) -> Future | None:
        if not self.cache.reserve(key, self.store.expert_bytes(key[0]), prefetched):
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

    def demand(self, layer: int, experts: list[int], prefetch: tuple[int, list[int]] | None = None
               ) -> dict[int, ExpertWeights]:  # fmt: skip
        """The weights of `experts` of `layer`, pinned until `release()`; reads the missing ones
        (in parallel), then queues `prefetch` (layer, experts) reads and waits for its own."""
        start = time.perf_counter()
        found: dict[int, ExpertWeights] = {}
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
            if prefetch is not None and self.prefetch_enabled:
                next_layer, guesses = prefetch
                for e in guesses:
                    key = (next_layer, e)
                    if key not in cache and key not in self._futures:
                        self._submit(key, prefetched=True)
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


def _as_float(a: mx.array | None) -> mx.array | None:
    """bfloat16 tensors are cached as their uint16 bits (see ExpertStore._to_array)."""
    return a.view(mx.bfloat16) if a is not None and a.dtype == mx.uint16 else a


def _expert_matmul(x: mx.array, arrays: tuple, spec: tuple | None, zeros: mx.array) -> mx.array:
    """x [n, 1, in] @ W.T for one expert's arrays ([1, out, in...]), as mixtral.expert_matmul
    (`zeros`: [n] expert indices into the single expert)."""
    weight, scales, biases = (_as_float(a) for a in arrays)
    if spec is not None:
        group_size, bits, mode = spec
        return mx.gather_qmm(
            x, weight, scales, biases, rhs_indices=zeros, transpose=True, group_size=group_size,
            bits=bits, mode=mode, sorted_indices=True,
        )  # fmt: skip
    return mx.gather_mm(x, weight.swapaxes(-1, -2), rhs_indices=zeros, sorted_indices=True)


class OffloadedExperts(nn.Module):
    """Drop-in for `mixtral.Experts` whose weights live in an OffloadRuntime's cache."""

    def __init__(self, runtime: OffloadRuntime, layer: int):
        super().__init__()
        self.runtime = runtime
        self.layer = layer

    def __call__(self, x: mx.array, inds: mx.array) -> mx.array:
        """x: [N, hidden], inds: [N, k] -> [N, k, hidden]."""
        rt = self.runtime
        N, k = inds.shape
        next_layer = rt.next_layer.get(self.layer)
        guess = None
        if rt.prefetch_enabled and next_layer is not None and N <= PREFETCH_MAX_TOKENS:
            logits = rt.gates[next_layer](x)
            guess = mx.argpartition(-logits, kth=rt.top_k - 1, axis=-1)[..., : rt.top_k]
            mx.eval(inds, guess)
        else:
            mx.eval(inds)
        rt.release()  # everything before this layer is computed: its experts may go
        rt.counters.forward_passes += self.layer == min(rt.specs)
        flat = np.array(inds).reshape(-1)
        order = np.argsort(flat, kind="stable")
        sorted_experts = flat[order]
        experts, starts = np.unique(sorted_experts, return_index=True)
        bounds = [*starts.tolist(), len(flat)]
        rows = x[mx.array(order // k)][:, None]  # [N*k, 1, hidden], grouped by expert
        prefetch = (
            (next_layer, sorted(set(np.array(guess).reshape(-1).tolist())))
            if guess is not None
            else None
        )
        group = rt.group_size(self.layer)
        specs = rt.specs[self.layer]
        streams = _compute_streams()  # expert j of this layer on stream j % len(streams)
        parts: list[mx.array] = []
        for g in range(0, len(experts), group):
            chosen = experts[g : g + group].tolist()
            last_group = g + group >= len(experts)
            weights = rt.demand(self.layer, chosen, prefetch if last_group else None)
            group_parts = []
            for i, e in enumerate(chosen):
                j = g + i
                r = rows[bounds[j] : bounds[j + 1]]
                w = weights[e]
                if streams:
                    with mx.stream(streams[j % len(streams)]):
                        group_parts.append(self._swiglu(r, w, specs))
                else:
                    group_parts.append(self._swiglu(r, w, specs))
            parts.extend(group_parts)
            if not last_group:  # the cache cannot hold the whole layer: compute, then let go
                mx.eval(group_parts)
                rt.release()
        y = mx.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]  # [N*k, 1, hidden]
        inverse = mx.array(np.argsort(order))
        return y[inverse].reshape(N, k, -1)

    @staticmethod
    def _swiglu(rows: mx.array, w: ExpertWeights, specs: dict) -> mx.array:
        zeros = mx.zeros((rows.shape[0],), dtype=mx.uint32)
        gate = _expert_matmul(rows, w["gate_proj"], specs["gate_proj"], zeros)
        up = _expert_matmul(rows, w["up_proj"], specs["up_proj"], zeros)
        return _expert_matmul(nn.silu(gate) * up, w["down_proj"], specs["down_proj"], zeros)


def _compute_streams() -> list:
    """The model's compute streams (one per CPU core on MLX's CPU backend), if it splits work."""
    from . import mixtral

    make = getattr(mixtral, "compute_streams", None)
    streams = make() if make is not None else []
    return list(streams) if len(streams) > 1 else []


# --- wiring -----------------------------------------------------------------------------------


@dataclass
class OffloadOptions:
    policy: str = DEFAULT_POLICY
    prefetch: bool = False
    io_threads: int = 2
    drop_page_cache: bool = False  # read experts past the page cache (benchmarks of cold reads)

    @classmethod
    def from_env(cls) -> OffloadOptions:
        """MIXCHAT_OFFLOAD_POLICY (lru, lfu, lru-layer, lfu-layer), MIXCHAT_OFFLOAD_PREFETCH
        (0/1), MIXCHAT_OFFLOAD_NOCACHE (1: drop read experts from the page cache)."""
        env = os.environ
        options = cls()
        if env.get("MIXCHAT_OFFLOAD_POLICY"):
            options.policy = env["MIXCHAT_OFFLOAD_POLICY"].strip().lower()
        if env.get("MIXCHAT_OFFLOAD_PREFETCH"):
            options.prefetch = env["MIXCHAT_OFFLOAD_PREFETCH"].strip() not in ("0", "", "no", "off")
        if env.get("MIXCHAT_OFFLOAD_NOCACHE"):
            options.drop_page_cache = env["MIXCHAT_OFFLOAD_NOCACHE"].strip() not in ("0", "", "no")
        return options


def moe_layers(model) -> list[int]:
    return [i for i, layer in enumerate(model.layers) if "block_sparse_moe" in layer]


def attach(model, checkpoint, capacity: int, dtype: mx.Dtype, options: OffloadOptions | None = None
           ) -> OffloadRuntime:  # fmt: skip
    """Replace every MoE layer's experts by OffloadedExperts sharing one runtime whose cache
    holds at most `capacity` bytes. The model's expert arrays must not have been evaluated."""
    options = options or OffloadOptions.from_env()
    layers = moe_layers(model)
    store = ExpertStore(checkpoint, layers, dtype, options.drop_page_cache)
    cache = ExpertCache(capacity, options.policy, layers)
    top_k = model.args.num_experts_per_tok
    for layer in layers:
        need = top_k * store.expert_bytes(layer)
        if cache.limit(layer) < need:
            store.close()
            raise MixchatError(
                f"expert cache of {capacity} bytes cannot hold {top_k} experts per layer "
                f"({need} bytes each layer)"
            )
    runtime = OffloadRuntime(store, cache, top_k, prefetch=options.prefetch,
                             io_threads=options.io_threads)  # fmt: skip
    runtime.num_experts = model.args.num_local_experts
    for i, layer in enumerate(layers):
        moe = model.layers[layer].block_sparse_moe
        old = moe.switch_mlp
        specs = {}
        for proj in PROJECTIONS:
            module = old[proj]
            specs[proj] = (
                (module.group_size, module.bits, module.mode) if hasattr(module, "bits") else None
            )
        runtime.specs[layer] = specs
        runtime.gates[layer] = moe.gate
        if i + 1 < len(layers):
            runtime.next_layer[layer] = layers[i + 1]
        moe.switch_mlp = OffloadedExperts(runtime, layer)
    return runtime


def runtime_of(model) -> OffloadRuntime | None:
    """The OffloadRuntime of a model whose experts are offloaded, else None."""
    for layer in getattr(model, "layers", []):
        if "block_sparse_moe" in layer and isinstance(
            layer.block_sparse_moe.switch_mlp, OffloadedExperts
        ):
            return layer.block_sparse_moe.switch_mlp.runtime
    return None
