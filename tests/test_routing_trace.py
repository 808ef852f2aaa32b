"""Routing traces with Mixtral's locality, and cache policies replayed on them."""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import pytest

from model import routing_trace
from model.errors import MixchatError
from model.offload import DEFAULT_POLICY, POLICIES, ExpertCache
from model.routing_trace import (
    LayerLocality,
    RoutingProcess,
    Trace,
    default_profile,
    expected_hit_rate,
    generate_trace,
    measure_locality,
    random_locality,
    replay,
    solve_theta,
)

TOKENS = 4000


@pytest.fixture(scope="module")
def mixtral_like():
    process = RoutingProcess(8, 2, 8, seed=3)
    return process, process.prompt(TOKENS)


def test_generator_hits_its_targets_per_layer(mixtral_like):
    """Each statistic is a mean of TOKENS - 1 independent Bernoulli(target) draws (the chain's
    rules do not depend on expert ids, so each step's outcome has the same law whatever the
    state): 4 standard deviations, sqrt(p (1 - p) / (TOKENS - 1)) <= 0.8 points, are allowed."""
    process, routes = mixtral_like
    measured = measure_locality(routes, 8)
    n = TOKENS - 1
    for layer, target in enumerate(process.profile):
        for got, want in ((measured.share[layer], target.share),
                          (measured.same_first[layer], target.same_first)):  # fmt: skip
            assert abs(got - want) <= 4 * math.sqrt(want * (1 - want) / n), (layer, got, want)


def test_default_profile_spans_the_published_ranges():
    profile = default_profile(32)
    shares = [p.share for p in profile]
    firsts = [p.same_first for p in profile]
    assert (shares[0], firsts[0]) == (pytest.approx(0.45), pytest.approx(0.14))  # layer 0: low
    assert max(shares) == pytest.approx(0.67, abs=0.01)
    assert max(firsts) == pytest.approx(0.28, abs=0.01)
    assert np.argmax(shares) in (15, 16)  # the middle layers are the most local
    assert shares[-1] > shares[0] and firsts[-1] > firsts[0]


@pytest.mark.parametrize("experts, top_k", [(3, 2), (4, 2), (8, 1), (64, 6)])
def test_other_shapes_get_reachable_targets(experts, top_k):
    """Other shapes keep Mixtral's share of the way from random routing to certainty; every
    target stays reachable (3 experts top-2 always share one: P(share) = 1). 0.04 is 3.5
    standard deviations of a mean of 1,999 Bernoulli draws."""
    process = RoutingProcess(experts, top_k, 3, seed=1)
    measured = measure_locality(process.prompt(2000), experts)
    for layer, target in enumerate(process.profile):
        assert abs(measured.same_first[layer] - target.same_first) < 0.04
        assert abs(measured.share[layer] - target.share) < 0.04


def test_four_experts_middle_layer_by_hand():
    """The middle layer: 67% against random 13/28 is 38.5% of the way to 1; for 4 experts
    top-2 (random 5/6) that is 5/6 + 0.385 / 6 = 89.7%; same first: (28% - 1/8) / (7/8) =
    17.7% of the way, 1/4 + 0.177 * 3/4 = 38.3%."""
    middle = default_profile(3, 4, 2)[1]
    assert middle.share == pytest.approx(0.897, abs=5e-4)
    assert middle.same_first == pytest.approx(0.383, abs=5e-4)


def test_load_is_near_uniform(mixtral_like):
    """Expert e's load is the mean of TOKENS indicators with p = k/E = 1/4, correlated from
    token to token; with a variance inflation of at most 2 (lag-1 correlation ~0.2 at the most
    local layer), 5 standard deviations of the share are 5 * sqrt(2 p (1 - p) / TOKENS) / k."""
    _, routes = mixtral_like
    load = measure_locality(routes, 8).load
    assert load.sum(axis=1) == pytest.approx(np.ones(8))
    p = 2 / 8
    assert np.abs(load - 1 / 8).max() <= 5 * math.sqrt(2 * p * (1 - p) / TOKENS) / 2


def test_measure_locality_by_hand():
    # pairs: (0 1 -> 1 2) share, other first; (1 2 -> 3 4) nothing; (3 4 -> 3 0) both
    routes = np.array([[0, 1], [1, 2], [3, 4], [3, 0]]).reshape(4, 1, 2)
    got = measure_locality(routes, 5)
    assert got.share.tolist() == [pytest.approx(2 / 3)]
    assert got.same_first.tolist() == [pytest.approx(1 / 3)]
    assert got.load.tolist() == [[2 / 8, 2 / 8, 1 / 8, 2 / 8, 1 / 8]]


def test_routes_are_distinct_valid_expert_ids(mixtral_like):
    _, routes = mixtral_like
    assert routes.shape == (TOKENS, 8, 2) and routes.dtype == np.int32
    assert routes.min() >= 0 and routes.max() < 8
    assert (routes[..., 0] != routes[..., 1]).all()


