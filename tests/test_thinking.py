"""Qwen3's thinking switch as its chat template defines it (`enable_thinking`), in every place a
user sets it: `ask --think/--no-think`, the server's `chat_template_kwargs`, the chat's settings;
and a reply's <think>…</think> part folded in the chat.

tests/data/qwen3_chat_template.jinja is Qwen3's published chat template (the one in
Qwen/Qwen3-0.6B's and Qwen/Qwen3-30B-A3B's tokenizer_config.json), as llama.cpp keeps it in
models/templates/Qwen-Qwen3-0.6B.jinja (read from the public fork ye-NX/llama.cpp, commit
b354d7c9ecb76c97c07098617cdebbdfffa2583e)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from model.tokenizer.hf import HFTokenizer, current_template_options, template_options
from tests.fake_engine import FakeEngine
from tests.test_families import build_family
from tests.test_tui_helpers import make_app, screen_text, send, wait_for

QWEN3_TEMPLATE = (Path(__file__).parent / "data" / "qwen3_chat_template.jinja").read_text()
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "<think>\nEasy.\n</think>\n\nIt is 4."},
    {"role": "user", "content": "And 3 + 3?"},
]


@pytest.fixture(scope="module")
def qwen3_dirs(tmp_path_factory):
    """A tiny qwen3_moe checkpoint with Qwen3's real chat template, and a copy whose template
    (plain ChatML) has no thinking switch."""
    import transformers

    root = tmp_path_factory.mktemp("qwen3")
    plain = build_family(root / "chatml", "qwen3_moe")
    path = root / "qwen3"
    shutil.copytree(plain, path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    tok.chat_template = QWEN3_TEMPLATE
    tok.save_pretrained(path)
    return path, plain


def transformers_ids(path: Path, messages: list[dict], **kwargs) -> list[int]:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(path)
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                   return_dict=False, **kwargs)  # fmt: skip


@pytest.mark.parametrize("thinking", [None, True, False])
def test_prompt_tokens_equal_transformers_with_thinking_on_off_and_default(qwen3_dirs, thinking):
    path, _ = qwen3_dirs
    tokenizer = HFTokenizer.from_dir(path)
    assert tokenizer.thinking_default is True  # Qwen3 thinks unless told not to
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    with template_options(**kwargs):
        ids = tokenizer.encode_chat(CHAT)
    assert ids == transformers_ids(path, CHAT, **kwargs)
    text = tokenizer.decode(ids)
    assert text.endswith("<think>\n\n</think>\n\n") == (thinking is False)
    assert tokenizer.encode_chat(CHAT) == transformers_ids(path, CHAT)  # outside: the default


def test_a_template_without_the_switch_says_so(qwen3_dirs):
    _, plain = qwen3_dirs
    assert HFTokenizer.from_dir(plain).thinking_default is None


def test_ask_no_think_and_think(qwen3_dirs, cli):
    path, plain = qwen3_dirs
    args = ("ask", "--local", "--json", "--max-tokens", "2", "--temp", "0", "--model")
    question = [{"role": "user", "content": "Hi"}]
    for flag, kwargs in (("--no-think", {"enable_thinking": False}), ("--think", {}), (None, {})):
        result = cli(*args, str(path), *([flag] if flag else []), "Hi")
        assert result.returncode == 0, result.stderr.decode()
        answer = json.loads(result.stdout)
        assert answer["prompt_tokens"] == len(transformers_ids(path, question, **kwargs)), flag
    result = cli(*args, str(plain), "--no-think", "Hi")
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, lines
    assert lines[0].endswith("'s chat template has no thinking switch"), lines


def test_server_chat_template_kwargs(qwen3_dirs):
    from app.serve.requests import ApiError, parse_chat
    from app.serve.scheduler import Scheduler
    from model import Engine

    path, _ = qwen3_dirs
    engine = Engine.load(str(path))
    body = {"messages": CHAT, "chat_template_kwargs": {"enable_thinking": False}}
    request = parse_chat(body)
    assert request.template_kwargs == {"enable_thinking": False}
    # The scheduler encodes the request's prompt with them (Scheduler._prompt_ids uses no state)
    ids = Scheduler._prompt_ids(None, engine, request)
    assert ids == transformers_ids(path, CHAT, enable_thinking=False)
    assert Scheduler._prompt_ids(None, engine, parse_chat({"messages": CHAT})) == (
        transformers_ids(path, CHAT)
    )
    with pytest.raises(ApiError, match="chat_template_kwargs"):
        parse_chat({"messages": CHAT, "chat_template_kwargs": ["enable_thinking"]})


def test_a_chat_through_mixchat_serve_carries_the_thinking_setting(qwen3_dirs):
    """The chat app's engine over a server (app/remote_engine.py): the server says the
    template has the switch, and the chat's setting (template_options around stream and
    count_tokens, as the reply session sets it) reaches the server's prompt."""
    from app.remote_engine import connect
    from model import GenerationSettings
    from tests.test_serve import start

    path, plain = qwen3_dirs
    question = [{"role": "user", "content": "Hi"}]
    with start(path, batch=None) as running:
        engine = connect(running.url, str(path), None)
        assert engine is not None and engine.thinking_default is True
        for kwargs in ({"enable_thinking": False}, {}):
            expected = transformers_ids(path, question, **kwargs)
            with template_options(**kwargs):
                assert engine.count_tokens(question) == len(expected)
                chunks = list(engine.stream(question, GenerationSettings(max_tokens=1)))
            assert chunks[-1].stats is not None
            job = running.scheduler.history[-1]
            assert job.request.template_kwargs == kwargs
            assert job.done.prompt_tokens == len(expected), kwargs
    with start(plain, batch=None) as running:
        assert connect(running.url, str(plain), None).thinking_default is None


