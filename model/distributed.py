"""One model across several machines: expert parallelism over MLX's distributed engine.

Started under `mlx.launch` (or with MLX_RANK and MLX_HOSTFILE set by hand), `world()` joins the
group. Then:

- every rank holds the attention, embeddings, norms and routers (replicated) and the experts
  [r*E/n, (r+1)*E/n) of every MoE layer, read with one positioned read per tensor from the
  safetensors file (`take_share`): the other experts are never read;
- each MoE layer computes, per token, the router-weighted outputs of the chosen experts this
  rank holds (zero for the others) and ends with one `all_sum` over the ranks (`ExpertShard`).
  With top-2 routing the one-process model adds two weighted expert outputs; here they are
  a + 0 and 0 + b on two ranks (or a + b and 0 + 0), summed once: the same float, so greedy
  tokens are identical to one process;
- rank 0 owns the terminal. It sends each request (a reply to stream, a reset) to the other
  ranks over a small TCP control channel; they run the same reply and print nothing. Whether
  to stop a reply early (a cancel) is agreed each token with a one-value all_sum;
- a watchdog: every rank pings the other end of its control connection each second. A closed
  connection (a rank died) or `TIMEOUT` seconds of silence (a network failure)
  makes rank 0 print one line and exit 1 and every other rank exit, never a hang.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import queue
import secrets
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from . import ranks
from .errors import CheckpointError, MixchatError
from .experts import SORTED_MIN_ROWS
from .ranks import launched
from .safetensors_header import read_safetensors_header
from .sizes import format_bytes

TIMEOUT = 20.0  # seconds of silence on a control connection before giving up
PING_SECONDS = 1.0
EXPERT_MARK = ".block_sparse_moe.switch_mlp."
PER_EXPERT_MARK = ".block_sparse_moe.experts."
_NP_DTYPES = {"U32": np.uint32, "I32": np.int32, "U8": np.uint8, "I8": np.int8,
              "F32": np.float32, "F16": np.float16, "BF16": np.uint16}  # fmt: skip


class DistributedError(MixchatError):
    pass


class RankMismatch(DistributedError):
    """The ranks loaded different models or settings (every rank finds out at once)."""


# --- the world ---------------------------------------------------------------------------------


@dataclass
class World:
    rank: int = 0
    size: int = 1
    group: Any = None  # mx.distributed.Group when size > 1
    control: Control | None = None

    @property
    def leader(self) -> bool:
        return self.rank == 0


_world: World | None = None
_world_lock = threading.Lock()


def world() -> World:
    """This process's place among the ranks (size 1 unless launched as several), joined once:
    the group is initialised and the control channel to rank 0 connected."""
    global _world
    with _world_lock:
        if _world is None:
            _world = _join() if launched() else World()
        return _world


def _join() -> World:
    timeout = TIMEOUT
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
        return World(0, 1, None)
    try:
        control = Control.connect(group, rank, size, timeout)
    finally:
        guard.cancel()
    return World(rank, size, group, control)


def fatal(message: str) -> None:
    """One line on the terminal, then exit at once (never waiting on a collective that will
    not complete). Called from watchdog threads: the main thread may be blocked in MLX."""
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


# --- the control channel ------------------------------------------------------------------------


def _leader_host() -> str:
    """The address rank 0 is reached at: JACCL's coordinator, or its first ring address."""
    if coordinator := ranks.jaccl_coordinator():
        return coordinator.rsplit(":", 1)[0]
    hostfile = ranks.hostfile()
    if hostfile:
        try:
            hosts = json.loads(Path(hostfile).read_text())
            return str(hosts[0][0]).rsplit(":", 1)[0]
        except (OSError, ValueError, IndexError, KeyError, TypeError):
            raise DistributedError(f"cannot read rank 0's address from {hostfile}") from None
    raise DistributedError(
        "cannot tell rank 0's address: start the ranks with the ring backend or JACCL"
    )


