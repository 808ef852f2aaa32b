"""Training larger than memory: LoRA on experts that stream from disk, layer by layer.

Under a memory budget the model's experts live in the offload cache (model/offload/). For
training, `prepare` swaps each layer's OffloadedExperts for `StreamedLoRAExperts`: the same
streamed base weights, plus gate_proj/up_proj/down_proj children that are placeholders of the
stacked projections' shapes (broadcast zeros: no memory), so mlx-lm's `linear_to_lora_layers`
wraps them in LoRASwitchLinear exactly as it wraps the resident model's (the same keys, the
same random draws, the same adapter files). Only their lora_a [E, r, in] / lora_b [E, out, r]
are used: they stay resident with the optimizer state, while the base experts stream.

`StreamedTrainer.step_grads` (replacing `Trainer.step_grads`) computes one batch's loss and
gradients with checkpointing at layer boundaries: the forward pass runs layer by layer and
keeps each layer's input; the backward pass goes from the last layer to the first, recomputing
each layer from its saved input (reading its routed experts again) and taking the gradient of
its LoRA weights and of its input from the gradient of its output.
"""

from __future__ import annotations

import ctypes

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path

from .. import blas
from ..errors import MixchatError
from ..experts import Projection, RowGroups, matmul
from ..mixtral import create_attention_mask
from ..mlx_lm_parts import SwitchLinear
from ..offload.module import OffloadedExperts, _as_float, _projections
from ..offload.wiring import moe_layers, runtime_of
from .data import Row
from .train import Trainer, pad


def _placeholder(num_experts: int, out_features: int, in_features: int) -> SwitchLinear:
    """A frozen SwitchLinear of these shapes whose weight takes no memory (LoRA's base: only
    its shape is read)."""
    module = SwitchLinear.__new__(SwitchLinear)
    nn.Module.__init__(module)
    module.weight = mx.broadcast_to(mx.zeros((1, 1, 1)), (num_experts, out_features, in_features))
    module.freeze()
    return module


class StreamedLoRAExperts(OffloadedExperts):
    """OffloadedExperts whose projections carry LoRA (mlx-lm's LoRASwitchLinear A/B per
    expert, resident) on top of the streamed base weights; differentiable in x and in A/B."""

    def __init__(self, runtime, layer: int, hidden: int, ffn: int, num_experts: int,
                 activation=None):  # fmt: skip
        super().__init__(runtime, layer, activation)
        self.gate_proj = _placeholder(num_experts, ffn, hidden)
        self.up_proj = _placeholder(num_experts, ffn, hidden)
        self.down_proj = _placeholder(num_experts, hidden, ffn)

    def _project(self, x: mx.array, p: Projection, name: str, e: int, bias=None) -> mx.array:
        """x [n, 1, in] through expert e's projection `name` (+ its bias, gpt-oss's, and its
        LoRA, as mlx-lm's LoRASwitchLinear adds them) -> [n, 1, out]."""
        out_features = p.weight.shape[-2]
        in_features = x.shape[-1]
        if blas.applies(x.shape[0], out_features, in_features, p.weight.dtype):
            y = blas.linear(x, *blas.stacked_parts(p.weight, p.scales, p.biases, p.group_size,
                                                   p.bits, p.mode, 0))  # fmt: skip
        else:
            y = matmul(x, p, mx.zeros((x.shape[0],), dtype=mx.uint32), sorted_inds=True)
        if bias is not None:
            y = y + _as_float(bias).astype(y.dtype)
        lora = self[name]
        if "lora_a" in lora:
            z = (lora.dropout(x) @ lora.lora_a[e].T) @ lora.lora_b[e].T
            y = y + (lora.scale * z).astype(y.dtype)
        return y

    def __call__(self, x: mx.array, inds: mx.array) -> mx.array:
        """x: [..., hidden], inds: [..., k] -> [..., k, hidden] (Mixtral's [N, ..], a family's
        SwitchGLU [B, T, ..])."""
        lead = inds.shape[:-1]
        x, inds = x.reshape(-1, x.shape[-1]), inds.reshape(-1, inds.shape[-1])
        rt = self.runtime
        N, k = inds.shape
        mx.eval(inds)
        rt.release()  # everything before this layer is computed: its experts may go
        rt.counters.forward_passes += self.layer == min(rt.specs)
        groups = RowGroups.of(np.array(inds))
        rows = groups.rows(x, k)  # [N*k, 1, hidden], grouped by expert
        specs = rt.specs[self.layer]
        # The training minimum holds every routed expert of a layer at once: the backward
        # pass needs them all together.
        cached = rt.demand(self.layer, groups.experts)
        parts = []
        for j, e in enumerate(groups.experts):
            w = _projections(cached[e], specs)
            r = rows[groups.bounds[j] : groups.bounds[j + 1]]

            def project(h: mx.array, name: str, e=e, w=w) -> mx.array:
                arrays = cached[e][name]  # (weight, scales, biases[, the projection's bias])
                return self._project(h, w[name], name, e, arrays[3] if len(arrays) > 3 else None)

            gate, up = project(r, "gate_proj"), project(r, "up_proj")
            # Mixtral's SwiGLU, or the family SwitchGLU's own activation(up, gate) (gpt-oss's
            # clamped SwiGLU)
            h = nn.silu(gate) * up if self._activation is None else self._activation(up, gate)
            parts.append(project(h, "down_proj"))
        y = mx.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
        return groups.unsort(y, N, k).reshape(*lead, k, -1)


