"""The `mixchat` command end to end: streams, stdin, JSON, exit codes. Through the installed
command (a subprocess) where the process matters (the entry point, the environment read at
start-up, imports); otherwise through `main(argv)` in this process, with a real stdin pipe."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

MIXCHAT = str(Path(sys.executable).parent / "mixchat")


def mixchat(*args: str, stdin: bytes | None = None, env: dict | None = None, timeout=180):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [MIXCHAT, *args],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        env=environment,
        timeout=timeout,
    )


def assert_one_line_error(result, code: int, pattern: str):
    stderr = result.stderr.decode()
    assert result.returncode == code, stderr
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert pattern in stderr, stderr


def test_default_model_answers_paris(cli):
    result = cli("ask", "What is the capital of France? Answer in one word.")
    assert result.returncode == 0, result.stderr.decode()
    assert "Paris" in result.stdout.decode()
    assert "tok/s" in result.stderr.decode()  # stats go to stderr, not stdout
    assert "tok/s" not in result.stdout.decode()


def test_ask_json_from_stdin(tiny_mixtral, cli):
    prompt = "Bonjour, ça va ? 日本語もOK 👍🏽".encode()
    result = cli("ask", "--model", str(tiny_mixtral), "--json", "--max-tokens", "5", "-",
                 stdin=prompt)
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().strip().splitlines()
    assert len(lines) == 1
    data = json.loads(lines[0])
    assert set(data) >= {"text", "prompt_tokens", "generation_tokens", "prompt_tps",
                         "generation_tps", "peak_memory_gb", "model"}
    assert data["generation_tokens"] <= 5
    assert data["prompt_tokens"] > 10
    assert data["model"] == str(tiny_mixtral) or data["model"] == tiny_mixtral.name


def test_piped_stdin_without_prompt_and_system_prompt(tiny_mixtral, cli):
    args = ("ask", "--model", str(tiny_mixtral), "--json", "--max-tokens", "3", "--temp", "0")
    plain = json.loads(cli(*args, stdin=b"Hola").stdout)
    with_system = json.loads(cli(*args, "--system", "Sei un pirata.", stdin=b"Hola").stdout)
    assert with_system["prompt_tokens"] > plain["prompt_tokens"]


def test_streamed_stdout_equals_json_text(tiny_mixtral, cli):
    args = ("ask", "--model", str(tiny_mixtral), "--max-tokens", "8", "Grüß Gott")
    streamed = cli(*args)
    as_json = cli(*args, "--json")
    assert streamed.returncode == as_json.returncode == 0
    assert streamed.stdout.decode() == json.loads(as_json.stdout)["text"] + "\n"


def test_usage_errors_exit_2(cli):
    assert_one_line_error(cli("ask", "--max-tokens", "many", "hi"), 2, "usage error")
    assert_one_line_error(cli("ask", "--top-p", "0", "hi"), 2, "top-p")
    assert_one_line_error(cli("ask", stdin=b"   \n"), 2, "empty")
    assert_one_line_error(cli("frobnicate"), 2, "usage error")


def test_bad_models_exit_1(tmp_path, cli):
    assert_one_line_error(cli("ask", "--model", str(tmp_path / "nope"), "hi"), 1, "no model at")
    assert_one_line_error(cli("ask", "--model", "someone/not-cached", "hi"), 1, "mixchat download")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    assert_one_line_error(cli("ask", "--model", str(tmp_path), "hi"), 1, "never unpickles")
    assert_one_line_error(cli("info", str(tmp_path)), 1, "never unpickles")


def test_invalid_utf8_stdin_and_huge_prompt(tiny_mixtral, cli):
    bad = cli("ask", "--model", str(tiny_mixtral), stdin=b"caf\xe9 \xff")
    assert_one_line_error(bad, 1, "UTF-8")
    huge = ("token " * 6000).encode()
    assert_one_line_error(cli("ask", "--model", str(tiny_mixtral), stdin=huge), 1, "context")


def test_repo_id_from_local_hf_cache(tiny_mixtral, tmp_path):
    """A repo id resolves offline from a Hugging Face cache laid out as huggingface-hub does."""
    repo = tmp_path / "hub" / "models--acme--tiny-mixtral"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_mixtral, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path)}
    result = mixchat("ask", "--model", "acme/tiny-mixtral", "--json", "--max-tokens", "2", "hi",
                     env=env)
    assert result.returncode == 0, result.stderr.decode()
    assert json.loads(result.stdout)["model"] == "acme/tiny-mixtral"
    listed = json.loads(mixchat("models", "--json", env=env).stdout)
    assert {"name": "acme/tiny-mixtral", "source": "hf-cache", "path": str(snapshot)} in listed
    assert any(entry["source"] == "embedded" for entry in listed)


def test_info_counts_parameters_like_transformers(tiny_mixtral, cli):
    import torch
    import transformers

    result = cli("info", str(tiny_mixtral), "--json")
    assert result.returncode == 0, result.stderr.decode()
    info = json.loads(result.stdout)
    reference = transformers.MixtralForCausalLM.from_pretrained(tiny_mixtral, dtype=torch.float32)
    assert info["total_params"] == reference.num_parameters()
    experts = sum(p.numel() for n, p in reference.named_parameters() if ".experts." in n)
    assert info["active_params"] == info["total_params"] - experts // 2  # top-2 of 4 experts
    assert info["num_experts"] == 4 and info["experts_per_token"] == 2
    assert info["architecture"] == "mixtral"
    assert info["size_bytes"] == (tiny_mixtral / "model.safetensors").stat().st_size
    text = cli("info").stdout.decode()  # the default model, human-readable
    assert "GGUF Q4_1" in text and "dense" in text


def test_quantized_model_is_listed_and_runs(tiny_mixtral, tmp_path, cli):
    dst = tmp_path / "tiny-q4"
    result = cli("quantize", str(tiny_mixtral), str(dst), "--group-size", "32", "--no-eval",
                 "--quiet")
    assert result.returncode == 0, result.stderr.decode()
    listed = json.loads(cli("models", "--json").stdout)
    assert {"name": "tiny-q4", "source": "quantized", "path": str(dst.resolve())} in listed
    answer = cli("ask", "--model", str(dst), "--json", "--max-tokens", "3", "Ciao")
    assert answer.returncode == 0, answer.stderr.decode()
    assert "4-bit" in cli("info", str(dst)).stdout.decode()


# --- the shell idioms: a prompt and piped stdin -----------------------------------------------


class Terminal:
    """A stdin that is a terminal (nothing piped)."""

    def isatty(self) -> bool:
        return True


def piped(data: bytes):
    """A real pipe holding `data`, opened as sys.stdin would be."""
    read_end, write_end = os.pipe()
    os.write(write_end, data)
    os.close(write_end)
    return open(read_end, encoding="utf-8")  # noqa: SIM115 (closed by the caller's with)


def test_read_prompt_joins_instruction_and_piped_text():
    from app.cli.ask import read_prompt
    from app.cli.common import UsageError

    with piped(b"Le chat dort.\n") as stdin:
        assert read_prompt("Résume ce texte.", stdin) == "Résume ce texte.\n\nLe chat dort.\n"
    with piped(b"Le chat dort.") as stdin:
        assert read_prompt("-", stdin) == "Le chat dort."  # '-': stdin alone
    with piped(b"Le chat dort.") as stdin:
        assert read_prompt(None, stdin) == "Le chat dort."  # no argument: stdin alone
    with piped(b" \n") as stdin:
        assert read_prompt("Bonjour", stdin) == "Bonjour"  # an empty pipe adds nothing
    assert read_prompt("Bonjour", Terminal()) == "Bonjour"  # a terminal is never read
    with pytest.raises(UsageError, match="no prompt"):
        read_prompt(None, Terminal())


def test_prompt_and_piped_stdin_are_joined_end_to_end(tiny_mixtral, cli):
    args = ("ask", "--model", str(tiny_mixtral), "--json", "--max-tokens", "4")
    joined = json.loads(cli(*args, "Résume ce texte.", stdin=b"Le chat dort.\n").stdout)
    spelled = json.loads(cli(*args, "Résume ce texte.\n\nLe chat dort.\n").stdout)
    alone = json.loads(cli(*args, "Résume ce texte.").stdout)
    assert joined["prompt_tokens"] == spelled["prompt_tokens"] > alone["prompt_tokens"]
    assert joined["text"] == spelled["text"]  # greedy: the same prompt gives the same reply


# --- usage errors: one line, exit 2, before MLX -----------------------------------------------

BAD_VALUES = [
    (["--seed", "-1"], "seed"),
    (["--seed", str(2**64)], "seed"),
    (["--max-tokens", "-5"], "max tokens"),
    (["--max-tokens", "0"], "max tokens"),
    (["--temp", "-1"], "temperature"),
    (["--temp", "nan"], "temperature"),
    (["--top-p", "2"], "top-p"),
    (["--top-p", "0"], "top-p"),
    (["--min-p", "1"], "min-p"),
    (["--seed", "x"], "invalid int"),
]

IMPORTS_AFTER = """
import contextlib, io, json, sys
from app.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # --help
            code = e.code
    heavy = sorted({m.split(".")[0] for m in sys.modules} & {"mlx", "mlx_lm", "transformers",
                   "torch", "textual", "rich", "numpy"})
    results.append([code, err.getvalue(), heavy])
