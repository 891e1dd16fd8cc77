"""Which Redis records belong to one upload: its jobs and its duplicate records, so that
`deepfake forget` can erase them without scanning every job Redis holds.

Enqueue records the job and its duplicate key; the worker records each job it runs (jobs a
non-Python client enqueued included). The set is keyed by a hash of the location, not the key
itself, and expires with the results it points at.
"""
from __future__ import annotations

import hashlib

from redis import Redis

INDEX_PREFIX = "deepfake:upload:"
JOB, DEDUPE = "job:", "dedupe:"


def index_key(bucket: str, key: str) -> str:
    return INDEX_PREFIX + hashlib.sha256(f"{bucket}/{key}".encode()).hexdigest()


def record(connection: Redis, bucket: str, key: str, *, ttl_s: int, job_id: str | None = None,
           dedupe_key: str | None = None) -> None:
    members = ([JOB + job_id] if job_id else []) + ([DEDUPE + dedupe_key] if dedupe_key else [])
    if not members:
        return
    name = index_key(bucket, key)
    with connection.pipeline() as pipe:
        pipe.sadd(name, *members)
        pipe.expire(name, max(1, int(ttl_s)))  # outlives nothing it indexes: results and dedupe keys expire too
        pipe.execute()


def recorded(connection: Redis, bucket: str, key: str) -> tuple[set[str], set[str]]:
    """(job ids, duplicate-record keys) recorded for s3://bucket/key."""
    jobs, dedupes = set(), set()
    for raw in connection.smembers(index_key(bucket, key)):
        member = raw.decode() if isinstance(raw, bytes) else raw
        if member.startswith(JOB):
            jobs.add(member[len(JOB):])
        elif member.startswith(DEDUPE):
            dedupes.add(member[len(DEDUPE):])
    return jobs, dedupes


def remove(connection: Redis, bucket: str, key: str, *, job_ids: set[str], dedupe_keys: set[str]) -> None:
    """Drop these jobs and duplicate records from the upload's set, and the set once it is empty
    (another deployment on the same Redis may still have its own there)."""
    name = index_key(bucket, key)
    members = [JOB + j for j in job_ids] + [DEDUPE + d for d in dedupe_keys]
    if members:
        connection.srem(name, *members)
    if connection.scard(name) == 0:
        connection.delete(name)