class Control:
    """Rank 0's connection to every other rank (or a rank's to rank 0): JSON lines, with a
    ping each second both ways; silence or a closed connection is fatal (see `fatal`)."""

    def __init__(self, rank: int, peers: dict[int, socket.socket], timeout: float):
        self.rank = rank
        self.peers = peers  # rank -> socket (rank 0: all others; others: {0: rank 0})
        self.timeout = timeout
        self.requests: queue.Queue = queue.Queue()
        self.closing = False
        self.departed: set[int] = set()  # ranks that said they are done
        self._send_lock = threading.Lock()
        for peer, sock in peers.items():
            sock.settimeout(timeout)
            threading.Thread(target=self._read, args=(peer, sock), daemon=True,
                             name=f"mixchat-control-{peer}").start()  # fmt: skip
        threading.Thread(target=self._ping, daemon=True, name="mixchat-ping").start()
        atexit.register(self.close)

    @classmethod
    def connect(cls, group, rank: int, size: int, timeout: float) -> Control:
        """Rank 0 listens on an ephemeral port and tells the others through one all_sum."""
        listener = None
        port = 0
        if rank == 0:
            host = _leader_host()
            listener = socket.create_server((host, 0))
            listener.settimeout(max(60.0, 3 * timeout))
            port = listener.getsockname()[1]
        ports = mx.distributed.all_sum(mx.array([port], dtype=mx.int32), group=group)
        port = int(ports.item())
        if rank == 0:
            assert listener is not None
            peers: dict[int, socket.socket] = {}
            try:
                while len(peers) < size - 1:
                    sock, _ = listener.accept()
                    sock.settimeout(timeout)
                    hello = b""
                    while not hello.endswith(b"\n"):  # byte by byte: pings follow at once
                        byte = sock.recv(1)
                        if not byte or len(hello) > 16:
                            raise ValueError("no hello")
                        hello += byte
                    peers[int(hello)] = sock
            except (OSError, ValueError):
                raise DistributedError(
                    f"{size - 1 - len(peers)} rank(s) did not connect to rank 0's control port"
                ) from None
            finally:
                listener.close()
        else:
            try:
                sock = socket.create_connection((_leader_host(), port), timeout=timeout)
                sock.sendall(f"{rank}\n".encode())
            except OSError as e:
                raise DistributedError(f"cannot reach rank 0's control port: {e}") from None
            peers = {0: sock}
        return cls(rank, peers, timeout)

    def send(self, message: dict) -> None:
        data = (json.dumps(message) + "\n").encode()
        with self._send_lock:
            for peer, sock in self.peers.items():
                if peer in self.departed:
                    continue
                try:
                    sock.sendall(data)
                except OSError:
                    if not self.closing:
                        self._lost(peer, "its connection was closed")

    def _ping(self) -> None:
        while not self.closing:
            self.send({"op": "ping"})
            time.sleep(PING_SECONDS)

    def _read(self, peer: int, sock: socket.socket) -> None:
        buffer = b""
        while True:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                self._lost(peer, f"no word from it in {self.timeout:.0f} s (network down?)")
                return
            except OSError:
                data = b""
            if not data:
                if not self.closing:
                    self._lost(peer, "its connection was closed (the process died?)")
                return
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                try:
                    message = json.loads(line)
                    message["op"]
                except (ValueError, TypeError, KeyError):
                    self._lost(peer, "it sent something that is not mixchat's protocol")
                    return
                if message["op"] == "bye":  # that end is done (rank 0: every rank ends too)
                    self.departed.add(peer)
                    if self.rank != 0:
                        self.closing = True
                        self.requests.put(message)
                    return
                if message["op"] == "error" and self.rank == 0:  # a follower failed
                    self.closing = True
                    fatal(f"rank {peer}: {message['message']}")
                if message["op"] != "ping":
                    self.requests.put(message)

    def _lost(self, peer: int, why: str) -> None:
        if self.closing or peer in self.departed:
            return
        if self.rank == 0:
            fatal(f"rank {peer} stopped responding: {why}")
        fatal(f"lost rank 0: {why}")

    def close(self) -> None:
        """Say this end is done (rank 0: the others exit) and stop the watchdog."""
        if self.closing:
            return
        self.send({"op": "bye"})
        self.closing = True
        for sock in self.peers.values():
            try:
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            except OSError:
                pass


