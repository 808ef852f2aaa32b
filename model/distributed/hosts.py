"""Sizes and speed across ranks: hostfiles, `mixchat info --hosts`, and the memory decision of
one rank of several."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..names import is_expert_tensor, is_per_expert_tensor
from ..sizes import format_bytes
from .control import PING_SECONDS
from .errors import DistributedError, RankMismatch
from .join import World
from .launch import hostfile_entries
from .pipeline import layer_range
from .shard import expert_range


def read_hostfile(path: Path) -> list[str]:
    """Hosts of a hostfile: mlx.launch's ({"hosts": [{"ssh", "ips"}]} or a list of those) or
    the ring backend's (a list of ["ip:port", ...] per rank)."""
    hosts = hostfile_entries(path)
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
    mode: str  # "expert" or "pipeline"
    ranks: int
    part: str  # what the largest rank holds, in words
    experts_per_rank: int  # of each MoE layer the largest rank holds
    resident_bytes: int  # the largest rank's weights other than experts
    expert_bytes: int  # the largest rank's experts
    reserve_bytes: int  # its KV cache for the whole context + prefill activations
    sent_bytes_per_token: int  # bytes the busiest rank sends per decoded token
    exchanges_per_token: int  # all_sums or hops a decoded token waits for, one after another
    hop_bytes: int = 0  # pipeline: the hidden state handed from rank to rank

    @property
    def rank_bytes(self) -> int:
        return self.resident_bytes + self.expert_bytes + self.reserve_bytes

    def network_seconds(self, bandwidth: float, latency: float) -> float:
        return self.sent_bytes_per_token / bandwidth + self.exchanges_per_token * latency


