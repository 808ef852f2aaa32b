"""Shared fixtures: tiny random checkpoints built once per session (transformers is the
reference definition), and the embedded default model."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import pytest

from tests.checkpoints import build_hf_checkpoint, quick_gguf_reads


@pytest.fixture(scope="session", autouse=True)
def isolated_data_dir(tmp_path_factory):
    """No test reads or writes the user's real mixchat data directory (subprocesses too)."""
    os.environ["MIXCHAT_HOME"] = str(tmp_path_factory.mktemp("mixchat-home"))
    os.environ["MIXCHAT_SERVER"] = "off"  # `mixchat ask` never reaches a server the user runs


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory):
    """A 2-layer, 4-expert top-2 Mixtral in float32 with the v1 tokenizer."""
    return build_hf_checkpoint(tmp_path_factory.mktemp("tiny-mixtral"), "mixtral")


@pytest.fixture(scope="session")
def tiny_mistral_windowed(tmp_path_factory):
    """A dense Mistral with an 8-token sliding window, stored in bfloat16, in two shards."""
    return build_hf_checkpoint(
        tmp_path_factory.mktemp("tiny-mistral"),
        "mistral",
        dtype="bfloat16",
        sliding_window=8,
        max_shard_size="3MB",
        seed=1,
    )


@pytest.fixture(scope="session")
def tiny_mixtral_bf16_shards(tmp_path_factory):
    """tiny_mixtral's shape in bfloat16, in several 2 MB shards, intermediate 128 so every
    matrix quantizes: the quantizer's and compare's source (read only)."""
    return build_hf_checkpoint(
        tmp_path_factory.mktemp("tiny-bf16") / "hf",
        "mixtral",
        dtype="bfloat16",
        intermediate_size=128,
        max_shard_size="2MB",
    )


@pytest.fixture(scope="session")
def default_model_path():
    from model.registry import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def hf_gguf(default_model_path):
    """transformers' tokenizer built from the embedded GGUF (slow: built once per session)."""
    from transformers import AutoTokenizer

    with quick_gguf_reads():
        return AutoTokenizer.from_pretrained(
            str(default_model_path.parent), gguf_file=default_model_path.name
        )


@dataclass
class Ran:
    """What a `mixchat` run left: its exit code, stdout and stderr (bytes, as a subprocess's)."""

    returncode: int
    stdout: bytes
    stderr: bytes


@pytest.fixture
def cli(monkeypatch, capsys):
    """`mixchat(*args, stdin=..., env=...)` (tests/test_cli.py) as `main(args)` in this process,
    where the process itself is not what a test checks: stdin a real pipe holding `stdin` (empty,
    as subprocess.run gives), `env` added to the environment while it runs."""
    from app.cli import main

    def run(*args: str, stdin: bytes = b"", env: dict | None = None) -> Ran:
        with monkeypatch.context() as patch:
            for key, value in {"HF_HUB_OFFLINE": "1", **(env or {})}.items():
                patch.setenv(key, value)
            read_end, write_end = os.pipe()
            os.write(write_end, stdin)
            os.close(write_end)
            with open(read_end, encoding="utf-8") as pipe:
                patch.setattr(sys, "stdin", pipe)
                capsys.readouterr()
                try:
                    code = main(list(args))
                except SystemExit as e:  # --help
                    code = e.code
        out, err = capsys.readouterr()
        return Ran(code, out.encode(), err.encode())

    return run


@pytest.fixture
def anyio_backend():
    """Pilot tests (`App.run_test`) run on asyncio."""
    return "asyncio"