# --- the chat ---------------------------------------------------------------------------------


class ThinkingEngine(FakeEngine):
    """A fake engine whose model's template has Qwen3's switch; records the template
    variables each stream was started with."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.thinking_default = True
        self.options: list[dict] = []

    def stream(self, messages, settings=None):
        self.options.append(current_template_options())
        return super().stream(messages, settings)


REPLY = "<think>\nThe user adds two and two. That makes four.\n</think>\n\nThe answer is **4**."


@pytest.mark.anyio
async def test_thinking_part_is_folded_and_the_answer_shown_plainly(tmp_path):
    engine = ThinkingEngine(REPLY)
    app = make_app(tmp_path, engine)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, app, "What is 2 + 2?")
        view = app.chat_screen.chat_log.message_views[-1]
        words = len(REPLY.split("</think>")[0].split()) - 1  # less the <think> tag
        folded = f"Thought for {words} words (click to show)"  # one line, once it is mounted
        await wait_for(pilot, lambda: folded in screen_text(app), what="the folded thinking")
        text = screen_text(app)
        assert "The answer is 4." in text  # the answer, as Markdown
        assert "That makes four" not in text and "<think>" not in text
        assert view.content == REPLY  # nothing lost: copied, edited and stored as written
        stored = app.chat_screen.store.messages(app.chat_screen.conversation.id)
        assert stored[-1].content == REPLY
        await pilot.click(".message-thinking CollapsibleTitle")
        await wait_for(pilot, lambda: "That makes four" in screen_text(app), what="expanded")
        assert "The answer is 4." in screen_text(app)


@pytest.mark.anyio
async def test_thinking_setting_is_shown_only_for_a_switch_and_reaches_the_template(tmp_path):
    engine = ThinkingEngine("Fine.")
    app = make_app(tmp_path, engine)
    async with app.run_test(size=(100, 32)) as pilot:
        await send(pilot, app, "one")
        assert engine.options[-1] == {"enable_thinking": True}  # the setting's default
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: app.screen.query("#thinking"), what="the settings")
        switch = app.screen.query_one("#thinking")
        assert "Thinking" in screen_text(app) and switch.value is True
        switch.focus()
        await pilot.press("space")  # off
        await pilot.press("ctrl+s")  # save
        await wait_for(pilot, lambda: not app.screen.query("#thinking"), what="saved")
        assert app.chat_screen.settings.thinking is False
        await send(pilot, app, "two")
        assert engine.options[-1] == {"enable_thinking": False}

    plain = FakeEngine("Fine.")  # its model's template has no thinking switch
    app = make_app(tmp_path / "plain", plain)
    async with app.run_test(size=(100, 32)) as pilot:
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: app.screen.query("#safe-mode"), what="the settings")
        assert not app.screen.query("#thinking") and "Thinking" not in screen_text(app)


@pytest.mark.anyio
async def test_a_reply_cut_while_thinking_keeps_its_text(tmp_path):
    cut = "<think>\nStill thinking about"
    app = make_app(tmp_path, ThinkingEngine(cut))
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, app, "Hard question")
        view = app.chat_screen.chat_log.message_views[-1]
        assert view.content == cut
        assert "Thinking… (3 words)" in screen_text(app)

