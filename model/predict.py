"""Decode speed, predicted from this machine's measurements, and `mixchat info`'s fit report.

A decode step costs
    compute: the model's own kernels on its own shapes, timed on this machine
             (`kernel_timing.decode_timing`): each layer's resident part, plus, when experts
             stream, k routed experts per MoE layer at the cost the streamed decode pays for
             each (one by one from the cache); or the memory bound if that is slower;
  + disk:    experts the cache misses, read at the measured disk bandwidth
             (misses per token = MoE layers x top-k x (1 - expected hit rate)),
since a streamed layer must know its routing before it can read. The expected hit rate comes
from replaying realistic routing through the cache (`routing_trace.expected_hit_rate`).
The bound that dominates is named.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .kernel_timing import decode_timing
from .machine import Bandwidth, DecodeTiming, MeasurementCache, disk_bandwidth, memory_bandwidth
from .memory_plan import (
    MemoryPlan,
    auto_budget,
    estimate_plan,
    memory_plan,
    none_warning,
    with_context,
)
from .names import is_expert_tensor, is_per_expert_tensor
from .sizes import format_bytes, format_significant, size_arg


def expected_hit_rate(plan: MemoryPlan, cached_fraction: float) -> float:
    """Share of routed experts the cache holds, on routing with Mixtral's measured locality."""
    if cached_fraction >= 1.0 or not plan.moe_layers:
        return 1.0
    try:
        from .routing_trace import expected_hit_rate as replayed
    except ImportError:  # no trace model: LRU on near-uniform routing ~ the cached share
        return cached_fraction
    return replayed(cached_fraction, plan.num_experts, plan.top_k, plan.moe_layers)


@dataclass
class Prediction:
    budget: int | None
    fits: bool  # everything resident within the budget
    feasible: bool  # the budget is at least the minimum (or everything fits)
    cached_fraction: float
    expected_hit_rate: float
    memory_bytes_per_token: float
    disk_bytes_per_token: float
    compute_seconds: float  # per token, measured kernels
    memory_seconds: float  # per token, at the memory bandwidth
    disk_seconds: float  # per token, expert misses at the disk bandwidth
    tps: float

    @property
    def bound(self) -> str:
        parts = {"compute": self.compute_seconds, "memory": self.memory_seconds,
                 "disk": self.disk_seconds}  # fmt: skip
        return max(parts, key=parts.get)

    def as_dict(self) -> dict:
        return asdict(self) | {"bound": self.bound}


def predict(plan: MemoryPlan, budget: int | None, timing: DecodeTiming, disk_bw: float | None,
            memory_bw: float) -> Prediction:  # fmt: skip
    """Decode tok/s under `budget` (None: everything resident)."""
    fits = budget is None or budget >= plan.full_bytes
    feasible = fits or (plan.offloadable and budget >= plan.minimum_budget)
    cached = 1.0 if fits else (plan.cached_fraction(budget) if feasible else 0.0)
    hit = 1.0 if fits else expected_hit_rate(plan, cached)
    experts_per_token = plan.moe_layers * plan.top_k
    mem_bytes = plan.resident_active_bytes + experts_per_token * plan.expert_bytes
    disk_bytes = experts_per_token * plan.expert_disk_bytes * (1.0 - hit)
    disk_seconds = disk_bytes / disk_bw if disk_bytes > 0 and disk_bw else 0.0
    memory_seconds = mem_bytes / memory_bw if memory_bw else 0.0
    compute_seconds = timing.compute_seconds(plan.moe_layers)
    step = max(compute_seconds, memory_seconds) + disk_seconds
    return Prediction(
        budget=budget,
        fits=fits,
        feasible=feasible,
        cached_fraction=cached,
        expected_hit_rate=hit,
        memory_bytes_per_token=mem_bytes,
        disk_bytes_per_token=disk_bytes,
        compute_seconds=compute_seconds,
        memory_seconds=memory_seconds,
        disk_seconds=disk_seconds,
        tps=1.0 / step if feasible and step > 0 else 0.0,
    )


