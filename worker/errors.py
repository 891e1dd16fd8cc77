"""The closed set of error codes a verdict can carry, and the typed exceptions that raise them.

Every failure a worker can meet on user input ends as one of these codes in an error verdict;
anything unexpected becomes `internal`. The README documents each code.
"""
from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    NOT_FOUND = "not_found"  # the file or object does not exist
    ACCESS_DENIED = "access_denied"  # the worker may not read it (permissions, bucket allow-list)
    NOT_A_VIDEO = "not_a_video"  # empty, text, image, or bytes no demuxer recognises
    NO_VIDEO_STREAM = "no_video_stream"  # a media container without a video stream (audio only, empty)
    CORRUPT = "corrupt"  # a recognisable video container whose data cannot be decoded
    UNSUPPORTED = "unsupported"  # a codec this build cannot decode, or more than one video stream
    TOO_LARGE = "too_large"  # over the byte limit or the pixels-per-frame limit
    TOO_LONG = "too_long"  # over the duration limit
    TIMEOUT = "timeout"  # decoding or processing ran past its time limit
    INTERNAL = "internal"  # a bug or an unexpected failure inside the worker


class ModerationError(Exception):
    """A failure that ends in an error verdict with `code` and a human-readable message."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code.value, "message": self.message}


class NotFound(ModerationError):
    code = ErrorCode.NOT_FOUND


class AccessDenied(ModerationError):
    code = ErrorCode.ACCESS_DENIED


class NotAVideo(ModerationError):
    code = ErrorCode.NOT_A_VIDEO


class NoVideoStream(ModerationError):
    code = ErrorCode.NO_VIDEO_STREAM


class Corrupt(ModerationError):
    code = ErrorCode.CORRUPT


class Unsupported(ModerationError):
    code = ErrorCode.UNSUPPORTED


class TooLarge(ModerationError):
    code = ErrorCode.TOO_LARGE


class TooLong(ModerationError):
    code = ErrorCode.TOO_LONG


class Timeout(ModerationError):
    code = ErrorCode.TIMEOUT


class Internal(ModerationError):
    code = ErrorCode.INTERNAL


class TransientError(Exception):
    """Not the input's fault (storage unreachable, throttled): the job fails and RQ retries it.

    Never turned into a verdict, so a passing outage cannot stamp a final error on an upload.
    """


class Interrupted(Exception):
    """A read refused because the job was stopped from outside (RQ's time limit): `reason` is what
    stopped it, for the job to raise again. An Exception, unlike the reason: PyAV's read callback
    passes an Exception on through FFmpeg, and swallows anything else into a read of 0 bytes, which
    FFmpeg tries again, for ever."""

    def __init__(self, reason: BaseException) -> None:
        super().__init__(f"the read was stopped: {reason}")
        self.reason = reason


def last_line(exc_string: str | None) -> str | None:
    """A recorded traceback's last line, `Type: message`: what to show outside the logs."""
    lines = [line.strip() for line in (exc_string or "").splitlines() if line.strip()]
    return lines[-1] if lines else None


class ConfigurationError(RuntimeError):
    """The worker itself is misconfigured (not the input): it must not start."""
