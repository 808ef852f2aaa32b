"""MLX's streams and its global random generator belong to a thread (MLX 0.31.2 on), and the
chat app loads the model in one thread and writes each reply in another (a Textual worker).
So a model must run from any thread, nothing built lazily while loading (mlx-lm's RoPE
frequencies, YaRN's recomputed ones) left for a reply's thread to compute, and a reply's KV
cache must be computed before the next reply's thread reuses it; unseeded replies must draw
different numbers from one thread to the next (not the generator's same start each time)."""

from __future__ import annotations

import threading

import pytest

from model import Engine, GenerationSettings
from model.memory_plan import memory_plan
from model.offload import runtime_of
from model.weights import locate
from tests.test_families import family_dirs  # noqa: F401 (session fixtures, built once)
from tests.test_family_budget import family_4bit  # noqa: F401
from tests.test_family_deepseek import deepseek_dirs  # noqa: F401
from tests.test_family_gptoss import gptoss_dirs  # noqa: F401
from tests.test_family_more import more_dirs  # noqa: F401
from tests.test_offload import tiny_q4  # noqa: F401

GREEDY = GenerationSettings(max_tokens=6, temperature=0.0)
# Longer than the first prompt chunk: the prompt is read in several passes.
FIRST = [{"role": "user", "content": "The river runs under the old bridge. " * 12}]


def in_thread(fn):
    """fn() run in a thread of its own, as the chat app runs the load and each reply."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised in the test's thread
            box["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def text(engine: Engine, messages: list[dict], settings: GenerationSettings = GREEDY) -> str:
    return "".join(chunk.text for chunk in engine.stream(messages, settings))


def two_turns(engine: Engine, run=lambda fn: fn()) -> list[str]:
    """A reply, then a second turn that reuses the first one's KV cache, each through `run`."""
    first = run(lambda: text(engine, FIRST))
    second = FIRST + [{"role": "assistant", "content": first}, {"role": "user", "content": "More."}]
    return [first, run(lambda: text(engine, second))]


MODELS = [("tiny_mixtral", None), ("default_model_path", None),
          ("family_dirs", "qwen3_moe"), ("family_dirs", "qwen2_moe"), ("family_dirs", "olmoe"),
          ("more_dirs", "granitemoe"), ("more_dirs", "phimoe"),
          ("deepseek_dirs", "deepseek_v3"), ("deepseek_dirs", "deepseek_v2"),
          ("gptoss_dirs", "float"), ("gptoss_dirs", "mxfp4")]  # fmt: skip


@pytest.mark.parametrize("fixture, family", MODELS, ids=[f or x for x, f in MODELS])
def test_a_model_loaded_in_one_thread_answers_in_others_as_in_one(request, fixture, family):
    path = request.getfixturevalue(fixture)
    path = str(path if family is None else path[family])
    expected = two_turns(Engine.load(path))
    assert two_turns(in_thread(lambda: Engine.load(path)), run=in_thread) == expected


@pytest.mark.parametrize("fixture, family", [("tiny_q4", None), ("family_4bit", "qwen3_moe")])
def test_experts_streamed_under_a_budget_answer_from_other_threads_too(request, fixture, family):
    """The larger-than-memory path (its expert cache filled by the reply's thread, evicted and
    read again), loaded in one thread and answering in others: as in one thread."""
    path = request.getfixturevalue(fixture)
    path = path if family is None else path[family]
    plan = memory_plan(locate(path), 4, context=512)
    budget = plan.minimum_budget + 3 * plan.expert_bytes  # fewer experts than a token uses

    def load() -> Engine:
        engine = Engine.load(str(path), memory_budget=budget, max_context=512)
        assert runtime_of(engine.model) is not None  # the experts stream
        return engine

    assert two_turns(in_thread(load), run=in_thread) == two_turns(load())


def test_unseeded_replies_in_separate_threads_draw_different_tokens(default_model_path):
    engine = in_thread(lambda: Engine.load(str(default_model_path)))  # as the chat app does
    hot = GenerationSettings(max_tokens=24, temperature=1.5)
    question = [{"role": "user", "content": "Tell me a story."}]
    replies = {in_thread(lambda: text(engine, question, hot)) for _ in range(3)}
    assert len(replies) > 1
    seeded = GenerationSettings(max_tokens=24, temperature=1.5, seed=7)
    assert len({in_thread(lambda: text(engine, question, seeded)) for _ in range(2)}) == 1
