"""One model across several machines over MLX's distributed engine.

Started under `mlx.launch` (or with MLX_RANK and MLX_HOSTFILE set by hand), the app calls
`rank_split(mode)` (split.py): `world()` joins the group (join.py) and connects the control
channel to rank 0 (control.py), and the split goes to the loader (`model.load(...,
split=...)`). The model is split in one of two ways (`mode`: MIXCHAT_PARALLEL, read by
app/settings.py, the same on every rank):

- expert parallelism (`expert`, the default; shard.py): every rank holds the attention,
  embeddings, norms and routers (replicated) and the experts [r*E/n, (r+1)*E/n) of every MoE
  layer, read with one positioned read per tensor from the safetensors file: the other experts
  are never read. Each MoE layer computes the router-weighted outputs of the chosen experts
  this rank holds (zero for the others) and ends with one `all_sum` over the ranks. With top-2
  routing the one-process model adds two weighted expert outputs; here they are a + 0 and
  0 + b on two ranks (or a + b and 0 + 0), summed once: the same float, so greedy tokens are
  identical to one process;
- pipeline parallelism (`pipeline`; pipeline.py): rank r holds a contiguous block of layers
  (with all their experts), the first rank the embeddings, the last the final norm and LM
  head. Hidden states go from rank to rank with send/recv; the last rank samples and one
  all_sum gives every rank the token.

Either way rank 0 owns the terminal (lead.py): it sends each request (a reply to stream, a
reset) to the other ranks over the control channel; they run the same reply and print
nothing (their loop: app/follower.py). Whether to stop a reply early (a cancel) is agreed each
token with a one-value all_sum (the engine does, in the group it is given). A watchdog: every
rank pings the other end of its control connection each second; a closed connection (a rank
died) or `TIMEOUT` seconds of silence (a network failure) makes rank 0 print one line and
exit 1 and every other rank exit, never a hang (fatal.py). hosts.py has the arithmetic:
hostfiles, `mixchat info --hosts`, and one rank's memory decision.
"""

from ..ranks import launched
from .control import TIMEOUT, Control
from .errors import DistributedError, RankMismatch
from .fatal import fatal
from .hosts import (
    LINKS,
    RankPlan,
    critical_experts,
    hosts_report,
    rank_memory,
    rank_plan,
    read_hostfile,
)
from .join import MODES, World, after_failure, world
from .lead import Leader
from .pipeline import PipelineStage, layer_range, take_layers
from .shard import (
    ExpertShard,
    check_same_everywhere,
    expert_range,
    read_expert_blocks,
    take_share,
)
from .split import RankSplit, rank_split, shard_of

__all__ = [
    "LINKS", "MODES", "TIMEOUT", "Control", "DistributedError", "ExpertShard", "Leader",
    "PipelineStage", "RankMismatch", "RankPlan", "RankSplit", "World", "after_failure",
    "check_same_everywhere", "critical_experts", "expert_range", "fatal", "hosts_report",
    "launched", "layer_range", "rank_memory", "rank_plan", "rank_split", "read_expert_blocks",
    "read_hostfile", "shard_of", "take_layers", "take_share", "world",
]  # fmt: skip
