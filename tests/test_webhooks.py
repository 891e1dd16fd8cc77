"""Webhooks: which receivers a job may name, what they get, and delivery by a real worker.

Receivers are real HTTP servers on loopback; the end-to-end tests run DeepfakeWorker against the real
redis-server and S3 server. Only the round-robin and slow DNS cases inject a lookup (no real resolver
here answers one name with a public and a private address, or stalls), and one worker test makes
`deliver` raise what no input known to reach it still does, to show the worker survives it.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import threading
import time
from typing import Callable
from urllib.parse import unquote
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import generate_latest
from rq.job import Job
from rq.serializers import JSONSerializer
from workers import abandon, burst, queue_settings

from worker.queue import enqueue, job_state, queue_status
from worker.settings import Settings
from worker.webhooks import (
    MAX_WEBHOOKS, SIGNATURE_HEADER, HostPolicy, WebhookFailed, WebhookRefused, check_webhooks, deliver, is_public,
    post, resolve, sign, summary, verify_signature,
)

BUCKET = "hooks"
KEY = "clips/carphone.mp4"
OPEN = HostPolicy.parse("")


class Receiver:
    """A real HTTP server on 127.0.0.1 that records every request and answers per path."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.fail_next = 0  # answer this many POSTs with 503 first, whatever the path
        self.on_post: Callable[[dict], None] | None = None  # called with each request before it is answered
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                if receiver.on_post is not None:
                    receiver.on_post(receiver.requests[-1])
                if self.path.startswith("/slow"):
                    time.sleep(5)
                if receiver.fail_next > 0:
                    receiver.fail_next -= 1
                    self.send_response(503)
                elif self.path.startswith("/redirect"):
                    self.send_response(302)
                    self.send_header("Location", f"http://127.0.0.1:{receiver.port}/elsewhere")
                elif self.path.startswith("/broken"):
                    self.send_response(500)
                else:
                    self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture()
def receiver():
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


# -- which receivers ------------------------------------------------------------------------------

@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/hook", "http://localhost/hook", "http://169.254.169.254/latest/meta-data/",
    "http://10.1.2.3/", "http://192.168.0.10/", "http://172.16.0.1/", "http://100.64.0.1/", "http://0.0.0.0/",
    "http://[::1]/", "http://[::ffff:127.0.0.1]/", "http://[fd00::1]/", "http://[fe80::1]/", "http://224.0.0.1/",
    # IPv6 that Python 3.11 calls global: site-local, IETF-reserved blocks, documentation (RFC 9637)
    "http://[fec0::a9fe:a9fe]/", "http://[4000::1]/", "http://[e000::1]/", "http://[3fff::1]/",
])
def test_by_default_only_public_addresses_are_called(url):
    with pytest.raises(WebhookRefused, match="not a public address"):
        resolve(url, OPEN)


@pytest.mark.parametrize("url, why", [
    ("ftp://93.184.216.34/x", "only http"), ("file:///etc/passwd", "only http"), ("http:///nohost", "only http"),
    ("http://user:pw@93.184.216.34/", "credentials"), ("http://93.184.216.34:99999/", "malformed"),
])
def test_urls_that_are_never_called(url, why):
    with pytest.raises(WebhookRefused, match=why):
        resolve(url, HostPolicy.parse("93.184.216.34"))


def test_a_public_address_is_called_at_the_vetted_address():
    dest = resolve("https://93.184.216.34/hooks/deepfake?token=abc", OPEN)
    assert (dest.scheme, dest.host, dest.port, dest.path, dest.address) == (
        "https", "93.184.216.34", 443, "/hooks/deepfake?token=abc", "93.184.216.34")


