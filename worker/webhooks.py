"""Webhook delivery for finished and failed jobs: vetted destination, signed verdict summary.

RQ's own `Webhook.send` POSTs to whatever URL a job's hash names, follows redirects and, on failure,
sends the worker's full traceback. Anyone who can write to Redis names that URL, so from inside a
cluster it reaches internal services and the cloud metadata endpoint (SSRF). `DeepfakeJob` sends
through `deliver` instead, which:

- resolves the host once and connects to the vetted address (no second lookup to rebind);
- allows only public addresses, unless `DEEPFAKE_WEBHOOK_HOSTS` lists receivers, in which case it
  allows only those (host names, `.suffix` domains, IPs or CIDRs; private addresses included);
- never follows a redirect, and sends one attempt with a short timeout (a slow receiver delays the
  worker's next job by at most `DEEPFAKE_WEBHOOK_TIMEOUT_S`);
- POSTs a small summary (job id, status, label, score, where the verdict is stored), never a
  traceback, signed with HMAC-SHA256 when `DEEPFAKE_WEBHOOK_SECRET` is set (`verify_signature`).
"""
from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import json
import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from worker.errors import last_line

SIGNATURE_HEADER = "X-Deepfake-Signature"
# Headers a job may not set: they would change where or what is sent, or forge the signature.
_RESERVED_HEADERS = {"host", "content-length", "content-type", "transfer-encoding", "connection",
                     SIGNATURE_HEADER.lower()}
_MAX_JOB_HEADERS = 16
_MAX_ERROR_CHARS = 500

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class WebhookRefused(ValueError):
    """The URL may not be called: bad scheme, unresolvable host, or an address not allowed."""


class WebhookFailed(RuntimeError):
    """The receiver was allowed but did not take the POST (refused connection, timeout, non-2xx)."""


@dataclass(frozen=True)
class Destination:
    scheme: str
    host: str
    port: int
    path: str
    address: str  # the vetted IP the connection goes to


@dataclass(frozen=True)
class HostPolicy:
    """Which receivers webhooks may reach. Empty: any host whose addresses are all public."""

    names: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()
    networks: tuple[Network, ...] = ()

    @classmethod
    def parse(cls, spec: str) -> "HostPolicy":
        names, suffixes, networks = set(), [], []
        for item in (s.strip().lower() for s in spec.split(",")):
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item.strip("[]"), strict=False))
            except ValueError:
                if item.startswith("."):
                    suffixes.append(item)
                else:
                    names.add(item.rstrip("."))
        return cls(frozenset(names), tuple(suffixes), tuple(networks))

    @property
    def restricted(self) -> bool:
        return bool(self.names or self.suffixes or self.networks)

    def allows(self, host: str, address: Address) -> bool:
        if not self.restricted:
            return is_public(address)
        host = host.lower().rstrip(".")
        if host in self.names or any(host.endswith(s) for s in self.suffixes):
            return True
        return any(address.version == n.version and address in n for n in self.networks)


