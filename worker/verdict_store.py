"""Verdicts in S3: `<prefix><key>.json`, written with a conditional PUT so each is whole and written once.

A PUT is atomic (readers see the old object or the new one, never half). `If-None-Match: *` makes
the first writer win when two workers race on one upload; replacing a stale verdict (another ETag
or model) uses `If-Match` on the ETag that was read, so a concurrent writer is never overwritten.

Signed verdicts (`DEEPFAKE_VERDICT_SECRET`): a stored verdict is reused instead of recomputed, so
whoever can write under the verdict prefix could otherwise plant one. With a key set, each verdict
object carries `x-amz-meta-deepfake-signature: v1=<hex HMAC-SHA256 of "<bucket>/<key>\n" + body>`,
and a stored verdict whose signature is missing or wrong is treated as stale: recomputed and
replaced. Readers check verdicts with `verify_verdict` (the object's exact bytes and location).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import structlog
from botocore.exceptions import ClientError

from worker import __version__
from worker.preprocess import PREPROCESSING_VERSION
from worker.s3 import CHANGED_CODES, MAX_KEY_BYTES, NOT_FOUND_CODES, S3Location, control_client, error_code
from worker.video import beyond_display_aspect, frames_to_sample, image_demuxer

if TYPE_CHECKING:
    from worker.decision import DecisionPolicy
    from worker.settings import Settings


log = structlog.get_logger("worker.verdict_store")

SCAN_THREADS = 8  # parallel GETs when reading many verdicts (botocore's connection pool holds 10)
REPORT_TYPES = {".html": "text/html; charset=utf-8", ".png": "image/png", ".json": "application/json"}
REPORT_NAME_ROOM = 32  # the longest file name a report holds (worker.report), with room to spare
SIGNATURE_METADATA = "deepfake-signature"  # S3 user metadata: the x-amz-meta-deepfake-signature header
# GetBucketVersioning's answers from a store that has no versioning at all (so no older versions)
UNVERSIONED_CODES = frozenset({"NotImplemented", "MethodNotAllowed", "501", "405"})


def sign_verdict(secret: str, location: S3Location, body: bytes) -> str:
    """`v1=<hex HMAC-SHA256>` over the verdict object's location and bytes (a verdict copied to
    another upload's location does not verify there)."""
    message = f"{location.bucket}/{location.key}\n".encode() + body
    return "v1=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def verify_verdict(secret: str, location: S3Location, body: bytes, signature: str | None) -> bool:
    """For readers of stored verdicts: True when `signature` (the object's deepfake-signature
    metadata) is this key's signature of `body` at `location`. A signature that is no ASCII string
    (anyone who can write the object chooses it) is no match, where compare_digest would raise."""
    return (isinstance(signature, str) and signature.isascii() and bool(signature)
            and hmac.compare_digest(sign_verdict(secret, location, body), signature))


