"""Reading uploads from S3: checked locations, a HEAD before any byte is decoded, ranged streaming reads.

`S3RangeReader` is a seekable file object over ranged GETs, so PyAV can jump to an MP4 index at the
end of a multi-GB object without the worker downloading it first. Every GET is pinned to the ETag
seen at HEAD time: an object replaced mid-read fails cleanly instead of mixing two uploads.
"""
from __future__ import annotations

import io
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from urllib3.exceptions import HTTPError as Urllib3Error

from worker.errors import AccessDenied, Corrupt, Interrupted, ModerationError, NotFound, TransientError
from worker.source import check_size

MAX_KEY_BYTES = 1024
NOT_FOUND_CODES = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
DENIED_CODES = {"403", "AccessDenied", "AllAccessDisabled"}
# The worker's own credentials or clock refused (rotated or expired keys, a skewed node clock): no
# property of the upload, so the job fails for RQ to retry and the failed-jobs alert tells.
CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "RequestTimeTooSkewed", "ExpiredToken",
                    "InvalidToken", "TokenRefreshRequired", "InvalidClientTokenId"}
CHANGED_CODES = {"412", "PreconditionFailed"}
# botocore retries a request until its response starts; a body cut off after that (a reset or a
# read timeout mid-stream) is retried here, this many times in all, before the job fails transiently.
BODY_ATTEMPTS = 3


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @classmethod
    def parse(cls, uri: str) -> "S3Location":
        if not uri.startswith("s3://"):
            raise ValueError(f"not an s3:// URI: {uri!r}")
        bucket, _, key = uri[5:].partition("/")
        validate_location(bucket, key)
        return cls(bucket, key)


def validate_bucket(bucket: str) -> None:
    if not (3 <= len(bucket) <= 63) or not all((c.isascii() and c.isalnum()) or c in "-." for c in bucket) or bucket[0] in "-.":
        raise ValueError(f"invalid bucket name: {bucket!r}")


def validate_location(bucket: str, key: str) -> None:
    """Reject bucket names and keys that could escape into other prefixes or break a verdict path."""
    validate_bucket(bucket)
    if not key or len(key.encode()) > MAX_KEY_BYTES:
        raise ValueError("the object key must be 1 to 1024 bytes")
    if key.startswith("/") or any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"object key with empty, '.' or '..' path segments is not accepted: {key!r}")
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise ValueError("object key contains control characters")


def make_client(endpoint_url: str | None = None, region: str | None = None, attempts: int = 6,
                read_timeout_s: float = 60.0) -> Any:
    """A boto3 S3 client with botocore's standard retry mode (backoff on 5xx, throttling, resets),
    trying each request `attempts` times in all (botocore's own `max_attempts` counts the retries).

    The defaults are the worker's, which streams uploads and can wait: an endpoint that stalls fails
    a request after 6 tries of 60 s. What a person or a request handler waits on takes `control_client`.
    """
    config = Config(
        retries={"mode": "standard", "total_max_attempts": attempts},
        s3={"addressing_style": "path"} if endpoint_url else {},
        connect_timeout=10,
        read_timeout=read_timeout_s,
    )
    # Unset: boto3's own chain (AWS_REGION, which IRSA and EKS pod identity set, then the config file),
    # so requests go to the bucket's regional endpoint instead of us-east-1 and a redirect.
    region = region or boto3.session.Session().region_name or "us-east-1"
    return boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


# The CLI, `enqueue` and `deepfake check` make small requests (HEAD, LIST, a verdict's JSON) that a
# person or an upload handler waits on: 3 tries of 10 s, so a stalled endpoint fails them in about
# half a minute, not the worker's 6 (6 tries of 60 s).
CONTROL_ATTEMPTS = 3
CONTROL_READ_TIMEOUT_S = 10.0


def control_client(endpoint_url: str | None = None, region: str | None = None) -> Any:
    """An S3 client for calls someone waits on (see CONTROL_ATTEMPTS): the CLI, enqueue, backfill, forget, check."""
    return make_client(endpoint_url, region, attempts=CONTROL_ATTEMPTS, read_timeout_s=CONTROL_READ_TIMEOUT_S)


def error_code(exc: Exception) -> str:
    """S3's error code ("NoSuchKey", "403", ...) of a ClientError; "" for any other failure."""
    return str(exc.response.get("Error", {}).get("Code", "")) if isinstance(exc, ClientError) else ""


def bucket_allowed(allowed: frozenset[str], bucket: str) -> bool:
    """Whether `bucket` is in an allow-list (DEEPFAKE_ALLOWED_BUCKETS, where * allows any)."""
    return "*" in allowed or bucket in allowed


def translate_error(exc: Exception, uri: str) -> ModerationError | None:
    """The verdict error for an S3 failure, or None when it is not the input's fault (retry the job)."""
    if isinstance(exc, ClientError):
        code = error_code(exc)
        if code in CREDENTIAL_CODES:
            return None
        if code in NOT_FOUND_CODES:
            return NotFound(f"{uri} does not exist")
        if code in DENIED_CODES:
            return AccessDenied(f"access to {uri} denied ({code})")
        if code in CHANGED_CODES:
            return Corrupt(f"{uri} changed while it was being read")
    return None


