"""Synthetic MoE routing with Mixtral's locality, and expert-cache policies replayed on it.

A trace is int expert ids [tokens, layers, top_k], distinct within a token, first = the
router's first choice. Each layer is an independent Markov chain over ordered top-k tuples,
built to hit two published statistics of real Mixtral routing ("Mixtral of Experts", §5):

* share: P(a token shares >= 1 of its top-k experts with the previous token), 45-67% by layer;
* same_first: P(a token's first expert is the previous token's first expert), 14-28%;

(random routing: 46.4% and 12.5% for 8 experts top-2). Given the previous tuple A, the next
token keeps A's first expert with probability `same_first`, else draws its first expert from
the other experts; its other experts are drawn without replacement from those not chosen yet.
Every draw weighs the experts of A by `theta` and the others by 1 (theta < 1 avoids A, > 1
sticks to it); theta is solved per layer so that P(share) hits its target exactly. The rules
only depend on which experts were in A, not on their ids, so the stationary load is exactly
uniform and each statistic is, token after token, an independent Bernoulli draw.

Replays mirror mixchat's runtime (model/offload/), with its cache's own eviction orders
(model/offload/policies.py): per forward pass and layer the distinct experts the pass routes to
are demanded in id order, all counted for LFU, hits touched first, then misses loaded; the
layer's experts are pinned while it runs (computed in groups when the cache holds fewer).
Policies: the cache's POLICIES and AUTO_POLICY (next-use below top_k x layers experts, else
lru); "belady" (MIN: evict what is needed farthest in the future; an upper bound on every
policy's hits) and "static" (pin the most demanded experts of the whole trace, stream the rest
through top_k slots). Capacities are counted in experts (every expert the same size) and stay
fixed (the runtime's cache shrinks as the KV cache grows); the runtime's read-ahead of the next
layer's experts during long prompts is not replayed (it moves hits within a prompt pass, not
decode's).

`expected_hit_rate` is the decode hit rate `mixchat info` shows for a cached share of the
experts: a replay on a short generated trace, cached per shape, policy and capacity.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, OrderedDict
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .errors import MixchatError
from .offload.policies import AUTO_POLICY, DEFAULT_POLICY, POLICIES, eviction_order, per_layer

REPLAY_POLICIES = (*POLICIES, AUTO_POLICY, "static", "belady")

# Within the published ranges, by relative depth (0 = first MoE layer, 1 = last): layer 0 at the
# low end, the middle layers at the high end, the last layers in between (anchors chosen, not
# the paper's per-layer values); linear between the anchors.
PROFILE_ANCHORS = ((0.0, 0.45, 0.14), (0.5, 0.67, 0.28), (1.0, 0.56, 0.22))


@dataclass(frozen=True)
class LayerLocality:
    """Targets for one layer: P(share >= 1 expert with the previous token), P(same first)."""

    share: float
    same_first: float


def default_profile(num_layers: int, num_experts: int = 8, top_k: int = 2
                    ) -> list[LayerLocality]:  # fmt: skip
    """Mixtral-like targets per layer, interpolated along depth through PROFILE_ANCHORS (for 8
    experts top-2). Other shapes keep the same share of the way from random routing to
    certainty (x' = r' + (x - r) (1 - r') / (1 - r), r and r' the random statistics); top-1
    routing has one statistic, the same-first one."""
    depth = [i / (num_layers - 1) if num_layers > 1 else 0.0 for i in range(num_layers)]
    xs, shares, firsts = zip(*PROFILE_ANCHORS)
    mixtral, here = random_locality(8, 2), random_locality(num_experts, top_k)

    def rescale(x: float, r: float, r_here: float) -> float:
        return r_here + (x - r) * (1 - r_here) / (1 - r)

    profile = []
    for x in depth:
        first = rescale(float(np.interp(x, xs, firsts)), mixtral.same_first, here.same_first)
        share = rescale(float(np.interp(x, xs, shares)), mixtral.share, here.share)
        profile.append(LayerLocality(first if top_k == 1 else share, first))
    return profile


def random_locality(num_experts: int, top_k: int) -> LayerLocality:
    """The statistics of uniformly random, independent routing (theta = 1, no memory)."""
    share = 1.0 - math.comb(num_experts - top_k, top_k) / math.comb(num_experts, top_k)
    return LayerLocality(share, 1.0 / num_experts)


def _share_probability(theta: float, same_first: float, num_experts: int, top_k: int) -> float:
    """Exact P(share >= 1 expert with the previous token) of the chain for this theta."""
    E, k = num_experts, top_k
    none = (1.0 - same_first) * (E - k) / ((k - 1) * theta + E - k)
    for j in range(1, k):
        none *= (E - k - j) / (k * theta + E - k - j)
    return 1.0 - none


def solve_theta(target: LayerLocality, num_experts: int, top_k: int) -> float:
    """The weight of the previous token's experts that makes P(share) equal target.share."""
    if not 0.0 <= target.same_first < 1.0:
        raise MixchatError(f"same-first probability {target.same_first} is not in [0, 1)")

    def share(log_theta: float) -> float:
        return _share_probability(math.exp(log_theta), target.same_first, num_experts, top_k)

    lo, hi = -30.0, 30.0
    if not share(lo) - 1e-9 <= target.share <= share(hi) + 1e-9:
        raise MixchatError(
            f"a share of {target.share:.3f} with the previous token cannot go with a same-first "
            f"probability of {target.same_first:.3f} for {num_experts} experts top-{top_k} "
            f"(reachable: {share(lo):.3f} to {share(hi):.3f})"
        )
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if share(mid) < target.share else (lo, mid)
    return math.exp((lo + hi) / 2)


class RoutingProcess:
    """A seeded routing generator, one token at a time (`decode`) or many (`prompt`): the same
    chain either way (`prompt(n)` is n `decode()` calls)."""

    def __init__(self, num_experts: int, top_k: int, num_layers: int,
                 profile: list[LayerLocality] | None = None, seed: int = 0):  # fmt: skip
        if not 1 <= top_k < num_experts or num_layers < 1:
            raise MixchatError(
                f"routing needs 1 <= top_k < experts and >= 1 layer "
                f"(got {num_experts} experts, top-{top_k}, {num_layers} layers)"
            )
        if profile is None:
            profile = default_profile(num_layers, num_experts, top_k)
        profile = list(profile)
        if len(profile) != num_layers:
            raise MixchatError(f"locality profile has {len(profile)} layers, not {num_layers}")
        self.num_experts, self.top_k, self.num_layers = num_experts, top_k, num_layers
        self.profile = profile
        self.same_first = np.array([p.same_first for p in profile])
        self.log_theta = np.log([solve_theta(p, num_experts, top_k) for p in profile])
        self.rng = np.random.default_rng(seed)
        self.state: np.ndarray | None = None  # [layers, k], the last token's experts
        self._rows = np.arange(num_layers)

    def decode(self) -> np.ndarray:
        """The next token's experts, [layers, top_k] int32."""
        return self.prompt(1)[0]

    def prompt(self, tokens: int) -> np.ndarray:
        """`tokens` consecutive tokens' experts, [tokens, layers, top_k] int32 (the random
        numbers of all tokens drawn at once: the same ones `tokens` decode() calls draw)."""
        L, E = self.num_layers, self.num_experts
        uniform = self.rng.random((tokens, L, 2 * E + 1))
        with np.errstate(divide="ignore"):
            gumbel = -np.log(-np.log(uniform[..., : 2 * E]))  # two keys per expert
        keep = uniform[..., 2 * E] < self.same_first
        out = np.empty((tokens, L, self.top_k), np.int32)
        for t in range(tokens):
            out[t] = self.state = self._step(gumbel[t], keep[t])
        return out

    def _step(self, gumbel: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """One token [layers, k] from Gumbel keys [layers, 2 E] and keep-first draws [layers]."""
        E, k, rows, prev = self.num_experts, self.top_k, self._rows, self.state
        if prev is None:  # the stationary (uniform) distribution
            return np.argsort(-gumbel[:, :E], axis=1)[:, :k]
        # first choice: keep the previous one, or draw (Gumbel-max) among the others, the
        # previous token's experts weighing theta
        keys = gumbel[:, :E].copy()
        keys[rows[:, None], prev] += self.log_theta[:, None]
        keys[rows, prev[:, 0]] = -np.inf
        first = np.where(keep, prev[:, 0], np.argmax(keys, axis=1))
        # the others: weighted draws without replacement (Gumbel top-k), in draw order
        keys = gumbel[:, E:].copy()
        keys[rows[:, None], prev] += self.log_theta[:, None]
        keys[rows, first] = -np.inf
        out = np.empty((self.num_layers, k), np.int32)
        out[:, 0] = first
        if k == 2:
            out[:, 1] = np.argmax(keys, axis=1)
        elif k > 2:
            out[:, 1:] = np.argsort(-keys, axis=1)[:, : k - 1]
        return out


@dataclass(frozen=True)
class Trace:
    """Routing of a run: routes [tokens, layers, k], and the tokens of each forward pass (a
    prompt chunk, then one per decoded token)."""

    routes: np.ndarray
    passes: tuple[int, ...]
    num_experts: int

    @property
    def num_layers(self) -> int:
        return self.routes.shape[1]

    @property
    def top_k(self) -> int:
        return self.routes.shape[2]


def generate_trace(num_experts: int, top_k: int, num_layers: int, decode_tokens: int,
                   prompt_tokens: int = 0, prompt_chunk: int = 512, seed: int = 0,
                   profile: list[LayerLocality] | None = None) -> Trace:  # fmt: skip
    """A prompt of `prompt_tokens` prefilled in chunks of `prompt_chunk` tokens, then
    `decode_tokens` decoded one at a time, from one RoutingProcess."""
    process = RoutingProcess(num_experts, top_k, num_layers, profile, seed)
    chunks = [min(prompt_chunk, prompt_tokens - i) for i in range(0, prompt_tokens, prompt_chunk)]
    parts = [process.prompt(n) for n in chunks] + [process.prompt(decode_tokens)]
    return Trace(np.concatenate(parts), (*chunks, *([1] * decode_tokens)), num_experts)


@dataclass(frozen=True)
class Locality:
    """Measured per layer: share [L], same_first [L], load [L, E] (share of routed slots)."""

    share: np.ndarray
    same_first: np.ndarray
    load: np.ndarray


def measure_locality(routes: np.ndarray, num_experts: int) -> Locality:
    """The two statistics between consecutive tokens, and the load per expert, of routes
    [tokens, layers, k]."""
    routes = np.asarray(routes)
    if routes.ndim != 3 or routes.shape[0] < 2:
        raise MixchatError("measuring locality needs routes [tokens >= 2, layers, k]")
    prev, nxt = routes[:-1], routes[1:]
    share = (nxt[:, :, :, None] == prev[:, :, None, :]).any(axis=(2, 3)).mean(axis=0)
    same_first = (nxt[:, :, 0] == prev[:, :, 0]).mean(axis=0)
    T, L, k = routes.shape
    load = np.zeros((L, num_experts))
    for layer in range(L):
        load[layer] = np.bincount(routes[:, layer].ravel(), minlength=num_experts)
    return Locality(share, same_first, load / (T * k))


# --- replay ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayResult:
    policy: str
    capacity: int  # experts the cache holds
    hits: np.ndarray  # [layers]
    misses: np.ndarray  # [layers]

    @property
    def hit_rate(self) -> float:
        total = int(self.hits.sum() + self.misses.sum())
        return float(self.hits.sum()) / total if total else 0.0

    @property
    def layer_hit_rates(self) -> np.ndarray:
        return self.hits / np.maximum(self.hits + self.misses, 1)


def demand_steps(trace: Trace) -> list[tuple[int, int, list[int]]]:
    """(pass index, layer, distinct experts in id order) in the order the runtime demands them."""
    steps = []
    starts = np.cumsum((0, *trace.passes))
    index = 0
    while index < len(trace.passes):
        end = index  # a run of one-token passes: sorted all at once
        while end < len(trace.passes) and trace.passes[end] == 1:
            end += 1
        if end > index:
            tokens = np.sort(trace.routes[starts[index] : starts[end]], axis=2).tolist()
            for offset, layers in enumerate(tokens):
                steps += [(index + offset, layer, e) for layer, e in enumerate(layers)]
            index = end
            continue
        block = trace.routes[starts[index] : starts[index + 1]]
        steps += [
            (index, layer, np.unique(block[:, layer]).tolist()) for layer in range(trace.num_layers)
        ]
        index += 1
    return steps


def replay(trace: Trace, policy: str, capacity_experts: int, warmup_passes: int = 0,
           spread_quota: bool = False) -> ReplayResult:  # fmt: skip
    """Hits and misses per layer of a cache of `capacity_experts` experts under `policy`,
    counted from pass `warmup_passes` on (the cache is warmed by the passes before).

    Per-layer policies get capacity // layers experts each, as ExpertCache's quota (the rest
    unused); with `spread_quota` (not in ExpertCache: what a balanced quota would give) the
    first capacity % layers layers get one more."""
    L, k, E = trace.num_layers, trace.top_k, trace.num_experts
    if policy not in REPLAY_POLICIES:
        raise MixchatError(f"unknown policy {policy!r} (one of {', '.join(REPLAY_POLICIES)})")
    if policy.endswith("-layer"):
        extra = capacity_experts % L if spread_quota else 0
        limits = [capacity_experts // L + (layer < extra) for layer in range(L)]
    else:
        limits = [capacity_experts] * L
    limit = min(limits)
    if limit < k:
        scope = "each layer's share" if policy.endswith("-layer") else "it"
        raise MixchatError(
            f"a cache of {capacity_experts} experts cannot hold the {k} experts a token needs "
            f"per layer ({scope} holds {limit})"
        )
    if policy == "belady" and warmup_passes:
        raise MixchatError("Belady's bound is over the whole trace (warmup_passes=0)")
    steps = demand_steps(trace)
    hits, misses = [0] * L, [0] * L
    if policy == "belady":
        _replay_belady(steps, E, capacity_experts, hits, misses)
    elif policy == "static":
        _replay_static(steps, E, capacity_experts, k, warmup_passes, hits, misses)
    else:
        cycling = capacity_experts < k * L  # "auto": next-use below one token's experts
        _replay_cache(steps, L, policy, limits, cycling, warmup_passes, hits, misses)
    return ReplayResult(policy, capacity_experts, np.array(hits), np.array(misses))


def _replay_cache(steps, L, policy, limits, cycling, warmup, hits, misses) -> None:
    """ExpertCache's eviction orders (model/offload/policies.py), with OffloadRuntime.demand's
    order of operations (limits: the experts each layer's scope holds)."""
    frequency: Counter = Counter()
    lfu = policy.startswith("lfu")
    if per_layer(policy):
        orders = [eviction_order(policy, range(L), frequency) for _ in range(L)]
        scopes: list[set] = [set() for _ in range(L)]
    else:
        orders = [eviction_order(policy, range(L), frequency)] * L
        scopes = [set()] * L
    if policy == AUTO_POLICY:
        orders[0].cycling = cycling
    for index, layer, experts in steps:
        order, cached, limit = orders[layer], scopes[layer], limits[layer]
        for g in range(0, len(experts), limit):  # groups, released in between
            group = [(layer, e) for e in experts[g : g + limit]]
            if lfu:  # demands only order LFU
                for key in group:
                    order.demanded(key)
            missing = []
            for key in group:
                if key in cached:
                    order.touch(key)
                else:
                    missing.append(key)
            if index >= warmup:
                hits[layer] += len(group) - len(missing)
                misses[layer] += len(missing)
            for key in missing:
                if len(cached) >= limit:
                    victim = order.victim(layer, lambda k, pinned=group: k not in pinned)
                    order.remove(victim)
                    cached.discard(victim)
                cached.add(key)
                order.touch(key)


def _flat_accesses(steps) -> tuple[list[int], list[int], list[int]]:
    """(pass, layer, key) of every access in order, key = layer * E + expert (E implicit)."""
    passes, layers, experts = [], [], []
    for index, layer, group in steps:
        for e in group:
            passes.append(index)
            layers.append(layer)
            experts.append(e)
    return passes, layers, experts


def _replay_belady(steps, E, capacity, hits, misses) -> None:
    """MIN on the demanded sequence: on a miss with a full cache, evict the expert whose next
    demand is farthest (never, first)."""
    _, layers, experts = _flat_accesses(steps)
    keys = [layer * E + e for layer, e in zip(layers, experts)]
    n = len(keys)
    next_use = [n] * n
    seen: dict[int, int] = {}
    for i in range(n - 1, -1, -1):
        next_use[i] = seen.get(keys[i], n + i)  # never again: farther than any real use
        seen[keys[i]] = i
    cached: dict[int, int] = {}  # key -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, key), stale entries skipped
    for i, key in enumerate(keys):
        layer = layers[i]
        if key in cached:
            hits[layer] += 1
        else:
            misses[layer] += 1
            if len(cached) >= capacity:
                while True:
                    neg, victim = heapq.heappop(heap)
                    if cached.get(victim) == -neg:
                        del cached[victim]
                        break
        cached[key] = next_use[i]
        heapq.heappush(heap, (-next_use[i], key))


def _replay_static(steps, E, capacity, k, warmup, hits, misses) -> None:
    """The capacity - k most demanded experts of the trace stay; the others pass through k
    slots (LRU), as a runtime without eviction policy would need."""
    passes, layers, experts = _flat_accesses(steps)
    keys = [layer * E + e for layer, e in zip(layers, experts)]
    counts: dict[int, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    ranked = sorted(counts, key=lambda key: (-counts[key], key))
    pinned = set(ranked[: capacity - k])
    loaded: set[int] = set()
    slots: OrderedDict[int, None] = OrderedDict()
    for index, layer, key in zip(passes, layers, keys):
        if key in pinned:
            hit = key in loaded
            loaded.add(key)
        else:
            hit = key in slots
            if hit:
                slots.move_to_end(key)
            else:
                if len(slots) >= k:
                    slots.popitem(last=False)
                slots[key] = None
        if index >= warmup:
            if hit:
                hits[layer] += 1
            else:
                misses[layer] += 1


# --- the figure `mixchat info` shows -------------------------------------------------------------

ESTIMATE_PROMPT = 64  # tokens prefilled in one pass: warms the cache
ESTIMATE_WARMUP = 16  # decoded tokens not counted either
ESTIMATE_DECODE = 128  # decoded tokens counted


@lru_cache(maxsize=16)
def _estimate_trace(num_experts: int, top_k: int, num_layers: int) -> Trace:
    return generate_trace(num_experts, top_k, num_layers, ESTIMATE_WARMUP + ESTIMATE_DECODE,
                          prompt_tokens=ESTIMATE_PROMPT, prompt_chunk=ESTIMATE_PROMPT)  # fmt: skip


@lru_cache(maxsize=256)
def _estimate(num_experts: int, top_k: int, num_layers: int, policy: str, capacity: int) -> float:
    trace = _estimate_trace(num_experts, top_k, num_layers)
    return replay(trace, policy, capacity, warmup_passes=1 + ESTIMATE_WARMUP).hit_rate


def expected_hit_rate(cached_share: float, num_experts: int, top_k: int, num_layers: int,
                      policy: str = DEFAULT_POLICY) -> float:  # fmt: skip
    """Decode hit rate of an expert cache holding `cached_share` of a model's experts, replayed
    on a Mixtral-like trace (a 64-token prompt, then 144 decoded tokens, the last 128 counted),
    under `policy` (default: the expert cache's default, next-use).
    Raises MixchatError for a cache that cannot hold top_k experts per layer."""
    if policy not in (*POLICIES, AUTO_POLICY):
        raise MixchatError(f"unknown expert cache policy {policy!r}")
    if not math.isfinite(cached_share):
        raise MixchatError(f"cached share {cached_share} is not a number")
    total = num_experts * num_layers
    capacity = min(total, int(round(cached_share * total)))
    if capacity <= 0:
        return 0.0
    return _estimate(num_experts, top_k, num_layers, policy, capacity)
