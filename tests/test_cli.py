"""The `mixchat` command end to end, through subprocesses: streams, stdin, JSON, exit codes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

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


def test_default_model_answers_paris():
    result = mixchat("ask", "What is the capital of France? Answer in one word.")
    assert result.returncode == 0, result.stderr.decode()
    assert "Paris" in result.stdout.decode()
    assert "tok/s" in result.stderr.decode()  # stats go to stderr, not stdout
    assert "tok/s" not in result.stdout.decode()


def test_ask_json_from_stdin(tiny_mixtral):
    prompt = "Bonjour, ça va ? 日本語もOK 👍🏽".encode()
    result = mixchat("ask", "--model", str(tiny_mixtral), "--json", "--max-tokens", "5", "-",
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


def test_piped_stdin_without_prompt_and_system_prompt(tiny_mixtral):
    args = ("ask", "--model", str(tiny_mixtral), "--json", "--max-tokens", "3", "--temp", "0")
    plain = json.loads(mixchat(*args, stdin=b"Hola").stdout)
    with_system = json.loads(mixchat(*args, "--system", "Sei un pirata.", stdin=b"Hola").stdout)
    assert with_system["prompt_tokens"] > plain["prompt_tokens"]


def test_streamed_stdout_equals_json_text(tiny_mixtral):
    args = ("ask", "--model", str(tiny_mixtral), "--max-tokens", "8", "Grüß Gott")
    streamed = mixchat(*args)
    as_json = mixchat(*args, "--json")
    assert streamed.returncode == as_json.returncode == 0
    assert streamed.stdout.decode() == json.loads(as_json.stdout)["text"] + "\n"


def test_usage_errors_exit_2():
    assert_one_line_error(mixchat("ask", "--max-tokens", "many", "hi"), 2, "usage error")
    assert_one_line_error(mixchat("ask", "--top-p", "0", "hi"), 2, "top-p")
    assert_one_line_error(mixchat("ask", stdin=b"   \n"), 2, "empty")
    assert_one_line_error(mixchat("frobnicate"), 2, "usage error")


def test_bad_models_exit_1(tmp_path):
    assert_one_line_error(mixchat("ask", "--model", str(tmp_path / "nope"), "hi"), 1, "no model at")
    assert_one_line_error(mixchat("ask", "--model", "someone/not-cached", "hi"), 1, "mixchat download")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    assert_one_line_error(mixchat("ask", "--model", str(tmp_path), "hi"), 1, "never unpickles")
    assert_one_line_error(mixchat("info", str(tmp_path)), 1, "never unpickles")


def test_invalid_utf8_stdin_and_huge_prompt(tiny_mixtral):
    bad = mixchat("ask", "--model", str(tiny_mixtral), stdin=b"caf\xe9 \xff")
    assert_one_line_error(bad, 1, "UTF-8")
    huge = ("token " * 6000).encode()
    assert_one_line_error(mixchat("ask", "--model", str(tiny_mixtral), stdin=huge), 1, "context")


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


def test_info_counts_parameters_like_transformers(tiny_mixtral):
    import torch
    import transformers

    result = mixchat("info", str(tiny_mixtral), "--json")
    assert result.returncode == 0, result.stderr.decode()
    info = json.loads(result.stdout)
    reference = transformers.MixtralForCausalLM.from_pretrained(tiny_mixtral, dtype=torch.float32)
    assert info["total_params"] == reference.num_parameters()
    experts = sum(p.numel() for n, p in reference.named_parameters() if ".experts." in n)
    assert info["active_params"] == info["total_params"] - experts // 2  # top-2 of 4 experts
    assert info["num_experts"] == 4 and info["experts_per_token"] == 2
    assert info["architecture"] == "mixtral"
    assert info["size_bytes"] == (tiny_mixtral / "model.safetensors").stat().st_size
    text = mixchat("info").stdout.decode()  # the default model, human-readable
    assert "GGUF Q4_1" in text and "dense" in text


def test_quantized_model_is_listed_and_runs(tiny_mixtral, tmp_path):
    dst = tmp_path / "tiny-q4"
    result = mixchat("quantize", str(tiny_mixtral), str(dst), "--group-size", "32", "--no-eval",
                     "--quiet")
    assert result.returncode == 0, result.stderr.decode()
    listed = json.loads(mixchat("models", "--json").stdout)
    assert {"name": "tiny-q4", "source": "quantized", "path": str(dst.resolve())} in listed
    answer = mixchat("ask", "--model", str(dst), "--json", "--max-tokens", "3", "Ciao")
    assert answer.returncode == 0, answer.stderr.decode()
    assert "4-bit" in mixchat("info", str(dst)).stdout.decode()
