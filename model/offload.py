"""Experts read on demand from the checkpoint, into a cache that stays within a memory budget.

After `weights.build_model` has built a model with its expert tensors left unread, `attach`
swaps each MoE layer's `switch_mlp` for an `OffloadedExperts`. Per layer, per forward pass:

1. the router's choices are evaluated (one sync per layer, inherent to choosing what to read);
   a prompt (>= PREFILL_PREFETCH_TOKENS tokens, which use nearly every expert) queues the next
   layer's experts to be read while this layer computes; during decode, guessing the next
   layer's experts from this layer's hidden state is off by default (MIXCHAT_OFFLOAD_PREFETCH=1:
   its wrong guesses evicted more useful experts than they supplied);
2. experts not in the cache are read with positioned reads of their byte ranges (expert e of a
   stacked [E, ...] safetensors tensor is one contiguous slice), several in flight, past the
   page cache (O_DIRECT, F_NOCACHE) so their bytes are not held twice;
3. each chosen expert is applied to its tokens by `experts.swiglu` on the cached arrays (the
   same kernels and shapes as `mixtral.Experts`, so greedy tokens are identical).

Under a budget the engine runs a prompt layer by layer over whole windows of tokens
(`Model.prefill_layerwise`), so each expert is read at most once per layer per window.

The cache (`ExpertCache`) counts bytes exactly (the arrays' `nbytes`), reserves them before a
read starts, and never holds more than its capacity, which shrinks as the KV cache grows
(`OffloadRuntime.set_kv_bytes`). Eviction (MIXCHAT_OFFLOAD_POLICY): "next-use" by default,
which evicts what the cyclic layer order reaches last; replayed on Mixtral-like routing
(model/routing_trace.py) it beats LRU at every cached share, and LRU gets no hits at all once
the cache holds less than one token's experts (it evicts exactly the expert needed next). Experts in use by the layer
being computed are pinned until the next sync, so an eviction always frees memory. When a
layer needs more experts than the cache can hold, they are computed in groups.
"""

from __future__ import annotations

import mmap
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
from .experts import PROJECTIONS, ExpertWeights, Projection, RowGroups, swiglu
from .memory_plan import loaded_nbytes
from .safetensors_header import FLOAT_DTYPES, TensorSpec, read_safetensors_header

POLICIES = ("lru", "lfu", "lru-layer", "lfu-layer", "next-use")
DEFAULT_POLICY = "next-use"  # best at every cached share on Mixtral-like routing (BENCHMARKS.md)
_NP_DTYPES = {"U32": np.uint32, "I32": np.int32, "U8": np.uint8, "I8": np.int8, "U16": np.uint16,
              "I16": np.int16, "F32": np.float32, "F16": np.float16}  # fmt: skip
PREFETCH_MAX_TOKENS = 4  # guess the next layer's experts only for decode-sized batches
PREFILL_PREFETCH_TOKENS = 8  # from this many tokens on (~7 of 8 experts used), read ahead
ROW_SLICE = 1024  # rows one kernel call takes in a long prompt (bounds the activations)

Key = tuple[int, int]  # (layer, expert)


# --- reading experts --------------------------------------------------------------------------

_ALIGN = 4096  # O_DIRECT reads start, end and land on page boundaries
GGUF_PREFIX = "GGUF:"  # a _Slice dtype "GGUF:Q4_K": blocks converted when read




@dataclass(frozen=True)
class _Slice:
    file: int  # index into ExpertStore's open files
    offset: int  # absolute offset of expert 0's bytes
    stride: int  # bytes per expert
    dtype: str
    shape: tuple[int, ...]  # one expert's shape, with a leading 1: [1, out, in...]


CachedExpert = dict  # projection -> (weight, scales | None, biases | None), each [1, ...]


def _open(path: Path, bypass_page_cache: bool) -> tuple[int, bool]:
    """(fd, whether reads must be O_DIRECT-aligned). Bypassing the page cache keeps expert bytes
    from being held twice (once in the cache, once by the OS): O_DIRECT on Linux, F_NOCACHE on
    macOS; where O_DIRECT is refused (tmpfs...), reads are evicted after the fact instead."""
    if bypass_page_cache and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT), True
        except OSError:
            pass
    fd = os.open(path, os.O_RDONLY)
    if bypass_page_cache and sys.platform == "darwin":
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_NOCACHE", 48), 1)
    return fd, False


