"""`--memory-budget` on each of two ranks (loopback): a share over its budget streams its
experts through the expert cache, gives the tokens of one process and holds no more bytes than
the budget; below the share's minimum it is refused in one line."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from model import Engine, GenerationSettings, weights
from model.distributed import World
from model.distributed.hosts import rank_share
from model.memory_plan import memory_plan
from tests.test_distributed import MIXCHAT, finish, quantized, start_ranks

pytestmark = pytest.mark.xdist_group("ranks")  # ranks on loopback ports: one worker runs them all

CONTEXT = 64
PROMPT = "Tell me about mixtures of experts, at length: how a router picks two experts per token."


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """A Mixtral with 8 experts of 2 layers (4 per rank), experts large next to the rest, in
    MLX's 4-bit layout: a budget just over a share's minimum caches ~half of its experts."""
    from tests.checkpoints import build_hf_checkpoint

    root = tmp_path_factory.mktemp("many")
    hf = build_hf_checkpoint(root / "hf", "mixtral", intermediate_size=512, num_experts=8)
    return quantized(hf, root / "q4")


def share_plan(model, rank: int, mode: str = "expert"):
    checkpoint = weights.locate(model)
    plan = memory_plan(checkpoint, 4, CONTEXT)
    return rank_share(checkpoint, plan, 4, World(rank, 2, mode=mode))[0]


BUDGETED = textwrap.dedent("""
    import json, sys
    from mlx.utils import tree_flatten
    from model import Engine, GenerationSettings, distributed

    path, budget, prompt = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    # Each rank drives its own engine through the same calls (rank 0's requests to the others
    # wait unread): every rank can then report what it holds.
    engine = Engine.load(path, memory_budget=budget, max_context=64,
                         split=distributed.rank_split())
    greedy = GenerationSettings(max_tokens=12, temperature=0.0)
    chunks = list(engine.stream([{"role": "user", "content": prompt}], greedy))
    rt = engine.offload
    print(json.dumps({
        "rank": distributed.world().rank,
        "text": "".join(c.text for c in chunks),
        "streams": rt is not None,
        "params": sum(v.nbytes for _, v in tree_flatten(engine.model.parameters())),
        "cache_peak": rt.cache.peak, "cache_capacity": rt.capacity,
        "kv": sum(c.nbytes for c in engine._cache),
        "experts_cached": sorted({e for _, e in rt.cache.keys()}),
        "bytes_read": rt.counters.bytes_read, "hit_rate": chunks[-1].stats.expert_hit_rate,
    }))
""")


def test_ranks_over_budget_stream_their_share_and_give_the_tokens_of_one_process(many, tmp_path):
    plans = [share_plan(many, r) for r in range(2)]
    budget = max(p.minimum_budget for p in plans) + 2 * plans[0].expert_bytes
    assert all(budget < p.full_bytes for p in plans)  # neither share fits: both stream
    script = tmp_path / "budgeted.py"
    script.write_text(BUDGETED)
    results = finish(start_ranks([sys.executable, str(script), str(many), str(budget), PROMPT],
                                 tmp_path))  # fmt: skip
    for code, _, err in results:
        assert code == 0, err
    expected = "".join(
        c.text for c in Engine.load(str(many), max_context=CONTEXT).stream(
            [{"role": "user", "content": PROMPT}], GenerationSettings(max_tokens=12, temperature=0)
        )
    )
    for rank, (_, out, _) in enumerate(results):
        got = json.loads(out)
        plan = plans[rank]
        assert got["rank"] == rank and got["streams"]
        assert got["text"] == expected
        # Bytes held: the share's resident weights, and experts + KV cache within the cache's
        # capacity (the KV cache, allocated 256 tokens at a time, takes its room from the
        # experts); with the planned activations and read buffers, exactly the budget.
        assert got["params"] == plan.resident_bytes
        assert got["cache_capacity"] == plan.cache_bytes(budget, kv_bytes=0)
        # with the KV cache at its planned size, the cache holds a few of the share's experts
        assert plan.cache_bytes(budget) < 0.6 * plan.total_expert_bytes
        assert 0 < got["kv"] and got["cache_peak"] + got["kv"] <= got["cache_capacity"]
        assert got["params"] + got["cache_capacity"] + plan.reserve_bytes - plan.kv_bytes == budget
        # Only this rank's experts (4 of 8 per layer) were read, some more than once.
        lo, hi = 4 * rank, 4 * rank + 4
        assert got["experts_cached"] and all(lo <= e < hi for e in got["experts_cached"])
        assert got["bytes_read"] > plan.total_expert_disk_bytes and got["hit_rate"] < 1


def test_a_budget_below_a_shares_minimum_is_one_line_on_rank_0(many, tmp_path):
    budget = share_plan(many, 0).minimum_budget - 1
    args = [MIXCHAT, "ask", "--local", "-m", str(many), "--max-context", str(CONTEXT),
            "--memory-budget", str(budget), "hi"]  # fmt: skip
    (code0, out0, err0), (code1, _, _) = finish(start_ranks(args, tmp_path))
    assert code0 == 1 and code1 == 1 and out0 == ""
    lines = err0.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("mixchat: error: memory budget") and "below the minimum" in lines[0]
    assert "rank 0's share of q4 (4 of 8 experts per layer)" in lines[0]


def test_the_layer_pipeline_refuses_to_stream_in_one_line(many):
    """(In this process: rank 0 of a world whose other rank's word reads as zeros.)"""
    from model.distributed.hosts import rank_memory
    from model.memory_plan import BudgetError

    checkpoint = weights.locate(many)
    budget = min(share_plan(many, r, "pipeline").full_bytes for r in range(2)) - 1
    with pytest.raises(BudgetError, match="stream from disk with MIXCHAT_PARALLEL=expert only"):
        rank_memory(checkpoint, 4, budget, CONTEXT, None, World(0, 2, mode="pipeline"))