class VerdictStore:
    def __init__(self, client: Any, *, prefix: str = "verdicts/", bucket: str | None = None,
                 secret: str | None = None) -> None:
        self.client, self.prefix, self.bucket = client, prefix, bucket
        self.secret = secret

    @classmethod
    def for_settings(cls, settings: Settings, client: Any = None, *, verify: bool = False) -> "VerdictStore":
        """The store at the settings' verdict bucket and prefix; with `verify`, checking signatures with
        DEEPFAKE_VERDICT_SECRET (the worker, `deepfake verdict`, `deepfake result --full`), else not
        (the commands that list, erase or annotate verdicts)."""
        client = client or control_client(settings.s3_endpoint_url, settings.s3_region)
        secret = settings.verdict_secret.get_secret_value() if verify and settings.verdict_secret else None
        return cls(client, prefix=settings.verdict_prefix, bucket=settings.verdict_bucket, secret=secret)

    def _path(self, upload: S3Location) -> str:
        """`<prefix><key>` beside the upload; in a separate verdict bucket `<prefix><bucket>/<key>`, since
        uploads in different buckets may share a key."""
        return f"{self.prefix}{upload.bucket}/{upload.key}" if self.bucket else f"{self.prefix}{upload.key}"

    @staticmethod
    def could_hold(upload: S3Location, loc: S3Location) -> bool:
        """Whether `loc` is where some store (another prefix, bucket or verdict bucket) keeps the
        upload's verdict: `<prefix><key>.json` beside it, `<prefix><bucket>/<key>.json` elsewhere."""
        def ends_with(key: str, path: str) -> bool:  # at a folder boundary: xa.mp4.json is not a.mp4.json
            return key == path or key.endswith("/" + path)

        own = f"{upload.key}.json"
        return (loc.bucket == upload.bucket and ends_with(loc.key, own)) or ends_with(loc.key, f"{upload.bucket}/{own}")

    def location_for(self, upload: S3Location) -> S3Location:
        return S3Location(self.bucket or upload.bucket, self._path(upload) + ".json")

    def report_location(self, upload: S3Location) -> S3Location:
        return S3Location(self.bucket or upload.bucket, self._path(upload) + ".report/")

    def feedback_location(self, upload: S3Location) -> S3Location:
        """A reviewer's decision on the verdict (worker.feedback)."""
        return S3Location(self.bucket or upload.bucket, self._path(upload) + ".feedback.json")

    def scan(self, uploads: S3Location, *, suffixes: tuple[str, ...], since: dt.datetime | None = None,
             on_listed: Callable[[int], None] | None = None) -> Iterator[tuple[str, Any]]:
        """(key, parsed JSON) of each object this store holds for the uploads under `uploads`
        (s3://bucket/key-prefix) whose key ends with one of `suffixes` and, with `since`, that was
        written at or after it, in listing order, GET `SCAN_THREADS` at a time. Reports are passed
        over; an object deleted since the listing (an erasure) or not JSON is skipped.
        `on_listed(n)`: after each page, how many objects it held."""
        where = S3Location(self.bucket or uploads.bucket, self._path(uploads))

        def fetch(key: str) -> Any:
            try:
                return json.loads(self.client.get_object(Bucket=where.bucket, Key=key)["Body"].read())
            except ClientError as exc:
                if error_code(exc) in NOT_FOUND_CODES:
                    return None
                raise
            except ValueError:
                return None

        with ThreadPoolExecutor(max_workers=SCAN_THREADS) as pool:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=where.bucket, Prefix=where.key):
                contents = page.get("Contents", [])
                if on_listed is not None:
                    on_listed(len(contents))
                keys = [o["Key"] for o in contents if o["Key"].endswith(suffixes) and ".report/" not in o["Key"]
                        and (since is None or o["LastModified"] >= since)]
                for key, body in zip(keys, pool.map(fetch, keys)):
                    if body is not None:
                        yield key, body

    def put_report(self, upload: S3Location, directory: Path) -> str:
        """Upload a report directory beside the verdict (`.report/`); the page's s3:// URI. Reruns overwrite it."""
        prefix = self.report_location(upload)
        for path in sorted(directory.iterdir()):
            if path.is_file() and path.suffix in REPORT_TYPES:
                self.client.put_object(Bucket=prefix.bucket, Key=prefix.key + path.name, Body=path.read_bytes(),
                                       ContentType=REPORT_TYPES[path.suffix])
        return f"s3://{prefix.bucket}/{prefix.key}index.html"

    def delete(self, upload: S3Location, deleted: list[str] | None = None) -> tuple[list[str], str | None]:
        """Delete the upload's verdict, feedback and report objects (`deepfake forget`): the s3:// URIs
        deleted, and why older versions may remain (None: none can). Each URI is added to `deleted` as
        its object goes, so that a request failing part-way leaves the list of those already gone. In a versioned bucket every
        version and delete marker goes (`?versionId=` URIs): a plain DELETE there only hides the face
        boxes and crops behind a delete marker. Where the bucket's versioning cannot be read, the
        current objects go and the erasure is not called complete (0.4.4 called it complete). An
        upload whose key is `unstorable` has none: its paths are another upload's feedback or report."""
        deleted = [] if deleted is None else deleted
        if self.unstorable(upload):
            return deleted, None
        verdict, report = self.location_for(upload), self.report_location(upload)
        unknown = None
        try:
            status = self.client.get_bucket_versioning(Bucket=verdict.bucket).get("Status")
        except ClientError as exc:  # not allowed (s3:GetBucketVersioning), throttled, or not implemented
            status = None
            if error_code(exc) not in UNVERSIONED_CODES:  # a store without versioning keeps no old versions
                unknown = (f"the versioning of bucket {verdict.bucket} could not be read ({error_code(exc)}): "
                           "where it is versioned, older versions remain; allow s3:GetBucketVersioning and run "
                           "it again")
                log.warning("versioning_unknown", bucket=verdict.bucket, error=str(exc), reason=unknown)
        if status in ("Enabled", "Suspended"):
            keys = [verdict.key, self.feedback_location(upload).key]
            return self._delete_versions(verdict.bucket, keys, report.key, deleted), None
        keys = []
        for single in (verdict, self.feedback_location(upload)):
            try:
                self.client.head_object(Bucket=single.bucket, Key=single.key)
                keys.append(single.key)
            except ClientError as exc:
                if error_code(exc) not in NOT_FOUND_CODES:
                    raise
        keys += [o["Key"] for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=verdict.bucket, Prefix=report.key) for o in page.get("Contents", [])]
        for key in keys:
            self.client.delete_object(Bucket=verdict.bucket, Key=key)
            deleted.append(f"s3://{verdict.bucket}/{key}")
        return deleted, unknown

    def unstorable(self, upload: S3Location) -> str | None:
        """Why the upload's verdict objects could not be kept apart from every other upload's (None:
        they can). The verdict path adds the prefix, `.feedback.json` or `.report/<file>` to the key,
        which must stay within S3's key limit; and a key ending in `.feedback`, or with a `.report`
        folder, would be another upload's feedback object or sit inside its report (erased with it)."""
        room = max(len(".feedback.json"), len(".report/") + REPORT_NAME_ROOM)
        if len(self._path(upload).encode()) + room > MAX_KEY_BYTES:
            return f"the key is too long for its verdict path within S3's {MAX_KEY_BYTES}-byte key limit"
        if upload.key.endswith(".feedback") or any(p.endswith(".report") for p in upload.key.split("/")[:-1]):
            return "the key is shaped like another upload's feedback or report path"
        return None

    def _delete_versions(self, bucket: str, keys: list[str], prefix: str, deleted: list[str]) -> list[str]:
        for where, exact in [*((k, True) for k in keys), (prefix, False)]:
            for page in self.client.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=where):
                for version in page.get("Versions", []) + page.get("DeleteMarkers", []):
                    if exact and version["Key"] != where:
                        continue
                    self.client.delete_object(Bucket=bucket, Key=version["Key"], VersionId=version["VersionId"])
                    deleted.append(f"s3://{bucket}/{version['Key']}?versionId={version['VersionId']}")
        return deleted

    def is_verdict_key(self, upload: S3Location) -> bool:
        """Uploads inside the verdict prefix are refused: the worker must not moderate its own output."""
        return (self.bucket is None or self.bucket == upload.bucket) and upload.key.startswith(self.prefix)

    def _fetch(self, loc: S3Location) -> tuple[bytes, str, bool | None] | None:
        """(body, ETag, whether its signature verifies: None without a key), or None when absent."""
        try:
            resp = self.client.get_object(Bucket=loc.bucket, Key=loc.key)
        except ClientError as exc:
            if error_code(exc) in NOT_FOUND_CODES:
                return None
            raise
        body = resp["Body"].read()
        verified = None
        if self.secret is not None:
            signature = (resp.get("Metadata") or {}).get(SIGNATURE_METADATA)
            verified = verify_verdict(self.secret, loc, body, signature)
            if not verified:
                log.warning("stored_verdict_not_signed", location=loc.uri, signature_present=bool(signature))
        return body, resp["ETag"], verified

    def get(self, upload: S3Location) -> tuple[dict | None, str | None]:
        """The stored verdict and its ETag, or (None, None); one that does not verify, or does not
        parse, comes back as (None, ETag): stale, to be replaced."""
        fetched = self._fetch(self.location_for(upload))
        if fetched is None:
            return None, None
        body, etag, verified = fetched
        if verified is False:
            return None, etag  # not ours: treated as stale and replaced
        try:
            stored = json.loads(body)
        except ValueError:
            return None, etag  # unreadable: treated as stale and replaced
        return (stored, etag) if isinstance(stored, dict) else (None, etag)

    def read(self, upload: S3Location, *, at: S3Location | None = None) -> dict[str, Any]:
        """For readers (`deepfake verdict`): the stored verdict as it is, where, and whether its
        signature verifies (null without DEEPFAKE_VERDICT_SECRET); `at`: where a job's result says
        its worker stored it (the worker's verdict bucket and prefix may not be this reader's), read
        only when it is a verdict path of this upload under some prefix: a result in Redis is anyone's
        to write, and could name another upload's signed verdict."""
        if at is not None and not self.could_hold(upload, at):
            at = None
        loc = at or self.location_for(upload)
        fetched = None if self.unstorable(upload) and at is None else self._fetch(loc)  # not its own: another's
        if fetched is None:
            return {"upload": upload.uri, "stored_at": None, "verified": None, "verdict": None}
        body, _, verified = fetched
        try:
            verdict = json.loads(body)
        except ValueError:
            verdict = None
        if not isinstance(verdict, dict):
            verdict = None  # JSON, but no verdict (`[1, 2]`): said as none, whether or not it is signed
        if at is not None and verdict is not None and verdict.get("source") != upload.uri:
            # A verdict path of this upload under some prefix is another upload's under another (other/a.mp4's
            # `verdicts/other/a.mp4.json` is a.mp4's under `verdicts/other/`): its signed body says whose.
            return self.read(upload)
        return {"upload": upload.uri, "stored_at": loc.uri, "verified": verified, "verdict": verdict}

    def describes_current(self, upload: S3Location, verdict: dict, *, gone: bool | None = False) -> bool | None:
        """Whether `verdict` judged the bytes now at `upload` (`gone` when the upload no longer exists):
        a signature binds a verdict to its location, not to the bytes there, so an old signed verdict
        put back after the upload was replaced still verifies. None: it judged no bytes (a refusal
        before reading), or the upload cannot be read here."""
        judged = input_etag(verdict)
        if judged is None:
            return None
        try:
            return self.client.head_object(Bucket=upload.bucket, Key=upload.key)["ETag"] == judged
        except ClientError as exc:
            return gone if error_code(exc) in NOT_FOUND_CODES else None

    def put(self, upload: S3Location, verdict: dict, *, replaces: str | None = None) -> bool:
        """Write once: False when another writer got there first (their verdict stands)."""
        loc = self.location_for(upload)
        body = json.dumps(verdict, separators=(",", ":")).encode()
        condition = {"IfMatch": replaces} if replaces else {"IfNoneMatch": "*"}
        metadata = {SIGNATURE_METADATA: sign_verdict(self.secret, loc, body)} if self.secret is not None else {}
        try:
            self.client.put_object(Bucket=loc.bucket, Key=loc.key, Body=body, ContentType="application/json",
                                   Metadata=metadata, **condition)
        except ClientError as exc:
            if error_code(exc) in CHANGED_CODES | {"ConditionalRequestConflict"}:
                return False
            raise
        return True


