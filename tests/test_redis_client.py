"""The worker's Redis client (worker/redis_client.py) against a real redis-server that is full or away.

Full: `maxmemory` set below what it holds (1 byte), policy `noeviction` (what `deepfake check` asks
for), so every write is refused with an OOM error while reads go through. The client waits it out: a
refused command runs again, once, when there is room; a refused transaction under WATCH comes back as
WatchError after a wait, so RQ starts that step over without spinning. A real `rq worker` filled up
mid-job keeps its job, stays healthy and finishes it with its one verdict once Redis has room, with no
restart and nothing left for RQ's maintenance; one started against a full Redis waits instead of
exiting. Enqueuers get one line, not a traceback.

Away: killed and restarted on its port. The client reconnects and runs the command once, within
DEEPFAKE_REDIS_OUTAGE_S; past it, or on a wrong password, it raises. (Workers riding out a restart
mid-job, and giving up on a longer one: test_faults.py.)
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from redis import Redis
from redis.exceptions import AuthenticationError, WatchError
from redis.exceptions import ConnectionError as RedisUnreachable
from rq.registry import FailedJobRegistry, StartedJobRegistry
from servers import RedisServer, free_ports, stop
from workers import DurableRedis, Supervisor, stored, wait_until_final

from worker.queue import enqueue, get_queue, job_state
from worker.redis_client import (
    FULL_FIRST_WAIT_S,
    WaitingRedis,
    ride_out,
    waiting_for_space,
)
from worker.settings import Settings

BUCKET = "redis-full"
REFUSED = '"event": "redis_full"'  # the worker's log event at each wait


@pytest.fixture()
def own_redis(tmp_path):
    server = RedisServer.start(tmp_path)
    yield server
    stop(server.proc)


def fill(admin: Redis) -> None:
    admin.config_set("maxmemory", 1)  # below what any Redis holds: every write is refused from now on


def free(admin: Redis) -> None:
    admin.config_set("maxmemory", 0)


def until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# -- a full Redis: the client ----------------------------------------------------------------------
def test_a_refused_command_waits_for_room_and_then_runs_once(own_redis):
    admin = Redis.from_url(own_redis.url)
    client = Redis.from_url(own_redis.url)
    ride_out(client)
    assert ride_out(client) is client.get_retry()  # idempotent
    fill(admin)
    results = {}

    def write():
        results["incr"] = client.incr("counter")
        with client.pipeline() as pipe:  # a transaction: refused whole, then run whole
            results["pipe"] = pipe.set("a", 1).incr("b").execute()

    writer = threading.Thread(target=write)
    writer.start()
    until(lambda: waiting_for_space(client) is not None, 10, "the client to be refused")
    time.sleep(1.5)
    assert writer.is_alive() and admin.get("counter") is None
    assert waiting_for_space(client) >= 1.0
    assert client.get("counter") is None  # reads go through meanwhile
    free(admin)
    writer.join(40)
    assert not writer.is_alive()
    assert results == {"incr": 1, "pipe": [True, 1]}
    assert admin.mget("counter", "a", "b") == [b"1", b"1", b"1"]  # each ran once
    assert waiting_for_space(client) is None


def test_a_refused_transaction_under_watch_is_a_watcherror_after_a_wait(own_redis):
    admin = Redis.from_url(own_redis.url)
    client = WaitingRedis.from_url(own_redis.url)  # RQ_CONNECTION_CLASS: the retry comes with the client
    fill(admin)
    with client.pipeline() as pipe:
        pipe.watch("k")
        assert pipe.get("k") is None
        pipe.multi()
        pipe.set("k", "v")
        t0 = time.monotonic()
        with pytest.raises(WatchError):  # the WATCH is gone with the refused EXEC: the caller starts over
            pipe.execute()
        assert time.monotonic() - t0 >= FULL_FIRST_WAIT_S * 0.9  # after a wait, not at once
    assert waiting_for_space(client) is not None and admin.get("k") is None
    free(admin)


def test_enqueue_into_a_full_redis_is_one_line_and_exit_1(own_redis, s3_server):
    admin = Redis.from_url(own_redis.url)
    fill(admin)
    try:
        env = {**os.environ, "DEEPFAKE_LOG_FORMAT": "json", "DEEPFAKE_REDIS_URL": own_redis.url,
               "DEEPFAKE_S3_ENDPOINT_URL": s3_server.endpoint}
        proc = subprocess.run([sys.executable, "-m", "worker", "enqueue", f"s3://{BUCKET}/a.mp4"], capture_output=True,
                              text=True, timeout=120, env=env, check=False)
    finally:
        free(admin)
    assert proc.returncode == 1, proc.stderr
    # (after enqueue's warning that the upload cannot be read here: no such object)
    assert proc.stderr.splitlines()[-1].startswith("deepfake enqueue: Redis is full and refused the write (")
    assert "Traceback" not in proc.stderr and admin.llen("rq:queue:deepfake") == 0


def test_status_on_a_full_redis_shows_the_counts_and_says_maintenance_was_skipped(own_redis, s3_server):
    """What an operator runs when DeepfakeRedisFull fires: 0.4.4 printed only `Redis is full` (the
    maintenance lock's write was refused first), and the CronJob failed without saying why."""
    import json

    admin = Redis.from_url(own_redis.url)
    settings = Settings(redis_url=own_redis.url, s3_endpoint_url=s3_server.endpoint)
    ids = [enqueue(BUCKET, f"full-{i}.mp4", etag="", settings=settings, connection=admin) for i in range(3)]
    fill(admin)
    try:
        env = {**os.environ, "DEEPFAKE_LOG_FORMAT": "json", "DEEPFAKE_REDIS_URL": own_redis.url}
        proc = subprocess.run([sys.executable, "-m", "worker", "status"], capture_output=True, text=True,
                              timeout=120, env=env, check=False)
    finally:
        free(admin)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    status = json.loads(proc.stdout)
    assert status["queued"] == len(ids) and status["maintenance"].startswith("skipped: Redis is full")
    assert status["redis_memory"]["maxmemory_bytes"] == 1 < status["redis_memory"]["used_bytes"]
    assert proc.stderr.strip().splitlines()[-1].startswith("deepfake status: maintenance skipped: Redis is full")
    room = subprocess.run([sys.executable, "-m", "worker", "status"], capture_output=True, text=True, timeout=120,
                          env=env, check=False)
    assert room.returncode == 0 and json.loads(room.stdout)["maintenance"] == "done", room.stderr


# -- Redis away: the client ------------------------------------------------------------------------
def test_a_command_rides_out_a_restart_and_runs_once(tmp_path):
    server = DurableRedis(free_ports(1)[0], tmp_path).start()  # what it was told survives the restart
    client = Redis.from_url(server.url)
    ride_out(client, 60)
    try:
        assert client.incr("counter") == 1
        server.crash()
        results = {}
        writer = threading.Thread(target=lambda: results.setdefault("incr", client.incr("counter")))
        writer.start()
        time.sleep(2)
        assert writer.is_alive()  # reconnecting, not failed
        server.start()
        writer.join(30)
        assert results == {"incr": 2}  # the lost command ran once
        assert Redis.from_url(server.url).get("counter") == b"2"
    finally:
        stop(server.proc)


def test_a_write_to_a_primary_demoted_in_a_failover_is_ridden_out(tmp_path):
    """A failover that makes the old primary a replica keeps its clients connected: their writes get
    READONLY, which made the worker exit with its job in hand. Ridden out like an outage: here the
    server is promoted back, as a failover to it would; the write then runs, once."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    primary, other = RedisServer.start(tmp_path / "a"), RedisServer.start(tmp_path / "b")
    try:
        client = Redis.from_url(primary.url)
        ride_out(client, 60)
        assert client.incr("counter") == 1
        admin = Redis.from_url(primary.url)
        Redis.from_url(other.url).set("counter", 1)  # the data the demoted server copies
        admin.replicaof("127.0.0.1", other.port)  # demoted: now a replica, its clients still connected
        until(lambda: admin.info("replication").get("master_link_status") == "up", 10, "the demotion")
        results = {}
        writer = threading.Thread(target=lambda: results.setdefault("incr", client.incr("counter")))
        writer.start()
        time.sleep(1.5)
        assert writer.is_alive() and results == {}  # waiting, not failed
        assert admin.get("counter") == b"1"  # copied from the other server
        admin.replicaof("no", "one")  # promoted, with no write of ours after it for the writer to race
        writer.join(30)
        assert results == {"incr": 2} and admin.get("counter") == b"2"
    finally:
        stop(primary.proc)
        stop(other.proc)


def test_an_outage_past_the_limit_or_a_wrong_password_is_raised(tmp_path):
    port = free_ports(1)[0]  # nothing listens there
    client = Redis(port=port)
    ride_out(client, 1.5)
    t0 = time.monotonic()
    with pytest.raises(RedisUnreachable):
        client.ping()
    assert 1.5 <= time.monotonic() - t0 < 15
    guarded = RedisServer.start(tmp_path, "--requirepass", "right")
    try:
        wrong = Redis(port=guarded.port, password="wrong")
        ride_out(wrong, 60)
        t0 = time.monotonic()
        with pytest.raises(AuthenticationError):  # the deployment's mistake: said at once
            wrong.ping()
        assert time.monotonic() - t0 < 5
    finally:
        stop(guarded.proc)


# -- a real worker ---------------------------------------------------------------------------------
@pytest.fixture()
def uploads(s3_server, corpus):
    client = s3_server.client()
    if BUCKET not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=BUCKET)
    return client


def _settings(random_model_dir, s3_server, redis_url: str, tmp_path) -> Settings:
    # No retries: a job whose worker gave up would end failed, not quietly run again.
    return Settings(model_dir=random_model_dir, s3_endpoint_url=s3_server.endpoint, allowed_buckets=BUCKET,
                    frames=24, metrics_port=0, log_format="json", job_retries=0, redis_url=redis_url,
                    verdict_prefix=f"v-{tmp_path.name}/")


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _gauge(port: int, name: str) -> float:
    _, text = _get(port, "/metrics")
    [line] = [x for x in text.splitlines() if x.startswith(f"{name} ")]
    return float(line.split()[1])


def _full_seconds(port: int) -> float:
    return _gauge(port, "deepfake_redis_full_seconds")


def _finish(admin, url, job_ids, keys, supervisor, settings, uploads) -> None:
    free(admin)
    statuses = wait_until_final(lambda: Redis.from_url(url), job_ids, supervisor, timeout=180)
    assert set(statuses.values()) == {"finished"}, (statuses, supervisor.logs())
    for job_id, key in zip(job_ids, keys):
        [verdict] = stored(uploads, settings, key)  # written once
        assert job_state(job_id, settings=settings, connection=admin).result["created_at"] == verdict["created_at"]
    assert supervisor.restarts == 0 and supervisor.recovered == 0, supervisor.logs()
    assert FailedJobRegistry(queue=get_queue(admin, settings.queue)).count == 0
    assert '"event": "redis_space_back"' in supervisor.logs(None)


def _queued(uploads, corpus, admin, settings, prefix: str, n: int) -> tuple[list[str], list[str]]:
    """`n` uploads of one clip under `prefix`, each enqueued: their keys and job ids."""
    keys = [f"{prefix}/clip-{i}.mp4" for i in range(n)]
    for key in keys:
        uploads.put_object(Bucket=BUCKET, Key=key, Body=corpus["h264_mp4"].read_bytes())
    return keys, [enqueue(BUCKET, k, frames=24, settings=settings, connection=admin, s3_client=uploads) for k in keys]


def _waits_alive(supervisor) -> None:
    """The worker was refused, and is still there a few seconds later (RQ's own would have exited)."""
    until(lambda: REFUSED in supervisor.logs(None), 60, f"the worker to be refused\n{supervisor.logs()}")
    time.sleep(3)
    assert supervisor.alive() and supervisor.restarts == 0, supervisor.logs()


@pytest.mark.timeout(300)
def test_a_worker_filled_up_mid_job_keeps_it_and_finishes_it_once_there_is_room(
        own_redis, uploads, s3_server, random_model_dir, corpus, tmp_path):
    settings = _settings(random_model_dir, s3_server, own_redis.url, tmp_path)
    admin = Redis.from_url(own_redis.url)
    keys, job_ids = _queued(uploads, corpus, admin, settings, "mid-job", 3)
    port = free_ports(1)[0]
    supervisor = Supervisor(settings, own_redis.url, tmp_path, count=1,
                            env={"DEEPFAKE_FRAMES": "24", "DEEPFAKE_METRICS_PORT": str(port)})
    try:
        supervisor.start()
        started = StartedJobRegistry(queue=get_queue(admin, settings.queue))
        until(lambda: started.get_job_ids(cleanup=False), 120, f"a job to start\n{supervisor.logs()}")
        fill(admin)
        _waits_alive(supervisor)
        assert [job_state(j, settings=settings, connection=admin).status for j in job_ids].count("finished") < len(keys)
        status, body = _get(port, "/healthz")
        assert status == 200 and "Redis" in body and "full" in body, body  # a restart would not free it
        assert _full_seconds(port) >= 1.0
        # what DeepfakeRedisNearlyFull reads: used memory past maxmemory
        assert _gauge(port, "deepfake_redis_maxmemory_bytes") == 1 < _gauge(port, "deepfake_redis_used_memory_bytes")
        _finish(admin, own_redis.url, job_ids, keys, supervisor, settings, uploads)
        until(lambda: _full_seconds(port) == 0.0, 30, "the wait to end")
    finally:
        supervisor.stop()


@pytest.mark.timeout(300)
def test_a_worker_started_against_a_full_redis_waits_instead_of_exiting(
        own_redis, uploads, s3_server, random_model_dir, corpus, tmp_path):
    settings = _settings(random_model_dir, s3_server, own_redis.url, tmp_path)
    admin = Redis.from_url(own_redis.url)
    keys, job_ids = _queued(uploads, corpus, admin, settings, "at-start", 2)
    supervisor = Supervisor(settings, own_redis.url, tmp_path, count=1, env={"DEEPFAKE_FRAMES": "24"})
    try:
        fill(admin)
        supervisor.start()
        _waits_alive(supervisor)  # `rq worker` used to exit at its first Redis call
        assert admin.llen(get_queue(admin, settings.queue).key) == len(keys)
        _finish(admin, own_redis.url, job_ids, keys, supervisor, settings, uploads)
    finally:
        supervisor.stop()


@pytest.mark.parametrize("url, shown", [
    ("redis://:hunter2@cache:6379/0", "redis://:***@cache:6379/0"),
    ("rediss://app:p/w@rd@cache:6380/1", "rediss://app:***@cache:6380/1"),  # '/' and '@' in the password
    ("redis://cache:6379/0?password=hunter2&db=1", "redis://cache:6379/0?password=***&db=1"),
    ("unix:///run/redis.sock?password=hunter2", "unix:///run/redis.sock?password=***"),
    ("redis://:pa?ss@cache", "redis://:***@cache"),  # '?' in the password
    ("redis://cache:6379/0", "redis://cache:6379/0"),
])
def test_urls_in_logs_never_show_a_password(url, shown):
    from worker.redis_client import without_password

    assert without_password(url) == shown


def test_refused_urls_are_not_echoed_in_errors(monkeypatch):
    from pydantic import ValidationError

    from worker.settings import Settings

    for name, value in (("DEEPFAKE_REDIS_URL", "valkey://:hunter2@cache:6379/0"),
                        ("DEEPFAKE_REDIS_URL", "hunter2@cache:6379/0"),
                        ("DEEPFAKE_S3_ENDPOINT_URL", "ftp://user:hunter2@minio:9000")):
        monkeypatch.setenv(name, value)
        with pytest.raises(ValidationError) as caught:
            Settings()
        assert "hunter2" not in str(caught.value), caught.value
        monkeypatch.delenv(name)