def is_public(address: Address) -> bool:
    """Globally routable unicast: not loopback, private, link-local (cloud metadata), shared, reserved."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


def resolve(url: str, policy: HostPolicy,
            lookup=socket.getaddrinfo) -> Destination:  # noqa: ANN001 - socket.getaddrinfo's signature
    """The destination to connect to for `url`, or WebhookRefused saying why not."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookRefused(f"malformed URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookRefused("only http:// and https:// URLs with a host are called")
    if parts.username or parts.password:
        raise WebhookRefused("URLs with credentials are not called")
    port = port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname
    try:
        infos = lookup(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as exc:
        raise WebhookRefused(f"cannot resolve {host!r}: {exc}") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
    if not addresses:
        raise WebhookRefused(f"{host!r} resolves to no address")
    refused = [a for a in addresses if not policy.allows(host, a)]
    if refused:  # one bad address is enough: a round-robin name must not reach inside half the time
        why = "not a listed receiver" if policy.restricted else "not a public address"
        raise WebhookRefused(f"{host!r} resolves to {refused[0]}, {why} (DEEPFAKE_WEBHOOK_HOSTS)")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Destination(parts.scheme, host, port, path, str(addresses[0]))


def summary(job_id: str, status: str, result: Any = None, error: str | None = None,
            enqueued_at: str | None = None, ended_at: str | None = None) -> dict[str, Any]:
    """What a receiver needs to act on a job; the whole verdict is in S3 (`stored_at`)."""
    body: dict[str, Any] = {"job_id": job_id, "status": status, "enqueued_at": enqueued_at, "ended_at": ended_at}
    if isinstance(result, dict):
        body["verdict"] = {
            "status": result.get("status"), "label": result.get("label"), "action": result.get("action"),
            "score": result.get("score"),
            "threshold": result.get("threshold"), "source": result.get("source"),
            "stored_at": result.get("stored_at"), "error": (result.get("error") or {}).get("code"),
        }
    if error:
        # the exception's last line only: a receiver outside the cluster gets no traceback
        body["error"] = (last_line(error) or error)[:_MAX_ERROR_CHARS]
    return body


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """`t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>." + body>`: the timestamp bounds replays."""
    t = int(time.time() if timestamp is None else timestamp)
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify_signature(secret: str, header: str, body: bytes, tolerance_s: float = 300,
                     now: float | None = None) -> bool:
    """For receivers: True when `header` signs `body` with `secret` and is at most `tolerance_s` old."""
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        t = int(fields["t"])
        given = fields["v1"]
    except (ValueError, KeyError):
        return False
    if abs((time.time() if now is None else now) - t) > tolerance_s:
        return False
    expected = sign(secret, body, t).split("v1=", 1)[1]
    return hmac.compare_digest(expected, given)


def job_headers(headers: dict | None) -> dict[str, str]:
    """The headers a job asked for (a receiver's token, say), less those that steer or sign the request."""
    out: dict[str, str] = {}
    for name, value in list((headers or {}).items())[:_MAX_JOB_HEADERS]:
        if not isinstance(name, str) or not isinstance(value, str) or name.lower() in _RESERVED_HEADERS:
            continue
        if any(c in name + value for c in "\r\n\0"):
            continue
        out[name] = value
    return out


def post(dest: Destination, body: bytes, headers: dict[str, str], timeout_s: float) -> int:
    """One POST to the vetted address (TLS still checks the certificate against the host name)."""
    cls = http.client.HTTPSConnection if dest.scheme == "https" else http.client.HTTPConnection
    conn = cls(dest.host, dest.port, timeout=timeout_s)
    # http.client dials (host, port) through this attribute; HTTPS wraps the socket afterwards with
    # server_hostname=host, so the certificate is still verified for the name in the URL.
    conn._create_connection = lambda _addr, timeout, source=None: socket.create_connection(  # type: ignore[attr-defined]
        (dest.address, dest.port), timeout, source)
    try:
        conn.request("POST", dest.path, body=body, headers={"Content-Type": "application/json", **headers})
        response = conn.getresponse()
        response.read(65536)
        return response.status
    finally:
        conn.close()


def deliver(url: str, payload: dict[str, Any], *, policy: HostPolicy, secret: str | None = None,
            headers: dict | None = None, timeout_s: float = 5.0) -> str:
    """Send `payload` to `url`: 'sent' (2xx), or raises WebhookRefused / WebhookFailed."""
    dest = resolve(url, policy)
    body = json.dumps(payload, separators=(",", ":")).encode()
    extra = job_headers(headers)
    if secret:
        extra[SIGNATURE_HEADER] = sign(secret, body)
    try:
        status = post(dest, body, extra, timeout_s)
    except (OSError, http.client.HTTPException) as exc:
        raise WebhookFailed(f"{type(exc).__name__}: {exc}") from None
    if not 200 <= status < 300:
        hint = " (redirects are not followed)" if 300 <= status < 400 else ""
        raise WebhookFailed(f"HTTP {status}{hint}")
    return "sent"
