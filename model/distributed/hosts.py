"""Sizes and speed across ranks: hostfiles, `mixchat info --hosts`, and the memory decision of
one rank of several."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..sizes import format_bytes
from .errors import DistributedError
from .join import World
from .pipeline import layer_range
from .shard import EXPERT_MARK, PER_EXPERT_MARK, expert_range


def read_hostfile(path: Path) -> list[str]:
    """Hosts of a hostfile: mlx.launch's ({"hosts": [{"ssh", "ips"}]} or a list of those) or
    the ring backend's (a list of ["ip:port", ...] per rank)."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise DistributedError(f"cannot read hostfile {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise DistributedError(f"hostfile {path} is not JSON: {e}") from None
    hosts = data.get("hosts") if isinstance(data, dict) else data
    names = []
    if isinstance(hosts, list):
        for h in hosts:
            if isinstance(h, dict) and isinstance(h.get("ssh"), str):
                names.append(h["ssh"])
            elif isinstance(h, list) and h and all(isinstance(a, str) for a in h):
                names.append(h[0].rsplit(":", 1)[0])
            else:
                names = []
                break
    if len(names) < 1:
        raise DistributedError(
            f'hostfile {path}: expected a list of hosts ({{"ssh": ..., "ips": [...]}} as '
            'mlx.launch reads, or ["ip:port"] per rank as the ring backend reads)'
        )
    return names


# Links a ring can run over: (name, bytes/s, seconds per all_sum of a few KB). Assumed typical
# figures, not measurements (README "Several Macs" says where they come from).
LINKS = (
    ("10 Gb/s Ethernet", 1.25e9, 100e-6),
    ("Thunderbolt 4 (ring over TCP)", 2.5e9, 50e-6),
)


@dataclass
class RankPlan:
    ranks: int
    experts_per_rank: int  # of each layer, the most any rank holds
    resident_bytes: int  # replicated weights (attention, embeddings, routers, norms)
    expert_bytes: int  # this share of the experts, the largest rank's
    reserve_bytes: int  # KV cache for the whole context + prefill activations
    allsum_bytes_per_token: int  # bytes each rank sends per decoded token (ring all-reduce)
    allsums_per_token: int

    @property
    def rank_bytes(self) -> int:
        return self.resident_bytes + self.expert_bytes + self.reserve_bytes

    def network_seconds(self, bandwidth: float, latency: float) -> float:
        return self.allsum_bytes_per_token / bandwidth + self.allsums_per_token * latency


def rank_plan(plan, args, ranks: int, compute_bytes: int) -> RankPlan:
    """Per-rank memory and per-token traffic of `plan` (a memory_plan.MemoryPlan) over `ranks`."""
    E = max(plan.num_experts, 1)
    per_rank = max(hi - lo for lo, hi in (expert_range(E, r, ranks) for r in range(ranks)))
    # Each MoE layer sums one [hidden] vector per token; a ring all-reduce sends 2(n-1)/n of
    # it from each rank. One more one-value all_sum per token agrees on stopping.
    vector = args.hidden_size * compute_bytes
    per_layer = 2 * (ranks - 1) * vector // ranks if ranks > 1 else 0
    return RankPlan(
        ranks=ranks,
        experts_per_rank=per_rank,
        resident_bytes=plan.resident_bytes,
        expert_bytes=plan.total_expert_bytes * per_rank // E,
        reserve_bytes=plan.kv_bytes + plan.full_activation_bytes,
        allsum_bytes_per_token=plan.moe_layers * per_layer + (4 if ranks > 1 else 0),
        allsums_per_token=plan.moe_layers + 1 if ranks > 1 else 0,
    )


def critical_experts(num_experts: int, top_k: int, ranks: int) -> float:
    """Expected experts per MoE layer the busiest rank applies for one token, the k chosen
    uniformly among E (1.43 for top-2 of 8 on 2 ranks; k on one rank)."""
    from itertools import combinations

    E = max(num_experts, 1)
    owner = [next(r for r in range(ranks) if e < expert_range(E, r, ranks)[1]) for e in range(E)]
    choices = list(combinations(range(E), min(top_k, E)))
    if len(choices) > 200_000:  # many experts: sample the choices instead
        rng = np.random.default_rng(0)
        choices = [tuple(rng.choice(E, top_k, replace=False)) for _ in range(20_000)]
    total = 0
    for chosen in choices:
        total += np.bincount([owner[e] for e in chosen], minlength=ranks).max()
    return float(total / len(choices))