def prepare(model: nn.Module) -> bool:
    """Give a model whose experts stream LoRA-ready expert modules (before `lora_config` and
    `apply_lora`). False when its experts are resident (nothing to do)."""
    runtime = runtime_of(model)
    if runtime is None:
        return False
    args = model.args
    if args.is_family:
        return _prepare_family(model, runtime)
    for i in moe_layers(model):
        moe = model.layers[i].block_sparse_moe
        if not isinstance(moe.switch_mlp, StreamedLoRAExperts):
            moe.switch_mlp = StreamedLoRAExperts(runtime, i, args.hidden_size,
                                                 args.intermediate_size, args.num_local_experts)  # fmt: skip
    return True


def _give_back() -> None:
    """A layer's freed temporaries back to the system: MLX's buffer pool, then the C
    allocator's free lists (glibc keeps freed blocks under 32 MB: the process's RSS stayed
    ~4 GB above MLX's memory after a full-size layer's backward, benchmarks/bench_tune_layer.py)."""
    mx.clear_cache()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS: its allocator returns large blocks itself)
        return None


_LIBC = _libc()


def _prepare_family(model: nn.Module, runtime) -> bool:
    """prepare() for a family on mlx-lm's definitions (its SwitchGLUs streamed): each layer's
    experts, wherever the family keeps them, with the shapes of mlx-lm's own switch_mlp."""
    from ..families import parameter_shapes
    from ..offload.wiring import _experts_of

    args = model.args
    shapes = parameter_shapes(args)
    for i in moe_layers(model):
        owner, attr, path = _experts_of(model.layers[i])
        old = owner[attr]
        if isinstance(old, StreamedLoRAExperts):
            continue
        E, ffn, hidden = shapes[f"model.layers.{i}.{path}.gate_proj.weight"]
        owner[attr] = StreamedLoRAExperts(runtime, i, hidden, ffn, E, old._activation)
    return True


def _masks(model: nn.Module, h: mx.array) -> list:
    """Each layer's causal mask over a whole sequence h [B, T, hidden] (Mixtral's, or
    mlx-lm's: gpt-oss's sliding layers limited to its window, as its model masks them)."""
    if model.args.is_family:
        from ..mlx_lm_parts import create_attention_mask as mlx_lm_mask

        inner = model.model
        kinds = getattr(inner, "layer_types", None) or [None] * len(model.layers)
        window = getattr(inner, "window_size", None)
        return [mlx_lm_mask(h, None, window_size=window if kind == "sliding_attention" else None)
                for kind in kinds[: len(model.layers)]]  # fmt: skip
    mask = create_attention_mask(h, None, window_size=model.args.sliding_window)
    return [mask] * len(model.layers)


