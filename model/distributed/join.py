"""Joining the ranks: the group, the control channel to rank 0, and the one-line exit when a
rank or the network goes away (`fatal`)."""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from .. import ranks
from .control import PING_SECONDS, TIMEOUT, Control
from .errors import DistributedError


@dataclass
class World:
    rank: int = 0
    size: int = 1
    group: Any = None  # mx.distributed.Group when size > 1
    control: Control | None = None
    mode: str = "expert"  # how the model is split: "expert" (experts per rank) or "pipeline"

    @property
    def leader(self) -> bool:
        return self.rank == 0


_world: World | None = None
_world_lock = threading.Lock()
_fatal_lock = threading.Lock()


def world() -> World:
    """This process's place among the ranks (size 1 unless launched as several), joined once:
    the group is initialised and the control channel to rank 0 connected."""
    global _world
    with _world_lock:
        if _world is None:
            _world = _join() if ranks.launched() else World()
        return _world


def _join() -> World:
    timeout = TIMEOUT
    mode = ranks.parallel_mode()
    if mode not in ranks.MODES:
        raise DistributedError(
            f"MIXCHAT_PARALLEL={mode!r}: expected one of {', '.join(ranks.MODES)}"
        )
    _save_terminal()
    _filter_ring_messages()
    # Joining blocks until every rank is up: bounded, so a rank that never starts is an error.
    guard = threading.Timer(
        max(60.0, 3 * timeout),
        fatal,
        (f"the other ranks did not join within {max(60.0, 3 * timeout):.0f} s",),
    )
    guard.daemon = True
    guard.start()
    try:
        group = mx.distributed.init(strict=True)
    except Exception as e:  # RuntimeError/ValueError with the backend's reason
        guard.cancel()
        raise DistributedError(f"cannot join the distributed group: {e}") from None
    rank, size = group.rank(), group.size()
    if size == 1:
        guard.cancel()
        return World(0, 1, None, None, mode)
    try:
        control = Control.connect(group, rank, size, timeout)
    finally:
        guard.cancel()
    return World(rank, size, group, control, mode)


def fatal(message: str) -> None:
    """One line on the terminal, then exit at once (never waiting on a collective that will
    not complete). Called from watchdog threads: the main thread may be blocked in MLX."""
    _fatal_lock.acquire()  # one line, from the first thread to get here (never released)
    rank = _world.rank if _world is not None else ranks.rank_hint()
    where = "" if rank == 0 else f"rank {rank}: "
    line = f"mixchat: error: {where}{message}\n"
    fd = _real_stderr if _real_stderr is not None else 2
    try:
        if rank == 0 and _saved_tty is not None:  # a full-screen UI may be running: undo it
            import termios

            os.write(1, b"\x1b[?1000l\x1b[?1003l\x1b[?1006l\x1b[?1049l\x1b[?25h")
            termios.tcsetattr(0, termios.TCSADRAIN, _saved_tty)
    except Exception:  # the terminal is gone: the message still goes out
        pass
    try:
        os.write(fd, line.encode())
    finally:
        os._exit(1)


def after_failure(error: BaseException) -> None:
    """An exception escaped on a rank of several: if a collective failed because a rank or the
    network went away, the watchdog is about to say so in one line and exit; let it. Another
    failure comes back to the caller."""
    if _world is None or _world.size == 1 or "[ring]" not in str(error):
        return
    time.sleep(3 * PING_SECONDS)
    fatal(f"lost the connection to another rank ({str(error).removeprefix('[ring] ')})")


_real_stderr: int | None = None
_saved_tty: list | None = None  # the terminal's modes before any UI changed them (rank 0)


def _save_terminal() -> None:
    global _saved_tty
    try:
        import termios

        if os.isatty(0) and os.isatty(1):
            _saved_tty = termios.tcgetattr(0)
    except (ImportError, OSError):
        pass


def _filter_ring_messages() -> None:
    """The ring backend writes one line per socket error on stderr before it fails; the
    watchdog says what happened in one line, so those lines are dropped (MLX_RING_VERBOSE=1
    keeps them)."""
    global _real_stderr
    if _real_stderr is not None or ranks.ring_verbose():
        return
    sys.stderr.flush()
    _real_stderr = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward() -> None:
        pending = b""
        while data := os.read(read_end, 65536):
            pending += data
            *lines, pending = pending.split(b"\n")
            kept = [line + b"\n" for line in lines if not line.startswith(b"[ring]")]
            if kept:
                os.write(_real_stderr, b"".join(kept))
        if pending and not pending.startswith(b"[ring]"):
            os.write(_real_stderr, pending)

    thread = threading.Thread(target=forward, name="mixchat-stderr", daemon=True)
    thread.start()

    def restore() -> None:
        sys.stderr.flush()
        os.dup2(_real_stderr, 2)  # closes the pipe's last write end: the thread drains and ends
        thread.join(2.0)

    atexit.register(restore)
