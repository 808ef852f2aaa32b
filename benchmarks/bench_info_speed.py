"""`info`'s decode-step timing, the streamed way (each routed expert applied one by one from the
expert cache) and the fused way (a layer's experts together), against the real budgeted decode.

In one process, interleaved `reps` times (the machine may be shared: consecutive processes see
different loads): a greedy decode of `tokens` tokens under BUDGET, then both timings; prints each
round and the medians' measured / predicted compute ratios (the decode's expert reads are in the
measured time, not in the predicted compute).

    python -m benchmarks.bench_info_speed DIR BUDGET_BYTES [REPS] [TOKENS]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path


def main() -> None:
    from model import Engine, GenerationSettings, weights
    from model.kernel_timing import measure_decode_step

    path, budget = sys.argv[1], int(float(sys.argv[2]))
    reps = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    tokens = int(sys.argv[4]) if len(sys.argv) > 4 else 8
    checkpoint = weights.locate(Path(path))
    dtype, streams = weights.compute_dtype(checkpoint), weights.stream_count()
    bits = (checkpoint.args.quantization or {}).get("bits")
    group = (checkpoint.args.quantization or {}).get("group_size", 64)
    engine = Engine.load(path, memory_budget=budget)
    rows = []
    for rep in range(reps):
        engine.reset()
        chunks = list(engine.stream([{"role": "user", "content": "Bonjour ! Comment vas-tu ?"}],
                                    GenerationSettings(max_tokens=tokens, temperature=0.0)))
        stats = chunks[-1].stats
        token = 1 / stats.generation_tps
        new = measure_decode_step(checkpoint.args, bits, group, dtype, streams, True)
        old = measure_decode_step(checkpoint.args, bits, group, dtype, streams, False)
        rows.append((token, new.step_seconds, old.step_seconds))
        print(f"round {rep}: decode {token * 1e3:.0f} ms/token (hit {stats.expert_hit_rate:.0%}, "
              f"read {stats.bytes_read_per_token / 1e6:.0f} MB/token) | streamed timing "
              f"{new.step_seconds * 1e3:.0f} ms (layer {new.layer_seconds * 1e3:.1f} + "
              f"{new.experts_per_layer} x {new.expert_seconds * 1e3:.2f}, head "
              f"{new.head_seconds * 1e3:.0f}) | fused timing {old.step_seconds * 1e3:.0f} ms "
              f"(layer {old.layer_seconds * 1e3:.1f}, head {old.head_seconds * 1e3:.0f})", flush=True)
    token, new, old = (statistics.median(r[i] for r in rows) for i in range(3))
    print(f"median decode {token * 1e3:.0f} ms/token; measured / predicted compute: "
          f"streamed {token / new:.2f}, fused {token / old:.2f}")


if __name__ == "__main__":
    main()
