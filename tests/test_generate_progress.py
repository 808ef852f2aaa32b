"""The engine's prompt reading: progress between prompt chunks, Esc between them, and the routing
counts of the last reply kept whether or not anyone observed them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from model import Engine, GenerationSettings
from model import generate as generate_module
from tests import test_offload

# The budgeted engine's fixtures and settings, shared with tests/test_offload.py.
tiny_q4, plan, reference = test_offload.tiny_q4, test_offload.plan, test_offload.reference
CONTEXT, MESSAGES, OFFLOAD_GREEDY = test_offload.CONTEXT, test_offload.MESSAGES, test_offload.GREEDY

GREEDY = GenerationSettings(max_tokens=6, temperature=0.0)
LONG = [{"role": "user", "content": "Une phrase assez longue pour plusieurs morceaux. " * 4}]


@pytest.fixture(scope="module")
def engine(tiny_mixtral):
    return Engine.load(str(tiny_mixtral))


def test_a_long_prompt_reports_progress_chunk_by_chunk(engine, monkeypatch):
    monkeypatch.setattr(generate_module.Engine, "_chunk", property(lambda self: 8))
    engine.reset()
    total = engine.count_tokens(LONG)
    chunks = list(engine.stream(LONG, GREEDY))
    progress = [c.progress for c in chunks if c.progress is not None]
    expected = [(done, total) for done in range(8, total, 8)]
    assert progress == expected and len(progress) >= 3
    assert all(c.text == "" and c.stats is None for c in chunks if c.progress is not None)
    assert chunks[-1].stats.prompt_tokens == total


def test_prompt_chunks_after_the_first_are_sized_by_the_measured_speed(engine, monkeypatch):
    """A first small pass measures the speed; later passes aim at CANCEL_WITHIN seconds,
    between 16 tokens and the engine's chunk."""
    monkeypatch.setattr(generate_module.Engine, "_chunk", property(lambda self: 32))
    monkeypatch.setattr(generate_module, "FIRST_PROMPT_CHUNK", 8)
    total = engine.count_tokens(LONG)
    for within, step in ((0.0, 16), (1e9, 32)):  # "no time at all" and "all the time"
        monkeypatch.setattr(generate_module, "CANCEL_WITHIN", within)
        engine.reset()
        chunks = list(engine.stream(LONG, GREEDY))
        expected = [8]  # then passes of `step` while more than `step` tokens are left
        while total - expected[-1] > step:
            expected.append(expected[-1] + step)
        assert [c.progress[0] for c in chunks if c.progress is not None] == expected
        assert len(expected) >= 2


def test_cancel_while_reading_the_prompt_stops_before_the_next_chunk(engine, monkeypatch):
    monkeypatch.setattr(generate_module.Engine, "_chunk", property(lambda self: 8))
    engine.reset()
    expected = "".join(c.text for c in engine.stream(LONG, GREEDY))
    engine.reset()
    stream = engine.stream(LONG, GREEDY)
    first = next(stream)
    assert first.progress == (8, engine.count_tokens(LONG))
    engine.cancel()
    rest = list(stream)
    assert len(rest) == 1 and rest[0].text == "" and rest[0].progress is None
    assert rest[0].stats.finish_reason == "cancelled" and rest[0].stats.prompt_tokens == 8
    # The cache holds the 8 tokens read: the next turn reads the rest and says the same.
    again = list(engine.stream(LONG, GREEDY))
    assert "".join(c.text for c in again) == expected
    assert again[-1].stats.prompt_tokens == engine.count_tokens(LONG) - 8


def test_routing_of_the_last_reply_is_kept_without_an_observer(engine):
    messages = [{"role": "user", "content": "Bonjour"}]
    engine.reset()
    engine.routing_observer = None
    stats = list(engine.stream(messages, GREEDY))[-1].stats
    kept = engine.last_routing
    args = engine.model.args
    assert kept.shape == (args.num_hidden_layers, args.num_local_experts)
    assert (kept.sum(axis=1) == stats.generation_tokens * args.num_experts_per_tok).all()
    observed: list[np.ndarray] = []
    engine.reset()
    engine.routing_observer = observed.append
    try:
        list(engine.stream(messages, GREEDY))
    finally:
        engine.routing_observer = None
    assert np.array_equal(engine.last_routing, np.sum(observed, axis=0))


