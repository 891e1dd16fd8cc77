"""The engine cache (TensorRT engines, ONNX Runtime INT8 graphs): its key covers everything that
invalidates an engine, an engine is built once and then reused, a record that does not match is
rejected, writes are atomic, and concurrent builders build once and agree, with or without the lock."""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest

from worker.engine.cache import CACHE_ENV, EngineCache, EngineKey, default_cache_dir


def make_key(**overrides) -> EngineKey:
    fields = dict(gpu_name="NVIDIA H200", compute_capability="9.0", tensorrt_version="10.7.0",
                  onnx_sha256="ab" * 32, precision="fp16", batch_profile=(1, 32, 32), input_size=299)
    fields.update(overrides)
    return EngineKey(**fields)


def test_cache_key_covers_everything_that_invalidates_an_engine() -> None:
    base = make_key()
    assert base.digest() == make_key().digest()  # deterministic
    variants = [make_key(gpu_name="NVIDIA A10"), make_key(compute_capability="8.6"),
                make_key(tensorrt_version="10.8.0"), make_key(onnx_sha256="cd" * 32),
                make_key(precision="int8"), make_key(batch_profile=(1, 16, 16)), make_key(input_size=256),
                make_key(extra={"calibration_sha256": "00"})]
    digests = {v.digest() for v in variants} | {base.digest()}
    assert len(digests) == len(variants) + 1
    stem = base.file_stem()
    assert stem.startswith("abababababab-fp16-b1-32-32-") and "." not in stem


def test_cache_dir_default(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c" and EngineCache().directory == tmp_path / "c"
    monkeypatch.delenv(CACHE_ENV)
    assert default_cache_dir() == Path.home() / ".cache" / "deepfake" / "trt"


def test_cache_builds_once_then_reuses(tmp_path) -> None:
    cache = EngineCache(tmp_path / "trt")
    calls = []

    def build() -> bytes:
        calls.append(1)
        return b"plan-" + os.urandom(64)

    key = make_key()
    first, built = cache.get_or_build(key, build)
    assert built and len(calls) == 1
    again, built = EngineCache(tmp_path / "trt").get_or_build(key, build)  # a second pod on the volume
    assert not built and again == first and len(calls) == 1
    path = cache.path_for(key)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["key"] == key.as_dict() and meta["engine_sha256"] == hashlib.sha256(first).hexdigest()
    other, built = cache.get_or_build(make_key(precision="fp32"), build)  # another key builds anew
    assert built and other != first and len(calls) == 2
    assert not list((tmp_path / "trt").glob(".*tmp"))  # no temporary files left


def test_cache_rejects_an_engine_that_does_not_match_its_record(tmp_path) -> None:
    cache = EngineCache(tmp_path)
    key = make_key()
    cache.store(key, b"good engine")
    cache.path_for(key).write_bytes(b"bit-rotted")
    assert cache.load(key) is None
    data, built = cache.get_or_build(key, lambda: b"rebuilt")
    assert built and data == b"rebuilt" and cache.load(key) == b"rebuilt"
    cache.invalidate(key)
    assert cache.load(key) is None and not cache.path_for(key).exists()


def test_cache_write_is_atomic(tmp_path, monkeypatch) -> None:
    """A build that fails, or a write that dies half-way, leaves no engine and no temporary file."""
    cache = EngineCache(tmp_path)
    key = make_key()

    def failing_build() -> bytes:
        raise RuntimeError("builder ran out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        cache.get_or_build(key, failing_build)
    assert not cache.path_for(key).exists()

    def dying_fsync(fd: int) -> None:
        raise OSError("disk gone")  # after the bytes went into the temporary file, before the rename

    monkeypatch.setattr(os, "fsync", dying_fsync)
    with pytest.raises(OSError, match="disk gone"):
        cache.store(key, b"x" * 1000)
    assert not cache.path_for(key).exists()
    assert [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []


def test_cache_concurrent_builders_build_once_and_agree(tmp_path) -> None:
    """Eight workers start at once on one key: one builds (the others wait on the lock), all get its bytes,
    and a reader polling meanwhile only ever sees no file or the whole file (an empty or short one is torn)."""
    key = make_key()
    calls = []
    payload = b"E" * (1 << 20)
    results: list[bytes] = []
    torn: list[int] = []
    stop = threading.Event()

    def build() -> bytes:
        calls.append(1)
        time.sleep(0.3)
        return payload

    def worker() -> None:
        results.append(EngineCache(tmp_path).get_or_build(key, build)[0])

    def reader() -> None:
        path = EngineCache(tmp_path).path_for(key)
        while not stop.is_set():
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue  # not built yet
            if data != payload:
                torn.append(len(data))

    r = threading.Thread(target=reader)
    r.start()
    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    r.join()
    assert len(calls) == 1 and results == [payload] * 8
    assert torn == []


def test_cache_without_lock_still_never_tears(tmp_path) -> None:
    """Without the lock (filesystems that refuse flock) builders may race; the renames keep the file whole.
    They rebuild over a stale engine (its record disagrees) that a pod is still reading: each build lands
    in a new file, so that pod reads the whole old engine, never bytes of the new one."""
    key = make_key()
    payloads = [bytes([i]) * 200_000 for i in range(4)]
    barrier = threading.Barrier(4)
    path = EngineCache(tmp_path).store(key, b"S" * 200_000)
    path.with_suffix(".json").write_text(json.dumps({"key": key.as_dict(), "engine_sha256": "0" * 64}))
    held = open(path, "rb")  # noqa: SIM115 - open across the rebuild
    inode = os.fstat(held.fileno()).st_ino

    def worker(i: int) -> None:
        def build() -> bytes:
            barrier.wait()
            return payloads[i]

        EngineCache(tmp_path, lock=False).get_or_build(key, build)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    data = EngineCache(tmp_path).path_for(key).read_bytes()
    assert data in payloads
    with held:
        assert held.read() == b"S" * 200_000  # the old engine, whole: not rewritten in place
    assert path.stat().st_ino != inode
