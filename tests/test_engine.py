"""Generation: greedy decoding vs transformers, KV-cache reuse across turns, cancel, stats."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from model import Engine, GenerationSettings, MixchatError

GREEDY = GenerationSettings(max_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def engine(tiny_mixtral):
    return Engine.load(str(tiny_mixtral))


def run(engine: Engine, messages, settings=GREEDY):
    chunks = list(engine.stream(messages, settings))
    assert chunks[-1].stats is not None and all(c.stats is None for c in chunks[:-1])
    return "".join(c.text for c in chunks), chunks[-1].stats


def test_greedy_reply_matches_transformers_generate(engine, tiny_mixtral):
    import torch
    import transformers

    messages = [{"role": "user", "content": "Quelle est la capitale de la France ?"}]
    prompt = engine.tokenizer.encode_chat(messages)
    reference = transformers.MixtralForCausalLM.from_pretrained(tiny_mixtral, dtype=torch.float32)
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=2,
            pad_token_id=0,
        )
    expected = [t for t in out[0, len(prompt):].tolist() if t != 2]
    engine.reset()
    text, stats = run(engine, messages)
    assert text == engine.tokenizer.decode(expected)
    assert stats.prompt_tokens == len(prompt)
    assert stats.generation_tokens == len(out[0]) - len(prompt)
    assert stats.finish_reason in ("stop", "length")
    assert stats.prompt_tps > 0 and stats.peak_memory_gb > 0


def test_next_turn_prefills_only_new_tokens_and_matches_fresh_engine(engine, tiny_mixtral):
    engine.reset()
    first = [{"role": "user", "content": "Hallo! Wie geht es dir?"}]
    reply, stats1 = run(engine, first)
    conversation = first + [
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "Und auf Italiano, per favore?"},
    ]
    full_prompt = engine.tokenizer.encode_chat(conversation)
    first_prompt = engine.tokenizer.encode_chat(first)
    second, stats2 = run(engine, conversation)
    # At least the whole first turn comes from the cache (a random model's reply may re-encode
    # to other tokens than it was generated as, so the reply itself may be prefilled again).
    assert 0 < stats2.prompt_tokens <= len(full_prompt) - len(first_prompt)
    assert stats2.context_tokens >= len(full_prompt)
    fresh = Engine.load(str(tiny_mixtral))
    expected, fresh_stats = run(fresh, conversation)
    assert second == expected
    assert fresh_stats.prompt_tokens == len(full_prompt)


def test_regenerate_rewinds_the_cache(engine):
    engine.reset()
    messages = [{"role": "user", "content": "Raconte une histoire."}]
    first, _ = run(engine, messages)
    again, stats = run(engine, messages)  # same prompt: the cached reply is trimmed away
    assert again == first and stats.prompt_tokens == 1


def test_max_tokens_and_cancel(engine):
    engine.reset()
    messages = [{"role": "user", "content": "Escribe un poema largo."}]
    _, stats = run(engine, messages, GenerationSettings(max_tokens=3, temperature=0.0))
    assert stats.generation_tokens <= 3
    if stats.finish_reason != "stop":
        assert stats.finish_reason == "length" and stats.generation_tokens == 3

    settings = GenerationSettings(max_tokens=200, temperature=1.0, seed=0)
    stream = engine.stream(messages, settings)
    next(stream)
    engine.cancel()
    rest = list(stream)
    assert rest[-1].stats.finish_reason == "cancelled"
    assert rest[-1].stats.generation_tokens < 10


def test_seed_makes_sampling_reproducible(engine):
    messages = [{"role": "user", "content": "Dimmi qualcosa."}]
    settings = GenerationSettings(max_tokens=10, temperature=1.0, seed=7)
    engine.reset()
    a, _ = run(engine, messages, settings)
    engine.reset()
    b, _ = run(engine, messages, settings)
    engine.reset()
    c, _ = run(engine, messages, GenerationSettings(max_tokens=10, temperature=1.0, seed=8))
    assert a == b and a != c


def test_routing_observer_counts_each_generated_token(engine):
    seen: list[np.ndarray] = []
    engine.routing_observer = seen.append
    try:
        engine.reset()
        _, stats = run(engine, [{"role": "user", "content": "Hello"}])
    finally:
        engine.routing_observer = None
    assert len(seen) == stats.generation_tokens
    for counts in seen:
        assert counts.shape == (2, 4)
        assert (counts.sum(axis=1) == 2).all()  # top-2: two experts per layer per token
    engine.reset()
    run(engine, [{"role": "user", "content": "Hello"}])
    assert len(seen) == stats.generation_tokens  # no observer, no calls


def test_an_observer_attached_mid_reply_first_gets_the_tokens_before_it(engine):
    """F4 opened mid-reply shows the whole reply so far, not only what came after it opened."""
    seen: list[np.ndarray] = []
    engine.reset()
    stream = engine.stream([{"role": "user", "content": "Hello"}],
                           GenerationSettings(max_tokens=12, temperature=0))  # fmt: skip
    try:
        for i, chunk in enumerate(stream):
            if i == 5:
                engine.routing_observer = seen.append
            stats = chunk.stats or None
    finally:
        engine.routing_observer = None
    assert stats.generation_tokens > 6
    assert len(seen) == stats.generation_tokens  # every token, the early ones caught up
    assert (sum(seen) == engine.last_routing).all()


def test_stream_from_a_worker_thread(engine):
    result = {}

    def work():
        engine.reset()
        result["text"], result["stats"] = run(engine, [{"role": "user", "content": "你好"}])

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(60)
    assert result["stats"].generation_tokens > 0


def test_bad_settings_and_oversized_prompts(engine):
    with pytest.raises(MixchatError, match="top-p"):
        list(engine.stream([{"role": "user", "content": "x"}], GenerationSettings(top_p=0)))
    huge = "mot " * 5000
    with pytest.raises(MixchatError, match="context"):
        list(engine.stream([{"role": "user", "content": huge}]))
    # the engine still works afterwards
    text, stats = run(engine, [{"role": "user", "content": "ok"}])
    assert stats.generation_tokens > 0


def test_cancel_applies_to_the_stream_started_last(engine):
    messages = [{"role": "user", "content": "Écris un long texte."}]
    settings = GenerationSettings(max_tokens=50, temperature=1.0, seed=1)
    engine.reset()
    stream = engine.stream(messages, settings)
    engine.cancel()  # before the first token is read: still honoured
    chunks = list(stream)
    assert chunks[-1].stats.finish_reason == "cancelled"
    assert chunks[-1].stats.generation_tokens == 1
    engine.cancel()  # with no stream running: does not cancel the next one
    chunks = list(engine.stream(messages, GenerationSettings(max_tokens=5, temperature=0)))
    assert chunks[-1].stats.finish_reason in ("length", "stop")
