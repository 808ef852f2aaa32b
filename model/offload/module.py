"""OffloadedExperts: the drop-in for `mixtral.Experts` whose weights live in the expert cache.

Per layer, per forward pass: the router's choices are evaluated (one sync per layer, inherent
to choosing what to read); a prompt (>= PREFILL_PREFETCH_TOKENS tokens, which use nearly every
expert) queues the next layer's experts to be read while this layer computes; during decode,
guessing the next layer's experts from this layer's hidden state is off by default
(`OffloadOptions.prefetch`: its wrong guesses evicted more useful experts than they supplied).
Each chosen expert is applied to its tokens by `experts.swiglu` on the cached arrays (the same
kernels and shapes as `mixtral.Experts`, so greedy tokens are identical); when a layer needs
more experts than the cache can hold, they are computed in groups.

It is also the drop-in for mlx-lm's `SwitchGLU` (the families of model/families.py): x
[..., hidden] and indices [..., k] -> [..., k, hidden], each expert through the SwitchGLU's own
`activation` (given as `activation`) and its projections' biases where it has them (gpt-oss),
with the same gather kernels SwitchGLU runs, so greedy tokens are identical there too.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..experts import PROJECTIONS, ExpertWeights, Projection, RowGroups, matmul, swiglu
from ..mixtral import compute_streams
from ..router import top_experts
from .runtime import OffloadRuntime, Prefetch
from .store import CachedExpert

PREFETCH_MAX_TOKENS = 4  # guess the next layer's experts only for decode-sized batches
PREFILL_PREFETCH_TOKENS = 8  # from this many tokens on (~7 of 8 experts used), read ahead
ROW_SLICE = 1024  # rows one kernel call takes in a long prompt (bounds the activations)


def _as_float(a: mx.array | None) -> mx.array | None:
    """bfloat16 tensors are cached as their uint16 bits (see ExpertStore._to_array)."""
    return a.view(mx.bfloat16) if a is not None and a.dtype == mx.uint16 else a


def _projections(cached: CachedExpert, specs: dict[str, tuple | None]) -> ExpertWeights:
    """A cached expert's arrays as the `experts.Projection`s `experts.swiglu` applies."""
    out = {}
    for proj in PROJECTIONS:
        weight, scales, biases = (_as_float(a) for a in cached[proj][:3])
        spec = specs[proj]
        if spec is None:
            out[proj] = Projection(weight)
        else:
            group_size, bits, mode = spec
            out[proj] = Projection(weight, scales, biases, group_size, bits, mode)
    return out


def _glu(r: mx.array, cached: CachedExpert, w: ExpertWeights, activation) -> mx.array:
    """One expert over rows r [n, 1, hidden] as mlx-lm's SwitchGLU computes it: its
    `activation(up, gate)`, each projection's bias added where it has one."""
    zeros = mx.zeros((r.shape[0],), dtype=mx.uint32)

    def project(proj: str, h: mx.array) -> mx.array:
        y = matmul(h, w[proj], zeros, sorted_inds=True)
        bias = cached[proj][3] if len(cached[proj]) > 3 else None
        return y if bias is None else y + _as_float(bias).astype(y.dtype)

    return project("down_proj", activation(project("up_proj", r), project("gate_proj", r)))


class OffloadedExperts(nn.Module):
    """Drop-in for `mixtral.Experts` (activation None: experts.swiglu) or mlx-lm's SwitchGLU
    (its `activation`) whose weights live in an OffloadRuntime's cache."""

    def __init__(self, runtime: OffloadRuntime, layer: int, activation=None):
        super().__init__()
        self.runtime = runtime
        self.layer = layer
        object.__setattr__(self, "_activation", activation)  # not a child: holds no weights

    def __call__(self, x: mx.array, inds: mx.array) -> mx.array:
        """x: [..., hidden], inds: [..., k] -> [..., k, hidden]."""
        lead = inds.shape[:-1]
        x, inds = x.reshape(-1, x.shape[-1]), inds.reshape(-1, inds.shape[-1])
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
            out = rt.gates[next_layer](x)  # logits, or (DeepSeek, GraniteMoE) (inds, scores)
            guess = out[0] if isinstance(out, tuple) else top_experts(out, rt.top_k)
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
        streams = compute_streams()  # expert j of this layer on stream j % len(streams)
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
                    if self._activation is not None:  # a family's SwitchGLU
                        group_parts.append(_glu(r, cached[e], w, self._activation))
                        continue
                    zeros = mx.zeros((r.shape[0],), dtype=mx.uint32)
                    with mx.stream(streams[j % len(streams)]):
                        group_parts.append(swiglu(r, w, zeros, sorted_inds=True))
            parts.extend(group_parts)
            if not last_group:  # the cache cannot hold the whole layer: compute, then let go
                mx.eval(group_parts)
                rt.release()
        y = mx.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]  # [N*k, 1, hidden]
        return groups.unsort(y, N, k).reshape(*lead, k, -1)
