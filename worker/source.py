"""Where a video comes from. A source checks existence, access and size before any decoding."""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from worker.errors import AccessDenied, NotAVideo, NotFound, TooLarge


class Source(Protocol):
    uri: str  # how the verdict names the input
    size: int  # bytes

    def open(self) -> str | BinaryIO:
        """A path or a seekable binary file object PyAV can read."""
        ...


def check_size(uri: str, size: int, max_bytes: int) -> None:
    if size == 0:
        raise NotAVideo(f"{uri} is empty")
    if size > max_bytes:
        raise TooLarge(f"{size} bytes exceeds the limit of {max_bytes} bytes")


@dataclass(frozen=True)
class LocalSource:
    path: Path
    size: int

    @property
    def uri(self) -> str:
        return str(self.path)

    @classmethod
    def resolve(cls, path: str | Path, *, max_bytes: int) -> "LocalSource":
        p = Path(path)
        try:
            st = p.stat()
        except FileNotFoundError as exc:
            raise NotFound(f"no such file: {p}") from exc
        except PermissionError as exc:
            raise AccessDenied(f"cannot access {p}: permission denied") from exc
        if p.is_dir():
            raise NotAVideo(f"{p} is a directory")
        if not os.access(p, os.R_OK):
            raise AccessDenied(f"cannot read {p}: permission denied")
        check_size(str(p), st.st_size, max_bytes)
        return cls(path=p, size=st.st_size)

    def open(self) -> str:
        try:
            with open(self.path, "rb"):
                pass
        except PermissionError as exc:
            raise AccessDenied(f"cannot read {self.path}: permission denied") from exc
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise NotFound(f"no such file: {self.path}") from exc
            raise
        return str(self.path)