# --- expert parallelism -------------------------------------------------------------------------


def expert_range(num_experts: int, rank: int, size: int) -> tuple[int, int]:
    """Experts [lo, hi) of every MoE layer that `rank` of `size` holds."""
    return num_experts * rank // size, num_experts * (rank + 1) // size


class ExpertShard:
    """This rank's experts [lo, hi) of one MoE layer, and the group the outputs are summed over.
    Set on `mixtral.SparseMoE.shard`, which hands it the layer's experts and routing."""

    def __init__(self, lo: int, hi: int, group: Any):
        self.lo, self.hi, self.group = lo, hi, group

    def __call__(self, experts, x: mx.array, inds: mx.array, weights: mx.array) -> mx.array:
        """x [N, hidden], the router's global expert ids and weights [N, k] -> [N, hidden]: the
        router-weighted sum of every token's chosen experts, over all ranks.

        Each rank adds the weighted outputs of the chosen experts it holds (a choice held
        elsewhere counts zero), then one all_sum adds the ranks' sums: the one-process sum of
        k = 2 terms, a + b, becomes (a + 0) + (0 + b) or (a + b) + 0, the same float. Decoding
        (fewer rows than the sorted path takes), the router's choices are read back (one sync
        per layer) and only the slots holding a local expert for some token are computed, so
        a rank reads none of the experts it was not asked for. Longer prompts go through the
        sorted path with the other ranks' choices pointed at a local expert and masked."""
        N, k = inds.shape
        held = (inds >= self.lo) & (inds < self.hi)
        local = inds - self.lo
        fallback = mx.max(mx.where(held, local, 0), axis=-1, keepdims=True)
        local = mx.where(held, local, fallback).astype(inds.dtype)
        if N * k < SORTED_MIN_ROWS:
            slots = [j for j in range(k) if np.asarray(held[:, j]).any()]
            if not slots:
                y = mx.zeros((N, x.shape[-1]), dtype=x.dtype)
                return mx.distributed.all_sum(y, group=self.group)
            cols = mx.array(slots)
            local, weights, held = local[:, cols], weights[:, cols], held[:, cols]
        y = experts(x, local) * weights[..., None]  # [N, slots, hidden]
        y = mx.where(held[..., None], y, mx.zeros_like(y)).sum(axis=-2)
        return mx.distributed.all_sum(y, group=self.group)


def take_share(checkpoint, weights: dict[str, mx.array], model, world: World,
               settings: str = "") -> dict:  # fmt: skip
    """Replace the expert tensors of `weights` (lazy, as `weights.read_weights` returns them) by
    this rank's share, read from disk with one positioned read each; shrink `model`'s expert
    layers to that share and give each MoE layer its `ExpertShard`. `settings` (what changes
    the numbers: dtype, KV cache bits) must be the same on every rank, as must the model."""
    args = checkpoint.args
    if not args.is_moe:
        raise DistributedError(
            f"{checkpoint.path.name} is a dense model: several ranks split a Mixture-of-Experts "
            "model's experts; run it on one machine"
        )
    if checkpoint.format != "hf":
        raise DistributedError(
            "several ranks need a safetensors checkpoint (a GGUF file is read whole): convert "
            f"it with `mixchat quantize {checkpoint.path} DIR`"
        )
    E = args.num_local_experts
    if world.size > E:
        raise DistributedError(f"{world.size} ranks for {E} experts per layer: use at most {E}")
    check_same_everywhere(f"{args}|{checkpoint.size_bytes}|{settings}", world)
    lo, hi = expert_range(E, world.rank, world.size)
    share = {k: v for k, v in weights.items() if EXPERT_MARK not in k and PER_EXPERT_MARK not in k}
    share.update(_stack_per_expert(weights, lo, hi))  # Hugging Face layout: lazily, local only
    for file in checkpoint.files:
        specs = {k: s for k, s in read_safetensors_header(file).items() if EXPERT_MARK in k}
        if specs:
            share.update(read_expert_blocks(file, specs, lo, hi))
    for layer in model.layers:
        moe = layer.block_sparse_moe
        for proj in ("gate_proj", "up_proj", "down_proj"):
            linear = moe.switch_mlp[proj]
            linear.weight = linear.weight[lo:hi]  # the unread init values: shapes only
        moe.shard = ExpertShard(lo, hi, world.group)
    return share


