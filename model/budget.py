"""Memory budgets: parse them, size a checkpoint's parts, check a budget, predict decode speed.

Everything here works from a checkpoint's headers (`weights.locate`), before anything is loaded.
A budget covers the model's whole footprint: the resident (non-expert) weights, a reserve for
the KV cache and activations, and a cache of experts read on demand (`model/offload.py`).

Decode speed is predicted as the bound
    min(memory bandwidth / bytes of weights read per token,
        disk bandwidth / expert bytes missed per token)
with an expected miss rate of 1 - (cached share of the expert bytes).
"""

from __future__ import annotations

import mmap
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import MixchatError
from .sizes import format_bytes, parse_size
from .sizes import size_arg as budget_arg

AUTO_SHARE = 0.70  # `auto`: this share of physical memory (capped by what is available now)
RESERVE_TOKENS = 4096  # the KV cache is reserved for this many tokens (or the context, if less)
PREFILL_CHUNK = 512  # as model/generate.py: prompt tokens per forward pass
EXPERT_MARK = ".block_sparse_moe.switch_mlp."
PER_EXPERT_MARK = ".block_sparse_moe.experts."
FLOAT_DTYPES = ("F32", "F16", "BF16")


class BudgetError(MixchatError):
    """A memory budget that cannot work (too small, or a model whose experts cannot stream)."""


# --- sizes -------------------------------------------------------------------------------------


def parse_budget(text: str | int) -> int | str:
    """A --memory-budget value: a size ('12GB', '800MB', '1.5GiB', bytes) or 'auto'."""
    if isinstance(text, str) and text.strip().lower() == "auto":
        return "auto"
    try:
        return parse_size(text)
    except ValueError:
        raise ValueError(
            f"not a memory size: {text!r} (use e.g. 12GB, 800MB or auto)"
        ) from None


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        try:
            import psutil

            return int(psutil.virtual_memory().total)
        except Exception:
            return 8 * 10**9


