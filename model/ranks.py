"""MLX's launch variables (MLX_*), the one place they are read: whether this process was
started as one rank of several (mlx.launch, or by hand), and what the launcher says about it.
mixchat's own variables are read by app/settings.py (only). No MLX import: the
CLI asks before anything heavy loads; model/distributed/ does the rest."""

from __future__ import annotations

import os

# Set by mlx.launch, or by hand: the ring backend (MLX_HOSTFILE), JACCL, MPI, NCCL.
LAUNCH_ENV = ("MLX_HOSTFILE", "MLX_JACCL_COORDINATOR", "OMPI_COMM_WORLD_SIZE", "MLX_WORLD_SIZE")


def launched() -> bool:
    """Whether this process was started as one rank of several (mlx.launch or by hand)."""
    return any(os.environ.get(name) for name in LAUNCH_ENV)


def rank_hint() -> int:
    """This process's rank as the launcher set it (0 when unset or unreadable)."""
    try:
        return int(os.environ.get("MLX_RANK") or 0)
    except ValueError:
        return 0


def hostfile() -> str | None:
    """The ring backend's hostfile (a list of ["ip:port", ...] per rank), if any."""
    return os.environ.get("MLX_HOSTFILE") or None


def jaccl_coordinator() -> str | None:
    """JACCL's coordinator address ("ip:port"), if any."""
    return os.environ.get("MLX_JACCL_COORDINATOR") or None


def ring_verbose() -> bool:
    """MLX_RING_VERBOSE: the ring backend's own messages are wanted."""
    return bool(os.environ.get("MLX_RING_VERBOSE"))


def become_rank(rank: int, hostfile: str) -> None:
    """Set this process's launch variables (`--hosts`: rank 0 of the ranks it starts), before
    `model.distributed.world()` joins."""
    os.environ["MLX_RANK"] = str(rank)
    os.environ["MLX_HOSTFILE"] = hostfile
