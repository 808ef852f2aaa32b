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

from . import blas

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
SORTED_MIN_ROWS = 64  # from this many (token, expert) rows on, rows are grouped by expert
BOUNDED_BACKWARD_BYTES = 64 << 20  # lora_swiglu_by_expert: past this, one expert's graph at a time


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
    """down(silu(gate(x)) * up(x)) for each row of x [..., 1, hidden] through expert inds[...].

    On the CPU, an expert with many rows (a prompt) is computed by `blas`: its weights are
    dequantized once instead of once per row."""
    if x.ndim == 3 and by_blas(x.shape[0], w):
        groups = RowGroups.of(np.array(inds))
        if groups.largest >= blas.MIN_ROWS:
            return _swiglu_by_expert(x, w, inds, groups)
    return _swiglu_mlx(x, w, inds, sorted_inds)


def _swiglu_mlx(x: mx.array, w: ExpertWeights, inds: mx.array, sorted_inds: bool) -> mx.array:
    gate = matmul(x, w["gate_proj"], inds, sorted_inds)
    up = matmul(x, w["up_proj"], inds, sorted_inds)
    return matmul(nn.silu(gate) * up, w["down_proj"], inds, sorted_inds)


def by_blas(rows: int, w: ExpertWeights) -> bool:
    """Whether `swiglu` over this many rows goes through model/blas.py (experts that get
    blas.MIN_ROWS of them), rather than MLX's kernels only."""
    gate = w["gate_proj"]
    return blas.applies(rows, *_dims(gate), gate.weight.dtype)


def _dims(p: Projection) -> tuple[int, int]:
    """(out, in) features of one expert's projection."""
    out_features, packed = p.weight.shape[-2:]
    return out_features, packed if p.bits is None else packed * 32 // p.bits


def _swiglu_by_expert(x: mx.array, w: ExpertWeights, inds: mx.array,
                      groups: RowGroups) -> mx.array:  # fmt: skip
    """swiglu for rows x [R, 1, hidden], inds [R]: experts with blas.MIN_ROWS rows or more
    through numpy's BLAS, the others together through MLX's kernels (sorted by expert);
    differentiable in x (training: d(x) through BLAS too)."""
    many, few = [], []
    for e, a, b in zip(groups.experts, groups.bounds[:-1], groups.bounds[1:]):
        rows = groups.order[a:b]
        if b - a < blas.MIN_ROWS:
            few.append(rows)
        else:
            many.append((rows, [_expert(w[name], e) for name in PROJECTIONS]))
    few_np = np.concatenate(few) if few else None
    few_rows = None if few_np is None else mx.array(few_np)

    def mlx_part(xs: mx.array) -> mx.array:
        return _swiglu_mlx(xs, w, inds[few_rows], sorted_inds=True)  # [n, 1, out]

    def forward(xs: np.ndarray) -> np.ndarray:
        xs = xs.reshape(xs.shape[0], -1)
        y = np.empty((xs.shape[0], _dims(w["down_proj"])[0]), dtype=np.float32)
        for rows, parts in many:
            y[rows] = blas.swiglu_rows(xs[rows], *parts)
        if few_np is not None:
            out = mlx_part(mx.array(xs[few_np][:, None]).astype(x.dtype))
            y[few_np] = np.array(out.astype(mx.float32)).reshape(len(few_np), -1)
        return y[:, None]

    def backward(xs: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray]:
        xs, dy = xs.reshape(xs.shape[0], -1), dy.reshape(dy.shape[0], -1)
        dx = np.empty_like(xs)
        for rows, parts in many:
            dx[rows] = blas.swiglu_rows_grad(xs[rows], dy[rows], *parts)
        if few_np is not None:
            _, (d_few,) = mx.vjp(mlx_part, [mx.array(xs[few_np][:, None]).astype(x.dtype)],
                                 [mx.array(dy[few_np][:, None]).astype(x.dtype)])  # fmt: skip
            dx[few_np] = np.array(d_few.astype(mx.float32)).reshape(len(few_np), -1)
        return (dx[:, None],)

    return blas.through_numpy(forward, backward, x)