def test_a_receiver_list_allows_exactly_its_hosts_private_ones_included():
    policy = HostPolicy.parse("127.0.0.1, 10.0.0.0/8, .hooks.example, moderation.internal")
    assert resolve("http://127.0.0.1:9/x", policy).address == "127.0.0.1"
    assert resolve("http://10.9.8.7/x", policy).address == "10.9.8.7"
    with pytest.raises(WebhookRefused, match="not a listed receiver"):
        resolve("http://93.184.216.34/", policy)  # public, but not listed
    with pytest.raises(WebhookRefused, match="not a listed receiver"):
        resolve("http://169.254.169.254/", policy)

    def lookup(host, port, type):  # noqa: A002 - getaddrinfo's keyword
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.168.5.5", port))]

    assert resolve("http://a.hooks.example/", policy, lookup).address == "192.168.5.5"
    assert resolve("http://moderation.internal./", policy, lookup).address == "192.168.5.5"
    with pytest.raises(WebhookRefused):
        resolve("http://hooks.example.attacker.test/", policy, lookup)


def test_every_vetted_address_is_tried_in_turn(receiver):
    """A receiver's name with two addresses, the first down: only the first was tried, and the one
    attempt failed, where clients of the name (socket.create_connection) go on to the next."""
    def lookup(host, port, type):  # noqa: A002 - getaddrinfo's keyword
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in ("127.0.0.2", "127.0.0.2", "127.0.0.1")]

    dest = resolve(f"http://hooks.internal:{receiver.port}/hook", HostPolicy.parse("hooks.internal"), lookup)
    assert dest.addresses == ("127.0.0.2", "127.0.0.1")  # in order, once each; nothing listens on the first
    assert post(dest, b"{}", {}, timeout_s=5.0) == 204 and len(receiver.requests) == 1


@pytest.mark.parametrize("address, public", [
    ("64:ff9b::a9fe:a9fe", False), ("64:ff9b:1::a00:1", False), ("2002:a9fe:a9fe::1", False),
    ("::a9fe:a9fe", False), ("::ffff:10.0.0.1", False), ("::ffff:0:a9fe:a9fe", False),
    ("64:ff9b:1::808:808", False),  # local-use NAT64: where its IPv4 sits is the operator's choice
    ("64:ff9b::808:808", True), ("2002:808:808::1", True), ("2606:4700::1111", True),
])
def test_ipv6_forms_embedding_an_ipv4_address_need_it_public(address, public):
    """NAT64, 6to4, IPv4-compatible, mapped and translated (SIIT) addresses lead to the IPv4 address
    inside."""
    assert is_public(ipaddress.ip_address(address)) is public
    if not public:
        with pytest.raises(WebhookRefused, match="not a public address"):
            resolve(f"http://[{address}]/", OPEN)


def test_a_name_with_one_private_address_among_public_ones_is_refused():
    def round_robin(host, port, type):  # noqa: A002
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", port))]

    with pytest.raises(WebhookRefused, match="169.254.169.254"):
        resolve("http://hooks.example/", OPEN, round_robin)


# -- what receivers get ----------------------------------------------------------------------------

def test_delivery_is_signed_and_carries_the_verdict_summary_only(receiver):
    verdict = {"status": "ok", "label": "fake", "action": "block", "score": 0.91, "threshold": 0.5, "source": "s3://b/k.mp4",
               "stored_at": "s3://b/verdicts/k.mp4.json", "error": None, "faces": [{"big": "x" * 1000}]}
    payload = summary("job-1", "finished", verdict, source="s3://b/k.mp4")
    headers = {"Authorization": "Bearer receiver-token", "Host": "internal.admin", SIGNATURE_HEADER: "forged",
               "X-Bad": "a\r\nInjected: 1"}
    outcome = deliver(receiver.url(), payload, policy=HostPolicy.parse("127.0.0.1"), secret="s3cret",
                      headers=headers)
    assert outcome == "sent"
    [req] = receiver.requests
    body = req["body"]
    assert json.loads(body) == {"job_id": "job-1", "status": "finished", "source": "s3://b/k.mp4",
                                "enqueued_at": None, "ended_at": None,
                                "verdict": {"status": "ok", "label": "fake", "action": "block", "score": 0.91,
                                            "threshold": 0.5,
                                            "source": "s3://b/k.mp4", "stored_at": "s3://b/verdicts/k.mp4.json",
                                            "error": None}}
    assert req["headers"]["Authorization"] == "Bearer receiver-token"
    assert req["headers"]["Host"] == f"127.0.0.1:{receiver.port}"
    assert "X-Bad" not in req["headers"] and "Injected" not in req["headers"]
    signature = req["headers"][SIGNATURE_HEADER]
    assert verify_signature("s3cret", signature, body)
    assert not verify_signature("other", signature, body)
    assert not verify_signature("s3cret", signature, body.replace(b"fake", b"real"))
    assert not verify_signature("s3cret", sign("s3cret", body, timestamp=int(time.time()) - 3600), body)
    assert not verify_signature("s3cret", "garbage", body)
    # What a receiver gets from anyone: no exception, only False (a 401, not a 500); spaces and upper case are fine
    for bad in (None, "t=1,v1=é", "t=" + "9" * 400 + ",v1=00", "t=-5,v1=00", "v1=00", ""):
        assert not verify_signature("s3cret", bad, body)
    stamp, hexdigest = (part.split("=", 1)[1] for part in signature.split(","))
    assert verify_signature("s3cret", f"t={stamp}, v1={hexdigest.upper()}", body)