def check_same_everywhere(text: str, world: World) -> None:
    """Raise (on every rank) unless every rank passes the same `text`: ranks with different
    models or settings would add up wrong numbers."""
    digest = np.frombuffer(hashlib.sha256(text.encode()).digest()[:8], np.int32)  # 2 values
    rows = np.zeros((world.size, 2), np.int32)
    rows[world.rank] = digest
    everyone = np.array(mx.distributed.all_sum(mx.array(rows), group=world.group))
    differ = [r for r in range(world.size) if not np.array_equal(everyone[r], everyone[0])]
    if differ:
        raise RankMismatch(
            f"rank {differ[0]} loaded another model or other settings than rank 0 (dtype, "
            "--kv-bits): start every rank with the same command"
        )


def _stack_per_expert(weights: dict[str, mx.array], lo: int, hi: int) -> dict[str, mx.array]:
    """`experts.{e}.w1.weight` tensors (one per expert) of experts [lo, hi), stacked under
    mlx-lm's `switch_mlp` names; the others are dropped unread (mx.load is lazy per tensor)."""
    names = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    groups: dict[str, dict[int, mx.array]] = {}
    for key, value in weights.items():
        if PER_EXPERT_MARK not in key:
            continue
        prefix, rest = key.split(PER_EXPERT_MARK)
        expert, hf_name, part = rest.split(".", 2)
        if lo <= int(expert) < hi:
            name = f"{prefix}{EXPERT_MARK}{names.get(hf_name, hf_name)}.{part}"
            groups.setdefault(name, {})[int(expert)] = value
    out = {}
    for name, experts in groups.items():
        if sorted(experts) != list(range(lo, hi)):
            missing = min(set(range(lo, hi)) - set(experts))
            raise CheckpointError(f"checkpoint lacks expert {missing} of {name}")
        out[name] = mx.stack([experts[e] for e in range(lo, hi)])
    return out


def read_expert_blocks(file: Path, specs: dict, lo: int, hi: int) -> dict[str, mx.array]:
    """Experts [lo, hi) of stacked [E, ...] tensors: one contiguous byte range each (expert e
    starts at offset + e * nbytes / E), read with one positioned read into numpy. Floating
    tensors keep their stored dtype (the loader converts them as it does whole tensors)."""
    out = {}
    fd = os.open(file, os.O_RDONLY)
    try:
        for name, spec in specs.items():
            if spec.dtype not in _NP_DTYPES:
                raise CheckpointError(f"tensor {name} has unsupported dtype {spec.dtype}")
            experts = spec.shape[0]
            if spec.nbytes % experts:
                raise CheckpointError(f"tensor {name} does not split into {experts} experts")
            stride = spec.nbytes // experts
            buf = np.empty((hi - lo) * stride, np.uint8)
            _pread_into(fd, buf, spec.offset + lo * stride, name)
            array = mx.array(buf.view(_NP_DTYPES[spec.dtype]).reshape(hi - lo, *spec.shape[1:]))
            out[name] = array.view(mx.bfloat16) if spec.dtype == "BF16" else array
    finally:
        os.close(fd)
    return out


def _pread_into(fd: int, buf: np.ndarray, offset: int, name: str) -> None:
    done = 0
    while done < buf.nbytes:
        if hasattr(os, "preadv"):
            n = os.preadv(fd, [memoryview(buf[done:])], offset + done)
        else:  # older macOS Pythons: one extra copy
            data = os.pread(fd, buf.nbytes - done, offset + done)
            n = len(data)
            buf[done : done + n] = np.frombuffer(data, np.uint8)
        if n <= 0:
            raise CheckpointError(f"unexpected end of file reading the experts of {name}")
        done += n