def rank_plan(plan, checkpoint, ranks: int, compute_bytes: int, mode: str = "expert") -> RankPlan:
    """Memory of the largest rank and per-token traffic of `plan` (a memory_plan.MemoryPlan of
    `checkpoint`) split over `ranks` by experts or by layers."""
    args = checkpoint.args
    vector = args.hidden_size * compute_bytes
    flag = 4 if ranks > 1 else 0  # one int32 all_sum per token agrees on stopping
    if mode == "pipeline":
        # Per token: the hidden state [hidden] from each rank to the next (n - 1 hops, one
        # after the other), then one int32 all_sum gives every rank the sampled token.
        shares = [rank_share(checkpoint, plan, compute_bytes, World(r, ranks, mode=mode))
                  for r in range(ranks)]  # fmt: skip
        share, part = max(shares, key=lambda sp: sp[0].full_bytes)
        return RankPlan(
            mode=mode,
            ranks=ranks,
            part=part,
            experts_per_rank=plan.num_experts,
            resident_bytes=share.resident_bytes,
            expert_bytes=share.total_expert_bytes,
            reserve_bytes=share.kv_bytes + share.full_activation_bytes,
            sent_bytes_per_token=(vector if ranks > 1 else 0) + 2 * flag,
            exchanges_per_token=(ranks - 1) + 2 if ranks > 1 else 0,
            hop_bytes=vector,
        )
    E = max(plan.num_experts, 1)
    per_rank = max(hi - lo for lo, hi in (expert_range(E, r, ranks) for r in range(ranks)))
    # Each MoE layer sums one [hidden] vector per token (a family: one per chosen expert,
    # [k, hidden], weighted after the sum); a ring all-reduce sends 2(n-1)/n of it from each rank.
    if args.is_family:
        vector *= max(args.num_experts_per_tok, 1)
    per_layer = 2 * (ranks - 1) * vector // ranks if ranks > 1 else 0
    return RankPlan(
        mode=mode,
        ranks=ranks,
        part=f"{per_rank} of {plan.num_experts} experts per layer",
        experts_per_rank=per_rank,
        resident_bytes=plan.resident_bytes,
        expert_bytes=plan.total_expert_bytes * per_rank // E,
        reserve_bytes=plan.kv_bytes + plan.full_activation_bytes,
        sent_bytes_per_token=plan.moe_layers * per_layer + flag,
        exchanges_per_token=plan.moe_layers + 1 if ranks > 1 else 0,
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


def hosts_report(checkpoint, compute_bytes: int, hostfile: str | Path, data_dir: Path
                 ) -> tuple[list, dict]:  # fmt: skip
    """`mixchat info --hosts`: (rows, JSON dict) of memory per rank, network traffic per token
    and tok/s bounds for each way of splitting the model, with this machine's memory bandwidth
    (measured once, kept in `data_dir`) standing for every host's."""
    from ..machine import CACHE_FILE, MeasurementCache, memory_bandwidth
    from ..memory_plan import memory_plan

    hosts = read_hostfile(Path(hostfile))
    n = len(hosts)
    memory_bw = memory_bandwidth(
        MeasurementCache(data_dir / CACHE_FILE)
    ).bytes_per_second
    plan = memory_plan(checkpoint, compute_bytes)
    args = checkpoint.args
    modes = ("expert", "pipeline") if args.is_moe else ("pipeline",)
    if args.is_family:  # mlx-lm's definitions split by experts only
        modes = ("expert",)
    rows = [("hosts", f"{n} ranks ({', '.join(hosts)})")]
    data: dict = {"hosts": hosts, "memory_bandwidth": memory_bw, "default": modes[0], "modes": {}}
    for mode in modes:
        rp = rank_plan(plan, checkpoint, n, compute_bytes, mode)
        # Per decoded token. Expert parallel: every rank reads its replicated weights and the
        # chosen experts it holds, and each layer waits for the rank holding the most of them.
        # Pipeline: the ranks take turns, so a token reads what one machine would.
        experts_read = critical_experts(plan.num_experts, plan.top_k, n) if mode == "expert" \
            else plan.top_k  # fmt: skip
        mem_bytes = plan.resident_active_bytes + int(plan.moe_layers * experts_read * plan.expert_bytes)
        compute_s = mem_bytes / memory_bw
        name = f"{mode} mode"
        rows += [
            (name, f"{rp.part} on the largest rank: {format_bytes(rp.rank_bytes)} "
                   f"({format_bytes(rp.resident_bytes)} weights + {format_bytes(rp.expert_bytes)} "
                   f"experts + {format_bytes(rp.reserve_bytes)} KV cache and buffers)"),
            ("  network", f"{format_bytes(rp.sent_bytes_per_token)} sent by the busiest rank per "
                          f"token, {rp.exchanges_per_token} exchanges one after another"),
            ("  memory bound", f"{1 / compute_s:.1f} tok/s at {memory_bw / 1e9:.0f} GB/s "
                               f"({format_bytes(mem_bytes)} read per token on the critical path"
                               + (f": {experts_read:.2f} experts per layer, routing taken as "
                                  "uniform)" if mode == "expert" else ")")),
        ]  # fmt: skip
        links = {}
        for link, bandwidth, latency in LINKS:
            net = rp.network_seconds(bandwidth, latency)
            tps = 1 / (compute_s + net)
            links[link] = {"network_seconds_per_token": net, "tps": tps}
            rows.append((
                "  predicted", f"{tps:.1f} tok/s over {link} ({net * 1e3:.2f} ms network per "
                               f"token, assuming {latency * 1e6:.0f} µs per exchange)",
            ))  # fmt: skip
        data["modes"][mode] = asdict(rp) | {
            "rank_bytes": rp.rank_bytes, "memory_bound_tps": 1 / compute_s,
            "experts_read_per_layer": experts_read, "links": links,
        }  # fmt: skip
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
        if is_expert_tensor(name) or is_per_expert_tensor(name):  # any family's
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
    plan counts this rank's share of the model, and the budget (`--memory-budget`, else what
    this machine has available) applies to it. A share over its budget streams its experts
    through the expert cache (expert parallel only); below the share's minimum (its resident
    weights, KV cache and one layer's top-k experts) it is refused in one line. The ranks then
    agree: every rank takes the shortest context any rank took, and if one streams, all do
    (their passes over a prompt must match one for one)."""
    from dataclasses import replace

    from ..memory_plan import (
        CONTEXT_STEPS,
        BudgetError,
        MemoryDecision,
        _room,
        auto_budget,
        check_budget,
        default_context,
        memory_plan,
        with_context,
    )

    args = checkpoint.args
    if max_context is not None and max_context < 1:
        raise BudgetError(f"--max-context must be a positive number of tokens, not {max_context}")
    full_context = min(max_context or args.context_length, args.context_length)
    whole = memory_plan(checkpoint, compute_bytes, full_context, kv_bits)
    plan, what = rank_share(checkpoint, whole, compute_bytes, world_)
    if world_.mode == "pipeline":
        plan = replace(plan, offloadable=False, why_not="experts stream from disk with "
                       "MIXCHAT_PARALLEL=expert only")  # fmt: skip
    name = f"rank {world_.rank}'s share of {checkpoint.path.name} ({what})"
    decision = MemoryDecision(plan, None, False, full_context)
    failure: BudgetError | None = None
    if requested != "none" and not (requested is None and plan.full_bytes <= _room()):
        if requested is None or requested == "auto":
            budget, why = auto_budget()
        else:
            budget = int(requested)
        if plan.full_bytes > budget:
            context = full_context
            if max_context is None and plan.offloadable:
                context = default_context(plan, budget, args, compute_bytes)
                plan = with_context(plan, context, args, compute_bytes)
            elif max_context is None:  # the longest context whose share fits whole, if any
                fits = [with_context(plan, min(c, full_context), args, compute_bytes)
                        for c in CONTEXT_STEPS]  # fmt: skip
                plan = next((p for p in fits if p.full_bytes <= budget), plan)
                context = plan.context
            try:
                offload = check_budget(plan, budget, name)
                decision = MemoryDecision(plan, budget if offload else None, offload, context)
            except BudgetError as e:
                failure = e
    rows = agree(world_, [decision.context, int(decision.offload), int(failure is not None)])
    if failed := [r for r, row in enumerate(rows) if row[2]]:
        # One line on rank 0's terminal: its own reason, else the first failed rank's (which
        # that rank sends over the control channel, see `follow`; `fatal` prints it).
        if failure is not None and (world_.rank == 0 or 0 not in failed):
            raise failure
        if world_.rank == 0:
            time.sleep(3 * PING_SECONDS)  # the report arrives meanwhile and ends this process
        raise RankMismatch(f"rank {failed[0]} cannot load its share of {checkpoint.path.name}")
    contexts, streaming, _ = zip(*rows)
    context, offload = min(contexts), decision.offload or any(streaming)
    if context < decision.context or offload != decision.offload:
        plan = with_context(decision.plan, context, args, compute_bytes)
        budget = decision.budget if decision.offload else plan.full_bytes  # a cache of it all
        decision = MemoryDecision(plan, budget, offload, context)
    if decision.offload:
        kept = decision.plan.cached_fraction(decision.budget)
        decision.notice = (f"{name} needs {format_bytes(decision.plan.full_bytes)}: experts "
                           f"stream from disk ({kept:.0%} cached, context {context:,} tokens)")
    elif context < full_context:
        decision.notice = f"context {context:,} tokens: what fits every rank's memory"
    return decision


def agree(world_: World, values: list[int]) -> list[list[int]]:
    """Every rank's `values` (int32), on every rank, in rank order."""
    import mlx.core as mx

    rows = np.zeros((world_.size, len(values)), np.int32)
    rows[world_.rank] = values
    return np.array(mx.distributed.all_sum(mx.array(rows), group=world_.group)).tolist()
