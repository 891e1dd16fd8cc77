"""Verdicts in S3: `<prefix><key>.json`, written with a conditional PUT so each is whole and written once.

A PUT is atomic (readers see the old object or the new one, never half). `If-None-Match: *` makes
the first writer win when two workers race on one upload; replacing a stale verdict (another ETag
or model) uses `If-Match` on the ETag that was read, so a concurrent writer is never overwritten.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from worker.s3 import CHANGED_CODES, NOT_FOUND_CODES, S3Location


REPORT_TYPES = {".html": "text/html; charset=utf-8", ".png": "image/png", ".json": "application/json"}


class VerdictStore:
    def __init__(self, client: Any, *, prefix: str = "verdicts/", bucket: str | None = None) -> None:
        self.client, self.prefix, self.bucket = client, prefix, bucket

    def location_for(self, upload: S3Location) -> S3Location:
        return S3Location(self.bucket or upload.bucket, f"{self.prefix}{upload.key}.json")

    def put_report(self, upload: S3Location, directory: Path) -> str:
        """Upload a report directory to `<prefix><key>.report/`; the page's s3:// URI. Reruns overwrite it."""
        prefix = S3Location(self.bucket or upload.bucket, f"{self.prefix}{upload.key}.report/")
        for path in sorted(directory.iterdir()):
            if path.is_file() and path.suffix in REPORT_TYPES:
                self.client.put_object(Bucket=prefix.bucket, Key=prefix.key + path.name, Body=path.read_bytes(),
                                       ContentType=REPORT_TYPES[path.suffix])
        return f"s3://{prefix.bucket}/{prefix.key}index.html"

    def is_verdict_key(self, upload: S3Location) -> bool:
        """Uploads inside the verdict prefix are refused: the worker must not moderate its own output."""
        return (self.bucket is None or self.bucket == upload.bucket) and upload.key.startswith(self.prefix)

    def get(self, upload: S3Location) -> tuple[dict | None, str | None]:
        """The stored verdict and its ETag, or (None, None)."""
        loc = self.location_for(upload)
        try:
            resp = self.client.get_object(Bucket=loc.bucket, Key=loc.key)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in NOT_FOUND_CODES:
                return None, None
            raise
        try:
            stored = json.loads(resp["Body"].read())
        except ValueError:
            return None, resp["ETag"]  # unreadable: treated as stale and replaced
        return (stored, resp["ETag"]) if isinstance(stored, dict) else (None, resp["ETag"])

    def put(self, upload: S3Location, verdict: dict, *, replaces: str | None = None) -> bool:
        """Write once: False when another writer got there first (their verdict stands)."""
        loc = self.location_for(upload)
        body = json.dumps(verdict, separators=(",", ":")).encode()
        condition = {"IfMatch": replaces} if replaces else {"IfNoneMatch": "*"}
        try:
            self.client.put_object(Bucket=loc.bucket, Key=loc.key, Body=body, ContentType="application/json",
                                   **condition)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in CHANGED_CODES | {"ConditionalRequestConflict"}:
                return False
            raise
        return True


# Outcomes that the same bytes always reproduce; timeouts and internal errors are worth a new try.
DETERMINISTIC_ERRORS = frozenset({"not_a_video", "no_video_stream", "corrupt", "unsupported", "too_large", "too_long"})


def reusable(stored: dict | None, *, etag: str, model_sha256: str, frames: int) -> bool:
    """A stored verdict answers a new job for the same upload bytes, model weights and sampling."""
    if not isinstance(stored, dict) or not stored:
        return False
    inp, model, error = stored.get("input"), stored.get("model"), stored.get("error")
    if not isinstance(inp, dict) or not isinstance(model, dict) or not isinstance(error, (dict, type(None))):
        return False  # not a verdict this worker wrote: recomputed and replaced
    if stored.get("status") == "error" and (error or {}).get("code") not in DETERMINISTIC_ERRORS:
        return False
    return inp.get("etag") == etag and model.get("sha256") == model_sha256 and inp.get("frames") == frames
