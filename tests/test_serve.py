"""`mixchat serve` with the official `openai` client, on random loopback ports, with a tiny model:
answers equal `mixchat ask`'s, usage, concurrency, disconnects, errors, API key, keep-alive."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from app.serve.models import ModelManager
from app.serve.scheduler import Scheduler
from app.serve.server import ServerThread
from model.generation.stops import StopText
from tests.test_cli import assert_one_line_error, mixchat

HELLO = [{"role": "user", "content": "Hello there, how are you?"}]


def start(model, *, keep_alive=None, max_queue=32, batch=8, **kw) -> ServerThread:
    models = ModelManager(str(model), keep_alive=keep_alive)
    models.engine_for(models.start_key)
    return ServerThread(Scheduler(models, max_queue=max_queue, batch=batch), **kw)


@pytest.fixture(scope="module")
def server(tiny_mixtral):
    with start(tiny_mixtral, max_body=1 << 20) as running:
        yield running


def client(server: ServerThread, key: str = "none", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, **kw)


def health(server: ServerThread) -> dict:
    with urllib.request.urlopen(server.url + "/health", timeout=10) as response:
        assert response.status == 200
        return json.loads(response.read())


def finished(server: ServerThread, content: str, timeout: float = 20.0):
    """The job whose last message is `content`, once the scheduler is done with it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for job in list(server.scheduler.history):
            request = job.request
            last = request.messages[-1]["content"] if request.messages else request.prompt
            if last == content:
                return job
        time.sleep(0.02)
    raise AssertionError(f"no finished job for {content!r}")


def chat(server, messages, max_tokens=12, **kw):
    return client(server).chat.completions.create(
        model="default", messages=messages, max_tokens=max_tokens, temperature=0, **kw
    )