# Outcomes that the same bytes always reproduce; timeouts and internal errors are worth a new try.
DETERMINISTIC_ERRORS = frozenset({"not_a_video", "no_video_stream", "corrupt", "unsupported", "too_large", "too_long"})
# Of those, the ones another version's decoder may get past: reused only from the version that wrote
# them (0.2.0 scores files cut short that 0.1.0 called corrupt).
DECODER_ERRORS = frozenset({"corrupt", "unsupported"})
# What decoding sees changed in 0.3.0 (display aspect ratios, transparency, image sequences, playlists,
# frame rates claiming under 1 fps) and in 0.4.1 (segments joined with restarting timestamps, which
# 0.4.0 sampled over the first segment only; uploads labelled image/, audio/ or text/, which it left
# unread; mirrored pictures, which it turned upside down): an older verdict that depended on it (any but a limit's) is no answer, or a face the older
# worker could not see would stay allowed.
DECODING_SINCE = (0, 4, 1)
LIMIT_ERRORS = frozenset({"too_large", "too_long"})
# 0.4.4 calls a one-frame GIF (and the pictures of every image format) not_a_video, which earlier
# versions scored, and refuses frames shown over MAX_DISPLAY_ASPECT: their verdicts for such uploads
# (and only those: the video block says) are no answer.
PICTURES_SINCE = (0, 4, 4)