def test_non_ascii_paths_are_encoded_and_headers_http_cannot_carry_are_dropped(receiver):
    headers = {"Authorization": "Bearer café✓", "X:Bad": "v", "Bad Name": "v", "X-Ctl": "a\x01b", "X-Ok": "café"}
    assert deliver(receiver.url("/hooks/café?q=✓ x"), {"a": 1}, policy=HostPolicy.parse("127.0.0.1"),
                   headers=headers) == "sent"
    [req] = receiver.requests
    assert req["path"] == "/hooks/caf%C3%A9?q=%E2%9C%93%20x" and unquote(req["path"]) == "/hooks/café?q=✓ x"
    assert req["headers"]["X-Ok"] == "café"  # Latin-1 goes as it is
    assert not {"Authorization", "X:Bad", "Bad Name", "X-Ctl"} & set(req["headers"])


def test_enqueuers_can_refuse_webhooks_a_worker_would_not_send_as_given():
    from rq.webhook import Webhook

    def hook(url="http://hooks.example/x", **headers):
        return Webhook(url, "finished", method="POST", headers=headers or None)

    check_webhooks([hook("https://hooks.example/café", Authorization="Bearer t")] * MAX_WEBHOOKS)
    for hooks, why in [([hook()] * (MAX_WEBHOOKS + 1), "at most 4 webhooks"),
                       ([hook(**{"Authorization": "Bearer café✓"})], "not Latin-1"),
                       ([hook(**{"X:Y": "v"})], "not an RFC 7230 token"), ([hook(Host="x")], "sets this header"),
                       ([hook(**{"Content-Encoding": "gzip"})], "sets this header"), ([hook(Expect="100-continue")],
                                                                                     "sets this header"),
                       ([hook(**{"X-A": "a\r\nB: c"})], "line break"), ([hook("http://u:p@hooks.example/")], "credentials"),
                       ([hook(**{f"X-{i}": "v" for i in range(17)})], "at most 16 headers, not 17")]:
        with pytest.raises(WebhookRefused, match=why):
            check_webhooks(hooks)


def dripping_receiver(in_body: bool) -> tuple[socket.socket, threading.Event]:
    """A loopback server answering a status line, then a header line or body byte every 0.5 s for 30 s:
    each read gets data, so only a deadline over the whole response stops the client."""
    server, stop = socket.create_server(("127.0.0.1", 0)), threading.Event()
    head = b"HTTP/1.1 200 OK\r\n" + (b"Content-Length: 1000\r\n\r\n" if in_body else b"")

    def serve() -> None:
        conn, _ = server.accept()
        with conn, contextlib.suppress(OSError):
            conn.recv(65536)
            conn.sendall(head)
            end = time.monotonic() + 30
            while time.monotonic() < end and not stop.wait(0.5):
                conn.sendall(b"x" if in_body else b"X-D: 1\r\n")

    threading.Thread(target=serve, daemon=True).start()
    return server, stop


