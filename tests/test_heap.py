"""The worker gives the C heap's free pages back after each job (worker/heap.py)."""
from __future__ import annotations

import ctypes
import ctypes.util

import pytest
from workers import burst, queue_settings

from worker import heap
from worker.queue import enqueue, job_state

BUCKET = "heap"
KEY = "clips/carphone.mp4"
CHUNK, CHUNKS = 64 << 10, 2048  # 128 MB in blocks under glibc's mmap threshold: they come from the heap

glibc = pytest.mark.skipif(heap._malloc_trim() is None, reason="malloc_trim is glibc's; this C library has none")


@glibc
def test_free_heap_pages_below_the_top_are_returned():
    """What glibc keeps by itself: free blocks below one still in use, which only a trim returns."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(CHUNK) for _ in range(CHUNKS)]
    for block in blocks:
        ctypes.memset(block, 1, CHUNK)  # touched: resident
    pinned = libc.malloc(CHUNK)  # above them all: the heap's top cannot shrink past it
    for block in blocks:
        libc.free(block)
    kept = heap.resident_bytes()
    assert heap.release_free_memory()
    returned = kept - heap.resident_bytes()
    libc.free(pinned)
    assert returned > CHUNK * CHUNKS // 2, returned


@pytest.fixture(scope="module")
def s3(s3_server, corpus):
    return s3_server.bucket_with(BUCKET, {KEY: corpus["carphone"].read_bytes()})


def test_the_worker_trims_after_every_job(s3, redis, random_model_dir, redis_server, s3_server, tmp_path, moderator,
                                          monkeypatch):
    """Each job ends with a trim, a failed one's too, in the worker that ran it."""
    trims = []

    def counted() -> bool:
        trims.append(True)
        return heap.release_free_memory()

    monkeypatch.setattr("worker.rq_worker.release_free_memory", counted)
    settings = queue_settings(random_model_dir, redis_server, s3_server, tmp_path, BUCKET)
    ok = enqueue(BUCKET, KEY, settings=settings, connection=redis, s3_client=s3)
    failed = redis_queue_job(redis, settings)
    burst(redis, settings, moderator)
    assert job_state(ok, settings=settings, connection=redis).status == "finished"
    assert job_state(failed, settings=settings, connection=redis).status == "failed"
    assert len(trims) == 2


def redis_queue_job(redis, settings) -> str:
    """A job the worker refuses (it names other code): it fails at once."""
    from worker.queue import get_queue

    return get_queue(redis, settings.queue).enqueue("os.getcwd").id