def input_etag(verdict: dict) -> str | None:
    """The ETag of the bytes a stored verdict judged (None: a refusal made before any byte was read)."""
    inp = verdict.get("input")
    return inp.get("etag") if isinstance(inp, dict) else None


def _version(text: object) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in str(text).split("."))
    except ValueError:
        return (0,)  # not a version this worker wrote


def _preprocessing_version(stored: dict) -> int:
    """The stored verdict's preprocessing version; 1 for a verdict written before verdicts carried one."""
    value = stored.get("preprocessing_version", 1)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def reusable(stored: dict | None, *, etag: str, model_sha256: str, frames: int, max_sample_gap_s: float = 0.0,
             policy: DecisionPolicy | None = None, worker_version: str | None = __version__) -> bool:
    """A stored verdict answers a new job for the same upload bytes, model weights and sampling
    (`same_sampling`), and the same decision policy (`DecisionPolicy.answers`): a changed threshold,
    rule or error action decides the upload anew. For a worker of `worker_version` (an enqueuer
    judges for the workers that published their version)."""
    if not isinstance(stored, dict) or not stored:
        return False
    inp, model, error = stored.get("input"), stored.get("model"), stored.get("error")
    if not isinstance(inp, dict) or not isinstance(model, dict) or not isinstance(error, (dict, type(None))):
        return False  # not a verdict this worker wrote: recomputed and replaced
    code = (error or {}).get("code")
    if stored.get("status") == "error" and code not in DETERMINISTIC_ERRORS:
        return False
    if code in DECODER_ERRORS and stored.get("worker_version") != worker_version:
        return False
    if code != "too_large" and _version(stored.get("worker_version")) < DECODING_SINCE:
        return False  # too_long too: the duration is the decoder's reading (0.4.1 reads Matroska's anew)
    if _version(stored.get("worker_version")) < PICTURES_SINCE and _picture_or_strip(stored.get("video")):
        return False
    if code not in LIMIT_ERRORS and _preprocessing_version(stored) < PREPROCESSING_VERSION:
        return False  # faces were read or cut otherwise (e.g. an HDR upload read as SDR)
    if "action" not in stored:
        return False  # written before verdicts carried an action
    if not _finite_scores(stored):
        return False  # a model's NaN, which before 0.4.2 was called real and allowed
    if policy is not None and not policy.answers(stored):
        return False
    return (inp.get("etag") == etag and model.get("sha256") == model_sha256 and inp.get("frames") == frames
            and same_sampling(stored, frames, max_sample_gap_s))


