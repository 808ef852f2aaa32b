"""This machine, measured: memory size, memory and disk bandwidth, and the speed of a model's own
kernels on its own shapes. Measurements are kept in the data directory (`machine.json`), so
`mixchat info` measures once per machine, disk and model shape (`--remeasure` to redo them).
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


def disk_bandwidth(regions: list[tuple[Path, int, int]], cache: MeasurementCache,
                   remeasure: bool = False) -> Bandwidth:  # fmt: skip
    """`measure_disk_bandwidth`, kept per device."""
    try:
        device = os.stat(regions[0][0]).st_dev
    except (OSError, IndexError):
        device = 0
    key = f"disk:{device}"
    kept = None if remeasure else cache.get(key)
    if kept is not None:
        return Bandwidth(kept["median"], kept["low"], kept["high"],
                         kept["method"] + f" (measured {kept['measured_at']})")  # fmt: skip
    bw = measure_disk_bandwidth(regions)
    cache.put(key, {"median": bw.bytes_per_second, "low": bw.low, "high": bw.high,
                    "method": bw.method})  # fmt: skip
    return bw


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
    """Seconds one decode step computes (no disk reads), measured on the model's shapes."""

    layer_seconds: float  # one transformer layer at T=1
    head_seconds: float  # final norm + LM head + sampling
    layers: int
    streams: int
    synced: bool  # with a sync per MoE layer, as when experts stream from disk
    method: str

    @property
    def step_seconds(self) -> float:
        return self.layers * self.layer_seconds + self.head_seconds

    def as_dict(self) -> dict:
        return asdict(self) | {"step_seconds": self.step_seconds}


def measure_decode_step(args, bits: int | None, group_size: int, dtype, streams: int,
                        synced: bool, seconds: float = 1.5) -> DecodeTiming:  # fmt: skip
    """Time this architecture's decode step from one real layer: a `mixtral.Block` at the
    model's shapes (its top-k experts only: a token's cost does not depend on the others),
    quantized as the checkpoint is, random weights, a short KV cache, through the same code and
    streams as the model; repeated so that the layers' graph building overlaps as it does in a
    whole step, for about `seconds`. Then the LM head. Nothing is read from the checkpoint."""
    from dataclasses import replace

    import mlx.core as mx
    import mlx.nn as nn

    from .mixtral import Block, compute_streams, linear, use_parallel_streams
    from .mlx_lm_parts import KVCache, create_attention_mask

    use_parallel_streams(streams)
    one = replace(args, num_hidden_layers=1,
                  num_local_experts=args.num_experts_per_tok if args.is_moe else 0)  # fmt: skip
    block = Block(one)
    head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
    if bits is not None:
        nn.quantize(block, group_size=group_size, bits=bits,
                    class_predicate=lambda p, m: hasattr(m, "to_quantized")
                    and not p.endswith("block_sparse_moe.gate")
                    and m.weight.shape[-1] % group_size == 0)  # fmt: skip
        head = nn.QuantizedLinear.from_linear(head, group_size=group_size, bits=bits)
        for module in [m for _, m in block.named_modules()] + [head]:
            if "scales" in module and "weight" in module:  # random bits, never the fp32 init
                module.weight = mx.random.randint(0, 2**31 - 1, module.weight.shape).view(mx.uint32)
                module.scales = mx.full(module.scales.shape, 0.004, dtype=dtype)
                module.biases = mx.full(module.biases.shape, -0.03, dtype=dtype)
    block.set_dtype(dtype)
    head.set_dtype(dtype)
    mx.eval(block.parameters(), head.parameters())
    compute_streams()
    repeats = max(1, min(args.num_hidden_layers, 8))
    caches = [KVCache() for _ in range(repeats)]
    x = mx.random.normal((1, 32, args.hidden_size)).astype(dtype) * 0.1
    for c in caches:  # a short context, as a chat's first tokens
        block(x, create_attention_mask(x, c), c, None)
        mx.eval(c.state)
    token = mx.random.normal((1, 1, args.hidden_size)).astype(dtype) * 0.1

    def step() -> mx.array:
        h = token
        for c in caches:
            if synced:  # OffloadedExperts evaluates each layer's routing before reading
                mx.eval(h)
            h = block(h, None, c, None)
        return h

    def time_it(fn, budget: float) -> float:
        mx.eval(fn())  # warm up
        n, start = 0, time.perf_counter()
        while True:
            mx.eval(fn())
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= budget or n >= 200:
                return elapsed / n

    layer = time_it(step, seconds) / repeats
    hidden = mx.random.normal((1, args.hidden_size)).astype(dtype)

    def head_step() -> mx.array:
        logits = linear(hidden, head)
        return mx.argmax(logits - mx.logsumexp(logits, axis=-1, keepdims=True), axis=-1)

    head_time = time_it(head_step, min(0.5, seconds / 3))
    mx.clear_cache()
    return DecodeTiming(
        layer, head_time, args.num_hidden_layers, streams, synced,
        f"one {'quantized ' if bits else ''}layer of this shape timed x{repeats} "
        f"({'synced per layer, ' if synced else ''}{streams} stream{'s' * (streams > 1)})",
    )  # fmt: skip


def decode_timing(args, bits: int | None, group_size: int, dtype, streams: int, synced: bool,
                  cache: MeasurementCache, remeasure: bool = False) -> DecodeTiming:  # fmt: skip
    """`measure_decode_step`, kept per shape, quantization, dtype and stream count."""
    import mlx.core as mx

    key = (
        f"decode:{mx.__version__}:{mx.default_device()}:{args.hidden_size}x"
        f"{args.intermediate_size}x{args.num_attention_heads}/{args.num_key_value_heads}:"
        f"{args.num_local_experts if args.is_moe else 0}/{args.num_experts_per_tok}:"
        f"v{args.vocab_size}:{bits}b{group_size}:{dtype}:{streams}s:{'sync' if synced else ''}"
    )
    kept = None if remeasure else cache.get(key)
    if kept is not None:
        kept = {k: v for k, v in kept.items() if k not in ("measured_at", "step_seconds")}
        kept["layers"] = args.num_hidden_layers
        return DecodeTiming(**kept)
    timing = measure_decode_step(args, bits, group_size, dtype, streams, synced)
    cache.put(key, {k: v for k, v in timing.as_dict().items() if k != "step_seconds"})
    return timing
