"""This machine, measured: memory size, memory and disk bandwidth, and `DecodeTiming`, the
speed of a model's own kernels on its own shapes (timed by model/kernel_timing.py).
Measurements are kept in the data directory (`machine.json`), so `mixchat info` measures once
per machine, disk and model shape (`--remeasure` to redo them; the disk's last few are kept).
"""

from __future__ import annotations

import json
import mmap
import os
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import MixchatError
from .sizes import format_bytes

_ALIGN = 1 << 12
CACHE_FILE = "machine.json"


# --- memory size -------------------------------------------------------------------------------


def physical_memory() -> int:
    """Bytes of RAM. Raises MixchatError when the system does not say (never a guess)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:
        raise MixchatError(
            "cannot tell how much memory this machine has: pass --memory-budget SIZE"
        ) from None


def available_memory() -> int | None:
    """Memory the system could give a new process now (None if unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        return None


# --- the measurement cache ------------------------------------------------------------------


class MeasurementCache:
    """Figures measured on this machine, by key, in one JSON file (None: not kept)."""

    def __init__(self, path: Path | None):
        self.path = path
        self._data: dict = {}
        if path is not None:
            try:
                self._data = json.loads(path.read_text())
            except (OSError, ValueError):
                self._data = {}

    def get(self, key: str) -> dict | None:
        value = self._data.get(key)
        return value if isinstance(value, dict) else None

    def put(self, key: str, value: dict) -> None:
        self._data[key] = value | {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self._data, indent=1))
            tmp.replace(self.path)
        except OSError:
            pass  # a cache that cannot be written only costs a re-measurement


# --- bandwidths ----------------------------------------------------------------------------------


@dataclass
class Bandwidth:
    bytes_per_second: float  # the median of the rounds
    low: float  # slowest round
    high: float  # fastest round
    method: str

    def describe(self) -> str:
        spread = (
            f" (rounds {format_bytes(self.low)}/s to {format_bytes(self.high)}/s)"
            if self.high > self.low * 1.05
            else ""
        )
        return f"{format_bytes(self.bytes_per_second)}/s{spread}: {self.method}"