class ExpertStore:
    """Reads single experts of stacked `switch_mlp` tensors with positioned reads: one read per
    tensor part (contiguous: expert e of [E, ...] is bytes [e * stride, (e + 1) * stride)),
    several experts in flight from the runtime's thread pool."""

    def __init__(self, checkpoint, layers: Iterable[int], dtype: mx.Dtype,
                 bypass_page_cache: bool = True):  # fmt: skip
        self.dtype = dtype
        self.bypass_page_cache = bypass_page_cache
        self._fds: list[int] = []
        self._direct: list[bool] = []
        locations: dict[str, tuple[int, TensorSpec]] = {}
        for file in checkpoint.files:
            fd, direct = _open(file, bypass_page_cache)
            self._fds.append(fd)
            self._direct.append(direct)
            if checkpoint.format == "gguf":  # stacked expert tensors, converted on read
                for name, (tensor, part) in checkpoint.gguf_names.items():
                    if part == "weight":
                        spec = TensorSpec(tensor.shape, f"{GGUF_PREFIX}{tensor.ggml_type}",
                                          tensor.nbytes, tensor.offset)  # fmt: skip
                        locations[name] = (0, spec)
                continue
            for name, spec in read_safetensors_header(file).items():
                locations[name] = (len(self._fds) - 1, spec)
        self.slices: dict[int, dict[str, dict[str, _Slice]]] = {}
        self._gguf_memory: dict[tuple[int, str], int] = {}  # (layer, proj) -> one expert
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
                    file, spec = locations[name]
                    if spec.dtype.startswith(GGUF_PREFIX):
                        self._gguf_memory[(layer, proj)] = sum(
                            loaded_nbytes(checkpoint.tensors[f"{name[:-6]}{p}"], dtype.size)
                            for p in ("weight", "scales", "biases")
                            if f"{name[:-6]}{p}" in checkpoint.tensors
                        ) // spec.shape[0]
                    elif spec.dtype not in _NP_DTYPES and spec.dtype != "BF16":
                        raise CheckpointError(f"tensor {name} has unsupported dtype {spec.dtype}")
                    experts = spec.shape[0]
                    if spec.nbytes % experts:
                        raise CheckpointError(
                            f"tensor {name} does not split into {experts} experts"
                        )
                    stride = spec.nbytes // experts
                    parts[proj][part] = _Slice(file, spec.offset, stride, spec.dtype,
                                               (1, *spec.shape[1:]))  # fmt: skip
                    self.max_stride = max(self.max_stride, stride)
            self.slices[layer] = parts
            self.disk_bytes[layer] = sum(s.stride for p in parts.values() for s in p.values())
            self.memory_bytes[layer] = sum(
                self._gguf_memory.get((layer, proj)) or self._memory_nbytes(s)
                for proj, p in parts.items()
                for s in p.values()
            )
        self._local = threading.local()

    def _memory_nbytes(self, s: _Slice) -> int:
        return loaded_nbytes(TensorSpec(s.shape, s.dtype, s.stride), self.dtype.size)

    def expert_bytes(self, layer: int) -> int:
        """Bytes one expert of `layer` takes in the cache."""
        return self.memory_bytes[layer]

    def read(self, layer: int, expert: int) -> tuple[CachedExpert, int]:
        """(the expert's arrays, bytes of it read from disk)."""
        out: CachedExpert = {}
        total = 0
        for proj, parts in self.slices[layer].items():
            s = parts["weight"]
            if s.dtype.startswith(GGUF_PREFIX):  # GGUF blocks -> MLX affine (or float) arrays
                raw = self._pread(s.file, s.offset + expert * s.stride, s.stride)
                out[proj] = self._from_gguf(raw, s)
                total += s.stride
                continue
            arrays = []
            for part in ("weight", "scales", "biases"):
                s = parts.get(part)
                if s is None:
                    arrays.append(None)
                    continue
                raw = self._pread(s.file, s.offset + expert * s.stride, s.stride)
                arrays.append(self._to_array(raw, s))
                total += s.stride
            out[proj] = tuple(arrays)
        return out, total

    def _scratch(self, size: int) -> memoryview:
        """This thread's page-aligned read buffer (an anonymous mmap) of at least `size` bytes."""
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < size:
            if buf is not None:
                buf.close()
            buf = self._local.buf = mmap.mmap(-1, max(size, self.max_stride + 2 * _ALIGN))
        return memoryview(buf)

    def _pread(self, file: int, offset: int, size: int) -> np.ndarray:
        fd, direct = self._fds[file], self._direct[file]
        start = offset - offset % _ALIGN if direct else offset
        end = -(-(offset + size) // _ALIGN) * _ALIGN if direct else offset + size
        view = self._scratch(end - start)
        done = 0
        while done < end - start:
            n = os.preadv(fd, [view[done : end - start]], start + done)
            if n <= 0:
                if direct and start + done >= offset + size:
                    break  # the aligned tail ran past the end of the file
                raise CheckpointError(f"unexpected end of file reading experts at byte {offset}")
            done += n
        if self.bypass_page_cache and not direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, offset, size, os.POSIX_FADV_DONTNEED)
        return np.frombuffer(view, np.uint8, size, offset - start)

    def _from_gguf(self, raw: np.ndarray, s: _Slice) -> tuple:
        """One expert's GGUF blocks as (weight, scales, biases) [1, ...], as the whole-model
        GGUF loader converts them (model/gguf.py), floats at the compute dtype."""
        from .gguf import FLOAT_TYPES, to_affine

        ggml_type = s.dtype.removeprefix(GGUF_PREFIX)
        if ggml_type in FLOAT_TYPES:
            return (self._to_array(raw, replace(s, dtype=ggml_type)), None, None)
        weight, scales, biases, _, _ = to_affine(ggml_type, raw, s.shape[1:])
        as_f32 = replace(s, dtype="F32", shape=(1, *scales.shape))
        return (
            mx.array(weight.reshape(1, *weight.shape)),
            self._to_array(scales.reshape(-1).view(np.uint8), as_f32),
            self._to_array(biases.reshape(-1).view(np.uint8), as_f32),
        )

    def _to_array(self, raw: np.ndarray, s: _Slice) -> mx.array:
        """Bytes -> mx.array (a copy), floating tensors converted to the compute dtype with
        the same rounding `astype` applies when the model is loaded whole. Conversions are done
        in numpy so that no MLX operation is created on this (I/O) thread: bfloat16 is kept as
        its uint16 bits, viewed as bfloat16 where it is used (`_as_float`)."""
        if s.dtype not in FLOAT_DTYPES:
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
    "-layer" suffix for an equal byte quota per layer instead of one pool, or "next-use": evict
    what the forward pass will reach last (layers are visited in a cycle, so LRU evicts exactly
    what comes next once the cache holds less than one token's experts). Bytes are reserved
    before a read starts (a placeholder entry), pinned entries are never evicted, and `used`
    never exceeds the capacity (or a layer's quota). Thread-safe.
    """

    def __init__(self, capacity: int, policy: str = DEFAULT_POLICY, layers: Iterable[int] = (0,)):
        self.auto = policy == "auto"  # next-use while the capacity is below `working_set`
        self.working_set = 0  # bytes of one token's experts (set by `attach`)
        if self.auto:
            policy = "lru"
        if policy not in POLICIES:
            raise MixchatError(
                f"unknown expert cache policy {policy!r} (one of {', '.join(POLICIES)})"
            )
        self.capacity = int(capacity)
        self.policy = policy
        self.lfu = policy.startswith("lfu")
        self.next_use = policy == "next-use"
        self.per_layer = policy.endswith("-layer")
        self.layers = list(layers)
        self._position = {layer: i for i, layer in enumerate(self.layers)}  # in forward order
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
    def resize(self, capacity: int) -> None:
        """A new capacity (the KV cache grew or shrank); evicts unpinned entries to fit it."""
        with self.lock:
            self.capacity = max(0, int(capacity))
            self.quota = (
                self.capacity // max(len(self.layers), 1) if self.per_layer else self.capacity
            )
            for layer in self.layers if self.per_layer else [self.layers[0]]:
                for victim in self._victims(layer):
                    if self.scope_used(layer) <= self.limit(layer):
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
            victims = self._victims(layer)
            evictable = sum(self._entries[k].nbytes for k in victims)
            if self.scope_used(layer) - evictable + nbytes > limit:
                return False
            for victim in victims:
                if self.scope_used(layer) + nbytes <= limit:
                    break
                self._evict(victim)
            self._entries[key] = _Entry(None, nbytes, prefetched)
            if prefetched and cold:  # a guess goes in cold: evicted first unless demanded
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
        elif self.next_use or (self.auto and self.capacity < self.working_set):
            # the layer order reaches last first (this layer's others, then
            # the layers just computed), least recent among equals
            position = self._position
            n, here = len(position), position.get(layer, 0)
            keys.sort(key=lambda k: -((position.get(k[0], 0) - here - 1) % n))
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
    """Shared by a model's OffloadedExperts: the store, the cache, the I/O threads, counters.

    `capacity` is what the cache may hold with an empty KV cache; `set_kv_bytes` gives the
    cache whatever the KV cache does not use, so a growing chat takes memory from the experts
    and the total never passes the budget."""

    def __init__(self, store: ExpertStore, cache: ExpertCache, top_k: int, *, prefetch: bool = False,
                 io_threads: int = 4):  # fmt: skip
        self.store = store
        self.cache = cache
        self.capacity = cache.capacity  # with an empty KV cache
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
        from .sizes import format_bytes

        total = sum(self.store.memory_bytes[layer] * len(self.held) for layer in self.specs)
        share = self.cache.capacity / total if total else 1.0
        return (
            f"experts stream from disk: a {format_bytes(self.cache.capacity)} cache holds "
            f"{min(share, 1):.0%} of their {format_bytes(total)}"
        )

    def set_kv_bytes(self, nbytes: int) -> None:
        """The KV cache now takes `nbytes`: the expert cache gets the rest of its share (never
        less than one layer's k experts: the budget's minimum reserved the whole context)."""
        floor = self.top_k * max(self.store.memory_bytes.values(), default=0)
        self.cache.resize(max(floor, self.capacity - nbytes))
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


def _as_float(a: mx.array | None) -> mx.array | None:
    """bfloat16 tensors are cached as their uint16 bits (see ExpertStore._to_array)."""
    return a.view(mx.bfloat16) if a is not None and a.dtype == mx.uint16 else a


def _projections(cached: CachedExpert, specs: dict[str, tuple | None]) -> ExpertWeights:
    """A cached expert's arrays as the `experts.Projection`s `experts.swiglu` applies."""
    out = {}
    for proj in PROJECTIONS:
        weight, scales, biases = (_as_float(a) for a in cached[proj])
        spec = specs[proj]
        if spec is None:
            out[proj] = Projection(weight)
        else:
            group_size, bits, mode = spec
            out[proj] = Projection(weight, scales, biases, group_size, bits, mode)
    return out


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
        prefetch = None
        if next_layer is not None and N >= PREFILL_PREFETCH_TOKENS:
            # A prompt this long uses nearly every expert of every layer: read the next
            # layer's while this one computes.
            mx.eval(inds)
            prefetch = Prefetch(next_layer, list(rt.held), cold=False)
        elif rt.prefetch_enabled and next_layer is not None and N <= PREFETCH_MAX_TOKENS:
            logits = rt.gates[next_layer](x)
            guess = mx.argpartition(-logits, kth=rt.top_k - 1, axis=-1)[..., : rt.top_k]
            mx.eval(inds, guess)
            prefetch = Prefetch(next_layer, sorted(set(np.array(guess).reshape(-1).tolist())))
        else:
            mx.eval(inds)
        rt.release()  # everything before this layer is computed: its experts may go
        rt.counters.forward_passes += self.layer == min(rt.specs)
        groups = RowGroups.of(np.array(inds))
        rows = groups.rows(x, k)  # [N*k, 1, hidden], grouped by expert
        group = rt.group_size(self.layer)
        specs = rt.specs[self.layer]
        streams = _compute_streams()  # expert j of this layer on stream j % len(streams)
        parts: list[mx.array] = []
        experts, bounds = groups.experts, groups.bounds
        for g in range(0, len(experts), group):
            chosen = experts[g : g + group]
            last_group = g + group >= len(experts)
            cached = rt.demand(self.layer, chosen, prefetch if last_group else None)
            group_parts = []
            for i, e in enumerate(chosen):
                j = g + i
                w = _projections(cached[e], specs)
                for a in range(bounds[j], bounds[j + 1], ROW_SLICE):  # bounded activations
                    r = rows[a : min(a + ROW_SLICE, bounds[j + 1])]
                    zeros = mx.zeros((r.shape[0],), dtype=mx.uint32)
                    with mx.stream(streams[j % len(streams)]):
                        group_parts.append(swiglu(r, w, zeros, sorted_inds=True))
            parts.extend(group_parts)
            if not last_group:  # the cache cannot hold the whole layer: compute, then let go
                mx.eval(group_parts)
                rt.release()
        y = mx.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]  # [N*k, 1, hidden]
        return groups.unsort(y, N, k)


def _compute_streams() -> list:
    """The model's compute streams (one per CPU core on MLX's CPU backend)."""
    from .mixtral import compute_streams

    return compute_streams()


# --- wiring -----------------------------------------------------------------------------------


@dataclass
class OffloadOptions:
    policy: str = DEFAULT_POLICY
    prefetch: bool = False  # guess the next layer's experts during decode (see the docstring)
    io_threads: int = 4
    bypass_page_cache: bool = True  # expert bytes are not held a second time by the OS

    @classmethod
    def from_env(cls) -> OffloadOptions:
        """MIXCHAT_OFFLOAD_POLICY (auto, lru, lfu, lru-layer, lfu-layer, next-use),
        MIXCHAT_OFFLOAD_PREFETCH
        (0/1), MIXCHAT_OFFLOAD_PAGE_CACHE (1: let the OS cache expert reads)."""
        env = os.environ
        options = cls()
        if env.get("MIXCHAT_OFFLOAD_POLICY"):
            options.policy = env["MIXCHAT_OFFLOAD_POLICY"].strip().lower()
        if env.get("MIXCHAT_OFFLOAD_PREFETCH"):
            options.prefetch = env["MIXCHAT_OFFLOAD_PREFETCH"].strip() not in ("0", "", "no", "off")
        if env.get("MIXCHAT_OFFLOAD_PAGE_CACHE"):
            options.bypass_page_cache = env["MIXCHAT_OFFLOAD_PAGE_CACHE"].strip() in ("0", "no")
        return options


def moe_layers(model) -> list[int]:
    return [i for i, layer in enumerate(model.layers) if "block_sparse_moe" in layer]


def attach(model, checkpoint, capacity: int, dtype: mx.Dtype, options: OffloadOptions | None = None
           ) -> OffloadRuntime:  # fmt: skip
    """Replace every MoE layer's experts by OffloadedExperts sharing one runtime whose cache
    holds at most `capacity` bytes. The model's expert arrays must not have been evaluated."""
    options = options or OffloadOptions.from_env()
    layers = moe_layers(model)
    store = ExpertStore(checkpoint, layers, dtype, options.bypass_page_cache)
    top_k = model.args.num_experts_per_tok
    cache = ExpertCache(capacity, options.policy, layers)
    cache.working_set = sum(top_k * store.expert_bytes(layer) for layer in layers)
    for layer in layers:
        need = top_k * store.expert_bytes(layer)
        if cache.limit(layer) < need:
            store.close()
            raise MixchatError(
                f"expert cache of {capacity} bytes cannot hold {top_k} experts of a layer "
                f"({need} bytes)"
            )
    runtime = OffloadRuntime(store, cache, top_k, prefetch=options.prefetch,
                             io_threads=options.io_threads)  # fmt: skip
    runtime.num_experts = model.args.num_local_experts
    runtime.held = range(runtime.num_experts)
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
