"""`mixchat serve --detach` and `mixchat serve --stop`: the server as a background process,
found through serve.json in the data directory ({"pid", "url", "model"}), its output in
serve.log there.

--detach starts `mixchat serve` (the same options) in a new session and returns once the
server answers (or with the server's one-line error if it could not start); the server writes
serve.json itself once it serves and removes it when it exits. --stop sends it SIGTERM (the
server cancels what runs and exits) and waits for it to end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from model.errors import MixchatError

STATE_FILE = "serve.json"
LOG_FILE = "serve.log"
STOP_WAIT = 30.0  # seconds --stop waits for the server to exit


def read_state(path: Path) -> dict | None:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(state, dict) and isinstance(state.get("pid"), int) and "url" in state
    return state if ok else None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive, but not ours to stop
        return True
    return True


def write_state(path: Path, url: str, model: str) -> None:
    """The serving process says where it is (atomically: a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({"pid": os.getpid(), "url": url, "model": model}))
    partial.replace(path)


def remove_state(path: Path) -> None:
    """On exit: remove the state file if it is still this process's."""
    state = read_state(path)
    if state is not None and state["pid"] == os.getpid():
        path.unlink(missing_ok=True)


def detach(argv: list[str], data_dir: Path) -> int:
    """Start `mixchat serve ARGV` (without --detach) in the background; 0 once it serves."""
    path, log_path = data_dir / STATE_FILE, data_dir / LOG_FILE
    state = read_state(path)
    if state is not None and alive(state["pid"]):
        raise MixchatError(f"a background server is already running at {state['url']} (pid "
                           f"{state['pid']}): `mixchat serve --stop` stops it")  # fmt: skip
    path.unlink(missing_ok=True)  # a stale one (its server is gone)
    data_dir.mkdir(parents=True, exist_ok=True)
    child = [a for a in argv if a != "--detach"] + ["--state-file", str(path)]
    with open(log_path, "ab") as log:
        start = log.tell()
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", *child], stdin=subprocess.DEVNULL, stdout=log,
            stderr=log, start_new_session=True,
        )  # fmt: skip
    try:
        while (state := read_state(path)) is None or state["pid"] != process.pid:
            if process.poll() is not None:
                raise MixchatError(f"the background server did not start: "
                                   f"{last_line(log_path, start)} (log: {log_path})")  # fmt: skip
            time.sleep(0.1)
    except KeyboardInterrupt:
        process.terminate()
        raise
    print(f"mixchat serve: {state['model']} at {state['url']}/v1 in the background (pid "
          f"{process.pid}, log {log_path}); `mixchat serve --stop` stops it",
          file=sys.stderr)  # fmt: skip
    return 0


def last_line(log_path: Path, start: int) -> str:
    """The last line the failed server wrote (its one-line error), without the prefix."""
    with open(log_path, "rb") as log:
        log.seek(start)
        lines = [line.strip() for line in log.read().decode(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    return lines[-1].removeprefix("mixchat: error: ") if lines else "it exited at once"


def stop(data_dir: Path) -> int:
    """Stop the background server of this data directory; 0 once it has exited."""
    path = data_dir / STATE_FILE
    state = read_state(path)
    if state is None:
        raise MixchatError(f"no background server: {path} does not exist")
    pid, url = state["pid"], state["url"]
    if not alive(pid):
        path.unlink(missing_ok=True)
        raise MixchatError(f"the background server (pid {pid}) had already exited; removed {path}")
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as response:
            mixchat = json.loads(response.read()).get("server") == "mixchat"
    except (OSError, ValueError):
        mixchat = False
    if not mixchat:
        raise MixchatError(f"pid {pid} does not answer as a mixchat server at {url}: not "
                           f"stopping it (remove {path} if it is stale)")  # fmt: skip
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_WAIT
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(pid):
        raise MixchatError(f"the server (pid {pid}) did not exit within {STOP_WAIT:.0f} s")
    path.unlink(missing_ok=True)
    print(f"mixchat serve: stopped the server at {url} (pid {pid})", file=sys.stderr)
    return 0
