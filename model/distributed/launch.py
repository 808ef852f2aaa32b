"""`mixchat chat --hosts hosts.json` (or `ask --hosts`): this process becomes rank 0 and starts
the other ranks itself, one per further host of the hostfile, as followers (`ssh HOST`, or a
plain child process for localhost / 127.0.0.1). mlx.launch is not used: it pipes every rank's
output, so rank 0 would have no terminal for the chat app.

The ring backend's hostfile (`["ip:port"]` per rank) is written from the hostfile's IPs with
consecutive ports from a free one; each follower gets it in its command line. A follower that
exits with an error before or after joining ends rank 0 with one line (its reason, sent over
the control channel, or its last line of stderr); when rank 0 quits, the followers exit
(control.py's bye), and rank 0 waits a few seconds for them, then kills those left.
"""

from __future__ import annotations

import atexit
import json
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from .. import ranks
from .errors import DistributedError

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
FOLLOWERS_EXIT_WITHIN = 5.0  # seconds rank 0 waits for the followers when it quits
REPORT_GRACE = 1.0  # seconds a failed follower's own report (over control) has to arrive first


def hostfile_entries(path: str | Path) -> object:
    """A hostfile's list of hosts (its "hosts", or the file's top-level list), unchecked; a
    file that cannot be read or is not JSON is a one-line DistributedError."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise DistributedError(f"cannot read hostfile {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise DistributedError(f"hostfile {path} is not JSON: {e}") from None
    return data.get("hosts") if isinstance(data, dict) else data


def launch_hosts(path: str | Path) -> list[tuple[str, str]]:
    """(ssh name, ring IP) of each host of an mlx.launch hostfile ({"hosts": [{"ssh", "ips"}]}
    or the bare list), in rank order."""
    hosts = hostfile_entries(path)
    out = []
    for h in hosts if isinstance(hosts, list) else []:
        if not (isinstance(h, dict) and isinstance(h.get("ssh"), str)):
            break
        ips = h.get("ips") or [h["ssh"]]
        if not (isinstance(ips, list) and ips and isinstance(ips[0], str)):
            break
        out.append((h["ssh"], ips[0]))
    else:
        if len(out) >= 2:
            return out
    raise DistributedError(
        f'hostfile {path}: expected 2 or more hosts as mlx.launch reads them, '
        '[{"ssh": "mac-a.local", "ips": ["10.0.0.1"]}, ...]'
    )


def _free_port(count: int) -> int:
    """A port P with P .. P+count-1 free here (the other hosts are not asked)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("", 0))
            base = s.getsockname()[1]
        if base + count > 65535:
            continue
        try:
            for i in range(count):
                socket.create_server(("", base + i)).close()
        except OSError:
            continue
        return base
    raise DistributedError("no free ports for the ranks")


def start_followers(hostfile: str | Path, argv: list[str], variables: Mapping[str, str]
                    ) -> list[subprocess.Popen]:  # fmt: skip
    """Make this process rank 0 of the hostfile's ranks (the launch variables are set here,
    before `world()` joins) and start `mixchat ARGV` as ranks 1..n-1, each on its host, with
    `variables` (this process's MIXCHAT_* variables, from app/settings.py) set."""
    hosts = launch_hosts(hostfile)
    base = _free_port(len(hosts))
    ring = [[f"{ip}:{base + r}"] for r, (_, ip) in enumerate(hosts)]
    text = json.dumps(ring)
    local = Path(tempfile.gettempdir()) / f"mixchat-ring-{base}.json"
    local.write_text(text)
    atexit.register(local.unlink, missing_ok=True)
    settings = dict(variables)
    procs = []
    for rank, (ssh, _) in enumerate(hosts[1:], start=1):
        env = settings | {"MLX_RANK": str(rank), "MLX_HOSTFILE": str(local)}
        command = [sys.executable, "-m", "app.cli", *argv]
        if ssh in LOCAL_HOSTS:
            procs.append(subprocess.Popen(["env", *(f"{k}={v}" for k, v in env.items()),
                                           *command], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
            continue
        remote = f"/tmp/mixchat-ring-{base}.json"
        env["MLX_HOSTFILE"] = remote
        script = (f"printf %s {shlex.quote(text)} > {remote} && exec env "
                  + " ".join(shlex.quote(f"{k}={v}") for k, v in env.items()) + " "
                  + shlex.join(command))  # fmt: skip
        procs.append(subprocess.Popen(["ssh", "-o", "BatchMode=yes", ssh, script],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE))  # fmt: skip
    ranks.become_rank(0, str(local))
    quitting = threading.Event()
    for rank, proc in enumerate(procs, start=1):
        threading.Thread(target=_watch, args=(proc, rank, hosts[rank][0], quitting),
                         daemon=True, name=f"mixchat-rank-{rank}").start()  # fmt: skip
    atexit.register(_end, procs, quitting)
    return procs


def _watch(proc: subprocess.Popen, rank: int, host: str, quitting: threading.Event) -> None:
    """Rank 0's watch on a follower it started: an error exit ends rank 0 with one line."""
    assert proc.stderr is not None
    last = ""
    for raw in proc.stderr:
        if line := raw.decode(errors="replace").strip():
            last = line
    code = proc.wait()
    if code == 0 or quitting.is_set():
        return
    time.sleep(REPORT_GRACE)  # its own report over the control channel says it better
    if quitting.is_set():
        return
    from .fatal import fatal

    why = last.removeprefix("mixchat: error: ") or f"exit code {code}"
    fatal(f"rank {rank} ({host}) exited: {why}")


def _end(procs: list[subprocess.Popen], quitting: threading.Event) -> None:
    """At rank 0's exit (after the control channel's bye): wait for the followers, briefly."""
    quitting.set()
    deadline = time.monotonic() + FOLLOWERS_EXIT_WITHIN
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def join_hosts(hostfile: str | Path, argv: list[str], variables: Mapping[str, str],
               mode: str) -> None:  # fmt: skip
    """`--hosts HOSTFILE` on `chat` or `ask` (`argv`: the whole command line): start the other
    ranks with the same command line less --hosts and `variables` (MIXCHAT_*), then join them
    now, splitting the model as `mode` says (before any UI opens: a rank that cannot start or
    join is one line on a plain terminal)."""
    from .join import world

    if ranks.launched():
        raise DistributedError(
            "--hosts starts the other ranks itself: not under mlx.launch or with MLX_RANK set"
        )
    rest, skip = [], False
    for arg in argv:
        if skip or arg == "--hosts":
            skip = not skip
            continue
        if not arg.startswith("--hosts="):
            rest.append(arg)
    start_followers(hostfile, rest, variables)
    note = f"mixchat: joining the ranks of {hostfile} ..."
    show = sys.stderr.isatty()
    if show:
        print(note, file=sys.stderr, end="\r", flush=True)
    world(mode)
    if show:
        print(" " * len(note), file=sys.stderr, end="\r", flush=True)