def hosts_report(checkpoint, compute_bytes: int, hostfile: str | Path) -> tuple[list, dict]:
    """`mixchat info --hosts`: (rows, JSON dict) of memory per rank, network traffic per token
    and tok/s bounds, with this machine's memory bandwidth standing for every host's."""
    from .. import registry
    from ..machine import CACHE_FILE, MeasurementCache, memory_bandwidth
    from ..memory_plan import memory_plan

    hosts = read_hostfile(Path(hostfile))
    args = checkpoint.args
    if not args.is_moe:
        raise DistributedError(
            f"{checkpoint.path.name} is a dense model: several ranks split a Mixture-of-Experts "
            "model's experts; run it on one machine"
        )
    memory_bw = memory_bandwidth(
        MeasurementCache(registry.data_dir() / CACHE_FILE)
    ).bytes_per_second
    plan = memory_plan(checkpoint, compute_bytes)
    rp = rank_plan(plan, args, len(hosts), compute_bytes)
    # Per decoded token every rank reads its replicated weights and the chosen experts it
    # holds (ExpertShard skips the others); each layer waits for the rank holding the most.
    experts_read = critical_experts(plan.num_experts, plan.top_k, len(hosts))
    mem_bytes = plan.resident_active_bytes + int(plan.moe_layers * experts_read * plan.expert_bytes)
    compute_s = mem_bytes / memory_bw
    rows = [
        (
            "hosts",
            f"{len(hosts)} ranks ({', '.join(hosts)}), {rp.experts_per_rank} of "
            f"{plan.num_experts} experts per layer on each",
        ),
        (
            "per rank",
            f"{format_bytes(rp.rank_bytes)} ({format_bytes(rp.resident_bytes)} "
            f"replicated + {format_bytes(rp.expert_bytes)} experts + "
            f"{format_bytes(rp.reserve_bytes)} KV cache and buffers)",
        ),
        (
            "network",
            f"{format_bytes(rp.allsum_bytes_per_token)} sent by each rank per token, "
            f"in {rp.allsums_per_token} all_sums",
        ),
        (
            "memory bound",
            f"{1 / compute_s:.1f} tok/s at {memory_bw / 1e9:.0f} GB/s ({format_bytes(mem_bytes)} "
            f"read per token by the busiest rank: {experts_read:.2f} experts per layer, "
            "routing taken as uniform)",
        ),
    ]
    links = {}
    for name, bandwidth, latency in LINKS:
        net = rp.network_seconds(bandwidth, latency)
        tps = 1 / (compute_s + net)
        links[name] = {"network_seconds_per_token": net, "tps": tps}
        rows.append((
            "predicted", f"{tps:.1f} tok/s over {name} ({net * 1e3:.2f} ms network per token, "
                         f"assuming {latency * 1e6:.0f} µs per all_sum)",
        ))  # fmt: skip
    data = asdict(rp) | {"hosts": hosts, "rank_bytes": rp.rank_bytes,
                         "memory_bandwidth": memory_bw, "memory_bound_tps": 1 / compute_s,
                         "critical_experts_per_layer": experts_read,
                         "links": links}  # fmt: skip
    return rows, data


def rank_share(checkpoint, whole, compute_bytes: int, world_: World):
    """(this rank's part of the memory plan `whole`, what the part is in words)."""
    from dataclasses import replace

    from ..memory_plan import _disk_nbytes, loaded_nbytes

    args = checkpoint.args
    if world_.mode != "pipeline":
        E = max(whole.num_experts, 1)
        lo, hi = expert_range(E, world_.rank, world_.size)
        share = replace(
            whole,
            total_expert_bytes=whole.total_expert_bytes * (hi - lo) // E,
            total_expert_disk_bytes=whole.total_expert_disk_bytes * (hi - lo) // E,
        )
        return share, f"{hi - lo} of {E} experts per layer"
    L = args.num_hidden_layers
    lo, hi = layer_range(L, world_.rank, world_.size)
    first, last = world_.rank == 0, world_.rank == world_.size - 1
    resident = experts = disk = 0
    for name, spec in checkpoint.tensors.items():
        if name.startswith("model.layers."):
            if not lo <= int(name.split(".")[2]) < hi:
                continue
        elif name.startswith("model.embed_tokens."):
            if not (first or (last and args.tie_word_embeddings)):
                continue
        elif name.startswith("lm_head.") and not last:
            continue
        if EXPERT_MARK in name or PER_EXPERT_MARK in name:
            experts += loaded_nbytes(spec, compute_bytes)
            disk += _disk_nbytes(checkpoint, name, spec)
        else:
            resident += loaded_nbytes(spec, compute_bytes)
    share = replace(
        whole,
        resident_bytes=resident,
        total_expert_bytes=experts,
        total_expert_disk_bytes=disk,
        kv_bytes_per_token=whole.kv_bytes_per_token * (hi - lo) // L,
        moe_layers=(hi - lo) if whole.moe_layers else 0,
    )
    return share, f"layers {lo}-{hi - 1} of {L}"


def rank_memory(checkpoint, compute_bytes: int, requested: int | str | None,
                max_context: int | None, kv_bits: int | None, world_: World):  # fmt: skip
    """The memory decision of one rank of several (`memory_plan.decide`'s counterpart): the
    plan counts this rank's share of the experts, and the budget (`--memory-budget`, else what
    this machine has available) applies to it. Experts never stream from disk on a rank: a
    share that does not fit is refused in one line."""
    from dataclasses import replace

    from ..memory_plan import (
        CONTEXT_STEPS,
        BudgetError,
        MemoryDecision,
        _room,
        auto_budget,
        memory_plan,
        with_context,
    )

    args = checkpoint.args
    full_context = min(max_context or args.context_length, args.context_length)
    whole = memory_plan(checkpoint, compute_bytes, full_context, kv_bits)
    plan, what = rank_share(checkpoint, whole, compute_bytes, world_)
    plan = replace(plan, offloadable=False,
                   why_not="experts do not stream from disk with several ranks")  # fmt: skip
    if requested == "none":
        return MemoryDecision(plan, None, False, full_context)
    if requested is None:
        budget, source = _room(), "what this machine has available"
    elif requested == "auto":
        budget, why = auto_budget()
        source = f"the automatic budget ({why})"
    else:
        budget, source = int(requested), "its --memory-budget"
    if plan.full_bytes <= budget:
        return MemoryDecision(plan, None, False, full_context)
    if max_context is None:  # a shorter context may be all it takes
        for context in CONTEXT_STEPS:
            p = with_context(plan, min(context, full_context), args, compute_bytes)
            if p.full_bytes <= budget:
                notice = f"context {p.context:,} tokens: what fits this rank's memory"
                return MemoryDecision(p, None, False, p.context, notice)
    raise BudgetError(
        f"rank {world_.rank}'s share of {checkpoint.path.name} ({what}) needs {format_bytes(plan.full_bytes)}, over {source} ({format_bytes(budget)}): "
        "use more ranks, fewer expert bits or a shorter --max-context"
    )
