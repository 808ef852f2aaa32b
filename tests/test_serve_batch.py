"""Batched decode in `mixchat serve` (model/generation/batch.py): batches of several rows are formed,
each row's reply equals its answer alone (greedy and seeded sampling), a row's disconnect and
finish leave the others going, and engines that cannot batch serve one request at a time."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from app.serve.models import ModelManager
from app.serve.scheduler import Scheduler
from app.serve.server import ServerThread
from model import Engine, GenerationSettings
from tests.test_serve import client, finished, health, start

PROMPTS = [[{"role": "user", "content": f"Tell me about the number {i}."}] for i in range(6)]


def alone(engine: Engine, messages, **settings) -> str:
    engine.reset()
    return "".join(c.text for c in engine.stream(messages, GenerationSettings(**settings)))


def ask(server, messages, **settings):
    return client(server).chat.completions.create(model="default", messages=messages, **settings)


def test_rows_decode_together_and_equal_their_answers_alone(tiny_mixtral):
    fresh = Engine.load(str(tiny_mixtral))
    # each its own settings: lengths end rows at different steps, seeds sample their own way
    settings = [dict(max_tokens=4 + 3 * i, temperature=0) for i in range(3)] + [
        dict(max_tokens=10, temperature=0.9, top_p=0.9, seed=7 + i) for i in range(3)
    ]  # fmt: skip
    expected = [alone(fresh, p, **s) for p, s in zip(PROMPTS, settings)]
    with start(tiny_mixtral, batch=4) as server:
        # two long replies hold two rows of the batch while the six requests come and go
        holders = [ask(server, [{"role": "user", "content": f"A long story {i}."}],
                       max_tokens=3000, temperature=0, stream=True) for i in range(2)]  # fmt: skip
        for stream in holders:
            next(iter(stream))
        with ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(lambda a: ask(server, a[0], **a[1]), zip(PROMPTS, settings)))
        during = health(server)
        for stream in holders:
            stream.close()
    assert [r.choices[0].message.content for r in replies] == expected
    assert [r.usage.completion_tokens for r in replies] == [s["max_tokens"] for s in settings]
    assert during["batch"] == 4 and during["queued"] == 0 and during["active"] == 2
    assert 3 <= during["largest_batch"] <= 4  # the requests decoded with the holders, 4 at most
    assert during["batched_steps"] > 0


def test_a_disconnected_row_leaves_within_a_token_and_the_others_go_on(tiny_mixtral):
    fresh = Engine.load(str(tiny_mixtral))
    expected = alone(fresh, PROMPTS[1], max_tokens=40, temperature=0)
    with start(tiny_mixtral, batch=4) as server:
        leaving = client(server).chat.completions.create(
            model="default", messages=PROMPTS[0], max_tokens=3000, temperature=0, stream=True
        )
        chunks = iter(leaving)
        for _ in range(3):
            next(chunks)
        staying: list = []
        other = threading.Thread(target=lambda: staying.append(
            ask(server, PROMPTS[1], max_tokens=40, temperature=0)))  # fmt: skip
        other.start()
        while health(server)["active"] < 2 and other.is_alive():
            pass  # both rows are in the batch before the first one leaves
        leaving.close()
        other.join(60)
        job = finished(server, PROMPTS[0][0]["content"])
        state = health(server)
    assert job.done.finish_reason == "cancelled"
    assert job.done.stats.generation_tokens <= job.chunks_at_cancel + 1
    assert staying[0].choices[0].message.content == expected
    assert staying[0].choices[0].finish_reason == "length"
    assert state["batched_steps"] > 0 and state["active"] == 0


def test_engines_that_cannot_batch_serve_one_at_a_time(tiny_mistral_windowed):
    windowed = Engine.load(str(tiny_mistral_windowed))
    expected = [alone(windowed, p, max_tokens=5, temperature=0) for p in PROMPTS[:3]]
    models = ModelManager(str(tiny_mistral_windowed), keep_alive=None)
    models.engine_for(models.start_key)
    with ServerThread(Scheduler(models, batch=8)) as server:
        with ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(lambda p: ask(server, p, max_tokens=5, temperature=0),
                                    PROMPTS[:3]))  # fmt: skip
        state = health(server)
    assert [r.choices[0].message.content for r in replies] == expected
    assert state["batch"] == 1
    assert state["batch_limited_because"] == "the model uses a sliding-window KV cache"
    assert state["batched_steps"] == 0 and state["largest_batch"] == 1
    assert state["decode_steps"] == sum(r.usage.completion_tokens for r in replies) == 15


def test_default_batch_by_model_kind(tiny_mixtral):
    from model.generation.limit import batch_limit

    moe = Engine.load(str(tiny_mixtral))
    limit, reason = batch_limit(moe, None)  # an MoE model: one at a time unless --batch N
    assert limit == 1 and reason.startswith("the default for an MoE model")
    assert batch_limit(moe, 8) == (8, "") and batch_limit(moe, 1) == (1, "")