def measure_memory_bandwidth(size_mb: int = 64, repeats: int = 5) -> Bandwidth:
    """Bytes read + written per second copying `size_mb` MB (median of `repeats`)."""
    import numpy as np

    a = np.ones(size_mb * 2**20 // 8)
    b = np.empty_like(a)
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(b, a)
        rates.append(2 * a.nbytes / (time.perf_counter() - t))
    return Bandwidth(statistics.median(rates), min(rates), max(rates),
                     f"copying {size_mb} MB (bytes read + written), median of {repeats}")  # fmt: skip


def measure_disk_bandwidth(
    regions: list[tuple[Path, int, int]],
    rounds: int = 5,
    bytes_per_round: int = 192 * 2**20,
    chunk: int = 8 * 2**20,
    threads: int = 4,
) -> Bandwidth:
    """Read throughput of `regions` ((file, start, stop) byte ranges, e.g. the experts), the
    way the expert cache reads: `threads` positioned reads of `chunk` bytes in flight, at random
    places, past the page cache (O_DIRECT on Linux, else evicted first with posix_fadvise, else
    F_NOCACHE on macOS). The median of `rounds` rounds, each on places not read before."""
    pieces = []
    for path, start, stop in regions:
        start = -(-start // _ALIGN) * _ALIGN
        for offset in range(start, stop - chunk + 1, chunk):
            pieces.append((path, offset))
    if not pieces:  # tiny files: whole regions
        pieces = [(p, s - s % _ALIGN) for p, s, _ in regions]
        chunk = max(_ALIGN, min(max((e - s for _, s, e in regions), default=_ALIGN), chunk))
        chunk = -(-chunk // _ALIGN) * _ALIGN
    random.shuffle(pieces)
    per_round = max(1, bytes_per_round // chunk)
    for method in ("O_DIRECT", "fadvise", "nocache", "buffered"):
        try:
            rates = []
            for r in range(rounds):
                batch = pieces[r * per_round : (r + 1) * per_round] or pieces[:per_round]
                rate = _timed_reads(batch, chunk, method, threads)
                if rate is None:
                    break
                rates.append(rate)
        except OSError:
            continue
        if rates:
            how = {
                "O_DIRECT": "O_DIRECT, page cache bypassed",
                "fadvise": "evicted from the page cache first (posix_fadvise)",
                "nocache": "F_NOCACHE (some places may be cached)",
                "buffered": "through the page cache (some places may be cached)",
            }[method]
            return Bandwidth(
                statistics.median(rates), min(rates), max(rates),
                f"{len(rates)} rounds of {format_bytes(per_round * chunk)} of the model's experts, "
                f"{threads} reads of {format_bytes(chunk)} in flight, {how}",
            )  # fmt: skip
    raise MixchatError("cannot read the model's files to measure disk bandwidth")


def _timed_reads(pieces, chunk: int, method: str, threads: int) -> float | None:
    flags = os.O_RDONLY
    if method == "O_DIRECT":
        if not hasattr(os, "O_DIRECT"):
            return None
        flags |= os.O_DIRECT
    elif method == "fadvise" and not hasattr(os, "posix_fadvise"):
        return None
    elif method == "nocache" and sys.platform != "darwin":
        return None
    fds: dict[Path, int] = {}
    buffers = [mmap.mmap(-1, chunk) for _ in range(threads)]  # page-aligned, as O_DIRECT needs
    try:
        for path, _ in pieces:
            if path not in fds:
                fds[path] = os.open(path, flags)
                if method == "nocache":
                    import fcntl

                    fcntl.fcntl(fds[path], getattr(fcntl, "F_NOCACHE", 48), 1)
        if method == "fadvise":
            for path, offset in pieces:
                os.posix_fadvise(fds[path], offset, chunk, os.POSIX_FADV_DONTNEED)

        def read(i: int) -> int:
            path, offset = pieces[i]
            return os.preadv(fds[path], [buffers[i % threads]], offset)

        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            total = 0
            for i in range(0, len(pieces), threads):  # `threads` reads in flight, one per buffer
                total += sum(pool.map(read, range(i, min(i + threads, len(pieces)))))
        elapsed = time.perf_counter() - start
    finally:
        for fd in fds.values():
            os.close(fd)
        for buf in buffers:
            buf.close()
    if total == 0 or elapsed <= 0:
        return None
    return total / elapsed


DISK_KEPT = 5  # disk measurements kept per device: the fastest of them is used
CONFIRM_ROUNDS = 2  # a lone kept measurement is confirmed by one this short


def disk_bandwidth(regions: list[tuple[Path, int, int]], cache: MeasurementCache,
                   remeasure: bool = False) -> Bandwidth:  # fmt: skip
    """`measure_disk_bandwidth`, kept per device: the last DISK_KEPT measurements, of which the
    fastest is used. A disk is never faster than it is, but a measurement taken while something
    else reads or writes it is slower: one such figure alone must not make every prediction
    disk-bound. So a lone kept measurement is confirmed by a short second one the next time,
    and `--remeasure` adds a measurement rather than replacing the others."""
    try:
        device = os.stat(regions[0][0]).st_dev
    except (OSError, IndexError):
        device = 0
    key = f"disk:{device}"
    kept = cache.get(key)
    history = [h for h in (kept or {}).get("history", [kept] if kept else [])
               if isinstance(h, dict) and h.get("median")]  # fmt: skip
    if remeasure or len(history) < 2:
        confirming = bool(history) and not remeasure
        bw = measure_disk_bandwidth(regions, rounds=CONFIRM_ROUNDS if confirming else 5)
        history.append({"median": bw.bytes_per_second, "low": bw.low, "high": bw.high,
                        "method": bw.method, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        history = history[-DISK_KEPT:]
        best = max(history, key=lambda h: h["median"])
        cache.put(key, {k: best[k] for k in ("median", "low", "high", "method")}
                  | {"best_measured_at": best.get("measured_at"), "history": history})
    best = max(history, key=lambda h: h["median"])
    return Bandwidth(best["median"], best["low"], best["high"], _disk_method(best, history))


def _disk_method(best: dict, history: list[dict]) -> str:
    when = f"measured {best.get('measured_at', 'earlier')}"
    if len(history) > 1:
        slowest = min(h["median"] for h in history)
        when += (f"; the fastest of the {len(history)} kept measurements of this disk, "
                 f"{format_bytes(slowest)}/s to {format_bytes(best['median'])}/s")  # fmt: skip
    return f"{best['method']} ({when})"


def memory_bandwidth(cache: MeasurementCache, remeasure: bool = False) -> Bandwidth:
    kept = None if remeasure else cache.get("memory")
    if kept is not None:
        return Bandwidth(kept["median"], kept["low"], kept["high"], kept["method"])
    bw = measure_memory_bandwidth()
    cache.put("memory", {"median": bw.bytes_per_second, "low": bw.low, "high": bw.high,
                         "method": bw.method})  # fmt: skip
    return bw


# --- the model's own kernels -----------------------------------------------------------------


@dataclass
class DecodeTiming:
    """Seconds one decode step computes (no disk reads), measured on the model's shapes
    (model/kernel_timing.py).

    All experts resident, a layer is timed whole (its k experts applied together):
    `layer_seconds`, and `expert_seconds` is 0. Streamed from the expert cache, a MoE layer
    applies its k experts one by one from the cache after a sync on its routing: then
    `layer_seconds` is the rest of the layer (attention, norms, router, the sync) and
    `expert_seconds` one routed expert as the streamed decode applies it, k = `experts_per_layer`
    of them in each MoE layer."""

    layer_seconds: float  # one transformer layer at T=1 (streamed: without its routed experts)
    head_seconds: float  # final norm + LM head + sampling
    layers: int
    streams: int
    synced: bool  # with a sync per MoE layer, as when experts stream from disk
    method: str
    expert_seconds: float = 0.0  # one routed expert, streamed (0: inside layer_seconds)
    experts_per_layer: int = 0  # routed experts applied one by one per MoE layer (top-k)

    def compute_seconds(self, moe_layers: int | None = None) -> float:
        """One decode step: every layer's resident part, k experts in each of `moe_layers`
        MoE layers (None: every layer), the head."""
        moe = self.layers if moe_layers is None else moe_layers
        return (self.layers * self.layer_seconds
                + moe * self.experts_per_layer * self.expert_seconds + self.head_seconds)  # fmt: skip

    @property
    def step_seconds(self) -> float:
        return self.compute_seconds()

    def as_dict(self) -> dict:
        return asdict(self) | {"step_seconds": self.step_seconds}
