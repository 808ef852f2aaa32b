"""The control channel: rank 0's TCP connection to every other rank (JSON lines), with a
watchdog that turns silence or a closed connection into one line and an exit."""

from __future__ import annotations

import atexit
import json
import queue
import socket
import threading
import time
from pathlib import Path

import mlx.core as mx

from .. import ranks
from .errors import DistributedError
from .fatal import fatal

TIMEOUT = 20.0  # seconds of silence on a control connection before giving up
PING_SECONDS = 1.0
CLOSE_WAIT = 2.0  # seconds a closing end waits for the other to close its end


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
        self._readers = []
        for peer, sock in peers.items():
            sock.settimeout(timeout)
            reader = threading.Thread(target=self._read, args=(peer, sock), daemon=True,
                                      name=f"mixchat-control-{peer}")  # fmt: skip
            reader.start()
            self._readers.append(reader)
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
        self.closing = True
        self.send({"op": "bye"})
        # Half-close, then read until the other end closes too (at most CLOSE_WAIT seconds): a
        # socket closed with unread data (a ping in flight) resets the connection, and a reset
        # can reach the other end before the bye does.
        for sock in self.peers.values():
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        deadline = time.monotonic() + CLOSE_WAIT
        for reader in self._readers:
            if reader is not threading.current_thread():
                reader.join(max(0.0, deadline - time.monotonic()))
        for sock in self.peers.values():
            try:
                sock.close()
            except OSError:
                pass
