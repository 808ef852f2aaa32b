"""GenerationStats' one JSON form (model/stats.py): the server's `mixchat` field, read back by
the HTTP client, the chat's store and `ask --json`."""

from __future__ import annotations

import subprocess
import sys

from model.stats import GenerationStats

STATS = GenerationStats(
    prompt_tokens=12, prompt_tps=345.6, generation_tokens=7, generation_tps=8.9,
    peak_memory_gb=0.25, context_tokens=19, finish_reason="length", expert_hit_rate=0.5,
    bytes_read_per_token=1e6, prompt_bytes_read_per_token=2e5, load_seconds=0.1,
    compute_seconds=0.9,
)  # fmt: skip


def test_json_keys_are_the_servers():
    assert list(STATS.to_json()) == [
        "prompt_tokens_prefilled", "prompt_tps", "generation_tokens", "generation_tps",
        "peak_memory_gb", "context_tokens", "finish_reason", "expert_hit_rate",
        "bytes_read_per_token", "prompt_bytes_read_per_token", "load_seconds", "compute_seconds",
    ]  # fmt: skip
    assert STATS.to_json()["prompt_tokens_prefilled"] == 12


def test_from_json_reads_back_the_wire_form_and_the_stores_dicts():
    assert GenerationStats.from_json(STATS.to_json()) == STATS
    assert GenerationStats.from_json(STATS.to_json() | {"memory_notice": "x"}) == STATS
    saved = {"prompt_tokens": 3, "generation_tokens": 2, "generation_tps": None, "other": 1}
    stats = GenerationStats.from_json(saved)
    assert (stats.prompt_tokens, stats.generation_tokens, stats.generation_tps) == (3, 2, 0.0)
    assert stats.context_tokens is None  # not said: unknown, not 0


def test_of_keeps_stats_and_reads_dicts():
    assert GenerationStats.of(STATS) is STATS
    assert GenerationStats.of(None) is None
    assert GenerationStats.of({"finish_reason": "stop"}).finish_reason == "stop"


def test_the_stats_and_the_http_client_import_no_mlx():
    code = ("import sys, model.stats, app.remote, app.remote_engine, app.cli.ask_server; "
            "print(sorted({'mlx', 'mlx_lm', 'numpy'} & {m.split('.')[0] for m in sys.modules}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
