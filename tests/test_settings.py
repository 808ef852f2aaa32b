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
    import app.settings
    import app.store

    assert app.store.data_dir is app.settings.data_dir
    assert app.settings.data_dir({"MIXCHAT_HOME": str(tmp_path)}) == tmp_path
    assert app.settings.data_dir({}).name == "mixchat"  # the platform's user data directory


def test_load_options_offload_and_ranks_come_from_the_settings(tmp_path):
    from model.load_options import LoadOptions

    environ = {"MIXCHAT_HOME": str(tmp_path), "MIXCHAT_DTYPE": "float16", "MIXCHAT_STREAMS": "3",
               "MIXCHAT_PARALLEL": " Pipeline ", "HF_HUB_OFFLINE": "1", "OTHER": "x"}  # fmt: skip
    args = Namespace(memory_budget="auto", max_context=4096, kv_bits=8)
    settings = read_settings(args, environ)
    assert settings.load_options == LoadOptions(dtype="float16", memory_budget="auto",
                                                max_context=4096, kv_bits=8, streams=3)  # fmt: skip
    assert (settings.parallel, settings.hf_offline, settings.offload) == ("pipeline", True, None)
    assert settings.rank_variables == {k: v for k, v in environ.items() if k.startswith("MIXCHAT_")}
    plain = read_settings(Namespace(), {"MIXCHAT_HOME": str(tmp_path)})
    assert plain.load_options == LoadOptions() and plain.parallel == "expert"
    assert not plain.hf_offline
    assert LoadOptions().but(kv_bits=4) == LoadOptions(kv_bits=4)
    with pytest.raises(TypeError):
        LoadOptions().but(bits=4)  # only LoadOptions' fields


def test_offload_options_from_the_environment(tmp_path):
    environ = {"MIXCHAT_HOME": str(tmp_path), "MIXCHAT_OFFLOAD_POLICY": " LRU ",
               "MIXCHAT_OFFLOAD_PREFETCH": "1", "MIXCHAT_OFFLOAD_PAGE_CACHE": "1"}  # fmt: skip
    offload = read_settings(None, environ).offload
    assert (offload.policy, offload.prefetch, offload.bypass_page_cache) == ("lru", True, False)
    off = read_settings(None, environ | {"MIXCHAT_OFFLOAD_PREFETCH": "off",
                                         "MIXCHAT_OFFLOAD_PAGE_CACHE": "0"}).offload  # fmt: skip
    assert (off.prefetch, off.bypass_page_cache) == (False, True)
    assert read_settings(None, environ).load_options.offload == offload


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
    from model.load_options import LoadOptions

    assert received == {
        "model": "some/model", "lang": "fr", "data_dir": tmp_path,
        "load_options": LoadOptions(dtype="float16", streams=2),
        "server": "http://127.0.0.1:8741", "api_key": "k", "moderation": None,
    }  # fmt: skip
    assert dict(os.environ) == before
    assert main(["chat", "--local"]) == 0 and received["server"] is None  # in-process


def test_the_environment_is_read_in_one_place():
    """os.environ, getenv and MIXCHAT_* names appear in app/, model/ and quantize/ only in
    app/settings.py; model/ranks.py reads MLX's own launch variables (MLX_RANK, MLX_HOSTFILE...)
    and no MIXCHAT_* one. Everything else is given its settings."""
    readers = set()
    for path in [*ROOT.glob("app/**/*.py"), *ROOT.glob("model/**/*.py"),
                 *ROOT.glob("quantize/**/*.py")]:  # fmt: skip
        name = path.relative_to(ROOT).as_posix()
        text = path.read_text(encoding="utf-8")
        if name == "app/settings.py":
            continue
        if name == "model/ranks.py":
            named = set(re.findall(r"[\"']([A-Z][A-Z0-9]*_[A-Z0-9_]+)[\"']", text))  # variables
            if re.search(r"getenv\(|environ\.(items|keys|values)|MIXCHAT_", text) or any(
                not v.startswith(("MLX_", "OMPI_")) for v in named  # OMPI_: MPI's, MLX reads it
            ):
                readers.add(name)
            continue
        variable = r"[\"'](MIXCHAT|HF_HUB)_[A-Z_]+[\"']"
        if re.search(r"os\.environ\b|getenv\(|" + variable, text):
            readers.add(name)
    assert not readers, f"these read the environment (app/settings.py should): {sorted(readers)}"
