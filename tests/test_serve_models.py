"""Which model a running `mixchat serve` answers with, as `mixchat ask` meets it, and what
`/health` says about it: a plain `ask` keeps the server's model, another `--model` replaces it
with a one-line notice; the batch figure is right before the first request; one-row decodes
count as decode steps."""

from __future__ import annotations

import json

from app.serve.models import ModelManager
from app.serve.scheduler import Scheduler
from app.serve.server import ServerThread
from tests.test_cli import mixchat
from tests.test_serve import HELLO, chat, health, start


def ask(server: ServerThread, *args: str):
    result = mixchat("ask", "--json", "--max-tokens", "3", *args,
                     env={"MIXCHAT_SERVER": server.url})  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout), result.stderr.decode()


def test_plain_ask_keeps_the_servers_model_and_another_one_is_said(tiny_mixtral,
                                                                   default_model_path):  # fmt: skip
    with start(tiny_mixtral, batch=None) as server:
        assert health(server)["loads"] == 1
        answer, stderr = ask(server, "Bonjour !")  # no --model: the model the server has
        assert answer["model"] == tiny_mixtral.name and "unloaded" not in stderr
        state = health(server)
        assert state["loads"] == 1 and state["model"] == tiny_mixtral.name

        # another model: loaded in place of the server's, and `ask` says which it replaced
        answer, stderr = ask(server, "-m", str(default_model_path), "Bonjour !")
        other = default_model_path.stem
        assert answer["model"] == other
        assert stderr.splitlines() == [
            f"mixchat: the server at {server.url} unloaded {tiny_mixtral.name} to load {other}"
        ]
        assert health(server)["loads"] == 2

        answer, stderr = ask(server, "Bonjour !")  # plain again: the one loaded now
        assert answer["model"] == other and stderr == ""
        assert health(server)["loads"] == 2


def test_health_batch_before_the_first_request_and_one_row_decode_steps(tiny_mixtral):
    with start(tiny_mixtral, batch=None) as server:  # an MoE model: one request at a time
        before = health(server)
        assert before["batch"] == 1
        moe = before["batch_limited_because"]
        assert moe.startswith("the default for an MoE model")
        replies = [chat(server, [{"role": "user", "content": f"Count to {i}."}], max_tokens=4)
                   for i in range(4)]  # fmt: skip
        after = health(server)
    assert after["batch"] == 1 and after["batch_limited_because"] == moe
    assert after["decode_steps"] == sum(r.usage.completion_tokens for r in replies) == 16
    assert after["largest_batch"] == 1 and after["batched_steps"] == 0

    models = ModelManager(str(tiny_mixtral), keep_alive=None)  # nothing loaded yet
    with ServerThread(Scheduler(models)) as server:
        unloaded = health(server)
        assert unloaded["model"] is None and unloaded["batch"] is None
        assert unloaded["batch_limited_because"] == "no model is loaded: set when one is"
        chat(server, HELLO, max_tokens=2)
        loaded = health(server)
    assert loaded["batch"] == 1 and loaded["batch_limited_because"] == moe
    assert loaded["decode_steps"] == 2 and loaded["loads"] == 1
