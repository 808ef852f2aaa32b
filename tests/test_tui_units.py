"""Fast tests of the UI's pure parts: languages, prompt building, context fitting, buffers,
heatmap rendering, model info formatting."""

from __future__ import annotations

import threading

import numpy as np

from app.i18n import ENGLISH, TABLES, Strings, detect_language, resolve_language
from app.store import ChatSettings
from app.tui.actions import CHAT_ACTIONS, help_rows
from app.tui.prompting import (
    SAFE_MODE_PROMPT,
    build_messages,
    fit_to_context,
    system_prompt_for,
)
from app.tui.screens.model_info import format_value, info_attributes
from app.tui.streaming import RoutingAccumulator, TextBuffer, UpdatePacer
from app.tui.widgets.experts_heatmap import heat_color, render_heatmap
from tests.fake_engine import FakeEngine, FakeModelInfo


def test_language_follows_posix_precedence():
    assert detect_language({"LANG": "fr_FR.UTF-8"}) == "fr"
    assert detect_language({"LC_ALL": "en_US.UTF-8", "LANG": "fr_FR.UTF-8"}) == "en"
    assert detect_language({"LC_MESSAGES": "fr_CA", "LANG": "en_US.UTF-8"}) == "fr"
    assert detect_language({"LC_ALL": "", "LANG": "fr_BE.UTF-8@euro"}) == "fr"
    assert detect_language({"LANG": "C.UTF-8"}) == "en"
    assert detect_language({"LANG": "de_DE.UTF-8"}) == "en"  # no German table: English
    assert detect_language({}) == "en"
    assert resolve_language("fr", {"LANG": "en_US"}) == "fr"
    assert resolve_language("FR-fr", {}) == "fr"
    assert resolve_language(None, {"LANG": "fr_FR.UTF-8"}) == "fr"


def test_every_language_has_every_string_with_the_same_placeholders():
    import string

    def fields(template: str) -> set[str]:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name}

    for language, table in TABLES.items():
        assert set(table) == set(ENGLISH), language
        for key, text in ENGLISH.items():
            assert fields(table[key]) == fields(text), (language, key)
    # Every action has a label and a help text.
    strings = Strings("fr")
    for action in CHAT_ACTIONS:
        assert action.label_key in ENGLISH and action.help_key in ENGLISH
    assert len(help_rows(strings)) == len(CHAT_ACTIONS) + 5
    assert Strings("xx").language == "en"
    assert Strings("fr").key_name("Shift+Enter, Ctrl+J") == "Maj+Entrée, Ctrl+J"
    assert Strings("en").key_name("Shift+Enter") == "Shift+Enter"
    assert (
        Strings("fr")("notify.exported", path="/tmp/a.md") == "Discussion exportée vers /tmp/a.md"
    )


def test_safe_mode_prompt_is_mistrals_exact_text():
    assert SAFE_MODE_PROMPT == (
        "Always assist with care, respect, and truth. Respond with utmost utility yet securely. "
        "Avoid harmful, unethical, prejudiced, or negative content. "
        "Ensure replies promote fairness and positivity."
    )


def test_system_prompt_combines_safe_mode_user_prompt_and_language():
    assert system_prompt_for(ChatSettings()) == ""
    combined = system_prompt_for(
        ChatSettings(system_prompt="  You are terse.  ", safe_mode=True, reply_language="ja")
    )
    parts = combined.split("\n\n")
    assert parts[0] == SAFE_MODE_PROMPT
    assert parts[1] == "You are terse."
    assert "Japanese" in parts[2] and "日本語" in parts[2]
    assert system_prompt_for(ChatSettings(reply_language="unknown")) == ""


def test_build_messages_puts_the_system_prompt_first():
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert build_messages(ChatSettings(), history) == history
    messages = build_messages(ChatSettings(system_prompt="S"), history)
    assert messages[0] == {"role": "system", "content": "S"} and messages[1:] == history


