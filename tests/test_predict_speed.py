"""`info`'s decode speed under a budget: the cost the streamed decode pays per routed expert
(k experts x MoE layers, each applied one by one from the expert cache), and a disk figure that
one slow measurement (a busy disk) cannot make disk-bound."""

from __future__ import annotations

import pytest

from model import machine as M
from model import memory_plan as P
from model import predict as R
from model import weights
from model.machine import Bandwidth, DecodeTiming, MeasurementCache
from tests.test_memory_plan import synthetic_mixtral

GB = 10**9


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return synthetic_mixtral(tmp_path_factory.mktemp("mixtral-8x7b-q4"))


def test_streamed_prediction_pays_each_routed_expert(mixtral, monkeypatch):
    """A fake machine profile: 4 ms of resident layer, 90 ms per streamed expert, 50 ms of head.
    Compute per token = 32 layers x 4 ms + 32 MoE layers x top-2 x 90 ms + 50 ms."""
    monkeypatch.setattr(R, "expected_hit_rate", lambda plan, cached: cached)
    plan = P.memory_plan(weights.locate(mixtral), compute_bytes=2, context=4096)
    timing = DecodeTiming(layer_seconds=0.004, head_seconds=0.05, layers=32, streams=2,
                          synced=True, method="fake profile", expert_seconds=0.09,
                          experts_per_layer=2)  # fmt: skip
    budget, disk, memory = 12 * GB, 3e9, 68e9
    p = R.predict(plan, budget, timing, disk, memory)
    compute = 32 * 0.004 + 32 * 2 * 0.09 + 0.05
    miss = 32 * 2 * plan.expert_disk_bytes * (1 - p.cached_fraction)
    assert p.compute_seconds == pytest.approx(compute)
    assert p.disk_seconds == pytest.approx(miss / disk)
    assert p.tps == pytest.approx(1 / (compute + miss / disk))
    assert p.bound == "compute"
    # the same layers timed whole (experts applied together, 30 ms a layer) predict faster: what
    # `info` used to do, 1.5-1.7x optimistic on Qwen3-30B-A3B's 8 small experts a layer
    fused = DecodeTiming(0.03, 0.05, 32, 2, True, "one fused layer")
    assert R.predict(plan, budget, fused, disk, memory).tps > p.tps
    # fewer MoE layers (DeepSeek's first dense ones) pay fewer experts
    assert timing.compute_seconds(moe_layers=30) == pytest.approx(compute - 2 * 2 * 0.09)


def _fake_disk(monkeypatch, figures: list[float]) -> list[int]:
    """measure_disk_bandwidth returns `figures` in turn; the rounds asked for each are kept."""
    rounds = []

    def measure(regions, rounds_=5, **_):
        rounds.append(rounds_)
        bw = figures[len(rounds) - 1]
        return Bandwidth(bw, bw * 0.9, bw * 1.1, f"fake {bw / GB:.2f} GB/s")

    monkeypatch.setattr(M, "measure_disk_bandwidth",
                        lambda regions, rounds=5, **kw: measure(regions, rounds, **kw))  # fmt: skip
    return rounds


def test_one_slow_disk_measurement_does_not_make_the_prediction_disk_bound(mixtral, tmp_path,
                                                                         monkeypatch):  # fmt: skip
    """A good measurement (1.7 GB/s), then --remeasure while the disk is busy (56 MB/s): the
    fastest kept figure is used, and says so; the prediction stays compute-bound."""
    checkpoint = weights.locate(mixtral)
    regions = R.expert_regions(checkpoint)
    rounds = _fake_disk(monkeypatch, [1.7 * GB, 0.056 * GB, 1.6 * GB])
    cache = MeasurementCache(tmp_path / M.CACHE_FILE)
    assert M.disk_bandwidth(regions, cache).bytes_per_second == 1.7 * GB
    kept = M.disk_bandwidth(regions, MeasurementCache(tmp_path / M.CACHE_FILE), remeasure=True)
    assert len(rounds) == 2 and kept.bytes_per_second == 1.7 * GB
    assert "fastest of the 2 kept measurements" in kept.method and "56.0 MB/s" in kept.method
    assert "(measured 20" in kept.method
    # read back from the file: no new measurement, the same figure
    again = M.disk_bandwidth(regions, MeasurementCache(tmp_path / M.CACHE_FILE))
    assert len(rounds) == 2 and again.bytes_per_second == 1.7 * GB
    plan = P.memory_plan(checkpoint, compute_bytes=2, context=4096)
    timing = DecodeTiming(0.004, 0.05, 32, 2, True, "fake", 0.09, 2)
    assert R.predict(plan, 12 * GB, timing, again.bytes_per_second, 68e9).bound == "compute"
    assert R.predict(plan, 12 * GB, timing, 0.056 * GB, 68e9).bound == "disk"  # had it been used


def test_a_lone_slow_disk_measurement_is_confirmed_before_it_is_trusted(mixtral, tmp_path,
                                                                      monkeypatch):  # fmt: skip
    """The only figure kept (as an older mixchat kept it) was taken on a busy disk: the next
    `info` takes a short second measurement and uses the faster; after that it reads them back."""
    checkpoint = weights.locate(mixtral)
    regions = R.expert_regions(checkpoint)
    device = f"disk:{regions[0][0].stat().st_dev}"
    stale = MeasurementCache(tmp_path / M.CACHE_FILE)
    stale.put(device, {"median": 0.056 * GB, "low": 0.05 * GB, "high": 0.06 * GB,
                       "method": "a busy moment"})  # fmt: skip
    rounds = _fake_disk(monkeypatch, [1.7 * GB])
    used = M.disk_bandwidth(regions, MeasurementCache(tmp_path / M.CACHE_FILE))
    assert rounds == [M.CONFIRM_ROUNDS] and used.bytes_per_second == 1.7 * GB
    assert M.disk_bandwidth(regions, MeasurementCache(tmp_path / M.CACHE_FILE)) == used
    assert rounds == [M.CONFIRM_ROUNDS]  # kept: not measured a third time
