"""What is alive in MLX memory during ONE MoE layer's LoRA backward (`lora_swiglu_by_expert`,
the streamed trainer's route), expert by expert, in this process, at a width you choose.

Builds 8 quantized experts wrapped in mlx-lm's LoRASwitchLinear, routes `--rows` rows evenly
at random, and differentiates the sum of the output in the LoRA weights and the rows. Every
call into model/blas.py's blocked products (forward and backward) prints MLX's active memory
above the start, with the projection's shape; at the end the peak, in MB and in units of one
expert's float32 weights (3 projections). Small widths run in seconds; real Mixtral width
(--hidden 4096 --ffn 14336) needs ~3 GB for the weights alone.

    python -m benchmarks.bench_tune_backward [--hidden 1024] [--ffn 3584] [--rows 1024]
"""

from __future__ import annotations

import argparse

import mlx.core as mx
import numpy as np
from mlx_lm.models.switch_layers import SwitchLinear
from mlx_lm.tuner.lora import LoRASwitchLinear

from model import blas
from model.experts import RowGroups, lora_swiglu_by_expert


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=3584)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--quiet", action="store_true", help="only the summary")
    args = parser.parse_args()
    D, F, E = args.hidden, args.ffn, args.experts
    mx.random.seed(0)
    shapes = {"gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}
    mods = {
        name: LoRASwitchLinear.from_base(SwitchLinear(i, o, E, bias=False).to_quantized(64, 4), r=8)
        for name, (i, o) in shapes.items()
    }
    inds = np.random.default_rng(0).integers(0, E, args.rows)
    groups = RowGroups.of(inds[:, None])
    order = mx.array(groups.order)
    rows, flat = mx.random.normal((args.rows, D))[order], mx.array(inds)[order]
    mx.eval([m.parameters() for m in mods.values()], rows, flat)
    expert32 = 3 * D * F * 4

    def loss(params: dict, rows: mx.array) -> mx.array:
        for name, m in mods.items():
            m.update(params[name])
        return lora_swiglu_by_expert(rows, mods, groups, flat).sum()

    blocks, start = blas._blocks, 0

    def spied(*parts, **kw):
        if not args.quiet:
            mb = (mx.get_active_memory() - start) / 2**20
            print(f"  {mb:8.1f} MB active   blocked product of a {tuple(parts[0].shape)} weight")
        yield from blocks(*parts, **kw)

    blas._blocks = spied
    params = {name: m.trainable_parameters() for name, m in mods.items()}
    start = mx.get_active_memory()
    mx.reset_peak_memory()
    grads = mx.grad(loss, argnums=(0, 1))(params, rows)
    mx.eval(grads)
    peak = mx.get_peak_memory() - start
    print(
        f"{len(groups.experts)} experts, {args.rows} rows, hidden {D}, ffn {F}: peak "
        f"{peak / 2**20:.1f} MB above the start = {peak / expert32:.2f} x one expert's float32 "
        f"weights ({expert32 / 2**20:.1f} MB)"
    )


if __name__ == "__main__":
    main()
