"""One webhook POST to a vetted address within one deadline (worker.webhooks.deliver vets and signs;
this only connects and sends)."""
from __future__ import annotations

import http.client
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any


class WebhookFailed(RuntimeError):
    """The receiver was allowed but did not take the POST (refused connection, timeout, non-2xx)."""


@dataclass(frozen=True)
class Destination:
    scheme: str
    host: str
    port: int
    path: str
    addresses: tuple[str, ...]  # the vetted IPs, tried in the resolver's order until one connects

    @property
    def address(self) -> str:
        return self.addresses[0]


class _Cutoff:
    """Shuts a connection down at its deadline. A socket timeout bounds each read, not the request: a
    receiver sending a byte every half second would otherwise hold the worker for ever. The shutdown
    wakes whatever blocks (TLS handshake, send, a read of headers or body)."""

    def __init__(self, timeout_s: float) -> None:
        self.deadline = time.monotonic() + timeout_s
        self.fired = False
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._timer: threading.Timer | None = None

    def left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        return left

    def connect(self, dest: Destination, source: Any = None) -> socket.socket:
        """The first of the vetted addresses that connects (as socket.create_connection tries a name's),
        each given an equal share of the time left."""
        for i, address in enumerate(dest.addresses):
            try:
                sock = socket.create_connection((address, dest.port), self.left() / (len(dest.addresses) - i), source)
                break
            except OSError:
                if i == len(dest.addresses) - 1:
                    raise
        with self._lock:
            # a descriptor of our own for the same connection: TLS wrapping detaches `sock`'s
            self._sock = sock.dup()
            self._timer = threading.Timer(max(self.deadline - time.monotonic(), 0.0), self._fire)
            self._timer.daemon = True
            self._timer.start()
        return sock

    def _fire(self) -> None:
        with self._lock:
            if self._sock is not None:
                self.fired = True
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def disarm(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def post(dest: Destination, body: bytes, headers: dict[str, str], timeout_s: float) -> int:
    """One POST to the vetted address (TLS still checks the certificate against the host name), done
    within `timeout_s` in all, connect to the end of the response, or WebhookFailed."""
    cutoff = _Cutoff(timeout_s)
    cls = http.client.HTTPSConnection if dest.scheme == "https" else http.client.HTTPConnection
    conn = cls(dest.host, dest.port, timeout=timeout_s)
    # http.client dials (host, port) through this attribute; HTTPS wraps the socket afterwards with
    # server_hostname=host, so the certificate is still verified for the name in the URL.
    conn._create_connection = lambda _addr, timeout, source=None: cutoff.connect(dest, source)  # type: ignore[attr-defined]
    timed_out = WebhookFailed(f"timed out: no complete response within {timeout_s:.3g} s")
    try:
        conn.request("POST", dest.path, body=body, headers={"Content-Type": "application/json", **headers})
        response = conn.getresponse()
        response.read(65536)
    except (OSError, http.client.HTTPException, ValueError):
        if cutoff.fired or time.monotonic() >= cutoff.deadline:
            raise timed_out from None
        raise
    else:
        if cutoff.fired:  # the shutdown ended what looked like a response: half a header, say
            raise timed_out
        return response.status
    finally:
        cutoff.disarm()
        conn.close()