def _call_layer(model: nn.Module, layer: nn.Module, h: mx.array, mask) -> mx.array:
    """One decoder layer over a whole sequence, without a cache."""
    return layer(h, mask, None) if model.args.is_family else layer(h, mask, None, None)


def _layer_fn(model: nn.Module, layer: nn.Module, mask, dh: mx.array):
    """(params, x) -> <layer(x), dh>: its gradient is the layer's vector-Jacobian product."""

    def fn(params, x):
        layer.update(params)
        out = _call_layer(model, layer, x, mask)
        return (out.astype(mx.float32) * dh.astype(mx.float32)).sum()

    return fn


class StreamedTrainer(Trainer):
    """`Trainer` with the loss and gradients computed layer by layer (checkpointing at layer
    boundaries), for a model whose experts stream; the optimizer, data and saves are the same."""

    def _forward(self, inputs: mx.array) -> tuple[list[mx.array], mx.array, list]:
        """Each layer's input (evaluated, layer by layer), the last layer's output, the masks."""
        model = self.model
        h = model.model.embed_tokens(inputs)
        masks = _masks(model, h)
        saved = []
        for layer, mask in zip(model.layers, masks, strict=True):
            saved.append(h)
            h = _call_layer(model, layer, h, mask)
            mx.eval(h)
            _give_back()
        return saved, h, masks

    def _head(self, targets: mx.array, mask: mx.array):
        model = self.model

        def loss(h: mx.array) -> mx.array:
            logits = model.logits(model.model.norm(h))
            ce = nn.losses.cross_entropy(logits, targets) * mask
            return ce.astype(mx.float32).sum() / mask.sum()

        return loss

    def step_grads(self, rows: list[Row]) -> tuple[mx.array, mx.array, dict]:
        inputs, targets, weights = pad(rows)
        ntoks = weights.sum()
        if ntoks.item() == 0:  # nothing to learn: train_step leaves the weights as they are
            return mx.array(float("nan")), ntoks, {}
        saved, h, masks = self._forward(inputs)
        loss, dh = mx.value_and_grad(self._head(targets, weights))(h)
        mx.eval(loss, dh)
        flat: dict[str, mx.array] = {}
        layers = self.model.layers
        adapted = [
            i for i, layer in enumerate(layers) if tree_flatten(layer.trainable_parameters())
        ]
        first = min(adapted, default=len(layers))
        for i in range(len(layers) - 1, first - 1, -1):
            layer = layers[i]
            params = layer.trainable_parameters()
            fn = _layer_fn(self.model, layer, masks[i], dh)
            if i == first:  # no layer below learns: the input's gradient is not needed
                grads = mx.grad(fn, argnums=0)(params, saved[i])
                dx = None
            else:
                grads, dx = mx.grad(fn, argnums=(0, 1))(params, saved[i])
            layer.update(params)
            mx.eval(grads, dx) if dx is not None else mx.eval(grads)
            flat |= {f"model.layers.{i}.{k}": g for k, g in tree_flatten(grads)}
            dh, saved[i] = dx, None
            _give_back()
        self.runtime.release()
        trainable = self.model.trainable_parameters()
        return loss, ntoks, tree_map_with_path(lambda path, _: flat[path], trainable)

    def validate(self) -> float | None:
        if not self.val_batches:
            return None
        total, count = 0.0, 0.0
        for rows in self.val_batches:
            inputs, targets, weights = pad(rows)
            _, h, _ = self._forward(inputs)
            loss = self._head(targets, weights)(h)
            ntoks = weights.sum()
            mx.eval(loss, ntoks)
            total += loss.item() * ntoks.item()
            count += ntoks.item()
        self.runtime.release()
        self.val_loss = total / count
        return self.val_loss

    @property
    def runtime(self):
        runtime = runtime_of(self.model)
        if runtime is None:
            raise MixchatError("layer-by-layer training needs a model whose experts stream")
        return runtime