def test_under_a_memory_budget_the_layer_by_layer_prompt_reports_and_stops_too(
    tiny_q4, plan, reference, monkeypatch
):
    """Experts streamed from disk: the prompt runs layer by layer over windows; progress comes
    per window and Esc stops between windows, leaving a cache the next turn reuses."""
    monkeypatch.setattr(generate_module, "LAYERWISE_WINDOW", 8)
    budget = plan.minimum_budget + 4 * plan.expert_bytes
    engine = Engine.load(str(tiny_q4), memory_budget=budget, max_context=CONTEXT)
    assert engine.offload is not None
    total = engine.count_tokens(MESSAGES)
    stream = engine.stream(MESSAGES, OFFLOAD_GREEDY)
    assert next(stream).progress == (8, total)
    engine.cancel()
    [last] = list(stream)
    assert last.stats.finish_reason == "cancelled" and last.stats.prompt_tokens == 8
    chunks = list(engine.stream(MESSAGES, OFFLOAD_GREEDY))
    rest, done, windows = total - 8, 0, []
    while rest - done > 8:  # whole windows of 8; the last one is read with the first step
        done += 8
        windows.append((done, rest))
    assert [c.progress for c in chunks if c.progress] == windows and len(windows) >= 3
    assert "".join(c.text for c in chunks) == reference[0]


LONG_PROMPT_LEADER = textwrap.dedent("""
    import json, sys
    from model import Engine, GenerationSettings, distributed
    engine = Engine.load(sys.argv[1], split=distributed.rank_split())
    greedy = GenerationSettings(max_tokens=4, temperature=0.0)
    long = [{"role": "user", "content": "Une phrase assez longue, encore une. " * 120}]
    stream = engine.stream(long, greedy)
    first = next(stream).progress  # one pass read on both ranks
    engine.cancel()  # Esc on rank 0: both ranks stop before the next pass
    stopped = [c.stats for c in stream if c.stats][0]
    whole = "".join(c.text for c in engine.stream(long, greedy))  # and both go on in step
    print(json.dumps({"first": first, "finish": stopped.finish_reason,
                      "read": stopped.prompt_tokens, "text": whole}))
""")


@pytest.mark.xdist_group("ranks")  # ranks on loopback ports: one worker runs them all
def test_two_ranks_read_a_long_prompt_in_step_and_stop_together(tiny_mixtral, tmp_path):
    """Ranks that share the experts keep fixed passes (their all_sums must match) and agree on
    a cancel between passes; the reply after it is the one a single process writes."""
    from tests.test_distributed import MIXCHAT, finish, hostfile

    script = tmp_path / "leader.py"
    script.write_text(LONG_PROMPT_LEADER)
    hosts = hostfile(tmp_path)
    procs = []
    for rank, args in enumerate(
        ([sys.executable, str(script), str(tiny_mixtral)], [MIXCHAT, "chat", "-m", str(tiny_mixtral)])
    ):
        env = os.environ | {"MLX_RANK": str(rank), "MLX_HOSTFILE": str(hosts)}
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    (code0, out0, err0), (code1, _, err1) = finish(procs)
    assert code0 == 0 and code1 == 0, (err0, err1)
    got = json.loads(out0)
    single = Engine.load(str(tiny_mixtral))
    long = [{"role": "user", "content": "Une phrase assez longue, encore une. " * 120}]
    total = single.count_tokens(long)
    assert total > 2 * single._chunk  # several passes
    assert got["first"] == [single._chunk, total]  # a whole fixed pass, not a timed one
    assert (got["finish"], got["read"]) == ("cancelled", single._chunk)
    assert got["text"] == "".join(c.text for c in single.stream(long, GenerationSettings(
        max_tokens=4, temperature=0.0)))  # fmt: skip
