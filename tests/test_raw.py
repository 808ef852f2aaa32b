"""Raw completion (`Engine.stream_text`, `mixchat ask --raw`) and template-less models, against
mlx-lm's own generation on the same directory."""

from __future__ import annotations

import json

import pytest

from model import Engine, GenerationSettings
from tests.checkpoints import build_hf_checkpoint

PROMPT = "Once upon a time, in a land far away,"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny dense Mistral whose tokenizer is a tokenizer.json with no chat template (as a
    base model or an `mlx_lm.convert` of one has)."""
    import transformers

    path = build_hf_checkpoint(tmp_path_factory.mktemp("base") / "m", arch="mistral", seed=3,
                                rope_theta=10000.0)  # mlx-lm reads no rope_parameters
    tok = transformers.LlamaTokenizer.from_pretrained(str(path), add_bos_token=True)
    (path / "tokenizer.model").unlink()
    tok.save_pretrained(path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    assert "chat_template" not in config and not (path / "chat_template.jinja").exists()
    return path


def _mlx_lm_tokens(path, prompt: str, n: int) -> list[int]:
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = mlx_lm.load(str(path))
    out = []
    for response in mlx_lm.stream_generate(
        model, tokenizer, prompt, max_tokens=n, sampler=make_sampler(0.0)
    ):
        out.append(response.token)
    return out


def test_raw_completion_is_mlx_lm_s(base_dir):
    engine = Engine.load(str(base_dir))
    assert not engine.has_chat_template
    settings = GenerationSettings(max_tokens=12, temperature=0.0)
    ids = engine._raw_ids(PROMPT)
    assert ids[0] == 1  # BOS, as the tokenizer adds it
    text = "".join(c.text for c in engine.stream_text(PROMPT, settings))
    tokens = engine._cache_tokens[len(ids) :]
    expected = _mlx_lm_tokens(base_dir, PROMPT, 12)
    assert tokens == expected[: len(tokens)] and len(tokens) >= 11
    assert text == engine.tokenizer.decode(expected[: len(tokens) + 1])
    # Without a template, a chat is the raw completion of its text.
    chat = "".join(c.text for c in engine.stream([{"role": "user", "content": PROMPT}], settings))
    assert chat == text


def test_ask_without_template_says_so_once_and_completes(base_dir, cli):
    result = cli("ask", "--model", str(base_dir), "--temp", "0", "--max-tokens", "8",
                 "--json", PROMPT)  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    notices = [line for line in result.stderr.decode().splitlines() if "no chat template" in line]
    assert len(notices) == 1 and "plain text" in notices[0]
    reply = json.loads(result.stdout)
    engine = Engine.load(str(base_dir))
    settings = GenerationSettings(max_tokens=8, temperature=0.0)
    assert reply["text"] == "".join(c.text for c in engine.stream_text(PROMPT, settings))


def test_ask_raw_on_a_chat_model_skips_the_template(tiny_mixtral, cli):
    settings = GenerationSettings(max_tokens=6, temperature=0.0)
    engine = Engine.load(str(tiny_mixtral))
    expected = "".join(c.text for c in engine.stream_text(PROMPT, settings))
    chat = "".join(c.text for c in engine.stream([{"role": "user", "content": PROMPT}], settings))
    assert engine.has_chat_template and expected != chat
    result = cli("ask", "--raw", "--model", str(tiny_mixtral), "--temp", "0",
                 "--max-tokens", "6", "--json", PROMPT)  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    assert json.loads(result.stdout)["text"] == expected
    assert "no chat template" not in result.stderr.decode()


def test_raw_with_system_is_a_usage_error(tiny_mixtral, cli):
    result = cli("ask", "--raw", "--system", "be nice", "--model", str(tiny_mixtral), "hi")
    assert result.returncode == 2 and "--system and --safe need a chat template" in result.stderr.decode()
    assert len(result.stderr.decode().strip().splitlines()) == 1



@pytest.mark.anyio
async def test_chat_app_says_the_model_has_no_template(base_dir, tmp_path):
    from app.store import ChatSettings, ConversationStore
    from app.tui.app import MixchatApp
    from tests.test_tui_helpers import TERMINAL_SIZE, screen_text, send, wait_for, wait_until_idle

    app = MixchatApp(
        store=ConversationStore(tmp_path / "m.db"),
        engine_loader=lambda: Engine.load(str(base_dir)),
        lang="en",
    )
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        screen = app.chat_screen
        await wait_for(pilot, lambda: screen.engine is not None, timeout=60, what="the model")
        await pilot.pause()
        assert "no chat template: replies continue the text" in screen_text(app)
        screen.draft_settings = ChatSettings(temperature=0.0, max_tokens=4)
        await send(pilot, app, PROMPT, wait=False)
        await wait_until_idle(pilot, app, timeout=60)
        [user, reply] = app.store.messages(screen.conversation.id)
        engine = Engine.load(str(base_dir))
        settings = GenerationSettings(max_tokens=4, temperature=0.0)
        assert reply.content == "".join(c.text for c in engine.stream_text(PROMPT, settings))
