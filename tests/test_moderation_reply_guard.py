"""A guard model on streamed replies: the lexical guard checks every sentence window, the guard
model (Llama Guard 3's format) the reply so far as the agent turn after the user's message,
every few windows and at the end; `ask --safe --guard-model` and `serve --guard-model` stop a
reply it flags. A `--guard-model` that is not a guard is one line in ask and serve."""

from __future__ import annotations

import threading

import pytest

from app.cli import main
from app.moderation.lexical import LexicalGuard
from app.moderation.policy import Policy
from app.moderation.result import ModerationResult, scores
from app.moderation.stream import ReplyGuard
from tests.test_moderation_guard import guards  # noqa: F401 (the tiny guard models, a fixture)
from tests.test_moderation_safe import MODEL, Loaded, ask
from tests.test_serve import client, health, start

STORY = ("Here is a story about a cook. She opens a restaurant. The sea is calm. Guests arrive. "
         "They eat fish. More words follow here.")  # fmt: skip


class Recorder:
    """A model guard's stand-in (not named "lexical"): records what it is asked, flags
    `flag_on` when it sees it."""

    name = "llama-guard"

    def __init__(self, flag_on: str | None = None):
        self.calls: list[tuple[str, str, list | None]] = []
        self.flag_on = flag_on

    def check(self, text, role="user", context=None):
        self.calls.append((text, role, context))
        hit = self.flag_on is not None and self.flag_on in text
        return ModerationResult(scores(violence_and_threats=1.0 if hit else 0.0), self.name)


class RepliesOnly:
    """The real tiny guard model, asked about replies only: a user turn passes unchecked (the
    tiny model's verdict is the same for every prompt, so a prompt it flags would never be
    sent and its reply never seen)."""

    name = "llama-guard"

    def __init__(self, guard):
        self.guard = guard
        self.roles: list[str] = []
        self.contexts: list = []

    def check(self, text, role="user", context=None):
        self.roles.append(role)
        if role != "assistant":
            return ModerationResult(scores(), self.name)
        self.contexts.append(context)
        return self.guard.check(text, role, context)


def feed_all(guard: ReplyGuard, pieces: list[str]):
    for piece in pieces:
        if guard.feed(piece) is not None:
            return guard.result
    return guard.finish()


def test_lexical_every_window_the_guard_model_at_its_interval_and_at_the_end():
    model = Recorder()
    user = [{"role": "user", "content": "Tell me a story."}]
    guard = ReplyGuard(Policy([LexicalGuard(), model]), context=user, model_every=2)
    assert feed_all(guard, ["One.", " Two.", " Three.", " Four.", " Five.", " and six"]) is None
    assert guard.window_checks == 6  # five closed sentences and the tail
    # after the 2nd and 4th windows, then at the end: the reply so far, as the agent turn
    assert [c[0] for c in model.calls] == ["One. Two.", "One. Two. Three. Four.",
                                           "One. Two. Three. Four. Five. and six"]  # fmt: skip
    assert all(role == "assistant" and context == user for _, role, context in model.calls)


def test_the_guard_model_also_runs_after_enough_tokens_without_a_sentence_end():
    model = Recorder()
    guard = ReplyGuard(Policy([LexicalGuard(), model]), model_tokens=3)
    for piece in ["def", " f", "(x)", ":", "\n"]:
        guard.feed(piece)
    assert [c[0] for c in model.calls] == ["def f(x)"]  # after 3 pieces; 2 since
    assert guard.finish() is None and [c[0] for c in model.calls][1:] == ["def f(x):\n"]
    assert guard.finish() is None and len(model.calls) == 2  # nothing new since: not rerun


def test_a_guard_model_flag_stops_the_reply_and_names_it():
    model = Recorder(flag_on="Three")
    guard = ReplyGuard(Policy([LexicalGuard(), model]), model_every=1)
    result = feed_all(guard, ["One.", " Two.", " Three.", " Four."])
    assert result.flagged_categories == ["violence_and_threats"] and result.guard == "llama-guard"
    assert len(model.calls) == 3 and guard.feed(" Five.") is result  # stays stopped


def test_reply_guard_without_a_policy_is_the_lexical_guard_alone():
    guard = ReplyGuard()
    assert guard.slow is None and feed_all(guard, ["I will", " kill you."]).guard == "lexical"
    assert guard.model_checks == 0


def test_ask_safe_guard_model_stops_a_reply_the_tiny_unsafe_guard_flags(
    capsys, monkeypatch, tiny_mixtral, guards  # noqa: F811
):  # fmt: skip
    wrapped, loaded = RepliesOnly(guards["unsafe"]), []

    def load(cls, model, options=None):
        loaded.append(model)
        return wrapped

    monkeypatch.setattr("app.moderation.llama_guard.LlamaGuard.load", classmethod(load))
    code, out, err = ask(capsys, monkeypatch, "--safe", "--guard-model", "GUARD", "-m",
                         str(tiny_mixtral), "Tell me a story.", reply=STORY)  # fmt: skip
    assert loaded == ["GUARD"] and wrapped.roles[0] == "user"  # the prompt was checked
    assert code == 3 and err.count("\n") == 1 and "stopped" in err and "by llama-guard" in err
    assert out.startswith("Here is a story about a cook.") and "More words" not in out
    assert Loaded.last._cancelled.is_set()
    # the agent turn after the user's message, as Llama Guard's reference builds it
    assert wrapped.contexts[0] == [{"role": "user", "content": "Tell me a story."}]


