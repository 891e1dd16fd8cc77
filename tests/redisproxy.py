"""A loopback TCP proxy in front of the real redis-server that cuts a connection after forwarding a
chosen request, before Redis's reply reaches the client: Redis has applied it, the client never
hears so. What a restart, a failover or a network cut at that moment does, which no server can be
made to show on cue.

    with ReplyCutter(redis_server.port, when=lambda sent: b"EXEC" in sent and b"RPUSH" in sent) as cut:
        connection = Redis.from_url(cut.url)
"""
from __future__ import annotations

import socket
import threading
import time
from typing import Callable


class ReplyCutter:
    """Forwards every connection to 127.0.0.1:`upstream_port`; the first chunk a client sends that
    `when` matches is forwarded, then both sides are closed and Redis's reply dropped (once)."""

    def __init__(self, upstream_port: int, when: Callable[[bytes], bool]) -> None:
        self.upstream_port, self.when = upstream_port, when
        self.fired = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._open: list[socket.socket] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self._listener.getsockname()[1]}/0"

    def __enter__(self) -> "ReplyCutter":
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        for sock in [self._listener, *self._open]:
            _close(sock)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self._open += [client, upstream]
            muted = threading.Event()  # set: no reply on this connection reaches the client
            threading.Thread(target=self._requests, args=(client, upstream, muted), daemon=True).start()
            threading.Thread(target=self._replies, args=(upstream, client, muted), daemon=True).start()

    def _requests(self, client: socket.socket, upstream: socket.socket, muted: threading.Event) -> None:
        try:
            while data := client.recv(65536):
                cut = not self.fired.is_set() and self.when(data)
                if cut:
                    muted.set()
                    self.fired.set()
                upstream.sendall(data)
                if cut:
                    time.sleep(0.2)  # Redis applies it; its reply is read and dropped below
                    break
        except OSError:
            pass
        _close(client)
        _close(upstream)

    def _replies(self, upstream: socket.socket, client: socket.socket, muted: threading.Event) -> None:
        try:
            while data := upstream.recv(65536):
                if not muted.is_set():
                    client.sendall(data)
        except OSError:
            pass
        _close(client)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