def _expert(p: Projection, e: int) -> tuple:
    """matmul_t's arguments for expert e of a stacked projection (numpy views where numpy
    dequantizes it: no MLX array is made, which a training step would keep: blas.host)."""
    return blas.stacked_parts(p.weight, p.scales, p.biases, p.group_size, p.bits, p.mode, e)


@dataclass
class RowGroups:
    """The N*k (token, expert) rows of a layer, sorted by expert."""

    order: np.ndarray  # [N*k] flat row index, in sorted order
    experts: list[int]  # distinct experts, ascending
    bounds: list[int]  # rows of experts[i] are sorted rows bounds[i]:bounds[i+1]

    @property
    def largest(self) -> int:
        """Rows of the expert with the most."""
        return max((b - a for a, b in zip(self.bounds[:-1], self.bounds[1:])), default=0)

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


def lora_swiglu_by_expert(rows: mx.array, modules: dict[str, nn.Module], groups: RowGroups,
                          inds: mx.array) -> mx.array:  # fmt: skip
    """swiglu through mlx-lm's LoRASwitchLinear modules (frozen base + one A/B pair per expert)
    for rows [R, hidden] in `groups`' sorted order, inds [R] their experts; -> [R, hidden].

    On the CPU this is what training costs: MLX's gather kernels dequantize an expert's
    weights again for every row, forward and backward. Here each expert's base products are
    model/blas.py ops (its weights dequantized once, d(input) through BLAS too). Without
    dropout, on float32 or affine 2/4/8-bit weights, the layer's experts are one numpy op with
    its VJP written out (`numpy_lora_swiglu`: what it keeps is a few arrays per expert, not
    MLX's graph); otherwise the low-rank A/B products stay in MLX, differentiable in the LoRA
    weights. Experts with one row or a few together go through the gather kernels (rows sorted
    by expert)."""
    base = {name: Projection.of(modules[name].linear) for name in PROJECTIONS}
    ffn = modules["gate_proj"].linear.weight.shape[-2]
    # What autograd would keep of every expert until the layer's backward ends: ~22 [rows, FFN]
    # float32 arrays a row. Past BOUNDED_BACKWARD_BYTES (a long sequence), each expert is
    # differentiated on its own (its forward recomputed: ~30% slower; in numpy_lora_swiglu,
    # the gate and up products only); below, the plain graph (numpy's: 2 [rows, FFN] a row).
    bounded = 22 * rows.shape[0] * ffn * 4 > BOUNDED_BACKWARD_BYTES
    spans = [(e, a, b) for e, a, b in zip(groups.experts, groups.bounds[:-1], groups.bounds[1:])]
    many = [(e, a, b) for e, a, b in spans if b - a >= blas.MIN_ROWS_SMALL]
    in_numpy = many and numpy_lora_applies(modules, base)
    y_many = numpy_lora_swiglu(rows, modules, base, many, bounded) if in_numpy else None
    parts, few, offset = [], [], 0
    for e, a, b in spans:
        if b - a < blas.MIN_ROWS_SMALL:
            few.append((a, b))
            continue
        if few:
            parts.append(_lora_gathered(rows, modules, inds, few))
            few = []

        weights = {n: _expert(base[n], e) for n in base}
        if y_many is not None:
            parts.append(y_many[offset : offset + b - a])
            offset += b - a
        elif bounded:
            parts.append(_one_expert(rows[a:b], modules, weights, e))
        else:
            parts.append(_plain_expert(rows[a:b], modules, weights, e))
    if few:
        parts.append(_lora_gathered(rows, modules, inds, few))
    return mx.concatenate(parts, axis=0)


