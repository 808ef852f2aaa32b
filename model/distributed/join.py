"""Joining the ranks: the group and the control channel to rank 0 (a lost rank or network
ends the process in one line: fatal.py)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from .. import ranks
from .control import PING_SECONDS, TIMEOUT, Control
from .errors import DistributedError
from .fatal import fatal, filter_ring_messages, save_terminal, set_rank

MODES = ("expert", "pipeline")  # how several ranks split a model (MIXCHAT_PARALLEL)


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


def world(mode: str | None = None) -> World:
    """This process's place among the ranks (size 1 unless launched as several), joined once:
    the group is initialised and the control channel to rank 0 connected. `mode` (how the
    model is split: MIXCHAT_PARALLEL, read by app/settings.py; None: "expert") counts at the
    first call, which joins; later calls return the same World."""
    global _world
    with _world_lock:
        if _world is None:
            mode = mode or MODES[0]
            _world = _join(mode) if ranks.launched() else World(mode=mode)
        return _world


def _join(mode: str) -> World:
    timeout = TIMEOUT
    if mode not in MODES:
        raise DistributedError(
            f"MIXCHAT_PARALLEL={mode!r}: expected one of {', '.join(MODES)}"
        )
    save_terminal()
    filter_ring_messages()
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
    set_rank(rank)
    if size == 1:
        guard.cancel()
        return World(0, 1, None, None, mode)
    try:
        control = Control.connect(group, rank, size, timeout)
    finally:
        guard.cancel()
    return World(rank, size, group, control, mode)


def after_failure(error: BaseException) -> None:
    """An exception escaped on a rank of several: if a collective failed because a rank or the
    network went away, the watchdog is about to say so in one line and exit; let it. Another
    failure comes back to the caller."""
    if _world is None or _world.size == 1 or "[ring]" not in str(error):
        return
    time.sleep(3 * PING_SECONDS)
    fatal(f"lost the connection to another rank ({str(error).removeprefix('[ring] ')})")