@pytest.mark.parametrize("in_body", [False, True], ids=["headers", "body"])
def test_a_receiver_that_drips_its_response_is_cut_off_at_the_deadline(in_body):
    server, stop = dripping_receiver(in_body)
    t0 = time.monotonic()
    with server, pytest.raises(WebhookFailed, match="timed out"):
        deliver(f"http://127.0.0.1:{server.getsockname()[1]}/", {"a": 1}, policy=HostPolicy.parse("127.0.0.1"),
                timeout_s=1.0)
    stop.set()
    assert time.monotonic() - t0 < 1.0 + 5  # it would drip for 30 s (slack for a loaded machine)


def test_a_slow_name_lookup_counts_against_the_deadline():
    release = threading.Event()

    def stalled(host, port, type):  # noqa: A002 - a resolver that does not answer for 30 s
        release.wait(30)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port))]

    t0 = time.monotonic()
    with pytest.raises(WebhookFailed, match="timed out"):
        resolve("http://hooks.example/", OPEN, stalled, timeout_s=0.5)
    assert time.monotonic() - t0 < 0.5 + 5  # the lookup would stall for 30 s
    release.set()


def test_a_failed_job_sends_the_error_line_not_the_traceback():
    trace = 'Traceback (most recent call last):\n  File "/app/worker/x.py", line 3\nValueError: frames must be 1..1024\n'
    assert summary("j", "failed", None, trace)["error"] == "ValueError: frames must be 1..1024"
    # an S3 outage's line names the internal endpoint: not sent to a receiver that may be anywhere
    outage = ('Traceback (most recent call last):\nworker.errors.TransientError: reading s3://uploads/a.mp4 failed: '
              'Could not connect to the endpoint URL: "http://10.0.3.7:9000/uploads/a.mp4?x=1"\n')
    assert summary("j", "failed", None, outage)["error"] == (
        'worker.errors.TransientError: reading s3://uploads/a.mp4 failed: Could not connect to the endpoint URL: "<url>"')


def test_redirects_errors_and_slow_receivers_fail_without_following(receiver):
    policy = HostPolicy.parse("127.0.0.1")
    with pytest.raises(WebhookFailed, match="302.*not followed"):
        deliver(receiver.url("/redirect"), {"a": 1}, policy=policy)
    assert [r["path"] for r in receiver.requests] == ["/redirect"]
    with pytest.raises(WebhookFailed, match="HTTP 500"):
        deliver(receiver.url("/broken"), {"a": 1}, policy=policy)
    t0 = time.monotonic()
    with pytest.raises(WebhookFailed, match="timed out"):
        deliver(receiver.url("/slow"), {"a": 1}, policy=policy, timeout_s=0.3)
    assert time.monotonic() - t0 < 3  # the 0.3 s limit, not the receiver's 5 s (slack for a loaded machine)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(WebhookFailed, match="Connection refused|ConnectionRefused"):
        deliver(f"http://127.0.0.1:{closed}/", {"a": 1}, policy=policy)


def test_settings_keep_the_secret_out_of_reprs():
    s = Settings(webhook_secret="s3cret", webhook_hosts="127.0.0.1")
    assert "s3cret" not in repr(s) and s.webhook_secret.get_secret_value() == "s3cret"


# -- delivered by the worker -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3(s3_server, corpus):
    return s3_server.bucket_with(BUCKET, {KEY: corpus["carphone"].read_bytes()})


def worker_settings(random_model_dir, redis_server, s3_server, tmp_path, **extra) -> Settings:
    return queue_settings(random_model_dir, redis_server, s3_server, tmp_path, BUCKET, **extra)