def described(exc: Exception) -> str:
    """An S3 failure for an error message; for refused credentials, what the operator should check."""
    if error_code(exc) in CREDENTIAL_CODES:
        return f"{exc} (the worker's S3 credentials or its clock were refused: check its keys, token and time)"
    return str(exc)


def _with_error_code(client: Any, location: S3Location, exc: Exception) -> Exception:
    """A HEAD response has no body, so a refusal arrives as a bare 403 whether the object's policy
    denies the worker or the worker's own keys are wrong: a one-byte GET reads S3's error code."""
    if error_code(exc) != "403":
        return exc
    try:
        client.get_object(Bucket=location.bucket, Key=location.key, Range="bytes=0-0")["Body"].close()
    except (ClientError, BotoCoreError) as detailed:
        return detailed
    return exc  # HEAD denied, GET allowed: a policy that denies the worker HEAD, not its keys


class S3RangeReader(io.RawIOBase):
    """A seekable, read-only file object over ranged GETs with a small block cache."""

    def __init__(self, client: Any, bucket: str, key: str, size: int, etag: str, *,
                 block_size: int = 4 << 20, cache_blocks: int = 4) -> None:
        super().__init__()
        self._client, self._bucket, self._key = client, bucket, key
        client.meta.events.register("before-send.s3.GetObject", _refuse_when_interrupted,
                                    unique_id="deepfake-refuse-when-interrupted")  # once per client
        self._size, self._etag = size, etag
        self._block_size, self._cache_blocks = block_size, cache_blocks
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self._pos = 0
        self.requests = 0  # ranged GETs issued, for tests and metrics
        self.io_s = 0.0  # time spent waiting on S3 (a decode that timed out on it is S3's fault)
        # The first failed read, raised again by every later one. FFmpeg may swallow an exception
        # raised in its read callback (and treat it as the end of the data), so the caller checks
        # this after decoding: a failed read must never end as a verdict about the upload's bytes.
        self.error: Exception | None = None
        # What stopped a read from outside (RQ's job time limit, raised by SIGALRM inside a GET): every
        # later read raises Interrupted with it instead of a new GET. FFmpeg retries a failed read, and
        # a new GET against a stalled store ran minutes past the limit and ended as a storage error,
        # the timeout lost.
        self.interrupt: BaseException | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if self.interrupt is not None:
            raise Interrupted(self.interrupt)
        try:
            base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
            self._pos = max(0, base + offset)
            return self._pos
        except Exception:
            raise
        except BaseException as exc:
            raise self._stopped(exc) from exc

    def _fail(self, exc: Exception, uri: str) -> Exception:
        self.error = translate_error(exc, uri) or TransientError(f"reading {uri} failed: {described(exc)}")
        return self.error

    def cancel(self, reason: BaseException) -> None:
        """Make every later read, and the next try of a GET in flight, raise Interrupted(`reason`) (a
        job stopped while another thread reads): the GET waits for its try in flight only."""
        self.interrupt = self.interrupt or reason

    def _stopped(self, exc: BaseException) -> Interrupted:
        """What stops a read from outside (anything not an Exception: RQ's time limit, a stop) is kept,
        and raised as Interrupted, an Exception: PyAV turns anything else raised in its read or seek
        callback into a read of 0 bytes (or a failed seek), which FFmpeg tries again, for ever. (The
        time limit's handler also cancels the reader itself, for a signal that lands in a callback
        before this can catch it: worker.jobs.DeepfakeDeathPenalty.)"""
        self.interrupt = self.interrupt or exc
        return Interrupted(self.interrupt)

    def _block(self, index: int) -> bytes:
        if self.error is not None:
            raise self.error
        if index in self._blocks:
            self._blocks.move_to_end(index)
            return self._blocks[index]
        start = index * self._block_size
        end = min(start + self._block_size, self._size) - 1
        uri = f"s3://{self._bucket}/{self._key}"
        t0 = time.monotonic()
        try:
            data = self._fetch(start, end, uri)
        finally:
            self.io_s += time.monotonic() - t0
        self._blocks[index] = data
        while len(self._blocks) > self._cache_blocks:
            self._blocks.popitem(last=False)
        return data

    def _fetch(self, start: int, end: int, uri: str) -> bytes:
        """Bytes start..end (inclusive), pinned to the ETag, a body cut off mid-stream read again."""
        for attempt in range(BODY_ATTEMPTS):
            if self.interrupt is not None:  # cancelled from another thread since the last try
                raise Interrupted(self.interrupt)
            self.requests += 1
            try:
                _in_flight.reader = self  # for _refuse_when_interrupted, on this thread
                resp = self._client.get_object(Bucket=self._bucket, Key=self._key, Range=f"bytes={start}-{end}",
                                               IfMatch=self._etag)
            except (ClientError, BotoCoreError) as exc:  # botocore has already retried what it could
                raise self._fail(exc, uri) from exc
            finally:
                _in_flight.reader = None
            try:
                data = resp["Body"].read()
            # The body broke off mid-stream: botocore wraps a reset or a read timeout, but a TLS
            # failure comes through as urllib3's own error, and a socket error as OSError.
            except (BotoCoreError, Urllib3Error, OSError) as exc:
                if attempt + 1 == BODY_ATTEMPTS:
                    raise self._fail(exc, uri) from exc
                time.sleep(0.1 * 2**attempt)
                continue
            return data
        raise AssertionError("unreachable: the last attempt returns or raises")

    def readinto(self, buffer: Any) -> int:
        if self.interrupt is not None:
            raise Interrupted(self.interrupt)
        try:
            return self._readinto(buffer)
        except Exception:
            raise
        except BaseException as exc:
            raise self._stopped(exc) from exc

    def _readinto(self, buffer: Any) -> int:
        if self._pos >= self._size:
            return 0
        view = memoryview(buffer).cast("B")
        n = min(len(view), self._size - self._pos)
        done = 0
        while done < n:
            index, offset = divmod(self._pos, self._block_size)
            block = self._block(index)
            take = min(n - done, len(block) - offset)
            if take <= 0:
                break
            view[done : done + take] = block[offset : offset + take]
            done += take
            self._pos += take
        return done

    def read(self, size: int = -1) -> bytes:
        if self.interrupt is not None:
            raise Interrupted(self.interrupt)
        try:
            if size is None or size < 0:
                size = self._size - self._pos
            buf = bytearray(max(0, min(size, self._size - self._pos)))
            n = self._readinto(buf)
            return bytes(buf[:n])
        except Exception:
            raise
        except BaseException as exc:
            raise self._stopped(exc) from exc


