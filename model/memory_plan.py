"""The memory plan: what a checkpoint needs in memory, and how a budget is spent on it.

Everything here works from a checkpoint's headers (`weights.locate`), before anything is read.
A plan splits the footprint into
- resident weights (everything but the experts, at the compute dtype),
- a reserve: the KV cache for the context in use (`--max-context`, 8-bit with `--kv-bits 8`)
  and the activations of a prompt's prefill,
- the experts: resident when everything fits, else an expert cache of whatever the budget
  leaves, streamed from the checkpoint (model/offload.py).
The smallest workable budget holds the resident weights, the reserve, and the k experts of the
one layer being computed; everything above that is expert cache.

`decide` is the one place that turns what the user asked (no budget, "auto", "none", a size)
into what loading does.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from .config import QUANTIZE_TYPES
from .errors import MixchatError
from .kv_cache import kv_bytes_at, kv_fields
from .machine import available_memory, physical_memory
from .names import is_expert_tensor, is_per_expert_tensor
from .safetensors_header import FLOAT_DTYPES
from .sizes import format_bytes, parse_budget, size_arg  # noqa: F401 (parse_budget: re-exported)

AUTO_SHARE = 0.70  # `auto`: this share of physical memory (capped by what is available now)
FIT_SHARE = 0.85  # with no budget, a model loads whole when it needs at most this much of what
# is available now (and of physical memory); otherwise the auto budget applies
PREFILL_CHUNK = 512  # prompt tokens per attention pass, at most
ATTENTION_SCORES_BYTES = 256 * 10**6  # a prefill chunk's attention scores stay below this
LAYERWISE_WINDOW = 4096  # under a budget, prompts run layer by layer over this many tokens
CONTEXT_STEPS = tuple(2**k for k in range(20, 9, -1))  # default contexts tried: 1M ... 1K tokens
KV_BITS = (4, 8)


class BudgetError(MixchatError):
    """A memory budget that cannot work (too small, or a model whose experts cannot stream)."""


def auto_budget() -> tuple[int, str]:
    """(bytes, how it was chosen): 70% of physical memory, at most 90% of what is available."""
    total = physical_memory()
    budget = int(total * AUTO_SHARE)
    why = f"{AUTO_SHARE:.0%} of {format_bytes(total)} of memory"
    available = available_memory()
    if available is not None and available * 0.9 < budget:
        budget = int(available * 0.9)
        why = f"90% of the {format_bytes(available)} available now"
    return budget, why


# --- the arithmetic ----------------------------------------------------------------------------


def prefill_chunk(args, context: int, compute_bytes: int = 4) -> int:
    """Prompt tokens per attention pass: at most PREFILL_CHUNK, fewer for long contexts so the
    attention scores ([heads, chunk, context]) stay under ATTENTION_SCORES_BYTES."""
    per_token = args.num_attention_heads * max(context, 1) * compute_bytes
    return max(16, min(PREFILL_CHUNK, context, ATTENTION_SCORES_BYTES // per_token))


def activation_bytes(args, context: int, compute_bytes: int, layerwise: bool) -> int:
    """Prefill activations: a chunk's attention scores and projections, and either one chunk's
    expert intermediates (whole model resident) or, layer by layer under a budget, the hidden
    states and expert outputs of a whole window of tokens."""
    chunk = prefill_chunk(args, context, compute_bytes)
    k = args.num_experts_per_tok if args.is_moe else 1
    attention = chunk * compute_bytes * (
        args.num_attention_heads * min(context, 2**31) + 8 * args.hidden_size
    )
    tokens = min(context, LAYERWISE_WINDOW) if layerwise else chunk
    hidden = tokens * args.hidden_size * compute_bytes * (3 + k)
    rows = min(tokens * k, 1024 * 2)
    intermediates = rows * args.intermediate_size * compute_bytes * 3
    from .blas import BLOCK_ELEMENTS  # imports MLX: not at module level (argument checks)

    # model/blas.py (CPU prompts): one dequantized float32 block, float32 copies of the rows
    blas_bytes = BLOCK_ELEMENTS * 4 + 2 * rows * args.hidden_size * 4
    return attention + hidden + intermediates + blas_bytes


@dataclass
class MemoryPlan:
    """How a checkpoint splits in memory, for a given context."""

    resident_bytes: int  # non-expert weights in memory
    resident_active_bytes: int  # of those, read per decoded token (one embedding row)
    kv_bytes_per_token: int
    context: int  # tokens the KV cache is planned for
    kv_bits: int | None
    activation_bytes: int  # prefill activations (layer by layer when experts stream)
    full_activation_bytes: int  # the same with everything resident (chunk by chunk)
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
    kv_window: int | None = None  # gpt-oss's sliding layers cache at most this many tokens
    kv_window_bytes_per_token: int = 0  # those layers' share of kv_bytes_per_token

    def kv_bytes_at(self, tokens: int) -> int:
        """The KV cache holding `tokens` tokens as mlx-lm allocates it (kv_cache.kv_bytes_at)."""
        return kv_bytes_at(self.kv_bytes_per_token, self.kv_window_bytes_per_token,
                           self.kv_window, tokens)  # fmt: skip

    @property
    def kv_bytes(self) -> int:
        return self.kv_bytes_at(self.context)

    @property
    def reserve_bytes(self) -> int:
        """KV cache + prefill activations + read buffers, when experts stream."""
        return self.kv_bytes + self.activation_bytes + 2 * self.expert_disk_bytes

    @property
    def full_bytes(self) -> int:
        """Everything resident: weights + KV cache + activations."""
        return (
            self.resident_bytes
            + self.total_expert_bytes
            + self.kv_bytes
            + self.full_activation_bytes
        )

    @property
    def minimum_budget(self) -> int:
        """Resident weights + reserve + the top-k experts of the one layer being computed."""
        return self.resident_bytes + self.reserve_bytes + self.top_k * self.expert_bytes

    def room_bytes(self, budget: int) -> int:
        """What `budget` leaves the expert cache and the KV cache together (uncapped)."""
        return budget - self.resident_bytes - (self.reserve_bytes - self.kv_bytes)

    def cache_bytes(self, budget: int, kv_bytes: int | None = None) -> int:
        """Bytes the expert cache may hold under `budget` while the KV cache takes `kv_bytes`
        (default: its largest, for the whole context): the room left, at most every expert."""
        kv = self.kv_bytes if kv_bytes is None else kv_bytes
        return max(0, min(self.room_bytes(budget) - kv, self.total_expert_bytes))

    def cached_fraction(self, budget: int) -> float:
        if not self.total_expert_bytes:
            return 1.0
        return min(1.0, self.cache_bytes(budget) / self.total_expert_bytes)

    def needs_offload(self, budget: int | None) -> bool:
        return budget is not None and budget < self.full_bytes

    def as_dict(self) -> dict:
        return asdict(self) | {
            "kv_bytes": self.kv_bytes,
            "reserve_bytes": self.reserve_bytes,
            "full_bytes": self.full_bytes,
            "minimum_budget": self.minimum_budget,
        }


def _layer_of(name: str) -> int:
    return int(name.split(".")[2])


def loaded_nbytes(spec, compute_bytes: int) -> int:
    """Bytes a stored tensor takes once loaded (floating tensors become the compute dtype)."""
    if spec.dtype in FLOAT_DTYPES:
        return spec.nbytes // (4 if spec.dtype == "F32" else 2) * compute_bytes
    return spec.nbytes


def _disk_nbytes(checkpoint, name: str, spec) -> int:
    """Bytes a tensor takes in its file (a GGUF's blocks become weight + scales + biases)."""
    gguf_names = getattr(checkpoint, "gguf_names", None)
    if gguf_names and name in gguf_names:
        tensor, part = gguf_names[name]
        return tensor.nbytes if part == "weight" else 0
    return spec.nbytes


def memory_plan(checkpoint, compute_bytes: int = 4, context: int | None = None,
                kv_bits: int | None = None) -> MemoryPlan:  # fmt: skip
    """Size the parts of `checkpoint` (a weights.Checkpoint) once loaded at `compute_bytes`,
    with the KV cache planned for `context` tokens (default: the model's whole context)."""
    args = checkpoint.args
    if kv_bits is not None and kv_bits not in KV_BITS:
        raise BudgetError(f"the KV cache can be quantized to 4 or 8 bits, not {kv_bits}")
    if kv_bits and args.kv_group_size is None:
        raise BudgetError(
            f"a quantized KV cache needs a head dimension divisible by 32, not {args.head_dim}"
        )
    context = min(context or args.context_length, args.context_length)
    if args.sliding_window:
        context = min(context, args.sliding_window)
    resident = active = 0
    layer_mem: dict[int, int] = {}
    layer_disk: dict[int, int] = {}
    stacked = per_expert = False
    bits = None
    for name, spec in checkpoint.tensors.items():
        mem = loaded_nbytes(spec, compute_bytes)
        # any family's experts (names.EXPERT_MODULES); shared experts and routers are resident
        if (is_stacked := is_expert_tensor(name)) or is_per_expert_tensor(name):
            layer = _layer_of(name)
            layer_mem[layer] = layer_mem.get(layer, 0) + mem
            layer_disk[layer] = layer_disk.get(layer, 0) + _disk_nbytes(checkpoint, name, spec)
            stacked |= is_stacked
            per_expert |= not is_stacked
            if name.endswith("gate_proj.weight") and spec.dtype == "U32" and bits is None:
                bits = spec.shape[-1] * 32 // args.hidden_size if args.hidden_size else None
            continue
        resident += mem
        if name.startswith("model.embed_tokens.") and not args.tie_word_embeddings:
            active += mem // max(args.vocab_size, 1)
        else:
            active += mem
    E = max(args.num_local_experts, 1) if args.is_moe else 1
    offloadable, why = True, ""
    convert = (f"mixchat quantize {checkpoint.path} DIR" if args.model_type in QUANTIZE_TYPES
               else f"mlx_lm.convert --hf-path {checkpoint.path} --mlx-path DIR -q")  # fmt: skip
    if not args.is_moe or not layer_mem:
        offloadable, why = False, "it is a dense model: it has no experts to stream"
    elif checkpoint.format not in ("hf", "gguf") or per_expert or not stacked:
        offloadable = False
        why = (
            "experts stream only from an MLX-quantized checkpoint (experts stacked per layer): "
            f"convert it with `{convert}`"
        )
    elif args.quantization is None and checkpoint.format != "gguf":
        offloadable, why = False, f"it is not quantized: convert it with `{convert}`"
    return MemoryPlan(
        resident_bytes=resident,
        resident_active_bytes=active,
        **kv_fields(args, compute_bytes, kv_bits),
        context=context,
        kv_bits=kv_bits,
        activation_bytes=activation_bytes(args, context, compute_bytes, layerwise=True),
        full_activation_bytes=activation_bytes(args, context, compute_bytes, layerwise=False),
        expert_bytes=max(layer_mem.values(), default=0) // E,
        expert_disk_bytes=max(layer_disk.values(), default=0) // E,
        total_expert_bytes=sum(layer_mem.values()),
        total_expert_disk_bytes=sum(layer_disk.values()),
        moe_layers=len(layer_mem),
        num_experts=args.num_local_experts if args.is_moe else 0,
        top_k=args.num_experts_per_tok if args.is_moe else 0,
        offloadable=offloadable,
        why_not=why,
        expert_bits=bits,
    )


def with_context(plan: MemoryPlan, context: int, args, compute_bytes: int) -> MemoryPlan:
    """`plan` with its KV cache and activations planned for `context` tokens instead."""
    return replace(
        plan,
        context=context,
        activation_bytes=activation_bytes(args, context, compute_bytes, layerwise=True),
        full_activation_bytes=activation_bytes(args, context, compute_bytes, layerwise=False),
    )


def default_context(plan: MemoryPlan, budget: int, args, compute_bytes: int) -> int:
    """The longest context (the model's, or a power of two) whose KV cache and activations take
    at most half of what the budget leaves after the resident weights and one layer's experts;
    the rest is expert cache. Never below 1,024 tokens (the budget check then explains)."""
    candidates = [args.context_length] + [c for c in CONTEXT_STEPS if c < args.context_length]
    for context in candidates:
        p = with_context(plan, context, args, compute_bytes)
        spare = budget - p.resident_bytes - p.top_k * p.expert_bytes
        if p.kv_bytes + p.activation_bytes <= spare / 2 or budget >= p.full_bytes:
            return context
    return min(candidates[-1], args.context_length)


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
        kv = "8-bit " if plan.kv_bits == 8 else "4-bit " if plan.kv_bits == 4 else ""
        raise BudgetError(
            f"memory budget {format_bytes(budget)} is below the minimum of "
            f"{format_bytes(plan.minimum_budget)} for {model_name} with a {plan.context:,}-token "
            f"context ({format_bytes(plan.resident_bytes)} resident weights + "
            f"{format_bytes(plan.kv_bytes)} {kv}KV cache + "
            f"{format_bytes(plan.activation_bytes)} activations + {plan.top_k} experts of "
            f"{format_bytes(plan.expert_bytes)}): use --memory-budget "
            f"{size_arg(plan.minimum_budget)}, a shorter --max-context or --kv-bits 8"
        )
    return True


# --- what loading does ---------------------------------------------------------------------


@dataclass
class MemoryDecision:
    """What `weights.build_model` does with a checkpoint: load it whole, or stream experts."""

    plan: MemoryPlan
    budget: int | None  # None: no budget (everything resident)
    offload: bool
    context: int  # the context the engine allows
    notice: str = ""  # one line for the user, when something was chosen for them

    @property
    def cache_bytes(self) -> int:
        """The expert cache's capacity while the KV cache is empty (it shrinks as that grows:
        `OffloadRuntime.set_kv_bytes`)."""
        return self.plan.cache_bytes(self.budget, 0) if self.offload and self.budget else 0


def decide(checkpoint, compute_bytes: int, requested: int | str | None = None,
           max_context: int | None = None, kv_bits: int | None = None) -> MemoryDecision:  # fmt: skip
    """Turn the requested budget into a decision.

    requested None (the default): load whole when the model fits in what this machine has
    available now, else stream experts under the auto budget and say so. "auto": the auto
    budget. "none": load whole regardless, with a warning when it will not fit. A size: that
    budget (BudgetError when too small). `max_context` caps the context (default: the longest
    that leaves room, see `default_context`)."""
    args = checkpoint.args
    name = checkpoint.path.name
    if max_context is not None and max_context < 1:
        raise BudgetError(f"--max-context must be a positive number of tokens, not {max_context}")
    full_context = min(max_context or args.context_length, args.context_length)
    plan = memory_plan(checkpoint, compute_bytes, full_context, kv_bits)
    if requested == "none":
        warning = none_warning(plan, name)
        notice = f"warning: {warning}" if warning else ""
        return MemoryDecision(plan, None, False, full_context, notice)
    if requested is None:
        room = _room()
        if plan.full_bytes <= room:
            return MemoryDecision(plan, None, False, full_context)
        if not plan.offloadable:
            if max_context is None:  # a shorter context may be all it takes
                for context in CONTEXT_STEPS:
                    p = with_context(plan, min(context, full_context), args, compute_bytes)
                    if p.full_bytes <= room:
                        return MemoryDecision(p, None, False, p.context)
            raise BudgetError(
                f"{name} needs {format_bytes(plan.full_bytes)} in memory and this machine has "
                f"{format_bytes(room)} available, and {plan.why_not} "
                "(or pass --memory-budget none to load it anyway)"
            )
        budget, why = auto_budget()
        source = f"the automatic budget ({why})"
    elif requested == "auto":
        budget, why = auto_budget()
        source = f"the automatic budget ({why})"
    else:
        budget, source = int(requested), "--memory-budget"
    context = full_context
    if max_context is None and budget < plan.full_bytes:
        context = default_context(plan, budget, args, compute_bytes)
        plan = with_context(plan, context, args, compute_bytes)
    offload = check_budget(plan, budget, name)
    notice = ""
    if offload:
        share = plan.cached_fraction(budget)
        shortened = f", context {context:,} tokens" if context < args.context_length else ""
        notice = (
            f"{name} needs {format_bytes(plan.full_bytes)}, more than {source} of "
            f"{format_bytes(budget)}: experts stream from disk ({share:.0%} cached"
            f"{shortened})"
        )
    return MemoryDecision(plan, budget, offload, context, notice)


def none_warning(plan: MemoryPlan, name: str) -> str:
    """What `--memory-budget none` (everything in memory) risks: "" when `plan` fits this
    machine's memory, else one line (after "warning: " for `ask`, `chat`; in `info`'s rows)."""
    room = _room()
    if plan.full_bytes <= room:
        return ""
    return (
        f"{name} needs {format_bytes(plan.full_bytes)} and this machine has "
        f"{format_bytes(room)} to spare: expect swapping (drop --memory-budget none to "
        "stream experts instead)"
    )


def _room() -> int:
    """Bytes a model may take without pushing this machine into swap."""
    total = physical_memory()
    available = available_memory()
    return int(FIT_SHARE * min(total, available if available is not None else total))


def estimate_plan(
    args,
    compute_bytes: int = 4,
    bits: int = 4,
    expert_bits: int | None = None,
    group_size: int = 64,
    scale_bytes: int = 2,
    context: int | None = None,
) -> MemoryPlan:
    """The plan of this architecture after `mixchat quantize --bits B --expert-bits EB`
    (router and norms unquantized, scales and biases stored at `scale_bytes`), from the model
    definition's tensor shapes (model.config.parameter_shapes)."""
    from .config import parameter_shapes

    E = args.num_local_experts if args.is_moe else 0
    k = args.num_experts_per_tok if args.is_moe else 0
    expert_bits = expert_bits or bits
    context = min(context or args.context_length, args.context_length)

    def quantized(params: int, b: int, scale: int) -> int:
        return int(params * b / 8 + params / group_size * 2 * scale)

    resident = embed_row = expert_mem = expert_disk = 0
    for name, shape in parameter_shapes(args).items():
        params = math.prod(shape)
        if is_expert_tensor(name):
            expert_mem += quantized(params, expert_bits, compute_bytes)
            expert_disk += quantized(params, expert_bits, scale_bytes)
        elif len(shape) == 1 or name.endswith(".block_sparse_moe.gate.weight"):
            resident += params * compute_bytes  # norms and routers stay unquantized
        else:
            resident += quantized(params, bits, compute_bytes)
            if name == "model.embed_tokens.weight" and not args.tie_word_embeddings:
                embed_row = quantized(params, bits, compute_bytes)
    moe_layers = args.num_hidden_layers if E else 0
    per_expert = moe_layers * E or 1
    return MemoryPlan(
        resident_bytes=resident,
        resident_active_bytes=resident - embed_row + embed_row // max(args.vocab_size, 1),
        **kv_fields(args, compute_bytes),
        context=context,
        kv_bits=None,
        activation_bytes=activation_bytes(args, context, compute_bytes, layerwise=True),
        full_activation_bytes=activation_bytes(args, context, compute_bytes, layerwise=False),
        expert_bytes=expert_mem // per_expert,
        expert_disk_bytes=expert_disk // per_expert,
        total_expert_bytes=expert_mem,
        total_expert_disk_bytes=expert_disk,
        moe_layers=moe_layers,
        num_experts=E,
        top_k=k,
        offloadable=bool(E),
        why_not="" if E else "it is a dense model: it has no experts to stream",
        expert_bits=expert_bits,
    )


# --- training (model/tune/streamed.py) ---------------------------------------------------------


def training_minimum(plan: MemoryPlan, args, batch: int, seq: int, rank: int, num_layers: int,
                     compute_bytes: int) -> dict[str, int]:  # fmt: skip
    """The smallest budget that trains LoRA with experts streamed, in parts: resident weights;
    LoRA weights, gradients and Adam's moments (float32) on the last `num_layers` layers (-1:
    all); activations (each layer's saved input, one layer recomputed with its gradient: ~5/8
    of each routed expert as float32 is alive in its VJP, measured by bench_tune_layer.py; the
    logits and theirs); one layer's routed experts and two read buffers."""
    D, F, E = args.hidden_size, args.intermediate_size, max(args.num_local_experts, 1)
    q, kv = args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
    per_layer = (D + q) * 2 + (D + kv) * 2  # q, o, k, v
    per_layer += (D + E) + 3 * E * (D + F) if args.is_moe else 3 * (D + F)
    layers = args.num_hidden_layers if num_layers == -1 else num_layers
    tokens = batch * seq
    kept = (args.num_hidden_layers + 1) * tokens * D * compute_bytes
    scores = batch * args.num_attention_heads * seq * seq * 4 * 3
    rows = tokens * max(args.num_experts_per_tok, 1)
    routed = min(E, rows) if args.is_moe else 0
    layer = rows * F * 4 * 6 + tokens * (D + q + 2 * kv) * 4 * 6 + scores + routed * D * F * 15 // 2
    return {
        "resident weights": plan.resident_bytes,
        "LoRA + optimizer": layers * per_layer * rank * 4 * 4,
        "activations": kept + layer + tokens * args.vocab_size * 4 * 3,
        f"{routed} experts": routed * plan.expert_bytes + 2 * plan.expert_disk_bytes,
    }


def check_training_budget(parts: dict[str, int], budget: int, model_name: str) -> int:
    """The experts' share of `budget` for training (BudgetError, one line naming the minimum
    and its parts, when the budget is below it)."""
    minimum = sum(parts.values())
    if budget < minimum:
        detail = " + ".join(f"{format_bytes(v)} {k}" for k, v in parts.items())
        raise BudgetError(
            f"memory budget {format_bytes(budget)} is below the minimum of "
            f"{format_bytes(minimum)} for training {model_name} ({detail}): use --memory-budget "
            f"{size_arg(minimum)}, a smaller --batch-size or --max-seq-length"
        )
    experts = [v for k, v in parts.items() if k.endswith("experts")][0]
    return budget - minimum + experts