def webhook_counts(worker) -> dict[str, float]:
    text = generate_latest(worker.runtime.metrics.registry).decode()
    counts = {}
    for line in text.splitlines():
        if line.startswith("deepfake_webhooks_total{") and float(line.rsplit(" ", 1)[1]):  # each outcome starts at 0
            counts[line.split('outcome="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return counts


def test_worker_posts_the_signed_verdict_to_a_listed_receiver(s3, redis, redis_server, s3_server, random_model_dir,
                                                               moderator, receiver, tmp_path):
    settings = worker_settings(random_model_dir, redis_server, s3_server, tmp_path,
                               webhook_hosts="127.0.0.1", webhook_secret="hook-key")
    job_id = enqueue(BUCKET, KEY, webhook_url=receiver.url("/deepfake?token=t1"), settings=settings,
                     connection=redis, s3_client=s3)
    worker = burst(redis, settings, moderator)
    state = job_state(job_id, settings=settings, connection=redis)
    assert state.status == "finished" and state.result["status"] == "ok"
    [req] = receiver.requests
    assert req["path"] == "/deepfake?token=t1"
    assert verify_signature("hook-key", req["headers"][SIGNATURE_HEADER], req["body"])
    body = json.loads(req["body"])
    assert body["job_id"] == job_id and body["status"] == "finished"
    assert body["verdict"]["label"] == state.result["label"] and body["verdict"]["score"] == state.result["score"]
    assert body["verdict"]["stored_at"] == state.result["stored_at"]
    assert body["enqueued_at"] and body["ended_at"]
    assert webhook_counts(worker) == {"sent": 1.0}


def test_a_webhook_not_delivered_is_sent_by_the_next_enqueue_with_it(s3, redis, redis_server, s3_server,
                                                                     random_model_dir, moderator, receiver, tmp_path):
    """A webhook is tried once. The receiver was down then: enqueueing the upload again with the same
    webhook returned the finished job, and nothing was ever sent. Now that enqueue makes a new job,
    which reuses the stored verdict and delivers it; once delivered, duplicates are answered again."""
    settings = worker_settings(random_model_dir, redis_server, s3_server, tmp_path, webhook_hosts="127.0.0.1")
    burst(redis, settings, moderator)  # the published model: duplicates are matched
    hook = receiver.url("/deepfake?token=t1")
    receiver.fail_next = 1
    first = enqueue(BUCKET, KEY, webhook_url=hook, settings=settings, connection=redis, s3_client=s3)
    worker = burst(redis, settings, moderator)
    assert webhook_counts(worker) == {"failed": 1.0} and len(receiver.requests) == 1
    assert b"t1" not in b"".join(redis.smembers(f"deepfake:webhook-undelivered:{first}"))  # digests only
    assert enqueue(BUCKET, KEY, settings=settings, connection=redis, s3_client=s3) == first  # no webhook: answered
    again = enqueue(BUCKET, KEY, webhook_url=hook, settings=settings, connection=redis, s3_client=s3)
    assert again != first
    worker = burst(redis, settings, moderator)
    assert webhook_counts(worker) == {"sent": 1.0}
    body = json.loads(receiver.requests[-1]["body"])
    first_result = job_state(first, settings=settings, connection=redis).result
    assert body["job_id"] == again and body["verdict"]["label"] == first_result["label"]
    assert job_state(again, settings=settings, connection=redis).result["created_at"] == first_result["created_at"]
    assert enqueue(BUCKET, KEY, webhook_url=hook, settings=settings, connection=redis, s3_client=s3) == again
    # A job noted so that has not finished (requeued after its failure webhook failed) still answers
    # its duplicates: it sends when it ends, and a delivery then takes the note back.
    from worker.job_webhooks import record_undelivered, undelivered_key

    s3.put_object(Bucket=BUCKET, Key="clips/requeued.mp4", Body=s3.get_object(Bucket=BUCKET, Key=KEY)["Body"].read())
    requeued = enqueue(BUCKET, "clips/requeued.mp4", webhook_url=hook, settings=settings, connection=redis,
                       s3_client=s3)
    record_undelivered(redis, requeued, [hook], 600)
    assert enqueue(BUCKET, "clips/requeued.mp4", webhook_url=hook, settings=settings, connection=redis,
                   s3_client=s3) == requeued
    burst(redis, settings, moderator)
    assert json.loads(receiver.requests[-1]["body"])["job_id"] == requeued and not redis.exists(undelivered_key(requeued))


def test_a_webhook_is_noted_undelivered_until_it_is_delivered(s3, redis, redis_server, s3_server, random_model_dir,
                                                              moderator, receiver, tmp_path):
    """RQ saves the result, then sends: a worker killed mid-POST left no note, so the enqueue that
    follows was answered by the finished job and the receiver never heard (0.4.5). The note is there
    while the POST is under way, and gone once it is delivered."""
    from worker.job_webhooks import was_undelivered

    settings = worker_settings(random_model_dir, redis_server, s3_server, tmp_path, webhook_hosts="127.0.0.1")
    burst(redis, settings, moderator)  # the published model: duplicates are matched
    hook = receiver.url("/deepfake?token=t2")
    noted = []
    receiver.on_post = lambda req: noted.append(
        (Job.fetch(json.loads(req["body"])["job_id"], connection=redis, serializer=JSONSerializer).get_status(),
         was_undelivered(redis, json.loads(req["body"])["job_id"], hook)))
    job_id = enqueue(BUCKET, KEY, webhook_url=hook, settings=settings, connection=redis, s3_client=s3)
    burst(redis, settings, moderator)
    assert noted == [("finished", True)]  # a kill now leaves the note: the next enqueue with it sends again
    assert not was_undelivered(redis, job_id, hook)
    assert enqueue(BUCKET, KEY, webhook_url=hook, settings=settings, connection=redis, s3_client=s3) == job_id


def test_worker_refuses_an_internal_receiver_and_still_finishes_the_job(s3, redis, redis_server, s3_server,
                                                                         random_model_dir, moderator, receiver,
                                                                         tmp_path):
    settings = worker_settings(random_model_dir, redis_server, s3_server, tmp_path)  # no receiver list
    job_id = enqueue(BUCKET, KEY, webhook_url=receiver.url(), settings=settings, connection=redis, s3_client=s3)
    worker = burst(redis, settings, moderator)
    assert job_state(job_id, settings=settings, connection=redis).status == "finished"
    assert receiver.requests == []
    assert webhook_counts(worker) == {"refused": 1.0}
    assert not redis.exists(f"deepfake:webhook-undelivered:{job_id}")  # refused again on a new job: not noted


def test_a_failed_job_posts_the_error_line_only(s3, redis, redis_server, s3_server, random_model_dir, moderator,
                                                receiver, tmp_path):
    settings = worker_settings(random_model_dir, redis_server, s3_server, tmp_path, webhook_hosts="127.0.0.1")
    assert settings.job_retries > 0
    job_id = enqueue(BUCKET, KEY, frames=5000, webhook_url=receiver.url(), settings=settings, connection=redis,
                     s3_client=s3)  # more frames than a worker accepts: the job fails, no verdict
    worker = burst(redis, settings, moderator)
    # at once, with retries left: a client's bug fails again (0.4.4 retried it, the webhook 12 minutes late)
    assert job_state(job_id, settings=settings, connection=redis).status == "failed"
    [req] = receiver.requests
    body = json.loads(req["body"])
    assert body["status"] == "failed" and "verdict" not in body
    assert body["source"] == f"s3://{BUCKET}/{KEY}"  # which upload got no verdict
    assert body["error"].startswith("worker.runtime.InvalidJobArguments: frames must be an integer from 1 to 1024")
    assert "Traceback" not in req["body"].decode() and "File \"" not in req["body"].decode()
    assert webhook_counts(worker) == {"sent": 1.0}


def _raw_hooks(redis, job_id: str, hooks: list[tuple[str, dict | None]]) -> None:
    """Give a queued job these `finished` webhooks as a Redis writer can (the Python enqueue sets no headers)."""
    redis.hset(f"rq:job:{job_id}", "webhooks", json.dumps(
        [{"url": url, "job_status": "finished", "method": "POST", "headers": h, "timeout": 10} for url, h in hooks]))


def test_no_hook_fails_or_reruns_a_job_with_its_verdict(s3, redis, redis_server, s3_server, random_model_dir,
                                                       moderator, receiver, tmp_path, monkeypatch):
    """A non-ASCII path, a header value outside Latin-1 and an illegal header name once raised out of
    send_webhooks after the verdict was saved: RQ failed the job and ran it again, 4 times. Now each is
    sent as HTTP allows, and even an exception no known input raises (`/boom`) costs one hook only."""
    import worker.job_webhooks
    from rq.job import Job
    from rq.results import Result
    from rq.serializers import JSONSerializer

    real = worker.job_webhooks.deliver

    def deliver_or_raise(url, *args, **kwargs):
        if url.endswith("/boom"):
            "é".encode("ascii")  # UnicodeEncodeError, as http.client raised for the cases below
        return real(url, *args, **kwargs)

    monkeypatch.setattr(worker.job_webhooks, "deliver", deliver_or_raise)
    settings = worker_settings(random_model_dir, redis_server, s3_server, tmp_path, webhook_hosts="127.0.0.1")
    job_id = enqueue(BUCKET, KEY, settings=settings, connection=redis, s3_client=s3)
    _raw_hooks(redis, job_id, [(receiver.url("/boom"), None), (receiver.url("/café"), None),
                               (receiver.url("/latin"), {"Authorization": "Bearer café✓"}),
                               (receiver.url("/name"), {"X:Y": "v", "X-Ok": "1"}),
                               (receiver.url("/fifth"), None)])  # over MAX_WEBHOOKS: skipped
    worker = burst(redis, settings, moderator)
    job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
    assert job.get_status() == "finished"
    assert [r.type for r in job.results()] == [Result.Type.SUCCESSFUL]  # ran once: no failed or retried attempt
    assert [r["path"] for r in receiver.requests] == ["/caf%C3%A9", "/latin", "/name"]
    assert "Authorization" not in receiver.requests[1]["headers"] and receiver.requests[2]["headers"]["X-Ok"] == "1"
    assert webhook_counts(worker) == {"failed": 1.0, "sent": 3.0, "refused": 1.0}


@pytest.mark.parametrize("hosts", ["", "127.0.0.1"], ids=["unlisted", "listed"])
def test_counting_the_started_registry_outside_a_worker_sends_only_vetted_signed_webhooks(
        hosts, s3, redis, redis_server, s3_server, random_model_dir, receiver, tmp_path, monkeypatch):
    """`deepfake status` counts RQ's started registry, which moves an abandoned job on and sends its
    webhooks: through the job's own class, never RQ's (unsigned, to any address, RQ's body)."""
    import worker.runtime

    settings = worker_settings(random_model_dir, redis_server, s3_server, tmp_path, job_retries=0)
    job_id = enqueue(BUCKET, KEY, webhook_url=receiver.url(), settings=settings, connection=redis, s3_client=s3)
    abandon(redis, job_id)
    monkeypatch.setattr(worker.runtime, "_runtime", None)  # a CLI process: no worker runtime, no model
    monkeypatch.setenv("DEEPFAKE_WEBHOOK_HOSTS", hosts)
    monkeypatch.setenv("DEEPFAKE_WEBHOOK_SECRET", "hook-key")
    status = queue_status(settings=settings, connection=redis)
    assert status["started"] == 0 and status["failed"] == 1  # the abandoned job was failed, as RQ does
    assert worker.runtime._runtime is None  # and no model was loaded to send its webhook
    if not hosts:
        assert receiver.requests == []  # loopback is not a public address
        return
    [req] = receiver.requests
    assert verify_signature("hook-key", req["headers"][SIGNATURE_HEADER], req["body"])
    body = json.loads(req["body"])
    assert body["job_id"] == job_id and body["status"] == "failed" and "AbandonedJobError" in body["error"]
    assert "func_name" not in body and "exc_info" not in body  # not RQ's own body