_in_flight = threading.local()  # the reader whose GET this thread is sending


def _refuse_when_interrupted(**kwargs: Any) -> None:
    """botocore's `before-send`, before each try of a request: a GET of a reader stopped meanwhile is
    not tried again (botocore would, up to `attempts` tries of `read_timeout_s` against a stalled
    store, while the stopped job waited for its decoding thread)."""
    reader = getattr(_in_flight, "reader", None)
    if reader is not None and reader.interrupt is not None:
        raise Interrupted(reader.interrupt)


@dataclass
class S3Source:
    """An object in S3, checked (allow-list, size) by `resolve` before it is opened."""

    client: Any
    location: S3Location
    size: int
    etag: str
    content_type: str | None
    reader: S3RangeReader | None = field(default=None, init=False, repr=False)  # the one opened last

    @property
    def uri(self) -> str:
        return self.location.uri

    @classmethod
    def resolve(cls, client: Any, location: S3Location, *, max_bytes: int,
                allowed_buckets: frozenset[str]) -> "S3Source":
        if not bucket_allowed(allowed_buckets, location.bucket):
            raise AccessDenied(f"bucket {location.bucket!r} is not in the worker's allow-list (DEEPFAKE_ALLOWED_BUCKETS)")
        try:
            head = client.head_object(Bucket=location.bucket, Key=location.key)
        except (ClientError, BotoCoreError) as exc:
            exc = _with_error_code(client, location, exc)
            raise translate_error(exc, location.uri) or TransientError(
                f"HEAD {location.uri} failed: {described(exc)}") from exc
        size = int(head["ContentLength"])
        # The size decides here; the content type never does: the uploader chooses it (browsers send
        # image/gif for an animated GIF, `aws s3 cp` audio/3gpp for a .3gp video), and refusing on it
        # let any video through as `not_a_video`, unread. The bytes say what the upload is.
        try:
            check_size(location.uri, size, max_bytes)
        except ModerationError as exc:
            exc.etag = head["ETag"]  # the bytes refused: a verdict stored for them is not replaced
            raise
        return cls(client, location, size, head["ETag"], head.get("ContentType"))

    def open(self) -> S3RangeReader:
        self.reader = S3RangeReader(self.client, self.location.bucket, self.location.key, self.size, self.etag)
        return self.reader

    @property
    def io_s(self) -> float:
        """Seconds the object opened last spent waiting on S3."""
        return self.reader.io_s if self.reader is not None else 0.0

    @property
    def requests(self) -> int:
        """Ranged GETs issued for the object opened last."""
        return self.reader.requests if self.reader is not None else 0

    @property
    def interrupt(self) -> BaseException | None:
        """What stopped a read from the object opened last from outside (see S3RangeReader.interrupt)."""
        return self.reader.interrupt if self.reader is not None else None

    def cancel(self, reason: BaseException) -> None:
        """Make the next read of the object opened last raise `reason` (pipeline's prefetch abort)."""
        if self.reader is not None:
            self.reader.cancel(reason)

    @property
    def read_error(self) -> Exception | None:
        """The failure of a read from the object opened last (see S3RangeReader.error), if any."""
        return self.reader.error if self.reader is not None else None
