"""A directory of built TensorRT engines, keyed by everything that makes an engine (in)valid.

A TensorRT plan only runs on the GPU model and TensorRT version it was built with, for the network
and precision and shapes it was built for; building one takes minutes, so pods keep them on a
volume. The key is:

* GPU name and compute capability (a plan built on an A10 does not run on an H100),
* TensorRT version,
* sha256 of the ONNX file,
* precision (fp32 | fp16 | int8) and, for INT8, a digest of the calibration crops,
* the batch profile (min, opt, max) and input size,

hashed into the file name ``<onnx sha[:12]>-<precision>-b<min>-<opt>-<max>-<key digest[:16]>.engine``
with a ``.json`` beside it recording the key and the engine's sha256 (for people, and checked on load).

Writes are atomic: the engine is written to a temporary file in the same directory, fsynced and
renamed over the final name (``os.replace``), so a reader never sees half a file even when two pods
on one volume build the same engine at once — the later rename simply wins with an equivalent
engine. An advisory ``fcntl`` lock per key (best effort: skipped where the filesystem refuses it)
additionally lets the second builder wait and reuse the first one's engine instead of building too.

Sharing: pods running as other UIDs read the same volume, so files get the mode an ordinary write
would (0666 less the umask: ``mkstemp``'s 0600 would lock them out), the lock is also taken through a
read-only handle, and an entry this process cannot read is a miss (built and served, if it cannot be
replaced, uncached), never a worker that refuses to start.

Directory: the ``cache_dir`` argument, else ``$DEEPFAKE_CACHE_DIR``, else ``~/.cache/deepfake/trt``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CACHE_ENV = "DEEPFAKE_CACHE_DIR"
ENGINE_SUFFIX = ".engine"
META_SUFFIX = ".json"
CALIB_SUFFIX = ".calib"  # TensorRT's INT8 calibration cache, beside the engine
KEY_SCHEMA = "deepfake-trt-engine/1"


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "deepfake" / "trt"


@dataclass(frozen=True)
class EngineKey:
    gpu_name: str  # e.g. "NVIDIA H200"
    compute_capability: str  # e.g. "9.0"
    tensorrt_version: str
    onnx_sha256: str
    precision: str  # fp32 | fp16 | int8
    batch_profile: tuple[int, int, int]  # (min, opt, max) of the batch axis
    input_size: int = 299
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. {"calibration_sha256": ...}

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["batch_profile"] = list(self.batch_profile)
        return {"schema": KEY_SCHEMA, **d}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()

    def file_stem(self) -> str:
        lo, opt, hi = self.batch_profile
        return f"{self.onnx_sha256[:12]}-{self.precision}-b{lo}-{opt}-{hi}-{self.digest()[:16]}"


def _umask() -> int:
    """This process's umask, read from /proc: os.umask() can only read it by setting it, process-wide."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in its directory, fsync and rename, with the mode
    a plain write would give (mkstemp's 0600 would hide it from pods running as other UIDs)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            with contextlib.suppress(OSError):  # e.g. a filesystem without modes: still usable by us
                os.fchmod(fh.fileno(), 0o666 & ~_umask())
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class EngineCache:
    def __init__(self, directory: Path | str | None = None, *, lock: bool = True) -> None:
        self.directory = Path(directory).expanduser() if directory else default_cache_dir()
        self.lock = lock

    def path_for(self, key: EngineKey) -> Path:
        return self.directory / (key.file_stem() + ENGINE_SUFFIX)

    def calibration_path(self, key: EngineKey) -> Path:
        return self.directory / (key.file_stem() + CALIB_SUFFIX)

    def load(self, key: EngineKey) -> bytes | None:
        """The cached engine for `key`, or None (missing, unreadable, or not the bytes its record describes)."""
        path = self.path_for(key)
        meta_path = path.with_suffix(META_SUFFIX)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:  # e.g. written by a pod running as another UID: build our own
            log.warning("engine cache: cannot read %s (%s); treating it as missing", path, exc)
            return None
        try:
            meta = json.loads(meta_path.read_text())
        except (FileNotFoundError, ValueError):
            return data  # the engine's rename landed before its record's: the engine alone is whole
        except OSError as exc:
            log.warning("engine cache: cannot read %s (%s); treating the engine as missing", meta_path, exc)
            return None
        if not isinstance(meta, dict):  # valid JSON, but no record of ours ([] or null)
            log.warning("engine cache: %s is not a record; ignoring its engine", meta_path)
            return None
        if meta.get("key") != key.as_dict():
            log.warning("engine cache: %s records another key; ignoring it", meta_path)
            return None
        if meta.get("engine_sha256") not in (None, hashlib.sha256(data).hexdigest()):
            log.warning("engine cache: %s does not match its record; ignoring it", path)
            return None
        return data

    def store(self, key: EngineKey, data: bytes) -> Path:
        """Write `data` for `key` atomically (temporary file + rename), then its record."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path_for(key)
        atomic_write(path, data)
        meta = {"key": key.as_dict(), "engine_sha256": hashlib.sha256(data).hexdigest(),
                "bytes": len(data), "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        atomic_write(path.with_suffix(META_SUFFIX), (json.dumps(meta, indent=2) + "\n").encode())
        return path

    def invalidate(self, key: EngineKey) -> None:
        """Forget `key`'s engine, record and INT8 calibration cache (a rebuild recalibrates too)."""
        path = self.path_for(key)
        for p in (path, path.with_suffix(META_SUFFIX), self.calibration_path(key)):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:  # another UID's file in a sticky or read-only directory: rebuilt, served uncached
                log.warning("engine cache: cannot remove %s (%s)", p, exc)

    @contextlib.contextmanager
    def _locked(self, key: EngineKey) -> Iterator[None]:
        if not self.lock:
            yield
            return
        try:
            import fcntl

            self.directory.mkdir(parents=True, exist_ok=True)
            lock_path = self.path_for(key).with_suffix(".lock")
            try:
                fh = open(lock_path, "a+b")  # created 0666 less the umask, like the engines
            except PermissionError:  # another UID's lock file: flock works through a read-only handle too
                fh = open(lock_path, "rb")
        except (ImportError, OSError) as exc:  # no fcntl, read-only or odd filesystem: rename still protects
            log.debug("engine cache: no lock (%s)", exc)
            yield
            return
        try:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            except OSError as exc:  # e.g. some network filesystems
                log.debug("engine cache: flock refused (%s)", exc)
            yield
        finally:
            fh.close()  # closing releases the lock

    def get_or_build(self, key: EngineKey, build: Callable[[], bytes]) -> tuple[bytes, bool]:
        """(engine bytes, built now?): the cached engine, else `build()`'s result, stored for next time."""
        data = self.load(key)
        if data is not None:
            return data, False
        with self._locked(key):
            data = self.load(key)  # another process may have built it while we waited
            if data is not None:
                return data, False
            data = build()
            if not data:
                raise RuntimeError("the engine build returned no bytes")
            try:
                self.store(key, data)
            except OSError as exc:  # a read-only cache must not stop the worker: it just rebuilds next time
                log.warning("engine cache: could not store %s (%s)", self.path_for(key), exc)
            return data, True