def test_prompt_chunk_and_decode_are_the_same_process():
    chunked = RoutingProcess(8, 2, 4, seed=11)
    stepped = RoutingProcess(8, 2, 4, seed=11)
    first = chunked.prompt(30)
    assert np.array_equal(first, np.stack([stepped.decode() for _ in range(30)]))
    assert np.array_equal(chunked.decode(), stepped.decode())
    trace = generate_trace(8, 2, 4, decode_tokens=5, prompt_tokens=70, prompt_chunk=32, seed=11)
    assert trace.passes == (32, 32, 6, 1, 1, 1, 1, 1)
    assert np.array_equal(trace.routes[:30], first)


def test_random_targets_need_no_memory():
    """Random top-2 of 8: P(share) = 1 - C(6,2)/C(8,2) = 13/28, P(same first) = 1/8; the chain
    reaches them with theta = 1 (previous experts weigh like the others)."""
    target = random_locality(8, 2)
    assert target.share == pytest.approx(13 / 28) and target.same_first == 1 / 8
    assert solve_theta(target, 8, 2) == pytest.approx(1.0, rel=1e-6)


def test_unreachable_targets_are_refused():
    with pytest.raises(MixchatError, match="cannot go with"):
        RoutingProcess(8, 2, 1, profile=[LayerLocality(share=0.2, same_first=0.3)])
    with pytest.raises(MixchatError, match="1 <= top_k < experts"):
        RoutingProcess(2, 2, 1)


# --- replay against the runtime's own cache -----------------------------------------------------


