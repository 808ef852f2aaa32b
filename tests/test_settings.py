"""Settings read once (app/settings.py) and passed down: precedence, bad values, one data dir."""

from __future__ import annotations

import re
from argparse import Namespace
from pathlib import Path

import pytest

from app.settings import Settings, SettingsError, read_settings

ROOT = Path(__file__).resolve().parent.parent


def test_environment_and_command_line(tmp_path):
    environ = {
        "MIXCHAT_HOME": str(tmp_path / "home"),
        "MIXCHAT_DTYPE": "float16",
        "MIXCHAT_MEMORY_BUDGET": "12GB",
        "MIXCHAT_STREAMS": "3",
        "MIXCHAT_DEBUG": "1",
        "LANG": "fr_FR.UTF-8",
    }
    assert read_settings(None, environ) == Settings(
        model=None, dtype="float16", memory_budget=12 * 10**9, lang="fr",
        data_dir=tmp_path / "home", streams=3, debug=True,
    )  # fmt: skip
    args = Namespace(model="acme/m", dtype="bfloat16", memory_budget="auto", lang="en")
    given = read_settings(args, environ)  # the command line wins
    assert (given.model, given.dtype, given.memory_budget, given.lang) == (
        "acme/m", "bfloat16", "auto", "en",
    )  # fmt: skip
    plain = read_settings(Namespace(), {"MIXCHAT_HOME": str(tmp_path)})
    assert (plain.dtype, plain.memory_budget, plain.lang, plain.streams, plain.debug) == (
        None, None, "en", None, False,
    )  # fmt: skip


def test_language_from_the_locale_in_posix_order(tmp_path):
    home = {"MIXCHAT_HOME": str(tmp_path)}
    assert read_settings(None, home | {"LC_ALL": "fr_CA.UTF-8", "LANG": "en_US"}).lang == "fr"
    assert read_settings(None, home | {"LC_ALL": "C", "LANG": "fr_FR.UTF-8"}).lang == "en"
    assert read_settings(None, home | {"LC_MESSAGES": "fr_FR", "LANG": "en_GB"}).lang == "fr"
    assert read_settings(Namespace(lang="fr_FR"), home).lang == "fr"


@pytest.mark.parametrize(
    ("environ", "args", "message"),
    [
        ({"MIXCHAT_DTYPE": "half"}, None, "MIXCHAT_DTYPE must be one of float32"),
        ({"MIXCHAT_MEMORY_BUDGET": "lots"}, None, "MIXCHAT_MEMORY_BUDGET: not a memory size"),
        ({"MIXCHAT_STREAMS": "two"}, None, "MIXCHAT_STREAMS must be a whole number"),
        ({"MIXCHAT_STREAMS": "0"}, None, "MIXCHAT_STREAMS must be a whole number"),
        ({}, Namespace(lang="de"), "no interface in 'de': choose one of en, fr"),
    ],
)
def test_unusable_values_are_one_line_errors(tmp_path, environ, args, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        read_settings(args, {"MIXCHAT_HOME": str(tmp_path), **environ})


def test_one_data_dir(tmp_path):
    import app.store
    import model.registry

    assert app.store.data_dir is model.registry.data_dir
    assert model.registry.data_dir({"MIXCHAT_HOME": str(tmp_path)}) == tmp_path
    assert model.registry.data_dir({}).name == "mixchat"  # the platform's user data directory


def test_chat_gets_its_settings_as_arguments(monkeypatch, tmp_path):
    """`mixchat chat` hands run_chat the settings; it no longer passes them through os.environ."""
    import os

    import app.tui.run
    from app.cli import main

    received = {}
    monkeypatch.setattr(app.tui.run, "run_chat", lambda **kw: received.update(kw) or 0)
    monkeypatch.setenv("MIXCHAT_HOME", str(tmp_path))
    monkeypatch.setenv("MIXCHAT_STREAMS", "2")
    monkeypatch.delenv("MIXCHAT_DTYPE", raising=False)
    monkeypatch.delenv("MIXCHAT_SERVER", raising=False)
    monkeypatch.setenv("MIXCHAT_API_KEY", "k")
    before = dict(os.environ)
    assert main(["chat", "--model", "some/model", "--lang", "fr", "--dtype", "float16"]) == 0
    assert received == {
        "model": "some/model", "lang": "fr", "dtype": "float16", "memory_budget": None,
        "max_context": None, "kv_bits": None, "data_dir": tmp_path, "streams": 2,
        "server": "http://127.0.0.1:8741", "api_key": "k",
    }  # fmt: skip
    assert dict(os.environ) == before
    assert main(["chat", "--local"]) == 0 and received["server"] is None  # in-process


def test_the_environment_is_read_in_one_place():
    """MIXCHAT_* variables and os.environ appear only in app/settings.py, in the default of
    model/registry.py's data_dir (given the environment by app/settings.py; app/i18n is given
    it too, and has no default), in model/offload.py (its tuning knobs, the memory-budget
    work's) and in model/ranks.py (MLX's launch variables, MLX_RANK/MLX_HOSTFILE...)."""
    allowed = {"app/settings.py", "model/registry.py", "model/offload.py", "model/ranks.py"}
    readers = set()
    for path in [*ROOT.glob("app/**/*.py"), *ROOT.glob("model/**/*.py")]:
        text = path.read_text(encoding="utf-8")
        if re.search(r"os\.environ\b|getenv\(|[\"']MIXCHAT_[A-Z_]+[\"']", text):
            readers.add(path.relative_to(ROOT).as_posix())
    assert readers <= allowed, readers - allowed