def _count(messages):
    return sum(len(m["content"]) for m in messages)


def test_fit_to_context_drops_whole_oldest_exchanges_and_keeps_the_system_prompt():
    messages = [{"role": "system", "content": "s" * 10}]
    for index in range(4):
        messages += [
            {"role": "user", "content": f"u{index}".ljust(20)},
            {"role": "assistant", "content": f"a{index}".ljust(20)},
        ]
    messages.append({"role": "user", "content": "last".ljust(20)})
    fitted = fit_to_context(messages, _count, context_length=120, max_tokens=30)
    assert fitted.messages[0]["role"] == "system"
    assert fitted.messages[1]["role"] == "user"  # never starts with an orphan reply
    assert fitted.messages[-1]["content"].startswith("last")
    assert fitted.dropped_messages == 6
    assert _count(fitted.messages) + 30 <= 120 and fitted.fits
    assert fitted.max_tokens == 30

    untouched = fit_to_context(messages, _count, context_length=10_000, max_tokens=30)
    assert untouched.messages == messages and untouched.dropped_messages == 0


def test_fit_to_context_shrinks_the_reply_budget_then_gives_up():
    messages = [{"role": "user", "content": "x" * 90}]
    shrunk = fit_to_context(messages, _count, context_length=120, max_tokens=50)
    assert shrunk.fits and shrunk.max_tokens == 30 and shrunk.dropped_messages == 0
    # Less room than MIN_REPLY_TOKENS left: refused rather than a reply of a few tokens.
    cramped = fit_to_context(messages, _count, context_length=100, max_tokens=50)
    assert not cramped.fits
    too_long = fit_to_context(messages, _count, context_length=80, max_tokens=50)
    assert not too_long.fits and too_long.prompt_tokens == 90 and too_long.max_tokens == 0


def test_text_buffer_is_safe_across_threads():
    buffer = TextBuffer()

    def writer(tag: str) -> None:
        for index in range(1000):
            buffer.append(f"{tag}{index};")

    threads = [threading.Thread(target=writer, args=(tag,)) for tag in "ab"]
    drained = []
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        drained.append(buffer.drain())
    for thread in threads:
        thread.join()
    drained.append(buffer.drain())
    pieces = "".join(drained).split(";")[:-1]
    assert len(pieces) == 2000 and buffer.chunks_received == 2000
    assert buffer.drain() == ""


def test_routing_accumulator_sums_counts():
    accumulator = RoutingAccumulator()
    assert accumulator.snapshot() == (None, 0)
    engine = FakeEngine()
    for step in range(1, 6):
        accumulator.observe(engine._routing_counts(step))
    counts, tokens = accumulator.snapshot()
    assert tokens == 5 and counts.shape == (4, 8) and counts.sum() == 5 * 4 * 2
    version = accumulator.version
    accumulator.reset()
    assert accumulator.snapshot() == (None, 0) and accumulator.version > version


def test_heatmap_rendering():
    counts = np.zeros((3, 8), dtype=np.int64)
    counts[0, 1] = 5
    counts[2, 7] = 12_345
    text = render_heatmap(counts)
    lines = text.plain.splitlines()
    assert lines[0].split() == [f"E{i}" for i in range(8)]
    assert lines[1].split()[0] == "L0" and "5" in lines[1].split()
    assert "12k" in lines[3]
    assert len(lines) == 4
    # The brightest cell gets the top of the scale; zero cells are not colored.
    assert heat_color(1.0).get_truecolor() == (253, 231, 37)
    assert heat_color(0.0).get_truecolor() == (68, 1, 84)
    wide = render_heatmap(np.ones((2, 64), dtype=np.int64))
    assert len(wide.plain.splitlines()[1]) < 64 * 3  # compact cells for many experts