def available_memory() -> int | None:
    """Memory the system could give a new process now (None if unknown)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def auto_budget() -> tuple[int, str]:
    """(bytes, how it was chosen): 70% of physical memory, at most 90% of what is available."""
    total = physical_memory()
    budget = int(total * AUTO_SHARE)
    why = f"{AUTO_SHARE:.0%} of {format_bytes(total)} physical memory"
    available = available_memory()
    if available is not None and available * 0.9 < budget:
        budget = int(available * 0.9)
        why = f"90% of the {format_bytes(available)} available now"
    return budget, why


def resolve_budget(spec: str | int | None) -> int | None:
    """A parsed budget in bytes (None: no budget). Raises BudgetError on an unparseable size."""
    if spec is None or spec == "":
        return None
    try:
        value = parse_budget(spec)
    except ValueError as e:
        raise BudgetError(str(e)) from None
    return auto_budget()[0] if value == "auto" else int(value)


# --- what a checkpoint needs ------------------------------------------------------------------


def _memory_nbytes(spec, compute_bytes: int) -> int:
    """Bytes a stored tensor takes once loaded (floating tensors become the compute dtype)."""
    if spec.dtype in FLOAT_DTYPES:
        return spec.nbytes // (4 if spec.dtype == "F32" else 2) * compute_bytes
    return spec.nbytes


@dataclass
class MemoryPlan:
    """How a checkpoint splits in memory: resident weights, experts, and a runtime reserve."""

    resident_bytes: int  # non-expert weights in memory
    resident_active_bytes: int  # of those, read per decoded token (one embedding row)
    reserve_bytes: int  # KV cache for RESERVE_TOKENS tokens + prefill activations + read buffers
    expert_bytes: int  # one expert (gate+up+down) in memory, the largest layer's
    expert_disk_bytes: int  # one expert on disk (what a miss reads), the largest layer's
    total_expert_bytes: int  # all experts, in memory
    total_expert_disk_bytes: int
    moe_layers: int
    num_experts: int
    top_k: int
    offloadable: bool  # experts stacked per layer (MLX quantized layout): can be streamed
    why_not: str = ""  # when not offloadable
    expert_bits: int | None = None
    layer_expert_bytes: dict[int, int] = field(default_factory=dict)  # layer -> one expert

    @property
    def full_bytes(self) -> int:
        """Everything resident: weights + reserve."""
        return self.resident_bytes + self.total_expert_bytes + self.reserve_bytes

    @property
    def minimum_budget(self) -> int:
        """Resident weights + reserve + top-k experts per MoE layer."""
        return (
            self.resident_bytes
            + self.reserve_bytes
            + self.moe_layers * self.top_k * self.expert_bytes
        )

    def cache_bytes(self, budget: int) -> int:
        """Bytes the expert cache may hold under `budget`."""
        return max(
            0, min(budget - self.resident_bytes - self.reserve_bytes, self.total_expert_bytes)
        )

    def cached_fraction(self, budget: int) -> float:
        if not self.total_expert_bytes:
            return 1.0
        return min(1.0, self.cache_bytes(budget) / self.total_expert_bytes)

    def needs_offload(self, budget: int | None) -> bool:
        return budget is not None and budget < self.full_bytes

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("layer_expert_bytes")
        return d | {"full_bytes": self.full_bytes, "minimum_budget": self.minimum_budget}


def _layer_of(name: str) -> int:
    return int(name.split(".")[2])


def memory_plan(checkpoint, compute_bytes: int = 4) -> MemoryPlan:
    """Size the parts of `checkpoint` (a weights.Checkpoint) once loaded at `compute_bytes`."""
    args = checkpoint.args
    resident = active = 0
    layer_mem: dict[int, int] = {}
    layer_disk: dict[int, int] = {}
    stacked = per_expert = False
    bits = None
    for name, spec in checkpoint.tensors.items():
        mem = _memory_nbytes(spec, compute_bytes)
        if EXPERT_MARK in name or PER_EXPERT_MARK in name:
            layer = _layer_of(name)
            layer_mem[layer] = layer_mem.get(layer, 0) + mem
            layer_disk[layer] = layer_disk.get(layer, 0) + spec.nbytes
            stacked |= EXPERT_MARK in name
            per_expert |= PER_EXPERT_MARK in name
            if name.endswith("gate_proj.weight") and spec.dtype == "U32" and bits is None:
                packed_in = spec.shape[-1]
                in_dims = args.hidden_size
                bits = packed_in * 32 // in_dims if in_dims else None
            continue
        resident += mem
        if name.startswith("model.embed_tokens.") and not args.tie_word_embeddings:
            active += mem // max(args.vocab_size, 1)
        else:
            active += mem
    E = max(args.num_local_experts, 1) if args.is_moe else 1
    expert = max(layer_mem.values(), default=0) // E
    expert_disk = max(layer_disk.values(), default=0) // E
    offloadable, why = True, ""
    if not args.is_moe or not layer_mem:
        offloadable, why = False, "it is a dense model: it has no experts to stream"
    elif checkpoint.format != "hf" or per_expert or not stacked:
        offloadable = False
        why = (
            "experts stream only from an MLX-quantized checkpoint (experts stacked per layer): "
            f"convert it with `mixchat quantize {checkpoint.path} DIR`"
        )
    elif args.quantization is None:
        offloadable = False
        why = f"it is not quantized: convert it with `mixchat quantize {checkpoint.path} DIR`"
    return MemoryPlan(
        resident_bytes=resident,
        resident_active_bytes=active,
        reserve_bytes=reserve_bytes(args, compute_bytes, expert_disk),
        expert_bytes=expert,
        expert_disk_bytes=expert_disk,
        total_expert_bytes=sum(layer_mem.values()),
        total_expert_disk_bytes=sum(layer_disk.values()),
        moe_layers=len(layer_mem),
        num_experts=args.num_local_experts if args.is_moe else 0,
        top_k=args.num_experts_per_tok if args.is_moe else 0,
        offloadable=offloadable,
        why_not=why,
        expert_bits=bits,
        layer_expert_bytes={layer: mem // E for layer, mem in layer_mem.items()},
    )


def reserve_bytes(args, compute_bytes: int, expert_disk_bytes: int = 0) -> int:
    """KV cache for RESERVE_TOKENS tokens, prefill activations (attention scores and expert
    intermediates of one PREFILL_CHUNK), and two experts' read buffers."""
    tokens = min(args.context_length, RESERVE_TOKENS)
    if args.sliding_window:
        tokens = min(tokens, args.sliding_window)
    kv = 2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim * compute_bytes
    k = args.num_experts_per_tok if args.is_moe else 1
    activations = (
        PREFILL_CHUNK
        * compute_bytes
        * (
            12 * args.hidden_size
            + args.num_attention_heads * tokens
            + 3 * k * args.intermediate_size
        )
    )
    return kv * tokens + activations + 2 * expert_disk_bytes


