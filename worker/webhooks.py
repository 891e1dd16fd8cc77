"""Webhook delivery for finished and failed jobs: vetted destination, signed verdict summary.

RQ's own `Webhook.send` POSTs to whatever URL a job's hash names, follows redirects and, on failure,
sends the worker's full traceback. Anyone who can write to Redis names that URL, so from inside a
cluster it reaches internal services and the cloud metadata endpoint (SSRF). `DeepfakeJob` sends
through `deliver` instead, which:

- resolves the host once and connects to the vetted address (no second lookup to rebind);
- allows only public addresses (and IPv6 forms embedding an IPv4 one only if that one is public too),
  unless `DEEPFAKE_WEBHOOK_HOSTS` lists receivers, in which case it allows only those (host names,
  `.suffix` domains, IPs or CIDRs; private addresses included);
- never follows a redirect, and sends one attempt under one deadline for DNS, connect, TLS, request
  and the whole response (a slow or dripping receiver delays the worker's next job by at most
  `DEEPFAKE_WEBHOOK_TIMEOUT_S` per webhook, and a job has at most `MAX_WEBHOOKS`);
- percent-encodes a non-ASCII path and drops headers HTTP cannot carry (`job_headers`);
- POSTs a small summary (job id, status, label, score, where the verdict is stored), never a
  traceback, signed with HMAC-SHA256 when `DEEPFAKE_WEBHOOK_SECRET` is set (`verify_signature`).
"""
from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import json
import re
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, quote, urlsplit

import structlog

from worker.errors import last_line
from worker.webhook_http import Destination, WebhookFailed, post

log = structlog.get_logger("worker.webhooks")

SIGNATURE_HEADER = "X-Deepfake-Signature"
# Headers a job may not set: they would change where or what is sent, or forge the signature.
# Every Content-* header too (Content-Encoding: gzip left a receiver unable to read the body).
_RESERVED_HEADERS = {"host", "transfer-encoding", "connection", "keep-alive", "expect", "te", "trailer", "upgrade",
                     SIGNATURE_HEADER.lower()}
_MAX_JOB_HEADERS = 16
_MAX_ERROR_CHARS = 500
# An http(s) URL in a failed job's error line: the S3 endpoint botocore names ("Could not connect to
# the endpoint URL: http://10.0.3.7:9000/..."), internal, and a receiver may be any public host.
_URL_IN_ERROR = re.compile(r"https?://[^\s\"'<>]+")
# Each webhook may take DEEPFAKE_WEBHOOK_TIMEOUT_S of the worker's time between jobs: a job's are capped.
MAX_WEBHOOKS = 4
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # an RFC 7230 header name
_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # control characters but tab: CR, LF and NUL among them
# What a request target keeps as it is (reserved characters, %-escapes); the rest, non-ASCII and spaces
# included, is percent-encoded.
_PATH_SAFE = "!$%&'()*+,/:;=?@[]~"
# IPv6 ranges that carry an IPv4 address in their low 32 bits (NAT64, RFC 6052 and 8215; IPv4-compatible).
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Local-use NAT64: where its IPv4 address sits is the operator's choice, so it is refused outright
# (Python before 3.12 calls it global).
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")
# The only IPv6 addresses assigned as global unicast (RFC 4291); of them, documentation's (RFC 3849, 9637).
_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")
_DOCUMENTATION = (ipaddress.ip_network("2001:db8::/32"), ipaddress.ip_network("3fff::/20"))
_IPV4_IN_LOW_BITS = tuple(ipaddress.ip_network(n) for n in (
    "64:ff9b::/96", "64:ff9b:1::/48", "::/96", "::ffff:0:0:0/96"))  # NAT64, IPv4-compatible, SIIT

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class WebhookRefused(ValueError):
    """The URL may not be called: bad scheme, unresolvable host, or an address not allowed."""


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


def embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 one leads to (mapped, NAT64, 6to4, Teredo server and client,
    IPv4-compatible): a gateway on the path would take `64:ff9b::a9fe:a9fe` to 169.254.169.254."""
    found = [address.ipv4_mapped, address.sixtofour, *(address.teredo or ())]
    if any(address in net for net in _IPV4_IN_LOW_BITS):
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return [a for a in found if a is not None]


def is_public(address: Address) -> bool:
    """Globally routable unicast: not loopback, private, link-local (cloud metadata), shared, reserved;
    for IPv6, every IPv4 address it embeds too."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # an IPv4 address in IPv6 notation: only it counts
            return is_public(address.ipv4_mapped)
        if address in _LOCAL_NAT64 or not all(is_public(a) for a in embedded_ipv4(address)):
            return False
        if address in _NAT64:
            return True  # to a public address (Python 3.12 and later call the NAT64 prefix not global)
        if address not in _GLOBAL_UNICAST or any(address in n for n in _DOCUMENTATION) or address.is_reserved:
            return False  # Python 3.11 calls site-local (fec0::/10) and IETF-reserved blocks global
    return address.is_global and not address.is_multicast


def _split(url: str) -> tuple[SplitResult, int]:
    """`url`'s parts and port, or WebhookRefused when no worker would call it whatever its address."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except (ValueError, TypeError, AttributeError) as exc:
        raise WebhookRefused(f"malformed URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookRefused("only http:// and https:// URLs with a host are called")
    if parts.username or parts.password:
        raise WebhookRefused("URLs with credentials are not called")
    return parts, port or (443 if parts.scheme == "https" else 80)


def check_url(url: str) -> None:
    """WebhookRefused, saying why, when no worker would call `url` whatever its address resolves to."""
    _split(url)


def _lookup(lookup, host: str, port: int, timeout_s: float | None) -> list:  # noqa: ANN001
    """getaddrinfo, which takes no timeout, in a daemon thread given `timeout_s`: a slow resolver
    must not hold the worker past the webhook's deadline (the thread ends when the resolver gives up)."""
    if timeout_s is None:
        return lookup(host, port, type=socket.SOCK_STREAM)
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["infos"] = lookup(host, port, type=socket.SOCK_STREAM)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=run, name="webhook-dns", daemon=True)
    thread.start()
    thread.join(max(timeout_s, 0.0))
    if thread.is_alive():
        raise WebhookFailed(f"resolving {host!r} timed out after {timeout_s:.3g} s")
    if "error" in box:
        raise box["error"]
    return box["infos"]


def resolve(url: str, policy: HostPolicy, lookup=socket.getaddrinfo,  # noqa: ANN001 - getaddrinfo's signature
            timeout_s: float | None = None) -> Destination:
    """The destination to connect to for `url`, or WebhookRefused saying why not (WebhookFailed when
    the lookup takes longer than `timeout_s`)."""
    parts, port = _split(url)
    host = parts.hostname
    try:
        infos = _lookup(lookup, host, port, timeout_s)
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
    # http.client sends the request line as ASCII: a non-ASCII path would raise, not be sent
    path = quote(path, safe=_PATH_SAFE)
    return Destination(parts.scheme, host, port, path, tuple(dict.fromkeys(str(a) for a in addresses)))


def summary(job_id: str, status: str, result: Any = None, error: str | None = None,
            enqueued_at: str | None = None, ended_at: str | None = None, source: str | None = None) -> dict[str, Any]:
    """What a receiver needs to act on a job; the whole verdict is in S3 (`stored_at`). `source`, the
    upload's s3:// URI, names it for a failed job too, which has no verdict."""
    body: dict[str, Any] = {"job_id": job_id, "status": status, "source": source, "enqueued_at": enqueued_at,
                            "ended_at": ended_at}
    if isinstance(result, dict):
        body["verdict"] = {
            "status": result.get("status"), "label": result.get("label"), "action": result.get("action"),
            "score": result.get("score"),
            "threshold": result.get("threshold"), "source": result.get("source"),
            "stored_at": result.get("stored_at"), "error": (result.get("error") or {}).get("code"),
        }
    if error:
        # the exception's last line only, its URLs left out: a receiver outside the cluster gets no
        # traceback and no internal address
        body["error"] = _URL_IN_ERROR.sub("<url>", last_line(error) or error)[:_MAX_ERROR_CHARS]
    return body


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """`t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>." + body>`: the timestamp bounds replays."""
    t = int(time.time() if timestamp is None else timestamp)
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify_signature(secret: str, header: str, body: bytes, tolerance_s: float = 300,
                     now: float | None = None) -> bool:
    """For receivers: True when `header` signs `body` with `secret` and is at most `tolerance_s` old;
    False for anything else a request may carry (no header, a malformed one), never an exception."""
    if not isinstance(header, str):
        return False
    try:
        fields = dict((k.strip(), v.strip()) for k, v in (part.split("=", 1) for part in header.split(",")))
        stamp, given = fields["t"], fields["v1"].lower()
    except (ValueError, KeyError):
        return False
    if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12 and given.isascii()):
        return False
    if abs((time.time() if now is None else now) - int(stamp)) > tolerance_s:
        return False
    expected = sign(secret, body, int(stamp)).split("v1=", 1)[1]
    return hmac.compare_digest(expected, given)