def shard_of(model) -> ExpertShard | None:
    for layer in model.layers:
        shard = getattr(layer, "block_sparse_moe", None) and layer.block_sparse_moe.shard
        if shard is not None:
            return shard
    return None


def agree_stop(model, stop: bool) -> bool:
    """Whether any rank wants to stop the reply now (rank 0 on a cancel), agreed by all ranks
    at the same token; `stop` itself when the model is on one rank."""
    shard = shard_of(model)
    if shard is None:
        return stop
    total = mx.distributed.all_sum(mx.array([int(stop)], dtype=mx.int32), group=shard.group)
    return bool(total.item())


# --- rank 0 leads, the others follow --------------------------------------------------------------


class Leader:
    """Rank 0's side of the protocol: each request goes to the other ranks before rank 0 runs it."""

    def __init__(self, control: Control):
        self.control = control

    def start_stream(self, messages: list[dict], settings):
        """Send a reply request; a seed is fixed here so that sampling agrees on every rank."""
        from dataclasses import replace

        if settings.seed is None:
            settings = replace(settings, seed=secrets.randbits(31))
        self.control.send({"op": "stream", "messages": messages, "settings": asdict(settings)})
        return settings

    def reset(self) -> None:
        self.control.send({"op": "reset"})


def leader_of(model) -> Leader | None:
    """The Leader of an engine on rank 0 of several; None on one rank or on a follower."""
    if shard_of(model) is None:
        return None
    w = world()
    return Leader(w.control) if w.leader and w.control is not None else None


def follow(model: str | None, **engine_options) -> int:
    """A rank other than 0: load this rank's share (`Engine.load(model, **engine_options)`) and
    run rank 0's requests until it ends."""
    from .generate import Engine, GenerationSettings

    w = world()
    assert w.control is not None
    try:
        engine = Engine.load(model, **engine_options)
    except RankMismatch:  # rank 0 found out too, and says so itself
        w.control.close()
        raise
    except MixchatError as e:  # rank 0 says it, in one line
        w.control.send({"op": "error", "message": str(e)})
        w.control.close()
        raise
    while True:
        message = w.control.requests.get()
        if message["op"] == "bye":
            return 0
        if message["op"] == "reset":
            engine.reset()
        elif message["op"] == "stream":
            settings = GenerationSettings(**message["settings"])
            try:
                for _ in engine.stream(message["messages"], settings):
                    pass
            except MixchatError:  # rank 0 meets the same error and reports it
                pass


# --- sizes and speed across ranks (`mixchat info --hosts`) --------------------------------------