def expert_regions(checkpoint) -> list[tuple]:
    """Byte ranges (file, start, stop) of the expert tensors; the whole files if none."""
    from .safetensors_header import read_safetensors_header

    regions = []
    if checkpoint.format == "hf":
        for file in checkpoint.files:
            for name, spec in read_safetensors_header(file).items():
                if is_expert_tensor(name) or is_per_expert_tensor(name):  # any family's
                    regions.append((file, spec.offset, spec.offset + spec.nbytes))
    if not regions:
        regions = [(f, 0, f.stat().st_size) for f in checkpoint.files]
    return regions


# --- `mixchat info`: will it fit, how fast --------------------------------------------------


@dataclass
class FitReport:
    budget: int | None  # None: --memory-budget none (everything in memory, however much)
    budget_source: str  # "--memory-budget" or how auto chose it
    plan: MemoryPlan
    prediction: Prediction
    memory_bandwidth: Bandwidth
    disk_bandwidth: Bandwidth | None  # None: not measured (nothing is read from disk)
    timing: DecodeTiming
    options: list[dict]  # {"option": str, "detail": str, "prediction": dict}
    warning: str = ""  # --memory-budget none that will not fit: the warning `ask` gives

    @property
    def fits(self) -> bool:
        """Everything in memory: within the budget, or (none) within what this machine has."""
        return self.prediction.fits and not self.warning

    def as_dict(self) -> dict:
        return {
            "budget": self.budget,
            "budget_source": self.budget_source,
            "fits": self.fits,
            "feasible": self.prediction.feasible,
            "needs_bytes": self.plan.full_bytes,
            "minimum_budget": self.plan.minimum_budget if self.plan.offloadable else None,
            "cache_bytes": None if self.budget is None else self.plan.cache_bytes(self.budget),
            "warning": self.warning or None,
            "context": self.plan.context,
            "plan": self.plan.as_dict(),
            "prediction": self.prediction.as_dict(),
            "memory_bandwidth": self.memory_bandwidth.bytes_per_second,
            "memory_method": self.memory_bandwidth.method,
            "disk_bandwidth": self.disk_bandwidth.bytes_per_second if self.disk_bandwidth else None,
            "disk_bandwidth_range": (
                [self.disk_bandwidth.low, self.disk_bandwidth.high] if self.disk_bandwidth else None
            ),
            "disk_method": self.disk_bandwidth.method if self.disk_bandwidth else "",
            "decode_timing": self.timing.as_dict(),
            "options": self.options,
        }

    def rows(self) -> list[tuple[str, str]]:
        plan, p = self.plan, self.prediction
        budget = "none" if self.budget is None else format_bytes(self.budget)
        rows = [("memory budget", f"{budget} ({self.budget_source})")]
        parts = (
            f"weights {format_bytes(plan.resident_bytes + plan.total_expert_bytes)} + KV cache "
            f"{format_bytes(plan.kv_bytes)} for {plan.context:,} tokens + activations "
            f"{format_bytes(plan.full_activation_bytes)}"
        )
        if self.warning:
            rows.append(("fits", f"no: {self.warning}"))
        elif p.fits:
            rows.append(("fits", f"yes: {format_bytes(plan.full_bytes)} in memory ({parts})"))
        elif p.feasible:
            rows.append((
                "fits", f"no: needs {format_bytes(plan.full_bytes)} ({parts}); "
                f"{format_bytes(plan.cache_bytes(self.budget))} of "
                f"{format_bytes(plan.total_expert_bytes)} of experts ({p.cached_fraction:.0%}) stay "
                "cached, the others are read from disk when the router picks them",
            ))  # fmt: skip
        elif plan.offloadable:
            rows.append((
                "fits", f"no: needs {format_bytes(plan.full_bytes)}, and the budget is below the "
                f"minimum of {format_bytes(plan.minimum_budget)} for streaming experts",
            ))  # fmt: skip
        else:
            rows.append(("fits", f"no: needs {format_bytes(plan.full_bytes)} ({parts}), and "
                                 f"{plan.why_not}"))  # fmt: skip
        if plan.offloadable:
            rows.append((
                "minimum budget", f"{format_bytes(plan.minimum_budget)} (resident weights "
                f"{format_bytes(plan.resident_bytes)}, KV cache and activations "
                f"{format_bytes(plan.kv_bytes + plan.activation_bytes)}, {plan.top_k} experts of "
                "the layer being computed)",
            ))  # fmt: skip
        if p.feasible:
            rows.append(("decode speed", f"≈ {format_significant(p.tps)} tok/s, {self._why(p)}"))
        if self.disk_bandwidth is not None:
            rows.append(("disk read", self.disk_bandwidth.describe()))
        rows.append(("memory speed", self.memory_bandwidth.describe()))
        for option in self.options:
            rows.append(("option", f"{option['option']}: {option['detail']}"))
        return rows

    def _why(self, p: Prediction) -> str:
        ms = 1000
        t = self.timing
        compute = f"compute {p.compute_seconds * ms:.0f} ms/token"
        if t.expert_seconds and self.plan.moe_layers:
            routed = self.plan.moe_layers * t.experts_per_layer
            compute += (f" = {t.layers} layers {t.layers * t.layer_seconds * ms:.0f} ms + {routed} "
                        f"streamed experts x {t.expert_seconds * ms:.2f} ms + head "
                        f"{t.head_seconds * ms:.0f} ms")  # fmt: skip
        compute += f" ({t.method})"
        memory = (
            f"memory {format_bytes(p.memory_bytes_per_token)} per token at "
            f"{format_bytes(self.memory_bandwidth.bytes_per_second)}/s = "
            f"{p.memory_seconds * ms:.0f} ms"
        )
        text = f"{p.bound}-bound: {compute}; {memory}"
        if p.disk_bytes_per_token > 0 and self.disk_bandwidth is not None:
            text += (
                f"; disk {format_bytes(p.disk_bytes_per_token)} of experts missed per token "
                f"(expected hit rate {p.expected_hit_rate:.0%}) at "
                f"{format_bytes(self.disk_bandwidth.bytes_per_second)}/s = "
                f"{p.disk_seconds * ms:.0f} ms"
            )
        return text