def numpy_lora_applies(modules: dict[str, nn.Module], base: dict[str, Projection]) -> bool:
    """Whether `numpy_lora_swiglu` computes these LoRA experts: no dropout (mlx-lm's default)
    and base weights numpy dequantizes (float32, affine 2/4/8-bit)."""
    return all(
        getattr(modules[n].dropout, "_p_1", 0) == 1
        and blas.numpy_route(base[n].bits, base[n].mode, base[n].biases)
        and base[n].weight.dtype in (mx.float32, mx.uint32)
        for n in PROJECTIONS
    )  # fmt: skip


def numpy_lora_swiglu(rows: mx.array, modules: dict[str, nn.Module], base: dict[str, Projection],
                      spans: list[tuple[int, int, int]], recompute: bool = False) -> mx.array:  # fmt: skip
    """The LoRA swiglu of rows[a:b] through expert e for each (e, a, b) of `spans`, concatenated
    ([sum of b - a, hidden]): one MLX op for the layer, computed in numpy (base products through
    BLAS), with its VJP written out: d(rows) and the gradients of the six stacked lora_a/lora_b.

    MLX's autograd of the same graph kept ~22 [rows, FFN] float32 arrays a row and, inside the
    training step's transform, every array evaluated on the way (each product's input, the
    LoRA slices, their gradients' full-size scatters) until the step ended: 0.6 GB above the
    model on the 790M benchmark's 2 x 24 tokens. This keeps, per expert, its gate and up
    outputs [rows, FFN] and the rank-sized LoRA products (`recompute`: those products only, the
    gate and up outputs computed again in the backward), in numpy, freed with the op."""
    loras = [a for n in PROJECTIONS for a in (modules[n].lora_a, modules[n].lora_b)]
    scale = [float(modules[n].scale) for n in PROJECTIONS]
    weights = {e: [_expert(base[n], e) for n in PROJECTIONS] for e, _, _ in spans}
    saved: dict[int, tuple] = {}

    def project(i: int, e: int, x: np.ndarray, ab: tuple) -> tuple[np.ndarray, np.ndarray]:
        z = x @ ab[2 * i][e].T  # [n, r]
        y = blas.matmul_t(x, *weights[e][i])
        y += (z @ ab[2 * i + 1][e].T) * scale[i]
        return y, z

    def forward(xs: np.ndarray, *ab: np.ndarray) -> np.ndarray:
        out = []
        for e, a, b in spans:
            g, zg = project(0, e, xs[a:b], ab)
            u, zu = project(1, e, xs[a:b], ab)
            y, zd = project(2, e, blas.silu(g) * u, ab)
            saved[e] = (None, None, zg, zu, zd) if recompute else (g, u, zg, zu, zd)
            out.append(y)
        return np.concatenate(out)

    def project_back(i: int, e: int, x: np.ndarray, z: np.ndarray, dy: np.ndarray,
                     ab: tuple, grads: list) -> np.ndarray:  # fmt: skip
        """d(x) of project(i, e, x); adds d(lora_a[e]) and d(lora_b[e]) into grads."""
        sdy = dy * scale[i]
        grads[2 * i + 1][e] += sdy.T @ z
        dz = sdy @ ab[2 * i + 1][e]
        grads[2 * i][e] += dz.T @ x
        dx = blas.matmul(dy, *weights[e][i])
        dx += dz @ ab[2 * i][e]
        return dx

    def backward(xs: np.ndarray, *ab_dy: np.ndarray) -> tuple[np.ndarray, ...]:
        *ab, dys = ab_dy
        dxs, grads = np.zeros_like(xs), [np.zeros_like(t) for t in ab]
        offset = 0
        for e, a, b in spans:
            x, dy = xs[a:b], dys[offset : offset + b - a]
            offset += b - a
            g, u, zg, zu, zd = saved.pop(e)
            if g is None:
                g = blas.matmul_t(x, *weights[e][0]) + (zg @ ab[1][e].T) * scale[0]
                u = blas.matmul_t(x, *weights[e][1]) + (zu @ ab[3][e].T) * scale[1]
            with np.errstate(over="ignore"):
                sig = 1.0 / (1.0 + np.exp(-g))
            silu = g * sig
            dh = project_back(2, e, silu * u, zd, dy, ab, grads)
            du = dh * silu
            dh *= u
            dh *= sig * (1.0 + g * (1.0 - sig))  # d(gate output)
            dx = project_back(0, e, x, zg, dh, ab, grads)
            dx += project_back(1, e, x, zu, du, ab, grads)
            dxs[a:b] = dx
        return (dxs, *grads)

    return blas.through_numpy(forward, backward, rows, *loras)


