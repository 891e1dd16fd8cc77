"""A loopback HTTP proxy in front of the real S3 server that injects faults into chosen requests.

Every request is forwarded to the real server (SeaweedFS) unchanged, Host header included, so SigV4
signatures still verify; a matching `Rule` first delays it, answers it with a 5xx instead, resets the
connection before answering, cuts the response body short with a reset, or runs a hook (e.g. delete
the object on the real server) before forwarding. Every request is logged, so tests can also count
what the worker asked for (a HEAD and no GET for an oversized upload).

    with FaultProxy(s3_server.port) as proxy:
        proxy.add(Rule(method="GET", action="status", status=503, times=2))
        client = make_client(proxy.endpoint)

With `tls_dir` it serves HTTPS (a self-signed certificate for 127.0.0.1, made with the openssl
command; clients trust it through AWS_CA_BUNDLE=proxy.ca_bundle), and `bad_record_mid_body` sends
half the body, then a TLS record that fails to decrypt: what a middlebox mangling a stream does.
"""
from __future__ import annotations

import http.client
import random
import re
import os
import socket
import ssl
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "expect", "content-length"}
S3_ERROR_CODES = {403: "AccessDenied", 500: "InternalError", 501: "NotImplemented", 502: "BadGateway", 503: "SlowDown", 504: "GatewayTimeout"}


@dataclass
class Request:
    method: str
    path: str  # URL-decoded path, e.g. /uploads/clips/a.mp4
    query: str
    headers: dict[str, str]  # lower-cased names

    @property
    def range_start(self) -> int | None:
        m = re.match(r"bytes=(\d+)-", self.headers.get("range", ""))
        return int(m.group(1)) if m else None


@dataclass
class Record:
    method: str
    path: str
    query: str
    range: str | None
    status: int | None  # None: the connection was reset before a status was sent
    fault: str | None
    at: float


@dataclass
class Rule:
    """Which requests to hit and how. `times` bounds how often it fires; `probability` (seeded) thins it."""

    action: str  # "delay" | "status" | "reset" | "reset_mid_body" | "bad_record_mid_body" | "hook"
    method: str | None = None
    path: str | None = None  # regex searched in the decoded path
    when: Callable[[Request], bool] | None = None
    delay_s: float = 0.0
    status: int = 503
    times: int | None = None
    probability: float = 1.0
    hook: Callable[[Request], None] | None = None
    hits: int = 0

    def matches(self, req: Request, rng: random.Random) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method is not None and req.method != self.method:
            return False
        if self.path is not None and not re.search(self.path, req.path):
            return False
        if self.when is not None and not self.when(req):
            return False
        return self.probability >= 1.0 or rng.random() < self.probability


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _reset(self) -> None:
        """Close with RST (SO_LINGER 0): the client sees 'connection reset by peer'."""
        try:
            self.wfile.flush()
        except OSError:
            pass
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        try:
            self.connection.close()
        except OSError:
            pass

    def _handle(self) -> None:
        proxy = self.server.proxy
        parts = urlsplit(self.path)
        req = Request(self.command, unquote(parts.path), parts.query, {k.lower(): v for k, v in self.headers.items()})
        body = self._read_body()
        rule = proxy._pick(req)
        fault = rule.action if rule else None
        if rule is not None and rule.action == "delay":
            time.sleep(rule.delay_s)
        if rule is not None and rule.action == "hook" and rule.hook is not None:
            rule.hook(req)
        if rule is not None and rule.action == "reset":
            proxy._record(req, None, fault)
            self._reset()
            return
        if rule is not None and rule.action == "status":
            code = S3_ERROR_CODES.get(rule.status, "InternalError")
            payload = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                       f"<Message>injected by the test fault proxy</Message></Error>").encode()
            self.send_response(rule.status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            proxy._record(req, rule.status, fault)
            return
        status, headers, data = proxy._forward(self.command, self.path, self.headers, body)
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        if self.command == "HEAD":  # no body: the object's own length
            upstream_length = next((v for k, v in headers if k.lower() == "content-length"), None)
            if upstream_length is not None:
                self.send_header("Content-Length", upstream_length)
        else:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if rule is not None and rule.action == "reset_mid_body" and self.command != "HEAD" and data:
            self.wfile.write(data[: len(data) // 2])
            proxy._record(req, status, fault)
            self._reset()
            return
        if rule is not None and rule.action == "bad_record_mid_body" and self.command != "HEAD" and data:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            proxy._record(req, status, fault)
            self._bad_record()
            return
        if self.command != "HEAD":
            self.wfile.write(data)
        proxy._record(req, status, fault)

    def _bad_record(self) -> None:
        """Past the TLS layer, on the raw socket: an application-data record whose MAC cannot verify."""
        raw = socket.socket(fileno=os.dup(self.connection.fileno()))
        try:
            raw.sendall(bytes([23, 3, 3, 0, 64]) + os.urandom(64))
        finally:
            raw.close()
        time.sleep(0.5)  # let the client read it before the connection closes
        self.close_connection = True

    def _safe(self) -> None:
        try:
            self._handle()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (e.g. its read timeout)
            self.close_connection = True

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _safe


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: "FaultProxy"


class FaultProxy:
    def __init__(self, upstream_port: int, *, seed: int = 0, upstream_host: str = "127.0.0.1",
                 tls_dir: Path | None = None) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.rules: list[Rule] = []
        self.log: list[Record] = []
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self.ca_bundle: Path | None = None
        if tls_dir is not None:
            self.ca_bundle = self_signed(tls_dir)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.ca_bundle, tls_dir / "key.pem")
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread: threading.Thread | None = None

    # -- control ---------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.ca_bundle else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> "FaultProxy":
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()
            self.log.clear()

    def requests(self, method: str | None = None, path: str | None = None) -> list[Record]:
        with self._lock:
            return [r for r in self.log if (method is None or r.method == method)
                    and (path is None or re.search(path, r.path))]

    def faults(self) -> list[Record]:
        with self._lock:
            return [r for r in self.log if r.fault is not None]

    # -- internals -------------------------------------------------------------------------------
    def _pick(self, req: Request) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.matches(req, self._rng):
                    rule.hits += 1
                    return rule
        return None

    def _record(self, req: Request, status: int | None, fault: str | None) -> None:
        with self._lock:
            self.log.append(Record(req.method, req.path, req.query, req.headers.get("range"), status, fault,
                                   time.monotonic()))

    def _forward(self, method: str, path: str, headers, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self.upstream, timeout=120)
        try:
            out = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}
            if body or method in ("PUT", "POST"):
                out["Content-Length"] = str(len(body))
            conn.request(method, path, body=body or None, headers=out)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.getheaders(), data
        finally:
            conn.close()


def self_signed(directory: Path) -> Path:
    """cert.pem (also the CA bundle that trusts it) and key.pem for 127.0.0.1 in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    cert = directory / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(directory / "key.pem"), "-out", str(cert)], check=True, capture_output=True)
    return cert