def _quant(checkpoint) -> tuple[int | None, int]:
    q = checkpoint.args.quantization or {}
    bits = q.get("bits") if isinstance(q.get("bits"), int) else None
    group = q.get("group_size") if isinstance(q.get("group_size"), int) else 64
    if checkpoint.format == "gguf" and bits is None:
        bits = 4
    return bits, group


def fit_report(checkpoint, compute_dtype, budget: int | str | None = None,
               model_ref: str | None = None, context: int | None = None,
               kv_bits: int | None = None, measurements: MeasurementCache | None = None,
               remeasure: bool = False, streams: int = 1) -> FitReport:  # fmt: skip
    """Whether `checkpoint` fits in `budget` (None or "auto": a safe share of this machine's
    memory), its decode speed from this machine's measurements, and options that would fit."""
    measurements = measurements or MeasurementCache(None)
    compute_bytes = compute_dtype.size
    args = checkpoint.args
    plan = memory_plan(checkpoint, compute_bytes, context, kv_bits)
    auto, auto_why = auto_budget()
    if budget == "none":  # everything in memory, fitting or not (`ask` warns when not)
        warning = none_warning(plan, checkpoint.path.name)
        return _whole(checkpoint, plan, compute_dtype, streams, measurements, remeasure, warning)
    if budget is None or budget == "auto":
        budget, source = auto, f"auto: {auto_why}"
    else:
        budget, source = int(budget), "--memory-budget"
    if context is None and budget < plan.full_bytes:
        from .memory_plan import default_context

        plan = with_context(plan, default_context(plan, budget, args, compute_bytes), args,
                            compute_bytes)  # fmt: skip
    memory_bw = memory_bandwidth(measurements, remeasure)
    streamed = budget < plan.full_bytes and plan.offloadable
    disk_bw = disk_bandwidth(expert_regions(checkpoint), measurements, remeasure) if streamed else None
    bits, group = _quant(checkpoint)
    timing = decode_timing(args, bits, group, compute_dtype, streams, streamed, measurements,
                           remeasure)  # fmt: skip
    disk = disk_bw.bytes_per_second if disk_bw else None
    memory = memory_bw.bytes_per_second
    prediction = predict(plan, budget, timing, disk, memory)

    options: list[dict] = []

    def add(option: str, candidate: MemoryPlan, at: int, what: str = "") -> None:
        p = predict(candidate, at, timing, disk, memory)
        if p.fits:
            detail = (f"{what}everything in memory ({format_bytes(candidate.full_bytes)}), "
                      f"≈ {format_significant(p.tps)} tok/s")  # fmt: skip
        elif p.feasible:
            detail = (
                f"{what}{p.cached_fraction:.0%} of the experts cached, ≈ "
                f"{format_significant(p.tps)} tok/s ({p.bound}-bound)"
            )
        else:
            return
        options.append({"option": option, "detail": detail, "prediction": p.as_dict()})

    quantized = args.quantization is not None or checkpoint.format == "gguf"
    if not prediction.fits:
        if plan.full_bytes <= auto and budget < plan.full_bytes:
            add(f"--memory-budget {size_arg(plan.full_bytes)}", plan, plan.full_bytes)
        elif plan.offloadable and budget < auto:
            add(f"--memory-budget auto ({format_bytes(auto)})", plan, auto)
        q = args.quantization or {}
        if quantized and checkpoint.format == "hf" and plan.moe_layers:
            current = plan.expert_bits or q.get("bits", 4)
            for expert_bits in (3, 2):
                if expert_bits >= current:
                    continue
                est = estimate_plan(args, compute_bytes, q.get("bits", 4), expert_bits, group,
                                    context=plan.context)  # fmt: skip
                candidate = _with_experts(plan, est)
                add(
                    f"mixchat quantize SRC DST --expert-bits {expert_bits}",
                    candidate,
                    budget,
                    f"re-quantized from the original checkpoint, experts "
                    f"{format_bytes(candidate.total_expert_disk_bytes)} on disk; ",
                )
                if budget >= candidate.full_bytes:
                    break
        elif not quantized and checkpoint.format == "hf":
            src = model_ref or str(checkpoint.path)
            for q_bits, expert_bits in ((4, None), (4, 3)):
                est = estimate_plan(args, compute_bytes, q_bits, expert_bits, 64,
                                    context=plan.context)  # fmt: skip
                flag = f" --expert-bits {expert_bits}" if expert_bits else ""
                add(
                    f"mixchat quantize {src} DST{flag}",
                    est,
                    budget,
                    f"{format_bytes(est.resident_bytes + est.total_expert_disk_bytes)} on disk; ",
                )
                if budget >= est.full_bytes:
                    break
        if plan.offloadable and plan.kv_bits is None and plan.context >= 8192:
            p8 = memory_plan(checkpoint, compute_bytes, plan.context, 8)
            add(f"--kv-bits 8 (context {plan.context:,})", p8, budget,
                "keys and values in 8 bits; ")  # fmt: skip
    return FitReport(budget, source, plan, prediction, memory_bw, disk_bw, timing, options)


def _whole(checkpoint, plan: MemoryPlan, compute_dtype, streams: int,
           measurements: MeasurementCache, remeasure: bool, warning: str) -> FitReport:  # fmt: skip
    """The report for --memory-budget none: everything resident, nothing read from disk."""
    memory_bw = memory_bandwidth(measurements, remeasure)
    bits, group = _quant(checkpoint)
    timing = decode_timing(checkpoint.args, bits, group, compute_dtype, streams, False,
                           measurements, remeasure)  # fmt: skip
    prediction = predict(plan, None, timing, None, memory_bw.bytes_per_second)
    source = "everything in memory, however much it needs"
    return FitReport(None, source, plan, prediction, memory_bw, None, timing, [], warning)


def _with_experts(plan: MemoryPlan, est: MemoryPlan) -> MemoryPlan:
    """`plan` with the expert sizes of `est` (same architecture, other expert bits)."""
    return replace(
        plan,
        expert_bytes=est.expert_bytes,
        expert_disk_bytes=est.expert_disk_bytes,
        total_expert_bytes=est.total_expert_bytes,
        total_expert_disk_bytes=est.total_expert_disk_bytes,
        expert_bits=est.expert_bits,
    )
