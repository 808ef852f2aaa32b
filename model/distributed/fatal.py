"""The one-line exit of a rank when another rank or the network goes away, and the terminal
state it restores first (rank 0 may be running a full-screen UI)."""

from __future__ import annotations

import atexit
import os
import sys
import threading

from .. import ranks

_fatal_lock = threading.Lock()
_rank: int | None = None  # this process's rank once joined (before: the launcher's hint)
_real_stderr: int | None = None  # the terminal's stderr while ring messages are filtered
_saved_tty: list | None = None  # the terminal's modes before any UI changed them (rank 0)


def set_rank(rank: int) -> None:
    """Name this rank in fatal()'s line (called once the group is joined)."""
    global _rank
    _rank = rank


def fatal(message: str) -> None:
    """One line on the terminal, then exit at once (never waiting on a collective that will
    not complete). Called from watchdog threads: the main thread may be blocked in MLX."""
    _fatal_lock.acquire()  # one line, from the first thread to get here (never released)
    rank = _rank if _rank is not None else ranks.rank_hint()
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


def save_terminal() -> None:
    """Keep the terminal's modes, for fatal() to restore them under a UI."""
    global _saved_tty
    try:
        import termios

        if os.isatty(0) and os.isatty(1):
            _saved_tty = termios.tcgetattr(0)
    except (ImportError, OSError):
        pass


def filter_ring_messages() -> None:
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