print(json.dumps(results))
"""


def run_in_process(*argvs: list[str], stdin: bytes = b"") -> list:
    """Run `main(argv)` for each argv in one fresh interpreter: [exit code, stderr, heavy
    packages imported so far] each."""
    result = subprocess.run(
        [sys.executable, "-c", IMPORTS_AFTER, json.dumps(argvs)],
        input=stdin, capture_output=True, timeout=180,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout.decode().strip().splitlines()[-1])


def test_bad_values_exit_2_with_one_line_before_mlx_is_imported():
    argvs = [["ask", *values, "hi"] for values, _ in BAD_VALUES]
    argvs += [["ask", "--model", "/nowhere", "hi"], ["chat", "--lang", "de"], ["--help"]]
    results = run_in_process(*argvs)
    for (values, pattern), (code, err, _) in zip(BAD_VALUES, results):
        assert code == 2, (values, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (values, err)
        assert err.startswith("mixchat: usage error: ") and pattern in err, (values, err)
    assert results[-3][:2] == [1, "mixchat: error: no model at '/nowhere'\n"]
    assert results[-2][0] == 2 and "no interface in 'de'" in results[-2][1]
    assert results[-1][0] == 0
    assert all(heavy == [] for _, _, heavy in results), results  # no MLX, no UI library


def test_bad_seed_and_bad_environment_through_the_command():
    assert_one_line_error(mixchat("ask", "--seed", "-1", "hi"), 2, "seed must be")
    assert_one_line_error(mixchat("ask", "hi", env={"MIXCHAT_DTYPE": "half"}), 2, "MIXCHAT_DTYPE")


def test_ask_imports_neither_transformers_nor_the_ui(tiny_mixtral):
    [(code, err, heavy)] = run_in_process(
        ["ask", "--model", str(tiny_mixtral), "--quiet", "--max-tokens", "2", "Bonjour"]
    )
    assert code == 0, err
    assert "mlx" in heavy and "mlx_lm" in heavy  # the model ran, with mlx-lm's samplers
    assert not {"transformers", "torch", "textual", "rich"} & set(heavy), heavy


def test_help_shows_defaults(cli):
    text = cli("ask", "--help").stdout.decode()
    squashed = " ".join(text.split())
    assert "most tokens in the reply (default 512" in squashed
    assert "random seed, 0 to 2**64-1" in squashed and "--safe" in squashed


# --- ask --safe and the interface language ----------------------------------------------------


def test_ask_messages_put_the_safe_mode_guardrail_first():
    from app.cli.ask import ask_messages
    from app.prompts import SAFE_MODE_PROMPT

    assert ask_messages("hi", "Sei un pirata.", safe=True) == [
        {"role": "system", "content": f"{SAFE_MODE_PROMPT}\n\nSei un pirata."},
        {"role": "user", "content": "hi"},
    ]
    assert ask_messages("hi", None, safe=True)[0] == {"role": "system", "content": SAFE_MODE_PROMPT}
    assert ask_messages("hi", None, safe=False) == [{"role": "user", "content": "hi"}]


def test_ask_safe_sends_the_guardrail(tiny_mixtral, cli):
    from app.prompts import SAFE_MODE_PROMPT

    args = ("ask", "--model", str(tiny_mixtral), "--json", "--max-tokens", "3")
    safe = json.loads(cli(*args, "--safe", "Hola").stdout)
    spelled = json.loads(cli(*args, "--system", SAFE_MODE_PROMPT, "Hola").stdout)
    assert safe["prompt_tokens"] == spelled["prompt_tokens"] > 40
    assert safe["text"] == spelled["text"]


def test_stats_lines_in_english_and_french():
    from types import SimpleNamespace

    from app.cli.common import stats_lines

    stats = SimpleNamespace(
        prompt_tokens=4625, prompt_tps=1234.56, generation_tokens=12, generation_tps=6.66,
        peak_memory_gb=0.132, finish_reason="length", expert_hit_rate=0.853,
        bytes_read_per_token=2.5e6, load_seconds=0.126, compute_seconds=6.9,
    )  # fmt: skip
    assert stats_lines(stats, "en") == [
        "[prompt 4,625 tokens, 1,234.6 tok/s | reply 12 tokens, 6.7 tok/s | peak memory 132 MB "
        "| length]",
        "[experts: 85% cache hits, 2.50 MB read per token, 0.13 s loading, 6.90 s computing]",
    ]
    nnbsp = "\u202f"
    assert stats_lines(stats, "fr") == [
        f"[invite 4{nnbsp}625 jetons, 1{nnbsp}234,6 jetons/s | réponse 12 jetons, 6,7 jetons/s "
        "| mémoire max 132 Mo | limite de jetons]",
        f"[experts : 85{nnbsp}% trouvés en cache, 2,50 Mo lus par jeton, 0,13 s de lecture, "
        "6,90 s de calcul]",
    ]


def test_ask_stats_follow_a_french_locale(tiny_mixtral, cli):
    args = ("ask", "--model", str(tiny_mixtral), "--max-tokens", "3", "Bonjour")
    french = cli(*args, env={"LC_ALL": "fr_FR.UTF-8"}).stderr.decode()
    english = cli(*args, env={"LC_ALL": "C.UTF-8", "LANG": "fr_FR.UTF-8"}).stderr.decode()
    assert re.search(r"réponse \d+ jetons, \d+,\d jetons/s \| mémoire max [\d,]+ [kMG]?o \|", french)
    assert re.search(r"reply \d+ tokens, \d+\.\d tok/s \| peak memory [\d.]+ [kMG]?B \|", english)