def header_problem(name: Any, value: Any) -> str | None:
    """Why a job's header is not sent (None: it is): HTTP/1.1 carries token names and Latin-1 values
    without line breaks, and some headers would steer or sign the request."""
    if not isinstance(name, str) or not isinstance(value, str):
        return "name and value must be strings"
    if not _TOKEN.fullmatch(name):
        return "the name is not an RFC 7230 token"
    if name.lower() in _RESERVED_HEADERS or name.lower().startswith("content-"):
        return "the worker sets this header itself"
    if _CTL.search(value):
        return "the value holds a line break or control character"
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return "the value is not Latin-1"
    return None


def job_headers(headers: dict | None) -> dict[str, str]:
    """The headers a job asked for (a receiver's token, say), less those HTTP cannot carry or that
    steer or sign the request (logged by name: a value may be a token)."""
    out: dict[str, str] = {}
    items = list(headers.items()) if isinstance(headers, dict) else []
    for name, value in items[:_MAX_JOB_HEADERS]:
        why = header_problem(name, value)
        if why is None:
            out[name] = value
        else:
            log.warning("webhook_header_dropped", header=ascii(name)[:64], reason=why)
    if len(items) > _MAX_JOB_HEADERS:
        log.warning("webhook_header_dropped", header=ascii(items[_MAX_JOB_HEADERS][0])[:64],
                    reason=f"past the first {_MAX_JOB_HEADERS}", dropped=len(items) - _MAX_JOB_HEADERS)
    return out


def check_webhooks(hooks: Sequence[Any]) -> None:
    """For enqueuers: WebhookRefused, saying why, for webhooks a worker would not send as given (more
    than MAX_WEBHOOKS, a URL no worker calls, a header it would drop, more headers than it sends).
    Addresses are the workers' DEEPFAKE_WEBHOOK_HOSTS to judge (`resolve`)."""
    if len(hooks) > MAX_WEBHOOKS:
        raise WebhookRefused(f"a job may have at most {MAX_WEBHOOKS} webhooks, not {len(hooks)}")
    for hook in hooks:
        check_url(hook.url)
        headers = hook.headers or {}
        if isinstance(headers, dict) and len(headers) > _MAX_JOB_HEADERS:
            raise WebhookRefused(f"a webhook may have at most {_MAX_JOB_HEADERS} headers, not {len(headers)}")
        for name, value in (headers.items() if isinstance(headers, dict) else [("headers", None)]):
            why = header_problem(name, value)
            if why is not None:
                raise WebhookRefused(f"webhook header {ascii(name)[:64]}: {why}")


def deliver(url: str, payload: dict[str, Any], *, policy: HostPolicy, secret: str | None = None,
            headers: dict | None = None, timeout_s: float = 5.0) -> str:
    """Send `payload` to `url` within `timeout_s` in all (DNS included): 'sent' (2xx), or raises
    WebhookRefused / WebhookFailed."""
    deadline = time.monotonic() + timeout_s
    dest = resolve(url, policy, timeout_s=timeout_s)
    body = json.dumps(payload, separators=(",", ":")).encode()
    extra = job_headers(headers)
    if secret:
        extra[SIGNATURE_HEADER] = sign(secret, body)
    left = deadline - time.monotonic()
    if left <= 0:
        raise WebhookFailed(f"timed out: resolving took all of {timeout_s:.3g} s")
    try:
        status = post(dest, body, extra, left)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        # ValueError: a header or URL http.client refuses that the checks above did not foresee
        raise WebhookFailed(f"{type(exc).__name__}: {exc}") from None
    if not 200 <= status < 300:
        hint = " (redirects are not followed)" if 300 <= status < 400 else ""
        raise WebhookFailed(f"HTTP {status}{hint}")
    return "sent"