def expert_cache_counts(trace: Trace, policy: str, capacity_experts: int, nbytes: int = 10):
    """Hits and misses per layer of model.offload.ExpertCache driven as OffloadedExperts and
    OffloadRuntime.demand drive it: per pass and layer the distinct experts (np.unique), in
    groups the cache can pin, hits pinned first, then misses reserved, pinned and filled."""
    L = trace.num_layers
    cache = ExpertCache(capacity_experts * nbytes, policy, layers=range(L))
    cache.working_set = trace.top_k * L * nbytes  # as `attach` sets it
    hits, misses = np.zeros(L, int), np.zeros(L, int)
    pinned: list = []

    def release():
        for key in pinned:
            cache.unpin(key)
        pinned.clear()

    start = 0
    for n in trace.passes:
        block = trace.routes[start : start + n]
        start += n
        for layer in range(L):
            experts = np.unique(block[:, layer]).tolist()
            release()
            group = max(1, (cache.limit(layer) - cache.pinned_bytes(layer)) // nbytes)
            for g in range(0, len(experts), group):
                missing = []
                for e in experts[g : g + group]:
                    key = (layer, e)
                    cache.record_demand(key)
                    if cache.get(key) is None:
                        missing.append(key)
                        continue
                    hits[layer] += 1
                    cache.pin(key)
                    pinned.append(key)
                for key in missing:
                    misses[layer] += 1
                    assert cache.reserve(key, nbytes)
                    cache.pin(key)
                    pinned.append(key)
                for key in missing:
                    cache.fill(key, object())
                if g + group < len(experts):
                    release()
            assert cache.used <= cache.capacity
    return hits, misses


def test_policy_names_are_the_caches():
    """One policy list and one default: the replay's are the cache's own objects."""
    assert routing_trace.POLICIES is POLICIES and routing_trace.DEFAULT_POLICY is DEFAULT_POLICY


@pytest.mark.parametrize("policy", (*POLICIES, DEFAULT_POLICY))
def test_replay_counts_as_expert_cache(policy):
    # prompt chunks touch more experts than the smallest caches hold: grouped demands; "auto"
    # is next-use below 2 x 3 = 6 experts, LRU from 6 on
    trace = generate_trace(8, 2, 3, decode_tokens=150, prompt_tokens=40, prompt_chunk=20, seed=5)
    for capacity in (4, 5, 6, 9, 13, 20):
        if policy.endswith("-layer") and capacity < 6:
            continue  # fewer than 2 per layer: refused (below)
        result = replay(trace, policy, capacity)
        hits, misses = expert_cache_counts(trace, policy, capacity)
        assert result.hits.tolist() == hits.tolist(), capacity
        assert result.misses.tolist() == misses.tolist(), capacity
        assert result.hit_rate < 1


def test_lru_gets_no_hits_below_one_tokens_experts():
    """Layers are demanded in a cycle: between two demands of an expert one token apart come
    the 2 experts of each of the L - 1 other layers, so LRU over all layers holding 2 (L - 1)
    experts always evicts it first; next-use and LFU keep some."""
    trace = generate_trace(8, 2, 4, decode_tokens=400, seed=1)
    assert replay(trace, "lru", 6).hits.sum() == 0
    assert replay(trace, "lru", 7).hits.sum() > 0
    assert replay(trace, "next-use", 6).hit_rate > 0.1
    assert replay(trace, "lfu", 6).hit_rate > 0.1
    assert replay(trace, "auto", 6).hits.tolist() == replay(trace, "next-use", 6).hits.tolist()
    assert replay(trace, "auto", 8).hits.tolist() == replay(trace, "lru", 8).hits.tolist()


def test_spread_quota_gives_the_remainder_to_the_first_layers():
    """Per-layer scopes are independent: with 5 experts over 2 layers spread as 3 + 2, layer 0
    counts as ExpertCache's per-layer LRU with 3 per layer, layer 1 as with 2 per layer."""
    trace = generate_trace(8, 2, 2, decode_tokens=200, prompt_tokens=16, seed=2)
    spread = replay(trace, "lru-layer", 5, spread_quota=True)
    assert spread.hits[0] == expert_cache_counts(trace, "lru-layer", 6)[0][0]
    assert spread.hits[1] == expert_cache_counts(trace, "lru-layer", 4)[0][1]
    assert replay(trace, "lru-layer", 5).hits[0] == expert_cache_counts(trace, "lru-layer", 4)[0][0]
    assert spread.hits[0] > replay(trace, "lru-layer", 5).hits[0]


def test_belady_bounds_every_policy():
    trace = generate_trace(8, 2, 6, decode_tokens=300, prompt_tokens=32, seed=8)
    for capacity in (12, 18, 24, 36):
        best = replay(trace, "belady", capacity)
        for policy in (*POLICIES, DEFAULT_POLICY, "static"):
            assert best.hits.sum() >= replay(trace, policy, capacity).hits.sum(), (policy, capacity)
        assert best.hits.sum() > replay(trace, "lru", capacity).hits.sum()


def optimal_hits(keys: list[int], capacity: int) -> int:
    """The most hits any demand-paging cache of `capacity` gets on `keys`: exhaustive search."""

    @cache
    def best(i: int, cached: frozenset) -> int:
        if i == len(keys):
            return 0
        key = keys[i]
        if key in cached:
            return 1 + best(i + 1, cached)
        if len(cached) < capacity:
            return best(i + 1, cached | {key})
        return max(best(i + 1, (cached - {victim}) | {key}) for victim in cached)

    return best(0, frozenset())


@pytest.mark.parametrize("seed", range(4))
def test_belady_is_optimal(seed):
    rng = np.random.default_rng(seed)
    routes = np.stack([rng.permutation(5)[:2] for _ in range(2 * 9)]).reshape(9, 2, 2)
    trace = Trace(routes.astype(np.int32), (1,) * 9, 5)
    keys = [layer * 5 + e for t in range(9) for layer in range(2) for e in sorted(routes[t, layer])]
    assert replay(trace, "belady", 4).hits.sum() == optimal_hits(keys, 4)


def test_static_pins_the_most_demanded():
    """One layer, top-1: expert 0 is demanded 5 times; a cache of 2 pins it and streams the
    others through 1 slot: 4 hits (expert 0 after its first read), nothing else repeats."""
    routes = np.array([0, 0, 1, 0, 2, 0, 3, 0], np.int32).reshape(8, 1, 1)
    result = replay(Trace(routes, (1,) * 8, 4), "static", 2)
    assert (result.hits.tolist(), result.misses.tolist()) == ([4], [4])


def test_replay_refuses_what_the_runtime_refuses():
    trace = generate_trace(8, 2, 4, decode_tokens=10)
    with pytest.raises(MixchatError, match="cannot hold the 2 experts"):
        replay(trace, "lru-layer", 7)  # 1 expert per layer
    with pytest.raises(MixchatError, match="unknown policy"):
        replay(trace, "fifo", 8)


# --- the figure `mixchat info` shows ------------------------------------------------------------


@pytest.mark.parametrize("policy", (*POLICIES, DEFAULT_POLICY))
def test_expected_hit_rate_grows_with_the_cache_and_reaches_one(policy):
    shares = [0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    rates = [expected_hit_rate(s, 8, 2, 8, policy) for s in shares]
    assert all(a <= b for a, b in zip(rates, rates[1:])), rates
    assert rates[0] < 0.4 and rates[-1] == 1.0
    assert expected_hit_rate(0.0, 8, 2, 8, policy) == 0.0


def test_expected_hit_rate_refuses_what_the_runtime_refuses():
    with pytest.raises(MixchatError, match="cannot hold the 2 experts"):
        expected_hit_rate(0.2, 8, 2, 32, "lru-layer")  # 1 expert per layer
    with pytest.raises(MixchatError, match="not a number"):
        expected_hit_rate(float("nan"), 8, 2, 32)
    with pytest.raises(MixchatError, match="unknown expert cache policy"):
        expected_hit_rate(0.5, 8, 2, 32, "fifo")


def test_expected_hit_rate_is_near_the_cached_share_per_layer():
    """Real Mixtral's per-layer LRU hits the cached share plus a few points; random models'
    repeated routing gave 96% at 50% cached."""
    rate = expected_hit_rate(0.5, 8, 2, 32, "lru-layer")
    assert 0.5 < rate < 0.62
