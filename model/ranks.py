"""Whether this process was started as one rank of several: environment only, no MLX import
(the CLI asks before anything heavy loads; model/distributed.py does the rest)."""

from __future__ import annotations

import os

# Set by mlx.launch, or by hand: the ring backend (MLX_HOSTFILE), JACCL, MPI, NCCL.
LAUNCH_ENV = ("MLX_HOSTFILE", "MLX_JACCL_COORDINATOR", "OMPI_COMM_WORLD_SIZE", "MLX_WORLD_SIZE")


def launched() -> bool:
    """Whether this process was started as one rank of several (mlx.launch or by hand)."""
    return any(os.environ.get(name) for name in LAUNCH_ENV)
