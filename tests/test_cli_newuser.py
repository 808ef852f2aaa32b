"""What a new user trips on at the command line (issue 18's CLI items), as the user meets it:
`main([...])` in-process with the output captured, a subprocess only for the real entry point."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from app.cli import main
from tests.test_cli import assert_one_line_error, mixchat


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


# --- item 2: info --memory-budget none ---------------------------------------------------------


def test_info_memory_budget_none_says_what_it_means(capsys, monkeypatch):
    code, out, err = run(capsys, "info", "--memory-budget", "none")
    assert code == 0, err
    assert "memory budget  none (everything in memory" in out
    assert "fits           yes:" in out
    code, out, _ = run(capsys, "info", "--json", "--memory-budget", "none")
    memory = json.loads(out)["memory"]
    assert code == 0 and memory["budget"] is None and memory["fits"] and memory["warning"] is None
    monkeypatch.setenv("MIXCHAT_MEMORY_BUDGET", "none")  # the same from the environment
    # ... on a machine too small for the model: the warning `ask --memory-budget none` gives
    import model.memory_plan as plan

    monkeypatch.setattr(plan, "physical_memory", lambda: 200 * 10**6)
    monkeypatch.setattr(plan, "available_memory", lambda: 100 * 10**6)
    code, out, err = run(capsys, "info")
    assert code == 0, err
    fits = next(line for line in out.splitlines() if line.startswith("fits"))
    assert "no: " in fits and "expect swapping (drop --memory-budget none" in fits


# --- item 8: the names `mixchat models` lists work as --model ----------------------------------


def test_every_listed_name_works_as_model(capsys, monkeypatch, tmp_path, tiny_mixtral):
    from model.registry import remember

    home = tmp_path / "home"
    monkeypatch.setenv("MIXCHAT_HOME", str(home))
    quantized = tmp_path / "nc-q"
    shutil.copytree(tiny_mixtral, quantized)
    remember(quantized, home)
    code, out, _ = run(capsys, "models", "--json")
    listed = {entry["name"]: entry["path"] for entry in json.loads(out)}
    assert code == 0 and "nc-q" in listed
    for name, path in listed.items():
        code, out, err = run(capsys, "info", "-m", name, "--json")
        assert code == 0, (name, err)
        assert json.loads(out)["path"] == path
    # two quantized directories of one name: which one is meant is asked, in one line
    other = tmp_path / "elsewhere" / "nc-q"
    shutil.copytree(tiny_mixtral, other)
    remember(other, home)
    code, _, err = run(capsys, "info", "-m", "nc-q")
    assert code == 1 and "names 2 quantized models" in one_line(err)


# --- item 9: the same options everywhere, errors that point the way ----------------------------


def test_info_takes_model_like_every_command(capsys, default_model_path):
    def described(*args: str) -> tuple[int, dict]:
        code, out, _ = run(capsys, "info", *args, "--json", "--memory-budget", "1GB")
        return code, json.loads(out)  # a fixed budget: the auto one follows free memory

    positional = described(str(default_model_path))
    assert positional[0] == 0
    for flag in ("--model", "-m"):
        assert described(flag, str(default_model_path)) == positional
    code, _, err = run(capsys, "info", "a", "--model", "b")
    assert code == 2 and "give the model once" in one_line(err)


def test_a_mistyped_command_names_the_commands(capsys):
    code, out, err = run(capsys, "aks", "hi")
    assert code == 2 and out == ""
    assert "unknown command 'aks'" in one_line(err) and "did you mean `mixchat ask`" in err
    assert "chat, ask, models, info, download, quantize, compare, serve" in err
    code, _, err = run(capsys, "frobnicate")
    assert code == 2 and "did you mean" not in one_line(err) and "the commands are" in err


def test_an_unknown_option_points_to_its_commands_help(capsys):
    for command in ("ask", "info", "models", "quantize"):
        code, _, err = run(capsys, command, "--bogus")
        assert code == 2 and f"see `mixchat {command} --help`" in one_line(err), err
    code, _, err = run(capsys, "--model", "x", "--bogus")  # `mixchat` alone is the chat app
    assert code == 2 and "see `mixchat chat --help`" in one_line(err)


def test_seed_without_temp_is_said_and_json_reports_the_seed(capsys):
    base = ("ask", "--local", "-q", "--json", "--max-tokens", "4")
    code, out, err = run(capsys, *base, "--seed", "7", "Bonjour")
    assert code == 0 and "--seed 7 is ignored" in one_line(err) and "greedy" in err
    assert json.loads(out)["seed"] is None
    code, out, err = run(capsys, *base, "--temp", "0.9", "Bonjour")  # no seed given: one chosen
    sampled = json.loads(out)
    assert code == 0 and err == "" and isinstance(sampled["seed"], int)
    code, out, _ = run(capsys, *base, "--temp", "0.9", "--seed", str(sampled["seed"]), "Bonjour")
    again = json.loads(out)
    assert code == 0 and (again["text"], again["seed"]) == (sampled["text"], sampled["seed"])


# --- item 10: a reply cut mid-character, end to end ---------------------------------------------


def test_a_reply_cut_mid_emoji_has_no_replacement_character():
    result = mixchat("ask", "-q", "--json", "--max-tokens", "14", "emoji 👋🏽 مرحبا 你好 é")
    assert result.returncode == 0, result.stderr.decode()
    answer = json.loads(result.stdout)
    assert answer["generation_tokens"] == 14 and answer["finish_reason"] == "length"
    assert answer["text"] and "\ufffd" not in answer["text"]


# --- item 12: numbers written one way; the user's own cap named as theirs ----------------------


def test_info_writes_the_context_as_every_other_count(capsys):
    code, out, _ = run(capsys, "info")
    context = next(line for line in out.splitlines() if line.startswith("context "))
    assert code == 0 and "8,192 tokens" in context and "8192" not in out


def test_max_context_over_the_prompt_is_named_as_the_users_cap(capsys):
    code, _, err = run(capsys, "ask", "--local", "--max-context", "16", "hello there, how are you?")
    assert code == 1 and "16-token context of this run" in one_line(err)
    assert "--max-context" in err and "the model's is 8,192" in err


# --- item 14: help that describes every option ------------------------------------------------


@pytest.mark.parametrize("command", ["chat", "ask", "info", "models", "download", "quantize"])
def test_help_describes_the_command_and_its_options(capsys, command):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    text = capsys.readouterr().out
    assert done.value.code == 0
    body = text.split("options:")[0]
    if command in ("chat", "ask", "info"):  # a description paragraph after the usage
        assert len(body.split("\n\n")) >= 3, body
    if command in ("info", "models", "ask"):  # --json says what it prints
        assert "--json" in text and "print one JSON" in text, text
    assert "MAX_SHARD_SIZE" not in text
    if command == "download":
        assert "-q, --quiet" in text or "--quiet, -q" in text


def test_readme_usage_lines_are_whole():
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    usage = [line for line in readme.splitlines() if line.startswith("`mixchat ask [")]
    assert len(usage) == 1
    prose = re.sub(r"^```.*?^```", "", readme, flags=re.S | re.M)  # without code blocks
    for paragraph in prose.split("\n\n"):  # inline code closes within its paragraph
        assert paragraph.count("`") % 2 == 0, paragraph


# --- item 5: the advice for a GGUF is a command that works -------------------------------------


def test_quantize_converts_a_gguf_into_a_directory_that_answers_the_same(capsys, tmp_path):
    """`mixchat quantize x.gguf DIR` (the advice --hosts and streaming give for a GGUF): DIR
    loads in mixchat as a safetensors checkpoint, with the GGUF's tokenizer, experts stacked so
    they stream, and the same greedy reply."""
    from model import Engine, GenerationSettings
    from model.memory_plan import memory_plan
    from model.weights import locate
    from tests.gguf_files import tiny_mixtral_gguf
    from tests.test_gguf import PROMPT, Q4_K_M

    gguf_path, _ = tiny_mixtral_gguf(tmp_path / "x.gguf", Q4_K_M, stacked=False,
                                     with_values=False)  # fmt: skip
    assert not memory_plan(locate(gguf_path), 4, 256).offloadable  # experts one by one
    dst = tmp_path / "x-mlx"
    code, out, err = run(capsys, "quantize", str(gguf_path), str(dst), "-q")
    assert code == 0, err
    checkpoint = locate(dst)
    assert checkpoint.format == "hf" and memory_plan(checkpoint, 4, 256).offloadable
    settings = GenerationSettings(max_tokens=12, temperature=0.0)
    prompts, replies = [], []
    for model in (gguf_path, dst):
        engine = Engine.load(str(model), max_context=256)
        prompts.append(engine.tokenizer.encode_chat(PROMPT))
        replies.append("".join(c.text for c in engine.stream(PROMPT, settings)))
    assert prompts[0] == prompts[1]  # the GGUF's own tokenizer came along
    assert replies[0] and replies[0] == replies[1]
    code, _, err = run(capsys, "quantize", str(gguf_path), str(dst), "-q")  # exists: refused
    assert code == 1 and "already exists" in one_line(err)


def test_usage_errors_are_instant_through_the_real_command():
    assert_one_line_error(mixchat("aks", "hi"), 2, "did you mean `mixchat ask`")