def test_ask_safe_guard_model_passes_a_reply_the_safe_guard_passes(
    capsys, monkeypatch, tiny_mixtral, guards  # noqa: F811
):  # fmt: skip
    wrapped = RepliesOnly(guards["safe"])
    monkeypatch.setattr("app.moderation.llama_guard.LlamaGuard.load",
                        classmethod(lambda cls, model, options=None: wrapped))  # fmt: skip
    code, out, err = ask(capsys, monkeypatch, "--safe", "--guard-model", "GUARD", "-m",
                         str(tiny_mixtral), "Tell me a story.", reply=STORY)  # fmt: skip
    assert code == 0 and "More words follow here." in out and err == ""
    assert wrapped.roles.count("assistant") == 2  # after four windows, and at the end


def test_serve_with_a_guard_model_ends_the_completion_with_content_filter(
    tiny_mixtral, guards  # noqa: F811
):  # fmt: skip
    wrapped = RepliesOnly(guards["unsafe"])
    hello = [{"role": "user", "content": "Hello"}]
    with start(tiny_mixtral, safe=True, policy=Policy([LexicalGuard(), wrapped])) as server:
        api = client(server)
        reply = api.chat.completions.create(model=MODEL, messages=hello, max_tokens=8, temperature=0)
        assert reply.choices[0].finish_reason == "content_filter"
        assert reply.to_dict().get("moderation", {}).get("guard") == "llama-guard", reply.to_dict()
        chunks = list(api.chat.completions.create(model=MODEL, messages=hello, max_tokens=8,
                                                  temperature=0, stream=True))  # fmt: skip
        assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert wrapped.contexts[0] == hello  # the reply judged after the request's user message


@pytest.mark.parametrize("command", ["ask", "serve"])
def test_a_guard_model_that_is_not_a_guard_is_one_line(capsys, tiny_mixtral, command):
    argv = {"ask": ["ask", "--local", "--safe", "-q", "-m", str(tiny_mixtral),
                    "--guard-model", str(tiny_mixtral), "Hello"],
            "serve": ["serve", "--port", "0", "-m", str(tiny_mixtral),
                      "--guard-model", str(tiny_mixtral)]}[command]  # fmt: skip
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "is not a Llama Guard model" in err


def test_the_guard_models_weights_are_counted_in_a_memory_budget(guards):  # noqa: F811
    from app.moderation.policy import chat_load_options
    from model.errors import MixchatError
    from model.load_options import LoadOptions

    policy = Policy([LexicalGuard(), guards["safe"]])
    from mlx.utils import tree_flatten

    weights = sum(v.nbytes for _, v in tree_flatten(guards["safe"].engine.model.parameters()))
    options, line = chat_load_options(LoadOptions(memory_budget=10**9), policy)
    assert options.memory_budget == 10**9 - weights and weights > 0
    assert line.startswith("the guard model takes") and "the chat model gets" in line
    assert chat_load_options(LoadOptions(), policy) == (LoadOptions(), "")  # measured at load
    assert chat_load_options(LoadOptions(memory_budget=10**9), Policy()) == (
        LoadOptions(memory_budget=10**9), "")  # fmt: skip
    with pytest.raises(MixchatError, match="nothing is left for the chat model"):
        chat_load_options(LoadOptions(memory_budget=1000), policy)


def test_the_servers_moderations_endpoint_uses_its_guard_model(tiny_mixtral):
    recorder = Recorder(flag_on="cook")
    with start(tiny_mixtral, policy=Policy([LexicalGuard(), recorder])) as server:
        result = client(server).moderations.create(input=["A story about a cook.", "The sea."])
    assert [r.flagged for r in result.results] == [True, False]
    assert [text for text, _, _ in recorder.calls] == ["A story about a cook.", "The sea."]


def test_the_chat_apps_reply_guard_asks_the_guard_model_after_the_users_message():
    from app.tui.moderation import ChatModeration

    recorder = Recorder(flag_on="fish")
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Tell me a story."}]  # fmt: skip
    guard = ChatModeration(Policy([LexicalGuard(), recorder])).reply_guard(messages)
    result = feed_all(guard, [s + " " for s in STORY.split(". ")])
    assert result is not None and result.guard == "llama-guard"
    assert recorder.calls and all(ctx == messages[1:] for _, _, ctx in recorder.calls)
    assert ChatModeration().reply_guard(messages).slow is None  # no guard model: lexical only


class Blocking(Recorder):
    """A guard model that takes as long as the test wants on a reply."""

    def __init__(self):
        super().__init__()
        self.checking = threading.Event()
        self.release = threading.Event()

    def check(self, text, role="user", context=None):
        if role == "assistant":
            self.checking.set()
            self.release.wait(30)
        return super().check(text, role, context)


def test_a_slow_guard_model_on_a_reply_does_not_hold_up_the_server(tiny_mixtral):
    """The reply guard's checks run off the event loop: while the guard model judges one
    reply (seconds, on a CPU), the server still answers others."""
    slow, replies = Blocking(), []
    hello = [{"role": "user", "content": "Hello"}]
    with start(tiny_mixtral, safe=True, policy=Policy([LexicalGuard(), slow])) as server:
        api = client(server)
        asking = threading.Thread(target=lambda: replies.append(api.chat.completions.create(
            model=MODEL, messages=hello, max_tokens=8, temperature=0)))  # fmt: skip
        asking.start()
        try:
            assert slow.checking.wait(30)  # the guard model is judging the reply now
            assert health(server)["status"] == "ok"
        finally:
            slow.release.set()
            asking.join(30)
    assert replies and replies[0].choices[0].finish_reason in ("stop", "length")