def check_budget(plan: MemoryPlan, budget: int, model_name: str = "the model") -> bool:
    """True when `budget` needs experts streamed, False when everything fits in it; raises
    BudgetError (one line, naming the minimum) when it cannot work."""
    if budget >= plan.full_bytes:
        return False
    if not plan.offloadable:
        raise BudgetError(
            f"{model_name} needs {format_bytes(plan.full_bytes)} in memory, over the "
            f"{format_bytes(budget)} budget, and {plan.why_not}"
        )
    if budget < plan.minimum_budget:
        raise BudgetError(
            f"memory budget {format_bytes(budget)} is below the minimum of "
            f"{format_bytes(plan.minimum_budget)} for {model_name} "
            f"({format_bytes(plan.resident_bytes)} resident weights + "
            f"{format_bytes(plan.reserve_bytes)} KV cache and activations + {plan.top_k} experts "
            f"x {plan.moe_layers} layers): use --memory-budget {budget_arg(plan.minimum_budget)} "
            "or more"
        )
    return True


# --- speed ------------------------------------------------------------------------------------


@dataclass
class Prediction:
    budget: int
    fits: bool  # everything resident within the budget
    feasible: bool  # the budget is at least the minimum (or everything fits)
    cached_fraction: float
    expected_hit_rate: float  # ~ cached fraction (LRU measures a few points above)
    memory_bytes_per_token: float
    disk_bytes_per_token: float
    memory_bound_tps: float
    disk_bound_tps: float  # inf when nothing is read from disk
    tps: float  # min of the two bounds

    @property
    def bound(self) -> str:
        return "disk" if self.disk_bound_tps < self.memory_bound_tps else "memory"

    def as_dict(self) -> dict:
        d = asdict(self)
        if d["disk_bound_tps"] == float("inf"):
            d["disk_bound_tps"] = None
        return d | {"bound": self.bound}


def predict(plan: MemoryPlan, budget: int, disk_bw: float, memory_bw: float) -> Prediction:
    """Decode tok/s bound under `budget` with disk and memory bandwidths in bytes/s."""
    fits = budget >= plan.full_bytes
    feasible = fits or (plan.offloadable and budget >= plan.minimum_budget)
    cached = 1.0 if fits else (plan.cached_fraction(budget) if feasible else 0.0)
    miss = 1.0 - cached
    experts_per_token = plan.moe_layers * plan.top_k
    mem_bytes = plan.resident_active_bytes + experts_per_token * plan.expert_bytes
    disk_bytes = experts_per_token * plan.expert_disk_bytes * miss
    mem_tps = memory_bw / mem_bytes if mem_bytes else float("inf")
    disk_tps = disk_bw / disk_bytes if disk_bytes > 0 else float("inf")
    return Prediction(
        budget=budget,
        fits=fits,
        feasible=feasible,
        cached_fraction=cached,
        expected_hit_rate=cached,
        memory_bytes_per_token=mem_bytes,
        disk_bytes_per_token=disk_bytes,
        memory_bound_tps=mem_tps,
        disk_bound_tps=disk_tps,
        tps=min(mem_tps, disk_tps) if feasible else 0.0,
    )


def estimate_plan(
    args,
    compute_bytes: int = 4,
    bits: int = 4,
    expert_bits: int | None = None,
    group_size: int = 64,
    scale_bytes: int = 2,
) -> MemoryPlan:
    """The plan of this architecture after `mixchat quantize --bits B --expert-bits EB`
    (router and norms unquantized, scales and biases stored at `scale_bytes`), from arithmetic."""
    h, hd, V = args.hidden_size, args.head_dim, args.vocab_size
    E = args.num_local_experts if args.is_moe else 0
    k = args.num_experts_per_tok if args.is_moe else 0
    expert_bits = expert_bits or bits

    def quantized(params: int, b: int, scale: int) -> int:
        return int(params * b / 8 + params / group_size * 2 * scale)

    attention = h * args.num_attention_heads * hd * 2 + h * args.num_key_value_heads * hd * 2
    embeddings = V * h * (1 if args.tie_word_embeddings else 2)
    small = (2 * h + h * E) * args.num_hidden_layers + h  # norms, routers
    layers = args.num_hidden_layers
    resident = (
        quantized(attention * layers + embeddings, bits, compute_bytes) + small * compute_bytes
    )
    embed_row = 0 if args.tie_word_embeddings else quantized(V * h, bits, compute_bytes)
    expert_params = 3 * h * args.intermediate_size
    expert_mem = quantized(expert_params, expert_bits, compute_bytes)
    expert_disk = quantized(expert_params, expert_bits, scale_bytes)
    moe_layers = layers if E else 0
    if not E:  # dense: the MLP is resident
        resident += quantized(expert_params * layers, bits, compute_bytes)
    return MemoryPlan(
        resident_bytes=resident,
        resident_active_bytes=resident - embed_row + embed_row // max(V, 1),
        reserve_bytes=reserve_bytes(args, compute_bytes, expert_disk if E else 0),
        expert_bytes=expert_mem if E else 0,
        expert_disk_bytes=expert_disk if E else 0,
        total_expert_bytes=expert_mem * E * moe_layers,
        total_expert_disk_bytes=expert_disk * E * moe_layers,
        moe_layers=moe_layers,
        num_experts=E,
        top_k=k,
        offloadable=bool(E),
        why_not="" if E else "it is a dense model: it has no experts to stream",
        expert_bits=expert_bits,
    )