def _plain_expert(xe: mx.array, modules: dict[str, nn.Module], parts: dict[str, tuple],
                  e: int) -> mx.array:  # fmt: skip
    """Expert e's LoRA swiglu of its rows xe, differentiated by MLX's autograd as it stands."""

    def project(name: str, x: mx.array) -> mx.array:
        module = modules[name]
        z = (module.dropout(x) @ module.lora_a[e].T) @ module.lora_b[e].T
        return blas.linear(x, *parts[name]) + (module.scale * z).astype(x.dtype)

    h = nn.silu(project("gate_proj", xe)) * project("up_proj", xe)
    return project("down_proj", h)


def _one_expert(xe: mx.array, modules: dict[str, nn.Module], parts: dict[str, tuple],
                e: int) -> mx.array:  # fmt: skip
    """Expert e's LoRA swiglu of its rows xe, as one op whose VJP recomputes the forward and
    evaluates d(xe) and the LoRA gradients at once: MLX's autograd would otherwise keep every
    expert's intermediates ([rows, FFN] float32, ~22 of them) until the layer's backward ends
    (benchmarks/bench_tune_backward.py)."""
    loras = [a for n in PROJECTIONS for a in (modules[n].lora_a, modules[n].lora_b)]

    def forward(x: mx.array, *ab: mx.array) -> mx.array:
        def project(i: int, name: str, x: mx.array) -> mx.array:
            module = modules[name]
            z = (module.dropout(x) @ ab[2 * i][e].T) @ ab[2 * i + 1][e].T
            return blas.linear(x, *parts[name]) + (module.scale * z).astype(x.dtype)

        h = nn.silu(project(0, "gate_proj", x)) * project(1, "up_proj", x)
        return project(2, "down_proj", h)

    @mx.custom_function
    def op(x: mx.array, *ab: mx.array) -> mx.array:
        return _detached(forward(x, *ab))

    @op.vjp
    def op_vjp(primals, cotangent: mx.array, output: mx.array) -> tuple:
        _, grads = mx.vjp(forward, list(primals), [cotangent])
        return tuple(_detached(g) for g in grads)

    return op(xe, *loras)


def _detached(a: mx.array) -> mx.array:
    """a evaluated into a fresh array with no graph: inside a transform MLX keeps an array's
    inputs alive until the transform ends; a copy through numpy lets them go now."""
    return mx.array(np.array(a.astype(mx.float32))).astype(a.dtype)


def _lora_gathered(rows: mx.array, modules: dict[str, nn.Module], inds: mx.array,
                   spans: list[tuple[int, int]]) -> mx.array:  # fmt: skip
    """The LoRA swiglu of rows[a:b] for consecutive spans, through MLX's gather kernels."""
    a, b = spans[0][0], spans[-1][1]
    x, flat = rows[a:b][:, None], inds[a:b]  # [n, 1, hidden], [n]
    gate, up, down = (modules[name] for name in PROJECTIONS)
    h = nn.silu(gate(x, flat, sorted_indices=True)) * up(x, flat, sorted_indices=True)
    return down(h, flat, sorted_indices=True)[:, 0]
