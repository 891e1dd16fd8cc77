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


# -- a volume shared by pods running as other UIDs ----------------------------------------------------

def test_cache_files_get_the_mode_a_plain_write_would(tmp_path) -> None:
    """mkstemp makes 0600 files and the rename keeps that mode: a pod running as another UID could not
    read the engine. Written files get 0666 less the umask instead, like any other write."""
    old = os.umask(0o027)
    try:
        cache = EngineCache(tmp_path)
        path = cache.store(make_key(), b"engine")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640
    assert path.with_suffix(".json").stat().st_mode & 0o777 == 0o640


def test_cache_entry_it_cannot_read_is_a_miss(tmp_path, monkeypatch, caplog) -> None:
    """Another UID's engine it may not read (PermissionError, not FileNotFoundError) is rebuilt, and one
    it may not replace either is served uncached: the worker starts either way."""
    cache = EngineCache(tmp_path)
    key = make_key()
    cache.store(key, b"theirs")
    read_bytes = Path.read_bytes

    def denied(self: Path) -> bytes:
        if self == cache.path_for(key):
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    assert cache.load(key) is None and "cannot read" in caplog.text

    def no_replace(src, dst) -> None:  # noqa: ANN001 - os.replace's signature
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(os, "replace", no_replace)
    assert cache.get_or_build(key, lambda: b"ours") == (b"ours", True)
    assert "could not store" in caplog.text
    assert [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []


def test_cache_lock_through_a_read_only_handle(tmp_path, monkeypatch) -> None:
    """Another UID's lock file (0644) cannot be opened for writing; flock through a read-only handle
    still serialises the builders."""
    import builtins
    import fcntl

    import worker.engine.cache as cache_module

    cache = EngineCache(tmp_path)
    key = make_key()
    lock_path = cache.path_for(key).with_suffix(".lock")
    lock_path.touch()

    def only_read(file, mode="r", *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if Path(file) == lock_path and mode != "rb":
            raise PermissionError(13, "Permission denied", str(file))
        return builtins.open(file, mode, *args, **kwargs)

    monkeypatch.setattr(cache_module, "open", only_read, raising=False)
    with cache._locked(key), open(lock_path, "rb") as other:  # another open file description
        with pytest.raises(BlockingIOError):
            fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to run as a second UID")
def test_a_pod_running_as_another_uid_reuses_the_engine() -> None:
    """The real thing: root builds into a shared directory, `nobody` (not allowed to write there) loads
    the engine instead of failing to start."""
    import shutil
    import subprocess
    import sys
    import tempfile

    shared = Path(tempfile.mkdtemp(prefix="engine-cache-"))  # not under tmp_path: its parents are 0700
    try:
        shared.chmod(0o755)
        old = os.umask(0o022)
        try:
            EngineCache(shared).store(make_key(), b"plan")
        finally:
            os.umask(old)
        code = ("import os, sys; from worker.engine.cache import EngineCache, EngineKey\n"
                "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"  # after start-up: /root is 0700
                "key = EngineKey(gpu_name='NVIDIA H200', compute_capability='9.0', tensorrt_version='10.7.0',"
                " onnx_sha256='ab' * 32, precision='fp16', batch_profile=(1, 32, 32), input_size=299)\n"
                "print(EngineCache(sys.argv[1]).get_or_build(key, lambda: b'rebuilt'))\n")
        repo = Path(__file__).resolve().parents[1]
        out = subprocess.run([sys.executable, "-c", code, str(shared)], cwd=repo, env={"PYTHONPATH": str(repo)},
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "(b'plan', False)"
    finally:
        shutil.rmtree(shared)


def test_cache_record_that_is_not_an_object_is_a_miss(tmp_path) -> None:
    cache = EngineCache(tmp_path)
    key = make_key()
    for record in ("[]", "null", '"x"', "3"):
        cache.store(key, b"engine")
        cache.path_for(key).with_suffix(".json").write_text(record)
        assert cache.load(key) is None, record
        assert cache.get_or_build(key, lambda: b"rebuilt") == (b"rebuilt", True)


def test_cache_invalidate_forgets_the_calibration_cache(tmp_path, monkeypatch) -> None:
    """rebuild=True invalidates: a TensorRT INT8 rebuild must calibrate afresh, not reuse the old scales."""
    cache = EngineCache(tmp_path)
    key = make_key(precision="int8")
    path = cache.store(key, b"engine")
    calib = tmp_path / f"{key.file_stem()}.calib"
    calib.write_bytes(b"scales")
    cache.invalidate(key)
    assert not path.exists() and not path.with_suffix(".json").exists() and not calib.exists()
    cache.invalidate(key)  # nothing left: no error
    # Files it may not remove (another UID's, in a sticky directory; faked: tests run as root): a
    # warning, and the rebuild goes on.
    cache.store(key, b"engine")
    monkeypatch.setattr(Path, "unlink", refuse)
    cache.invalidate(key)
    assert path.exists()


def refuse(path: Path, *args, **kwargs):
    raise PermissionError(13, "Permission denied", str(path))


def test_tensorrt_calibration_cache_is_written_atomically(tmp_path, monkeypatch) -> None:
    """Pods on one volume may calibrate at once: the .calib is replaced by a rename, never rewritten in
    place under a reader (which keeps the whole old file)."""
    import types

    import numpy as np

    from worker.engine.tensorrt_engine import _make_calibrator

    class Base:
        def __init__(self) -> None:
            pass

    cache_file = tmp_path / "sub" / "x.calib"
    cache_file.parent.mkdir()
    cache_file.write_bytes(b"old scales")
    calibrator = _make_calibrator(types.SimpleNamespace(IInt8EntropyCalibrator2=Base), np.zeros((2, 8, 8, 3), np.uint8),
                                  1, "cpu", cache_file)
    with open(cache_file, "rb") as held:
        inode = os.fstat(held.fileno()).st_ino
        calibrator.write_calibration_cache(memoryview(b"new scales"))
        assert held.read() == b"old scales"
    assert calibrator.read_calibration_cache() == b"new scales" and cache_file.stat().st_ino != inode
    assert [p.name for p in cache_file.parent.iterdir()] == ["x.calib"]  # no temporary file left
    # Unreadable (another UID's; faked): None, calibrated anew. Raising inside TensorRT's callback could abort.
    monkeypatch.setattr(Path, "read_bytes", refuse)
    assert calibrator.read_calibration_cache() is None
