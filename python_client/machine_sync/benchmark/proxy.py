"""A TCP proxy on loopback that adds latency and counts round trips.

The production service talks to a remote database, where every round trip
costs a network RTT. Putting this proxy between the client and the server
adds ``rtt / 2`` in each direction, for every byte, while keeping order.

Why threads and not asyncio: the event loop's timers wait in whole
milliseconds (epoll), which would turn a 1 ms RTT into 2 ms or more;
``time.sleep`` waits to a few tens of microseconds. The benchmark runs at most
a few dozen proxied connections, so two threads per direction are cheap.

Why not ``tc netem`` in a network namespace: it needs root and the client to
run inside the namespace; the proxy works for any user and any server,
including a remote one given by DSN.

A *flight* is a burst of bytes from the client after the server last spoke
(or at the start): one request/response exchange. Flights divided by state
changes is the measured number of round trips per state change.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from types import TracebackType

_CHUNK = 65536


class DelayProxy:
    """Forward 127.0.0.1:<port> to ``target`` with ``rtt_ms / 2`` added each way."""

    def __init__(self, target: tuple[str, int] | str, rtt_ms: float) -> None:
        """``target`` is (host, port) for TCP or a path for a Unix socket."""
        self._target = target
        self._one_way = rtt_ms / 2000.0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._flights = 0
        self._sockets: list[socket.socket] = []
        self._closed = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)

    @property
    def flights(self) -> int:
        """Client-to-server flights so far, over all connections."""
        with self._lock:
            return self._flights

    def __enter__(self) -> DelayProxy:
        self._acceptor.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop accepting and cut every proxied connection."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _connect_upstream(self) -> socket.socket:
        if isinstance(self._target, str):
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(self._target)
            return upstream
        upstream = socket.create_connection(self._target)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return upstream

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                upstream = self._connect_upstream()
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            # Which side spoke last, shared by the two directions of one connection.
            last = ["server"]
            for source, sink, side in ((client, upstream, "client"), (upstream, client, "server")):
                pending: queue.Queue[tuple[float, bytes]] = queue.Queue()
                threading.Thread(
                    target=self._read, args=(source, pending, side, last), daemon=True
                ).start()
                threading.Thread(target=self._write, args=(sink, pending), daemon=True).start()

    def _read(
        self,
        source: socket.socket,
        pending: queue.Queue[tuple[float, bytes]],
        side: str,
        last: list[str],
    ) -> None:
        while True:
            try:
                data = source.recv(_CHUNK)
            except OSError:
                data = b""
            due = time.perf_counter() + self._one_way
            if data and side == "client" and last[0] != "client":
                with self._lock:
                    self._flights += 1
            last[0] = side
            pending.put((due, data))
            if not data:
                return

    @staticmethod
    def _write(sink: socket.socket, pending: queue.Queue[tuple[float, bytes]]) -> None:
        while True:
            due, data = pending.get()
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            try:
                if not data:
                    sink.shutdown(socket.SHUT_WR)
                    return
                sink.sendall(data)
            except OSError:
                return
