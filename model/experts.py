"""The one way experts are applied: SwiGLU through expert weights chosen per row.

A token's hidden state goes through the k experts its router picked. Whether the weights are
the resident stacked arrays of a layer ([E, out, in], `mixtral.Experts`), one expert read from
disk into the budgeted cache ([1, out, in], `offload.OffloadedExperts`) or this rank's share of
the experts (`distributed`), they are applied by `swiglu` below: `mx.gather_qmm` (quantized) or
`mx.gather_mm` (float) with per-row expert indices, so every path runs the same kernels on the
same shapes and greedy tokens agree token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
SORTED_MIN_ROWS = 64  # from this many (token, expert) rows on, rows are grouped by expert


@dataclass(frozen=True)
class Projection:
    """One projection's weights for a set of experts, stacked on axis 0.

    weight: [E, out, in] float, or [E, out, in * bits / 32] uint32 when quantized (then
    scales/biases: [E, out, in / group_size])."""

    weight: mx.array
    scales: mx.array | None = None
    biases: mx.array | None = None
    group_size: int = 64
    bits: int | None = None  # None: not quantized
    mode: str = "affine"

    @classmethod
    def of(cls, module: nn.Module) -> Projection:
        """The weights of a SwitchLinear / QuantizedSwitchLinear module."""
        if "scales" in module:
            return cls(module["weight"], module["scales"], module.get("biases"),
                       module.group_size, module.bits, module.mode)  # fmt: skip
        return cls(module["weight"])


ExpertWeights = dict[str, Projection]  # "gate_proj" / "up_proj" / "down_proj" -> weights


def matmul(x: mx.array, p: Projection, inds: mx.array, sorted_inds: bool) -> mx.array:
    """x [..., 1, in] @ p.weight[inds].T -> [..., 1, out]."""
    if p.bits is not None:
        return mx.gather_qmm(
            x, p.weight, p.scales, p.biases, rhs_indices=inds, transpose=True,
            group_size=p.group_size, bits=p.bits, mode=p.mode, sorted_indices=sorted_inds,
        )  # fmt: skip
    return mx.gather_mm(x, p.weight.swapaxes(-1, -2), rhs_indices=inds, sorted_indices=sorted_inds)


def swiglu(x: mx.array, w: ExpertWeights, inds: mx.array, sorted_inds: bool) -> mx.array:
    """down(silu(gate(x)) * up(x)) for each row of x [..., 1, hidden] through expert inds[...]."""
    gate = matmul(x, w["gate_proj"], inds, sorted_inds)
    up = matmul(x, w["up_proj"], inds, sorted_inds)
    return matmul(nn.silu(gate) * up, w["down_proj"], inds, sorted_inds)


@dataclass
class RowGroups:
    """The N*k (token, expert) rows of a layer, sorted by expert."""

    order: np.ndarray  # [N*k] flat row index, in sorted order
    experts: list[int]  # distinct experts, ascending
    bounds: list[int]  # rows of experts[i] are sorted rows bounds[i]:bounds[i+1]

    @classmethod
    def of(cls, inds: np.ndarray) -> RowGroups:
        flat = inds.reshape(-1)
        order = np.argsort(flat, kind="stable")
        experts, starts = np.unique(flat[order], return_index=True)
        return cls(order, experts.tolist(), [*starts.tolist(), len(flat)])

    def rows(self, x: mx.array, k: int) -> mx.array:
        """x [N, hidden] -> [N*k, 1, hidden] in sorted row order."""
        return x[mx.array(self.order // k)][:, None]

    def unsort(self, y: mx.array, n: int, k: int) -> mx.array:
        """Sorted rows [N*k, 1, out] -> [N, k, out]."""
        return y[mx.array(np.argsort(self.order))].reshape(n, k, -1)