def read_hostfile(path: Path) -> list[str]:
    """Hosts of a hostfile: mlx.launch's ({"hosts": [{"ssh", "ips"}]} or a list of those) or
    the ring backend's (a list of ["ip:port", ...] per rank)."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise DistributedError(f"cannot read hostfile {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise DistributedError(f"hostfile {path} is not JSON: {e}") from None
    hosts = data.get("hosts") if isinstance(data, dict) else data
    names = []
    if isinstance(hosts, list):
        for h in hosts:
            if isinstance(h, dict) and isinstance(h.get("ssh"), str):
                names.append(h["ssh"])
            elif isinstance(h, list) and h and all(isinstance(a, str) for a in h):
                names.append(h[0].rsplit(":", 1)[0])
            else:
                names = []
                break
    if len(names) < 1:
        raise DistributedError(
            f'hostfile {path}: expected a list of hosts ({{"ssh": ..., "ips": [...]}} as '
            'mlx.launch reads, or ["ip:port"] per rank as the ring backend reads)'
        )
    return names


# Links a ring can run over: (name, bytes/s, seconds per all_sum of a few KB). Assumed typical
# figures, not measurements (README "Several Macs" says where they come from).
LINKS = (
    ("10 Gb/s Ethernet", 1.25e9, 100e-6),
    ("Thunderbolt 4 (ring over TCP)", 2.5e9, 50e-6),
)


@dataclass
class RankPlan:
    ranks: int
    experts_per_rank: int  # of each layer, the most any rank holds
    resident_bytes: int  # replicated weights (attention, embeddings, routers, norms)
    expert_bytes: int  # this share of the experts, the largest rank's
    reserve_bytes: int  # KV cache for the whole context + prefill activations
    allsum_bytes_per_token: int  # bytes each rank sends per decoded token (ring all-reduce)
    allsums_per_token: int

    @property
    def rank_bytes(self) -> int:
        return self.resident_bytes + self.expert_bytes + self.reserve_bytes

    def network_seconds(self, bandwidth: float, latency: float) -> float:
        return self.allsum_bytes_per_token / bandwidth + self.allsums_per_token * latency


def rank_plan(plan, args, ranks: int, compute_bytes: int) -> RankPlan:
    """Per-rank memory and per-token traffic of `plan` (a memory_plan.MemoryPlan) over `ranks`."""
    E = max(plan.num_experts, 1)
    per_rank = max(hi - lo for lo, hi in (expert_range(E, r, ranks) for r in range(ranks)))
    # Each MoE layer sums one [hidden] vector per token; a ring all-reduce sends 2(n-1)/n of
    # it from each rank. One more one-value all_sum per token agrees on stopping.
    vector = args.hidden_size * compute_bytes
    per_layer = 2 * (ranks - 1) * vector // ranks if ranks > 1 else 0
    return RankPlan(
        ranks=ranks,
        experts_per_rank=per_rank,
        resident_bytes=plan.resident_bytes,
        expert_bytes=plan.total_expert_bytes * per_rank // E,
        reserve_bytes=plan.kv_bytes + plan.full_activation_bytes,
        allsum_bytes_per_token=plan.moe_layers * per_layer + (4 if ranks > 1 else 0),
        allsums_per_token=plan.moe_layers + 1 if ranks > 1 else 0,
    )


def critical_experts(num_experts: int, top_k: int, ranks: int) -> float:
    """Expected experts per MoE layer the busiest rank applies for one token, the k chosen
    uniformly among E (1.43 for top-2 of 8 on 2 ranks; k on one rank)."""
    from itertools import combinations

    E = max(num_experts, 1)
    owner = [next(r for r in range(ranks) if e < expert_range(E, r, ranks)[1]) for e in range(E)]
    choices = list(combinations(range(E), min(top_k, E)))
    if len(choices) > 200_000:  # many experts: sample the choices instead
        rng = np.random.default_rng(0)
        choices = [tuple(rng.choice(E, top_k, replace=False)) for _ in range(20_000)]
    total = 0
    for chosen in choices:
        total += np.bincount([owner[e] for e in chosen], minlength=ranks).max()
    return float(total / len(choices))


def hosts_report(checkpoint, compute_bytes: int, hostfile: str | Path) -> tuple[list, dict]:
    """`mixchat info --hosts`: (rows, JSON dict) of memory per rank, network traffic per token
    and tok/s bounds, with this machine's memory bandwidth standing for every host's."""
    from . import registry
    from .machine import CACHE_FILE, MeasurementCache, memory_bandwidth
    from .memory_plan import memory_plan

    hosts = read_hostfile(Path(hostfile))
    args = checkpoint.args
    if not args.is_moe:
        raise DistributedError(
            f"{checkpoint.path.name} is a dense model: several ranks split a Mixture-of-Experts "
            "model's experts; run it on one machine"
        )
    memory_bw = memory_bandwidth(
        MeasurementCache(registry.data_dir() / CACHE_FILE)
    ).bytes_per_second
    plan = memory_plan(checkpoint, compute_bytes)
    rp = rank_plan(plan, args, len(hosts), compute_bytes)
    # Per decoded token every rank reads its replicated weights and the chosen experts it
    # holds (ExpertShard skips the others); each layer waits for the rank holding the most.
    experts_read = critical_experts(plan.num_experts, plan.top_k, len(hosts))
    mem_bytes = plan.resident_active_bytes + int(plan.moe_layers * experts_read * plan.expert_bytes)
    compute_s = mem_bytes / memory_bw
    rows = [
        (
            "hosts",
            f"{len(hosts)} ranks ({', '.join(hosts)}), {rp.experts_per_rank} of "
            f"{plan.num_experts} experts per layer on each",
        ),
        (
            "per rank",
            f"{format_bytes(rp.rank_bytes)} ({format_bytes(rp.resident_bytes)} "
            f"replicated + {format_bytes(rp.expert_bytes)} experts + "
            f"{format_bytes(rp.reserve_bytes)} KV cache and buffers)",
        ),
        (
            "network",
            f"{format_bytes(rp.allsum_bytes_per_token)} sent by each rank per token, "
            f"in {rp.allsums_per_token} all_sums",
        ),
        (
            "memory bound",
            f"{1 / compute_s:.1f} tok/s at {memory_bw / 1e9:.0f} GB/s ({format_bytes(mem_bytes)} "
            f"read per token by the busiest rank: {experts_read:.2f} experts per layer, "
            "routing taken as uniform)",
        ),
    ]
    links = {}
    for name, bandwidth, latency in LINKS:
        net = rp.network_seconds(bandwidth, latency)
        tps = 1 / (compute_s + net)
        links[name] = {"network_seconds_per_token": net, "tps": tps}
        rows.append((
            "predicted", f"{tps:.1f} tok/s over {name} ({net * 1e3:.2f} ms network per token, "
                         f"assuming {latency * 1e6:.0f} µs per all_sum)",
        ))  # fmt: skip
    data = asdict(rp) | {"hosts": hosts, "rank_bytes": rp.rank_bytes,
                         "memory_bandwidth": memory_bw, "memory_bound_tps": 1 / compute_s,
                         "critical_experts_per_layer": experts_read,
                         "links": links}  # fmt: skip
    return rows, data


def rank_memory(checkpoint, compute_bytes: int, requested: int | str | None,
                max_context: int | None, kv_bits: int | None, world_: World):  # fmt: skip
    """The memory decision of one rank of several (`memory_plan.decide`'s counterpart): the
    plan counts this rank's share of the experts, and the budget (`--memory-budget`, else what
    this machine has available) applies to it. Experts never stream from disk on a rank: a
    share that does not fit is refused in one line."""
    from dataclasses import replace

    from .memory_plan import (
        CONTEXT_STEPS,
        BudgetError,
        MemoryDecision,
        _room,
        auto_budget,
        memory_plan,
        with_context,
    )

    args = checkpoint.args
    full_context = min(max_context or args.context_length, args.context_length)
    whole = memory_plan(checkpoint, compute_bytes, full_context, kv_bits)
    E = max(whole.num_experts, 1)
    lo, hi = expert_range(E, world_.rank, world_.size)
    plan = replace(
        whole,
        total_expert_bytes=whole.total_expert_bytes * (hi - lo) // E,
        total_expert_disk_bytes=whole.total_expert_disk_bytes * (hi - lo) // E,
        offloadable=False,
        why_not="experts do not stream from disk with several ranks",
    )
    if requested == "none":
        return MemoryDecision(plan, None, False, full_context)
    if requested is None:
        budget, source = _room(), "what this machine has available"
    elif requested == "auto":
        budget, why = auto_budget()
        source = f"the automatic budget ({why})"
    else:
        budget, source = int(requested), "its --memory-budget"
    if plan.full_bytes <= budget:
        return MemoryDecision(plan, None, False, full_context)
    if max_context is None:  # a shorter context may be all it takes
        for context in CONTEXT_STEPS:
            p = with_context(plan, min(context, full_context), args, compute_bytes)
            if p.full_bytes <= budget:
                notice = f"context {p.context:,} tokens: what fits this rank's memory"
                return MemoryDecision(p, None, False, p.context, notice)
    raise BudgetError(
        f"rank {world_.rank}'s share of {checkpoint.path.name} ({hi - lo} of {E} experts per "
        f"layer) needs {format_bytes(plan.full_bytes)}, over {source} ({format_bytes(budget)}): "
        "use more ranks, fewer expert bits or a shorter --max-context"
    )