def _picture_or_strip(video: object) -> bool:
    """Whether a verdict's video block names an image format's demuxer or a shape 0.4.4 refuses."""
    if not isinstance(video, dict):
        return False
    container, w, h = video.get("container"), video.get("width"), video.get("height")
    if isinstance(container, str) and image_demuxer(container):
        return True
    return isinstance(w, int) and isinstance(h, int) and min(w, h) > 0 and beyond_display_aspect(w, h)


def _finite_scores(stored: dict) -> bool:
    """Whether every score a verdict carries (its own, its faces', its tracks') is a finite number or absent."""
    def finite(value: object) -> bool:
        return value is None or (isinstance(value, (int, float)) and math.isfinite(value))

    listed = [f.get("fake_score") for f in stored.get("faces") or [] if isinstance(f, dict)]
    listed += [t.get("score") for t in stored.get("tracks") or [] if isinstance(t, dict)]
    return finite(stored.get("score")) and all(finite(v) for v in listed)


def same_sampling(stored: dict, frames: int, max_sample_gap_s: float) -> bool:
    """Whether the stored verdict's frames are those a job with this gap would sample: the same gap
    (a verdict written before the setting had none), or a video short enough that neither gap adds a
    frame, so a worker upgraded to a gap does not score every short upload again. An error verdict's
    outcome does not depend on the sampling."""
    stored_gap = stored["input"].get("max_sample_gap_s", 0.0)
    if stored_gap == max_sample_gap_s or stored.get("status") == "error":
        return True
    video = stored.get("video") or {}
    duration = video.get("duration_s")
    if not isinstance(duration, (int, float)) or "declared_duration_s" in video:
        return False  # sampled on past a declared end: only the same gap gives the same frames
    return frames_to_sample(duration, frames, stored_gap) == frames_to_sample(duration, frames, max_sample_gap_s)
