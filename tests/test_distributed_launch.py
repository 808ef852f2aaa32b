"""`--hosts HOSTFILE`: rank 0 starts the other ranks itself (localhost here: child processes
instead of ssh); they follow it and exit when it quits. `ask` gives one process's tokens; the
chat app runs in a real terminal (tmux) with its follower behind it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from model import GenerationSettings
from tests.test_distributed import MIXCHAT, PROMPT, TIMEOUT, one_process


def hosts_json(tmp_path: Path) -> Path:
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps({"hosts": [{"ssh": "localhost", "ips": ["127.0.0.1"]}] * 2}))
    return path


def marked(mark: str) -> list[int]:
    """Processes whose environment carries MIXCHAT_TEST_MARK=mark (rank 0 passes its MIXCHAT_
    variables on to the ranks it starts)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"MIXCHAT_TEST_MARK={mark}".encode() in environ:
            pids.append(int(entry.name))
    return pids


def gone(mark: str, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while marked(mark) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not marked(mark)


pytestmark = [
    pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc"),
    pytest.mark.xdist_group("ranks"),  # ranks on loopback ports: one worker runs them all
]


def test_ask_with_hosts_starts_the_other_rank_and_gives_the_tokens_of_one_process(
    tiny_mistral_windowed, tmp_path
):
    """A dense model (bfloat16, sliding window, two shards) split by layers: a pipeline runs
    any model, not only a Mixture of Experts."""
    model = tiny_mistral_windowed
    mark = uuid.uuid4().hex
    env = os.environ | {"MIXCHAT_TEST_MARK": mark, "MIXCHAT_PARALLEL": "pipeline"}
    args = [MIXCHAT, "ask", "--hosts", str(hosts_json(tmp_path)), "-m", str(model),
            "--json", "--max-tokens", "16", PROMPT]  # fmt: skip
    result = subprocess.run(args, env=env, capture_output=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr.decode()
    expected = one_process(model, [{"role": "user", "content": PROMPT}],
                           GenerationSettings(max_tokens=16, temperature=0.0))  # fmt: skip
    assert json.loads(result.stdout)["text"] == expected
    assert gone(mark)  # the follower ended with rank 0


def test_a_hostfile_of_one_host_is_one_line(tiny_mixtral, tmp_path, cli):
    hosts = tmp_path / "one.json"
    hosts.write_text(json.dumps([{"ssh": "localhost", "ips": ["127.0.0.1"]}]))
    result = cli("ask", "--hosts", str(hosts), "-m", str(tiny_mixtral), "hi")
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, lines
    assert lines[0].startswith("mixchat: error: hostfile") and "2 or more hosts" in lines[0]


def _tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True,
                          timeout=10).stdout  # fmt: skip


def _wait_for_screen(session: str, expected: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = _tmux("capture-pane", "-p", "-t", session)
        if expected in screen:
            return screen
        time.sleep(0.1)
    raise AssertionError(f"{expected!r} never showed; the screen was:\n{screen}")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_chat_with_hosts_in_a_terminal_runs_its_follower_until_it_quits(tiny_mixtral, tmp_path):
    mark = uuid.uuid4().hex
    session = f"mixchat-hosts-{mark[:8]}"
    command = (
        f"unset COLUMNS LINES; cd {tmp_path} && MIXCHAT_HOME={tmp_path / 'home'} "
        f"MIXCHAT_TEST_MARK={mark} LANG=C.UTF-8 TERM=xterm-256color {MIXCHAT} chat --lang en "
        f"--hosts {hosts_json(tmp_path)} -m {tiny_mixtral}; echo EXITED-$? ; sleep 30"
    )
    _tmux("new-session", "-d", "-s", session, "-x", "100", "-y", "32", command)
    try:
        _wait_for_screen(session, "Ctrl+")  # the app is up (its footer)
        # Loaded before sending: an Esc during the load takes the message back instead of
        # stopping a reply (on a busy machine the load can outlast the typing).
        _wait_for_screen(session, "ready │", timeout=120)
        _tmux("send-keys", "-t", session, "-l", "Bonjour")
        _tmux("send-keys", "-t", session, "Enter")
        _wait_for_screen(session, "█ Assistant")  # a reply is being written
        followers = [p for p in marked(mark) if p != os.getpid()]
        assert len(followers) >= 2  # rank 0 and the rank it started
        _tmux("send-keys", "-t", session, "Escape")  # stop it (both ranks, at the same token)
        _wait_for_screen(session, " · stopped")  # its statistics: the reply has ended
        _tmux("send-keys", "-t", session, "C-q")
        _wait_for_screen(session, "EXITED-0", timeout=30)
        assert gone(mark)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
        for pid in marked(mark):
            os.kill(pid, 9)