def test_plain_and_streamed_equal_ask(server, tiny_mixtral, cli):
    local = cli("ask", "--local", "--json", "-m", str(tiny_mixtral), "--max-tokens", "12",
                HELLO[0]["content"], env={"MIXCHAT_SERVER": server.url})  # fmt: skip
    assert local.returncode == 0, local.stderr.decode()
    expected = json.loads(local.stdout)["text"]
    assert expected and not any(job.request.messages == HELLO for job in server.scheduler.history)

    plain = chat(server, HELLO)
    assert plain.choices[0].message.content == expected
    assert plain.choices[0].finish_reason == "length"
    prompt_tokens = server.scheduler.models.engine.count_tokens(HELLO)
    assert plain.usage.prompt_tokens == prompt_tokens
    assert plain.usage.completion_tokens == 12
    assert plain.usage.total_tokens == prompt_tokens + 12
    assert plain.model_extra["mixchat"]["generation_tps"] > 0

    chunks = list(chat(server, HELLO, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == prompt_tokens - 1  # reused

    for extra in ((), ("--json",)):
        through = cli("ask", "-m", str(tiny_mixtral), "--max-tokens", "12", *extra,
                      HELLO[0]["content"], env={"MIXCHAT_SERVER": server.url})  # fmt: skip
        assert through.returncode == 0, through.stderr.decode()
        out = through.stdout.decode()
        assert (json.loads(out)["text"] if extra else out) == (
            expected if extra else expected + "\n"
        )
    assert "tok/s" in through.stderr.decode() or extra
    # `ask --json` says the same as in-process: the same keys, the whole prompt's length (the
    # server had most of it cached and prefilled only the rest)
    local_json, through_json = json.loads(local.stdout), json.loads(through.stdout)
    assert through_json.keys() == local_json.keys()
    assert through_json["prompt_tokens"] == local_json["prompt_tokens"] == prompt_tokens
    assert through_json["text"] == local_json["text"]
    assert server.scheduler.history[-1].done.stats.prompt_tokens < prompt_tokens
    jobs = [job for job in server.scheduler.history if job.request.messages == HELLO]
    assert len(jobs) == 4  # plain, streamed, and both `ask`s went through the server

    usage = cli("ask", "-m", str(tiny_mixtral), "--max-tokens", "0", "Hi",
                env={"MIXCHAT_SERVER": server.url})  # fmt: skip
    assert_one_line_error(usage, 2, "max tokens must be at least 1, not 0")


def test_ask_without_a_server_answers_in_process(tiny_mixtral, cli):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    result = cli("ask", "--json", "-m", str(tiny_mixtral), "--max-tokens", "3", "Hi",
                 env={"MIXCHAT_SERVER": url})  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    assert json.loads(result.stdout)["generation_tokens"] == 3


def test_raw_completion_matches_greedy_reference(server, tiny_mixtral):
    import mlx.core as mx

    engine = server.scheduler.models.engine
    ids = [engine.tokenizer.bos_id] + engine.tokenizer.encode("Once upon a time")
    generated = []
    for _ in range(10):  # greedy, recomputing the whole sequence: no KV cache involved
        logits = engine.model(mx.array(ids + generated)[None])
        generated.append(int(mx.argmax(logits[0, -1]).item()))
    expected = engine.tokenizer.decode(generated)

    api = client(server)
    plain = api.completions.create(model="default", prompt="Once upon a time", max_tokens=10,
                                   temperature=0)  # fmt: skip
    assert plain.choices[0].text == expected
    assert plain.usage.prompt_tokens == len(ids)
    streamed = api.completions.create(model="default", prompt="Once upon a time", max_tokens=10,
                                      temperature=0, stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) == expected

    stop = expected[len(expected) // 2 : len(expected) // 2 + 3]
    cut = api.completions.create(model="default", prompt="Once upon a time", max_tokens=10,
                                 temperature=0, stop=[stop])  # fmt: skip
    assert cut.choices[0].text == expected[: expected.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_stop_text_holds_back_a_split_stop():
    stops = StopText(["END", "xyz"])
    assert stops.add("abcE") == ("abc", False)  # "E" may begin "END"
    assert stops.add("Nd") == ("ENd", False)
    assert stops.add(" fooxy") == (" foo", False)
    assert stops.add("zzz") == ("", True)
    assert StopText(["\n\n"]).add("a\n") == ("a", False)


def test_concurrent_requests_equal_sequential(server):
    prompts = [[{"role": "user", "content": f"Question {i}: count to {i}."}] for i in range(16)]
    sequential = [chat(server, p, max_tokens=6).choices[0].message.content for p in prompts]
    assert len(set(sequential)) > 1  # the prompts lead to different answers
    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(lambda p: chat(server, p, max_tokens=6), prompts))
    assert [r.choices[0].message.content for r in concurrent] == sequential
    assert all(r.usage.completion_tokens == 6 for r in concurrent)
    assert health(server)["queued"] == 0


def test_disconnect_cancels_running_and_waiting(tiny_mixtral):
    # one at a time, so the second request waits in the queue (batched: test_serve_batch.py)
    with start(tiny_mixtral, batch=1) as server:
        running = [{"role": "user", "content": "A long story, please."}]
        waiting = [{"role": "user", "content": "I will not wait."}]
        stream = chat(server, running, max_tokens=3000, stream=True)
        chunks = iter(stream)
        for _ in range(3):
            next(chunks)
        impatient = client(server, timeout=0.5)
        with pytest.raises(openai.APITimeoutError):
            impatient.chat.completions.create(model="default", messages=waiting, max_tokens=5)
        stream.close()

        job = finished(server, running[0]["content"])
        assert job.done.finish_reason == "cancelled"
        assert job.chunks_at_cancel is not None
        # within one token of the cancel (the engine has at most one step queued ahead)
        assert job.done.stats.generation_tokens <= job.chunks_at_cancel + 1
        assert job.done.stats.generation_tokens < 3000
        dropped = finished(server, waiting[0]["content"])
        assert dropped.cancelled and dropped.chunks == 0 and dropped.done is None  # never ran
        assert health(server)["status"] == "ok"


def post(server, path, data: bytes, method="POST", headers=None):
    request = urllib.request.Request(server.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_requests_get_openai_errors_and_server_stays_up(server):
    ok = {"model": "default", "messages": HELLO, "max_tokens": 2}
    cases = [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (json.dumps({"model": "default"}).encode(), 400, "invalid_value"),
        (json.dumps(ok | {"messages": [{"role": "robot", "content": "x"}]}).encode(), 400,
         "invalid_value"),
        (json.dumps(ok | {"messages": [{"role": "user", "content": 3}]}).encode(), 400,
         "invalid_value"),
        (json.dumps(ok | {"max_tokens": 0}).encode(), 400, "invalid_value"),
        (json.dumps(ok | {"max_tokens": "ten"}).encode(), 400, "invalid_value"),
        (json.dumps(ok | {"temperature": -1}).encode(), 400, "invalid_value"),
        (json.dumps(ok | {"top_p": 2}).encode(), 400, "invalid_value"),
        (json.dumps(ok | {"stop": [""]}).encode(), 400, "invalid_value"),
        (json.dumps(ok | {"stream": "yes"}).encode(), 400, "invalid_value"),
        (json.dumps(ok | {"n": 2}).encode(), 400, "unsupported_parameter"),
        (json.dumps(ok | {"tools": [{"type": "function"}]}).encode(), 400,
         "unsupported_parameter"),
        (json.dumps(ok | {"messages": [{"role": "user", "content": "word " * 5000}]}).encode(),
         400, "invalid_request"),
        (json.dumps(ok | {"model": "no/such-model"}).encode(), 404, "model_not_found"),
        (json.dumps(ok | {"model": "/no/such/dir"}).encode(), 404, "model_not_found"),
        (b" " * (1 << 20) + b"{}", 413, "too_large"),
    ]  # fmt: skip
    for body, status, code in cases:
        got, error = post(server, "/v1/chat/completions", body)
        assert (got, error["error"]["code"]) == (status, code), (body[:80], error)
        assert error["error"]["message"] and error["error"]["type"]
    assert post(server, "/v1/completions", json.dumps({"prompt": ""}).encode())[0] == 400
    assert post(server, "/v1/nothing", b"{}")[0] == 404
    assert post(server, "/v1/chat/completions", None, method="GET")[0] == 405
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(model="no/such-model", messages=HELLO, max_tokens=2)
    state = health(server)
    assert (state["status"], state["loads"], state["queued"]) == ("ok", 1, 0)
    assert chat(server, HELLO, max_tokens=2).choices[0].message.content  # still answers


def test_api_key_and_queue_limit(tiny_mixtral, cli):
    with start(tiny_mixtral, max_queue=1, batch=1, api_key="s3cret") as keyed:
        with pytest.raises(openai.AuthenticationError):
            client(keyed, "wrong").models.list()
        assert [m.id for m in client(keyed, "s3cret").models.list()] == [tiny_mixtral.name]
        assert health(keyed)["status"] == "ok"  # /health needs no key

        args = ("ask", "-m", str(tiny_mixtral), "--max-tokens", "3", "Hi")
        env = {"MIXCHAT_SERVER": keyed.url}
        assert_one_line_error(cli(*args, env=env), 1, "wants an API key")
        assert cli(*args, env=env | {"MIXCHAT_API_KEY": "s3cret"}).returncode == 0

        api = client(keyed, "s3cret")
        busy = api.chat.completions.create(model="default", messages=HELLO, max_tokens=3000,
                                           temperature=0, stream=True)  # fmt: skip
        next(iter(busy))  # the worker is generating; the next request waits in the queue
        waiter = threading.Thread(target=lambda: api.chat.completions.create(
            model="default", messages=HELLO, max_tokens=2))  # fmt: skip
        waiter.start()
        deadline = time.monotonic() + 10
        while health(keyed)["queued"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError):
            api.chat.completions.create(model="default", messages=HELLO, max_tokens=2)
        busy.close()
        waiter.join(20)
        assert not waiter.is_alive()


def test_keep_alive_unloads_and_requests_load_models(tiny_mixtral, default_model_path):
    with start(tiny_mixtral, keep_alive=0.2) as short:
        first = chat(short, HELLO, max_tokens=4).choices[0].message.content
        deadline = time.monotonic() + 10
        while health(short)["model"] is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        state = health(short)
        assert state["model"] is None  # unloaded after 0.2 s idle
        assert chat(short, HELLO, max_tokens=4).choices[0].message.content == first
        assert health(short)["loads"] == state["loads"] + 1  # loaded again for the request

        other = client(short).chat.completions.create(
            model=str(default_model_path), messages=HELLO, max_tokens=4, temperature=0
        )
        assert other.model == default_model_path.stem
        assert health(short)["loads"] == state["loads"] + 2

        # once idle past keep-alive, no model: no batch figure, and why
        deadline = time.monotonic() + 10
        while health(short)["model"] is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        idle = health(short)
        assert idle["batch"] is None and idle["batch_limited_because"].startswith("no model")


def test_conversation_cache_survives_other_conversations(server, tiny_mixtral):
    from model import Engine, GenerationSettings

    turn1 = [{"role": "user", "content": "My name is Ada. Remember it."}]
    reply = chat(server, turn1, max_tokens=5).choices[0].message.content
    chat(server, [{"role": "user", "content": "Something else entirely."}], max_tokens=5)
    turn2 = turn1 + [{"role": "assistant", "content": reply},
                     {"role": "user", "content": "What is my name?"}]  # fmt: skip
    second = chat(server, turn2, max_tokens=5)
    prompt1 = server.scheduler.models.engine.count_tokens(turn1)
    assert second.usage.prompt_tokens_details.cached_tokens >= prompt1

    fresh = Engine.load(str(tiny_mixtral))  # no cache at all: the same greedy answer
    settings = GenerationSettings(max_tokens=5, temperature=0)
    expected = "".join(chunk.text for chunk in fresh.stream(turn2, settings))
    assert second.choices[0].message.content == expected


def test_detach_and_stop(tiny_mixtral, tmp_path, cli):
    from app.serve.detach import read_state

    env = {"MIXCHAT_HOME": str(tmp_path)}
    started = mixchat("serve", "--detach", "-m", str(tiny_mixtral), "--port", "0", env=env)
    assert started.returncode == 0, started.stderr.decode()
    state = read_state(tmp_path / "serve.json")
    assert state is not None and state["model"] == tiny_mixtral.name
    assert f"at {state['url']}/v1 in the background (pid {state['pid']}," in started.stderr.decode()
    try:
        with urllib.request.urlopen(state["url"] + "/health", timeout=10) as response:
            assert json.loads(response.read())["model"] == tiny_mixtral.name
        asked = cli("ask", "--json", "-m", str(tiny_mixtral), "--max-tokens", "2", "Hi",
                    env=env | {"MIXCHAT_SERVER": state["url"]})  # fmt: skip
        assert asked.returncode == 0 and json.loads(asked.stdout)["generation_tokens"] == 2
        again = cli("serve", "--detach", "-m", str(tiny_mixtral), "--port", "0", env=env)
        assert_one_line_error(again, 1, f"already running at {state['url']}")
    finally:
        stopped = cli("serve", "--stop", env=env)
    assert stopped.returncode == 0, stopped.stderr.decode()
    assert f"stopped the server at {state['url']} (pid {state['pid']})" in stopped.stderr.decode()
    assert not (tmp_path / "serve.json").exists()
    with pytest.raises(ProcessLookupError):
        import os

        os.kill(state["pid"], 0)
    assert_one_line_error(cli("serve", "--stop", env=env), 1, "no background server")
    bad = cli("serve", "--detach", "-m", str(tiny_mixtral), "--port", "0",
              "--memory-budget", "1KB", env=env)  # fmt: skip
    assert_one_line_error(bad, 1, "the background server did not start: tiny-mixtral0 needs")
