"""`mixchat serve` on a family model (mlx-lm's definition and caches, model/families.py): several
requests at once each get the reply they get alone, whether the scheduler decodes them in one
batch or one at a time (engines that cannot batch serve one request at a time)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from model import Engine
from tests.test_families import family_dirs  # noqa: F401 (the tiny checkpoints, a fixture)
from tests.test_serve import health, start
from tests.test_serve_batch import PROMPTS, alone, ask


def test_concurrent_requests_to_a_family_model_equal_their_replies_alone(family_dirs):  # noqa: F811
    path = family_dirs["qwen3_moe"]
    fresh = Engine.load(str(path))
    settings = [dict(max_tokens=5 + 2 * i, temperature=0) for i in range(4)]
    expected = [alone(fresh, p, **s) for p, s in zip(PROMPTS, settings)]
    assert len(set(expected)) > 1  # the prompts lead to different replies
    with start(path, batch=4) as server:
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda a: ask(server, a[0], **a[1]), zip(PROMPTS, settings)))
        after = health(server)
    assert [r.choices[0].message.content for r in replies] == expected
    assert [r.usage.completion_tokens for r in replies] == [s["max_tokens"] for s in settings]
    assert after["queued"] == 0 and after["active"] == 0
    assert after["largest_batch"] >= 2 and after["batched_steps"] > 0  # decoded together