# --- bandwidth measurements -------------------------------------------------------------------

_ALIGN = 1 << 12


def _env_bandwidth(name: str) -> float | None:
    value = os.environ.get(name)
    if not value:
        return None
    try:
        gbs = float(value)
    except ValueError:
        raise BudgetError(f"{name} must be a bandwidth in GB/s, not {value!r}") from None
    return gbs * 1e9


def measure_memory_bandwidth(size_mb: int = 64, repeats: int = 5) -> tuple[float, str]:
    """(bytes/s, method): bytes read + written per second copying `size_mb` MB, best of
    `repeats` (the measure benchmarks/bench_decode.py uses for its bound)."""
    given = _env_bandwidth("MIXCHAT_MEMORY_BANDWIDTH")
    if given:
        return given, "given by MIXCHAT_MEMORY_BANDWIDTH"
    import numpy as np

    a = np.ones(size_mb * 2**20 // 8)
    b = np.empty_like(a)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(b, a)
        best = max(best, 2 * a.nbytes / (time.perf_counter() - t))
    return best, f"copying {size_mb} MB (bytes read + written)"


def measure_disk_bandwidth(
    regions: list[tuple[Path, int, int]], max_bytes: int = 256 * 2**20, chunk: int = 8 * 2**20
) -> tuple[float, str]:
    """(bytes/s, method) reading up to `max_bytes` of `regions` ((file, start, stop) byte ranges,
    e.g. the experts), in random `chunk`-sized pieces. Bypasses the page cache where it can:
    O_DIRECT (Linux), else evicting the range first with posix_fadvise, else F_NOCACHE (macOS)
    on a region read at random (it may have been read recently: then the figure is too high)."""
    given = _env_bandwidth("MIXCHAT_DISK_BANDWIDTH")
    if given:
        return given, "given by MIXCHAT_DISK_BANDWIDTH"
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
    pieces = pieces[: max(1, max_bytes // chunk)]
    for method in ("O_DIRECT", "fadvise", "nocache", "buffered"):
        try:
            result = _timed_reads(pieces, chunk, method)
        except OSError:
            continue
        if result is not None:
            return result
    raise BudgetError("cannot read the model's files to measure disk bandwidth")


def _timed_reads(pieces, chunk: int, method: str) -> tuple[float, str] | None:
    flags = os.O_RDONLY
    if method == "O_DIRECT":
        if not hasattr(os, "O_DIRECT"):
            return None
        flags |= os.O_DIRECT
    elif method == "fadvise" and not hasattr(os, "posix_fadvise"):
        return None
    elif method == "nocache" and sys.platform != "darwin":
        return None
    buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
    fds: dict[Path, int] = {}
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
        total = 0
        start = time.perf_counter()
        for path, offset in pieces:
            n = os.preadv(fds[path], [buf], offset)
            total += n
        elapsed = time.perf_counter() - start
    finally:
        for fd in fds.values():
            os.close(fd)
        buf.close()
    if total == 0 or elapsed <= 0:
        return None
    how = {
        "O_DIRECT": "with O_DIRECT (page cache bypassed)",
        "fadvise": "after evicting it from the page cache (posix_fadvise)",
        "nocache": "with F_NOCACHE, at random places (some may be cached)",
        "buffered": "at random places through the page cache (some may be cached)",
    }[method]
    return total / elapsed, f"{format_bytes(total)} of the model read {how}"


def expert_regions(checkpoint) -> list[tuple[Path, int, int]]:
    """Byte ranges (file, start, stop) of the expert tensors; the whole files if none."""
    from .offload import tensor_locations

    regions = []
    for file in checkpoint.files:
        for name, (start, stop, _, _) in tensor_locations(file).items():
            if EXPERT_MARK in name or PER_EXPERT_MARK in name:
                regions.append((file, start, stop))
    if not regions:
        regions = [(f, 0, f.stat().st_size) for f in checkpoint.files]
    return regions


# --- `mixchat info`: will it fit, how fast --------------------------------------------------


@dataclass
class FitReport:
    budget: int
    budget_source: str  # "--memory-budget" or how auto chose it
    plan: MemoryPlan
    prediction: Prediction
    memory_bandwidth: float
    memory_method: str
    disk_bandwidth: float | None  # None: not measured (nothing is read from disk)
    disk_method: str
    options: list[dict]  # {"option": str, "detail": str, "prediction": dict}

    def as_dict(self) -> dict:
        return {
            "budget": self.budget,
            "budget_source": self.budget_source,
            "fits": self.prediction.fits,
            "feasible": self.prediction.feasible,
            "needs_bytes": self.plan.full_bytes,
            "minimum_budget": self.plan.minimum_budget if self.plan.offloadable else None,
            "cache_bytes": self.plan.cache_bytes(self.budget),
            "plan": self.plan.as_dict(),
            "prediction": self.prediction.as_dict(),
            "memory_bandwidth": self.memory_bandwidth,
            "memory_method": self.memory_method,
            "disk_bandwidth": self.disk_bandwidth,
            "disk_method": self.disk_method,
            "options": self.options,
        }

    def rows(self) -> list[tuple[str, str]]:
        plan, p = self.plan, self.prediction
        rows = [("memory budget", f"{format_bytes(self.budget)} ({self.budget_source})")]
        parts = (
            f"weights {format_bytes(plan.resident_bytes + plan.total_expert_bytes)} + KV cache "
            f"and activations {format_bytes(plan.reserve_bytes)}"
        )
        if p.fits:
            rows.append(("fits", f"yes: {format_bytes(plan.full_bytes)} in memory ({parts})"))
        elif p.feasible:
            rows.append((
                "fits", f"no: needs {format_bytes(plan.full_bytes)} ({parts}); "
                f"{format_bytes(plan.cache_bytes(self.budget))} of "
                f"{format_bytes(plan.total_expert_bytes)} experts ({p.cached_fraction:.0%}) stay "
                "cached, the others are read from disk when the router picks them",
            ))  # fmt: skip
        elif plan.offloadable:
            rows.append((
                "fits", f"no: needs {format_bytes(plan.full_bytes)}, and the budget is below the "
                f"minimum of {format_bytes(plan.minimum_budget)} for streaming experts "
                f"({plan.top_k} per layer cached)",
            ))  # fmt: skip
        else:
            rows.append(("fits", f"no: needs {format_bytes(plan.full_bytes)} ({parts}), and "
                                 f"{plan.why_not}"))  # fmt: skip
        if plan.offloadable:
            rows.append(
                (
                    "minimum budget",
                    f"{format_bytes(plan.minimum_budget)} "
                    f"(resident weights, KV cache, {plan.top_k} experts per layer)",
                )
            )
        if p.feasible:
            rows.append(("decode speed", f"≈ {p.tps:.1f} tok/s at most, {self._why(p)}"))
            import mlx.core as mx

            if mx.default_device().type == mx.DeviceType.cpu:
                rows.append(("note", "a bandwidth bound: on MLX's CPU backend the quantized "
                                     "kernels are compute-bound far below it (BENCHMARKS.md)"))  # fmt: skip
        if self.disk_bandwidth is not None:
            rows.append(("disk read", f"{format_bytes(self.disk_bandwidth)}/s: {self.disk_method}"))
        rows.append(
            ("memory speed", f"{format_bytes(self.memory_bandwidth)}/s: {self.memory_method}")
        )
        for option in self.options:
            rows.append(("option", f"{option['option']}: {option['detail']}"))
        return rows

    def _why(self, p: Prediction) -> str:
        memory = (
            f"memory {format_bytes(self.memory_bandwidth)}/s ÷ "
            f"{format_bytes(p.memory_bytes_per_token)} per token = {p.memory_bound_tps:.1f}"
        )
        if p.disk_bytes_per_token <= 0 or self.disk_bandwidth is None:
            return f"memory-bound ({memory})"
        disk = (
            f"disk {format_bytes(self.disk_bandwidth)}/s ÷ "
            f"{format_bytes(p.disk_bytes_per_token)} of experts missed per token = "
            f"{p.disk_bound_tps:.1f}"
        )
        return (
            f"{p.bound}-bound (min of {disk}; {memory}); expected expert hit rate ≈ "
            f"{p.expected_hit_rate:.0%}"
        )


def fit_report(checkpoint, compute_bytes: int, budget: int | str | None = None,
               model_ref: str | None = None) -> FitReport:  # fmt: skip
    """Whether `checkpoint` fits in `budget` (None or "auto": a safe share of this machine's
    memory), its decode speed bound from measured bandwidths, and options that would fit."""
    plan = memory_plan(checkpoint, compute_bytes)
    auto, auto_why = auto_budget()
    if budget is None or budget == "auto":
        budget, source = auto, f"auto: {auto_why}"
    else:
        source = "--memory-budget"
    memory_bw, memory_method = measure_memory_bandwidth()
    quantized = checkpoint.args.quantization is not None or checkpoint.format == "gguf"
    if budget < plan.full_bytes and plan.moe_layers > 0:  # experts would stream from disk
        disk_bw, disk_method = measure_disk_bandwidth(expert_regions(checkpoint))
    else:
        disk_bw, disk_method = None, ""
    disk = disk_bw if disk_bw is not None else float("inf")
    prediction = predict(plan, budget, disk, memory_bw)

    options: list[dict] = []

    def add(option: str, candidate: MemoryPlan, at: int, what: str = "") -> None:
        p = predict(candidate, at, disk, memory_bw)
        if p.fits:
            detail = f"{what}everything in memory ({format_bytes(candidate.full_bytes)}), ≈ {p.tps:.1f} tok/s"
        elif p.feasible:
            detail = (
                f"{what}{p.cached_fraction:.0%} of the experts cached, ≈ {p.tps:.1f} tok/s "
                f"({p.bound}-bound)"
            )
        else:
            return
        options.append({"option": option, "detail": detail, "prediction": p.as_dict()})

    if not prediction.fits:
        if plan.full_bytes <= auto and budget < plan.full_bytes:
            add(f"--memory-budget {budget_arg(plan.full_bytes)}", plan, plan.full_bytes)
        elif plan.offloadable and budget < auto:
            add(f"--memory-budget auto ({format_bytes(auto)})", plan, auto)
        args = checkpoint.args
        q = args.quantization or {}
        group = q.get("group_size", 64) if isinstance(q.get("group_size", 64), int) else 64
        if quantized and checkpoint.format == "hf" and plan.moe_layers:
            current = plan.expert_bits or q.get("bits", 4)
            for bits in (3, 2):
                if bits >= current:
                    continue
                est = estimate_plan(args, compute_bytes, q.get("bits", 4), bits, group)
                candidate = replace_experts(plan, est)
                add(
                    f"mixchat quantize SRC DST --expert-bits {bits}",
                    candidate,
                    budget,
                    f"re-quantized from the original checkpoint, experts "
                    f"{format_bytes(candidate.total_expert_disk_bytes)} on disk; ",
                )
                if p_fits(candidate, budget):
                    break
        elif not quantized and checkpoint.format == "hf":
            src = model_ref or str(checkpoint.path)
            for bits, expert_bits in ((4, None), (4, 3)):
                est = estimate_plan(args, compute_bytes, bits, expert_bits, 64)
                flag = f" --expert-bits {expert_bits}" if expert_bits else ""
                add(
                    f"mixchat quantize {src} DST{flag}",
                    est,
                    budget,
                    f"{format_bytes(est.resident_bytes + est.total_expert_disk_bytes)} on disk; ",
                )
                if p_fits(est, budget):
                    break
    return FitReport(budget, source, plan, prediction, memory_bw, memory_method, disk_bw,
                     disk_method, options)  # fmt: skip


def p_fits(plan: MemoryPlan, budget: int) -> bool:
    return budget >= plan.full_bytes


def replace_experts(plan: MemoryPlan, est: MemoryPlan) -> MemoryPlan:
    """`plan` with the expert sizes of `est` (same architecture, other expert bits)."""
    from dataclasses import replace

    return replace(
        plan,
        reserve_bytes=plan.reserve_bytes - 2 * plan.expert_disk_bytes + 2 * est.expert_disk_bytes,
        expert_bytes=est.expert_bytes,
        expert_disk_bytes=est.expert_disk_bytes,
        total_expert_bytes=est.total_expert_bytes,
        total_expert_disk_bytes=est.total_expert_disk_bytes,
        expert_bits=est.expert_bits,
        layer_expert_bytes={},
    )
