"""Which Redis records belong to one upload: its jobs and its duplicate records, so that
`deepfake forget` can erase them without scanning every job Redis holds.

Enqueue records the job and its duplicate key; the worker records each job it runs (jobs a
non-Python client enqueued included). The set is keyed by a hash of the location, not the key
itself, expires with the results it points at, and drops those that expired (`PRUNE_ABOVE`).
"""
from __future__ import annotations

import hashlib

from redis import Redis
from rq.job import Job

INDEX_PREFIX = "deepfake:upload:"
JOB, DEDUPE = "job:", "dedupe:"


def index_key(bucket: str, key: str) -> str:
    return INDEX_PREFIX + hashlib.sha256(f"{bucket}/{key}".encode()).hexdigest()


# Each time a record takes the set past a multiple of this many members, it drops those whose job or
# duplicate record has expired: every new job for a key re-arms the set's expiry, so a key re-enqueued
# more often than results last (a replaced avatar, repeated S3 events) kept every job it ever had, and
# `forget` fetched them all. (A set of many live members is checked once per this many added.)
PRUNE_ABOVE = 16
# Members dropped only if what they name (KEYS[2..], ARGV[1..] in step) is still gone when removed: a
# duplicate record that expires and is claimed again between a check and a removal stays indexed.
DROP_GONE = """
local dropped = 0
for i, member in ipairs(ARGV) do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then
    dropped = dropped + redis.call('SREM', KEYS[1], member)
  end
end
return dropped
"""


def record(connection: Redis, bucket: str, key: str, *, ttl_s: int, job_id: str | None = None,
           dedupe_key: str | None = None) -> None:
    members = ([JOB + job_id] if job_id else []) + ([DEDUPE + dedupe_key] if dedupe_key else [])
    if not members:
        return
    name = index_key(bucket, key)
    with connection.pipeline() as pipe:
        pipe.sadd(name, *members)
        pipe.expire(name, max(1, int(ttl_s)))  # outlives nothing it indexes: results and dedupe keys expire too
        pipe.scard(name)
        added, _, size = pipe.execute()
    if added and size // PRUNE_ABOVE > (size - added) // PRUNE_ABOVE:
        prune(connection, name)


def prune(connection: Redis, name: str) -> int:
    """Drop the members of index `name` whose job hash or duplicate record is gone (expired, or erased
    by another deployment's `forget`), and any this module does not write; how many. A member is
    added once what it names exists."""
    targets = {member: _target(member) for member in
               (raw.decode() if isinstance(raw, bytes) else raw for raw in connection.smembers(name))}
    foreign = [member for member, target in targets.items() if target is None]
    dropped = connection.srem(name, *foreign) if foreign else 0
    known = [(member, target) for member, target in targets.items() if target is not None]
    if known:
        dropped += connection.eval(DROP_GONE, 1 + len(known), name, *[t for _, t in known], *[m for m, _ in known])
    return dropped


def _target(member: str) -> str | None:
    """The Redis key a member names (None: not a member this module writes)."""
    if member.startswith(JOB):
        return Job.key_for(member[len(JOB):])
    if member.startswith(DEDUPE):
        return member[len(DEDUPE):]
    return None


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