def test_model_info_attributes_and_formatting():
    info = FakeModelInfo()
    names = [name for name, _ in info_attributes(info)]
    assert names[:3] == ["architecture", "num_layers", "num_experts"]
    assert format_value("total_params", 46_700_000_000) == "46.70 B"
    assert format_value("active_params", 135_000_000) == "135.0 M"
    assert format_value("size_bytes", 24_600_000_000) == "24.6 GB"
    french = Strings("fr")
    assert format_value("total_params", 46_700_000_000, french) == "46,70 Md"
    assert format_value("size_bytes", 24_600_000_000, french) == "24,6 Go"
    assert format_value("num_layers", 8192, french) == "8\u202f192"
    assert format_value("kv_bytes_per_token", 46_080) == "46.1 KB"
    assert format_value("num_layers", 32) == "32"
    assert format_value("sliding_window", None) == "None"

    class Plain:
        def __init__(self) -> None:
            self.architecture = "llama"
            self._private = 1
            self.note = None

    assert info_attributes(Plain()) == [("architecture", "llama")]
    assert info_attributes(None) == []


def test_update_pacer_spaces_costly_updates_to_stay_within_its_cpu_budget():
    clock = {"wall": 0.0, "cpu": 0.0}
    pacer = UpdatePacer(
        max_rate=30,
        cpu_budget=0.05,
        max_interval=1.0,
        clock=lambda: clock["wall"],
        cpu_clock=lambda: clock["cpu"],
    )
    assert pacer.due()
    pacer.updated()  # first update: no cost known yet, the fastest rate
    assert pacer.interval == 1 / 30
    clock["wall"] += 1 / 30
    clock["cpu"] += 0.0005  # a cheap update: stays at 30 per second
    assert pacer.due()
    pacer.updated()
    assert pacer.interval == 1 / 30
    clock["wall"] += 0.01
    assert not pacer.due()
    clock["wall"] += 0.03
    clock["cpu"] += 0.010  # 10 ms of UI work per update at a 5% budget: one every 0.2 s
    pacer.updated()
    assert abs(pacer.interval - 0.2) < 1e-9
    clock["wall"] += 0.1
    assert not pacer.due()
    clock["wall"] += 0.1
    assert pacer.due()
    clock["cpu"] += 0.5  # very costly: capped at one update a second
    pacer.updated()
    assert pacer.interval == 1.0 and pacer.updates == 4


def test_stats_line_says_one_token_and_no_rate_for_a_single_token():
    from app.tui.engine import ReplyStats
    from app.tui.widgets.message_view import stats_line

    one = ReplyStats(generation_tokens=1, generation_tps=0.0, finish_reason="stop")
    assert stats_line(one, Strings("en")) == ("1 token", False)
    many = ReplyStats.of({"generation_tokens": 1234, "generation_tps": 6.66, "finish_reason": "length"})
    assert stats_line(many, Strings("fr")) == (
        "1\u202f234 jetons · 6,7 jetons/s · limite de jetons atteinte",
        True,
    )


def test_live_status_reads_rate_and_time_left_from_the_prompt_progress():
    from app.tui.reply_session import ActiveReply, live_status

    reply = ActiveReply(1, None, None, [], ChatSettings())  # no widgets needed here
    reply.prompt_size = 5000
    status = live_status(reply, now=0.0)
    assert (status.phase, status.total, status.prompt_size) == ("reading", 0, 5000)
    reply.started_at, reply.progress, reply.progress_at = 100.0, (1000, 4000), 110.0
    status = live_status(reply, now=111.0)  # measured when the chunk came, not now
    assert (status.read, status.total, status.read_rate, status.seconds_left) == (
        1000, 4000, 100.0, 30.0
    )  # fmt: skip
    reply.first_text_at, reply.last_text_chunk_at, reply.text_chunks = 120.0, 122.0, 21
    status = live_status(reply, now=125.0)
    assert (status.phase, status.tokens, status.tokens_per_second) == ("writing", 21, 10.0)
