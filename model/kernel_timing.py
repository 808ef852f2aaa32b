"""This model's own kernels, timed on this machine on its own shapes: one decode step's compute
(`DecodeTiming`, in machine.py), kept in the measurement cache per shape, quantization, dtype,
stream count and whether experts stream.

With every expert resident a layer applies its k experts together; streamed from the expert
cache (a budget), each MoE layer syncs on its routing, then applies its k experts one by one
from the cache through `offload.OffloadedExperts` itself. The second costs more per expert
(small products, one at a time, and for mlx-lm's families on one stream), so a streamed
prediction times that path: a layer with its experts in an OffloadedExperts over a cache that
already holds them (nothing read), then those experts alone, to split the cost per expert.
"""

from __future__ import annotations

import time
from dataclasses import replace

from .machine import DecodeTiming, MeasurementCache

TIMING_VERSION = 2  # 2: streamed layers through OffloadedExperts (1: one fused layer)


class _HeldExperts:
    """The part of an OffloadRuntime an OffloadedExperts uses, over one layer's experts that
    are all in memory already: demand hands them out, nothing is read, nothing evicted."""

    def __init__(self, experts, specs: dict, top_k: int):
        from .offload.runtime import OffloadCounters

        self.experts = experts  # expert -> CachedExpert
        self.specs = {0: specs}
        self.top_k = top_k
        self.next_layer: dict[int, int] = {}
        self.prefetch_enabled = False
        self.held = range(len(experts))
        self.counters = OffloadCounters()

    def release(self) -> None:
        pass

    def group_size(self, layer: int) -> int:
        return len(self.experts)

    def demand(self, layer: int, experts: list[int], prefetch=None) -> dict:
        return {e: self.experts[e] for e in experts}


def _streamed(switch_mlp, args):
    """An OffloadedExperts over `switch_mlp`'s experts ([E, out, in] stacked, E = top-k), each
    held as the expert cache holds one read from disk ([1, out, in] arrays)."""
    import mlx.core as mx

    from .experts import PROJECTIONS
    from .offload.module import OffloadedExperts

    specs, experts = {}, {}
    for proj in PROJECTIONS:
        m = switch_mlp[proj]
        specs[proj] = (m.group_size, m.bits, m.mode) if "scales" in m else None
    for e in range(args.num_experts_per_tok):
        experts[e] = {
            proj: tuple(None if switch_mlp[proj].get(part) is None
                        else mx.array(switch_mlp[proj][part][e : e + 1])
                        for part in ("weight", "scales", "biases"))  # fmt: skip
            for proj in PROJECTIONS
        }
        mx.eval(experts[e])
    activation = None
    if args.is_family:  # mlx-lm's SwitchGLU: its activation, on the default stream
        from mlx_lm.models.switch_layers import SwiGLU

        activation = SwiGLU()
    return OffloadedExperts(_HeldExperts(experts, specs, args.num_experts_per_tok), 0, activation)


def _time_it(fn, budget: float, warm_up: bool = True) -> float:
    import mlx.core as mx

    if warm_up:
        mx.eval(fn())
    n, start = 0, time.perf_counter()
    while True:
        mx.eval(fn())
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= budget or n >= 200:
            return elapsed / n


def measure_decode_step(args, bits: int | None, group_size: int, dtype, streams: int,
                        synced: bool, seconds: float = 1.5) -> DecodeTiming:  # fmt: skip
    """Time this architecture's decode step from one real layer: a `mixtral.Block` at the
    model's shapes (its top-k experts only: a token's cost does not depend on the others),
    quantized as the checkpoint is, random weights, a short KV cache, through the same code and
    streams as the model; repeated so that the layers' graph building overlaps as it does in a
    whole step, for about `seconds`. Then the LM head. Nothing is read from the checkpoint.

    `synced` (experts streamed): the layer's experts go through `OffloadedExperts` (a sync on
    the routing, then each expert from the cache), as under a budget; the layer is timed for
    2/3 of `seconds`, its k experts alone for the rest, which splits the layer into its
    resident part and a cost per routed expert."""
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
    streamed = synced and args.is_moe
    if streamed:
        block.block_sparse_moe.switch_mlp = _streamed(block.block_sparse_moe.switch_mlp, args)
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
            if synced and not streamed:  # a dense model streamed: nothing to sync on
                mx.eval(h)
            h = block(h, None, c, None)  # streamed: OffloadedExperts syncs on the routing
        return h

    layer = _time_it(step, seconds * (2 / 3 if streamed else 1)) / repeats
    expert = 0.0
    if streamed:
        k = args.num_experts_per_tok
        inds = mx.arange(k, dtype=mx.uint32).reshape(1, k)
        row = token.reshape(1, -1)
        experts_alone = _time_it(lambda: block.block_sparse_moe.switch_mlp(row, inds), seconds / 3,
                                 warm_up=False)  # the layer's timing ran these kernels already
        experts_alone = min(experts_alone, layer)  # noise on a busy machine: keep the layer's
        expert = experts_alone / k  # measured whole time, split into its two parts
        layer -= experts_alone
    hidden = mx.random.normal((1, args.hidden_size)).astype(dtype)

    def head_step() -> mx.array:
        logits = linear(hidden, head)
        return mx.argmax(logits - mx.logsumexp(logits, axis=-1, keepdims=True), axis=-1)

    head_time = _time_it(head_step, min(0.5, seconds / 3))
    mx.clear_cache()
    what = (f"one {'quantized ' if bits else ''}layer of this shape timed x{repeats}, "
            if not streamed else
            f"one {'quantized ' if bits else ''}layer of this shape timed x{repeats} with its "
            f"{args.num_experts_per_tok} experts applied one by one from the expert cache as "
            f"under a budget (then those experts alone: {expert * 1000:.2f} ms each), ")  # fmt: skip
    return DecodeTiming(
        layer, head_time, args.num_hidden_layers, streams, synced,
        f"{what}{'synced per layer, ' if synced else ''}{streams} stream{'s' * (streams > 1)}",
        expert, args.num_experts_per_tok if streamed else 0,
    )  # fmt: skip


def decode_timing(args, bits: int | None, group_size: int, dtype, streams: int, synced: bool,
                  cache: MeasurementCache, remeasure: bool = False) -> DecodeTiming:  # fmt: skip
    """`measure_decode_step`, kept per shape, quantization, dtype and stream count."""
    import mlx.core as mx

    key = (
        f"decode:t{TIMING_VERSION}:{mx.__version__}:{mx.default_device()}:{args.hidden_size}x"
        f"{args.intermediate_size}x{args.num_attention_heads}/{args.num_key_value_heads}:"
        f"{args.num_local_experts if args.is_moe else 0}/{args.num_experts_per_tok}:"
        f"{args.model_type}:v{args.vocab_size}:{bits}b{group_size}:{dtype}:{streams}s:"
        f"{'sync' if synced else ''}"
    )
    kept = None if remeasure else cache.get(key)
    if kept is not None:
        kept = {k: v for k, v in kept.items() if k not in ("measured_at", "step_seconds")}
        kept["layers"] = args.num_hidden_layers
        return DecodeTiming(**kept)
    timing = measure_decode_step(args, bits, group_size, dtype, streams, synced)
    cache.put(key, {k: v for k, v in timing.as_dict().items() if k != "step_seconds"})
    return timing
