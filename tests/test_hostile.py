"""Hostile and odd input: a generated corpus through the real Moderator and a worker process, the
fuzz target, and hostile job payloads and keys (docs/security.md; the static checks on the code are in
test_static_security.py)."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import time
import zlib
from typing import Any
from pathlib import Path

import pytest
from hostile_media import CASES, CASES_BY_NAME, HOSTILE_SETTINGS, MAX_PIXELS, build_hostile_corpus, outcome
from verdict_schema import assert_valid_verdict
from workers import burst

from worker.video import MAX_SAMPLED_FRAMES, frames_to_sample

ROOT = Path(__file__).resolve().parent.parent
FUZZ = Path(__file__).resolve().parent / "fuzz_decode.py"
# The CLI batch leaves out the cases that need limits of their own.
BATCH = [c for c in CASES if not c.settings]


@pytest.fixture(scope="session")
def hostile_corpus(tmp_path_factory) -> dict[str, Path]:
    return build_hostile_corpus(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def hostile_settings(settings):
    return settings.model_copy(update=HOSTILE_SETTINGS)


def moderator_for(case, hostile_settings, moderator):
    from worker.pipeline import Moderator

    return Moderator(hostile_settings.model_copy(update=case.settings), detector=moderator.detector,
                     engine=moderator.engine)


# -- the corpus ------------------------------------------------------------------------------------
def test_the_corpus_covers_the_hostile_input_the_worker_must_survive():
    names = set(CASES_BY_NAME)
    assert len(CASES) >= 25 and len(names) == len(CASES)
    for required in ("zero_bytes", "random_bytes", "text_named_mp4", "png_named_mp4", "audio_only",
                     "mp4_without_tracks", "hevc", "vp9", "av1", "mjpeg", "h264_10bit", "h264_444", "tiny_1x1",
                     "tiny_2x2", "odd_3x5", "raw_header_claims_16000", "two_hours_declared",
                     "thirty_minutes_undeclared", "looping_timestamps", "variable_frame_rate", "rotated_270",
                     "moov_at_end", "fragmented_mp4", "many_faces_3x3", "no_face"):
        assert required in names, required
    assert sum(n.startswith(("truncated_", "bitflip_")) for n in names) >= 6
    expected = {o for c in CASES if len(c.expect) == 1 for o in c.expect}
    assert {"ok", "no_face", "not_a_video", "no_video_stream", "corrupt", "unsupported", "too_large", "too_long",
            "timeout"} <= expected
    assert f"`tests/test_hostile.py`: {len(CASES)} generated hostile" in (ROOT / "README.md").read_text()  # docs match


@pytest.mark.timeout(90)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_hostile_file_ends_in_its_verdict_in_time(case, hostile_corpus, hostile_settings, moderator):
    if case.missing():
        pytest.fail(f"this PyAV build has no {case.missing()} encoder (pyproject pins one that has)")
    m = moderator_for(case, hostile_settings, moderator)
    started = time.monotonic()
    verdict = m.moderate_path(hostile_corpus[case.name])
    elapsed = time.monotonic() - started
    json.dumps(verdict)
    assert_valid_verdict(verdict)
    assert outcome(verdict) in case.expect, (case.name, verdict["error"], verdict.get("video"))
    assert outcome(verdict) != "internal"
    assert elapsed < case.limit_s, f"{case.name} took {elapsed:.1f} s (limit {case.limit_s} s)"
    if verdict["status"] in ("ok", "no_face"):
        video = verdict["video"]
        # the frames asked for, more only where the video is long (the sampling gap) or runs past its
        # declared duration, and never past the cap
        asked = frames_to_sample(video["duration_s"], HOSTILE_SETTINGS["frames"], hostile_settings.max_sample_gap_s)
        assert 1 <= video["frames_sampled"] <= MAX_SAMPLED_FRAMES
        assert video["frames_sampled"] <= asked or "declared_duration_s" in video, video
        assert video["width"] * video["height"] <= MAX_PIXELS
    if verdict["status"] == "ok":
        assert len(verdict["faces"]) >= case.min_faces, (case.name, len(verdict["faces"]))


def test_many_faces_are_all_recorded_and_the_largest_is_scored(hostile_corpus, hostile_settings, moderator):
    v = moderator_for(CASES_BY_NAME["many_faces_3x3"], hostile_settings, moderator).moderate_path(
        hostile_corpus["many_faces_3x3"])
    per_frame: dict[int, int] = {}
    for face in v["faces"]:
        per_frame[face["frame"]] = per_frame.get(face["frame"], 0) + 1
    assert max(per_frame.values()) >= 4  # the tiled clip shows nine copies of the face
    assert sum(f["largest"] for f in v["faces"]) == v["video"]["frames_with_face"]
    assert all(f["fake_score"] is not None for f in v["faces"] if f["largest"])


@pytest.mark.parametrize("case", ["mjpeg_later_frames_lie", "vp9_keyframes_claim_16000"])
def test_a_stream_whose_frames_lie_about_their_size_is_refused_without_allocating_them(hostile_corpus, case):
    """MJPEG: the probe sees 16×16, frames 3+ claim 12000×12000; decoding them used to cost ~3 GB.
    VP9: every keyframe claims 16000×16000; the decoder that opening the file probes with (before any
    check of ours) allocated ~400 MB, and a fuzzer run reached 3.3 GB."""
    if case not in hostile_corpus:
        pytest.fail(f"{case}: this PyAV build lacks its encoder (pyproject pins one that has)")
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from worker.decode import Limits, VideoReader
        from worker.errors import TooLarge
        try:
            with VideoReader({str(hostile_corpus[case])!r}, Limits(600, {MAX_PIXELS}, 30)) as r:
                list(r.sample(4))
            print("NO ERROR")
        except TooLarge as exc:
            print("too_large", exc)
        # VmHWM, not ru_maxrss: the latter keeps the forking parent's (pytest's) peak across exec.
        hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
        print("maxrss_mb", int(hwm.split()[1]) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "too_large" in out.stdout, out.stdout
    maxrss = int(re.search(r"maxrss_mb (\d+)", out.stdout).group(1))
    assert maxrss < 300, f"decoding the lying stream peaked at {maxrss} MB"


@pytest.mark.timeout(600)
def test_a_worker_process_gives_one_verdict_per_hostile_file(hostile_corpus, random_model_dir, tmp_path):
    """The whole batch through `deepfake moderate` in its own process: a segfault or a hang would show."""
    canary = "canary-secret-value-never-logged"
    env = {**os.environ, "DEEPFAKE_MODEL_DIR": str(random_model_dir), "DEEPFAKE_LOG_FORMAT": "json",
           "AWS_ACCESS_KEY_ID": "canary-access-key", "AWS_SECRET_ACCESS_KEY": canary,
           **{f"DEEPFAKE_{k.upper()}": str(v) for k, v in HOSTILE_SETTINGS.items()}}
    batch = [c for c in BATCH if c.name in hostile_corpus]
    files = [str(hostile_corpus[c.name]) for c in batch]
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "worker", "moderate", *files], env=env, capture_output=True,
                          text=True, timeout=540)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    verdicts = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert [v["source"] for v in verdicts] == files  # one verdict per file, in order
    for case, verdict in zip(batch, verdicts):
        assert_valid_verdict(verdict)
        assert outcome(verdict) in case.expect, (case.name, verdict["error"])
    assert elapsed < sum(c.limit_s for c in batch) + 60
    assert canary not in proc.stdout and canary not in proc.stderr  # secrets stay in the environment


# -- the fuzz target -------------------------------------------------------------------------------
def small_seeds(hostile_corpus, directory: Path, limit: int = 256 * 1024) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, path in hostile_corpus.items():
        if path.stat().st_size <= limit:
            (directory / path.name).write_bytes(path.read_bytes())
    return directory


def test_the_fuzz_target_holds_on_the_corpus_and_a_short_mutation_run(hostile_corpus, tmp_path):
    """Every seed, then a few hundred seeded mutants, through the same property the fuzzer checks."""
    seeds = small_seeds(hostile_corpus, tmp_path / "seeds")
    assert len(list(seeds.iterdir())) >= 25
    proc = subprocess.run([sys.executable, str(FUZZ), "--mutate", "--runs", "400", "--max-seconds", "25",
                           "--seed", "7", "--artifacts", str(tmp_path / "artifacts"), str(seeds)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, (proc.stdout[-1000:], proc.stderr[-3000:])
    assert "no failure" in proc.stdout


REGRESSIONS = Path(__file__).resolve().parent / "fuzz_regressions"


@pytest.mark.parametrize("path", sorted(REGRESSIONS.iterdir()), ids=lambda p: p.name)
def test_inputs_the_fuzzer_once_crashed_on_end_in_a_typed_outcome(path):
    """Crashes the fuzzer found, shrunk and kept (packet_of_an_undeclared_stream.ts: MPEG-TS whose
    demuxer hands back a packet of a stream PyAV never listed, which raised IndexError from PyAV)."""
    proc = subprocess.run([sys.executable, str(FUZZ), "--replay", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith(": ok"), proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fuzz_the_decode_stage(hostile_corpus, tmp_path):
    """atheris (coverage-guided) for DEEPFAKE_FUZZ_SECONDS (60): only ModerationError may come out.

    DEEPFAKE_FUZZ_SEED (1) makes CI runs repeatable; 0 lets libFuzzer pick a new seed each run."""
    seconds = int(os.environ.get("DEEPFAKE_FUZZ_SECONDS", "60"))
    seed = int(os.environ.get("DEEPFAKE_FUZZ_SEED", "1"))
    seeds = small_seeds(hostile_corpus, tmp_path / "seeds")
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    try:
        import atheris  # noqa: F401

        cmd = [sys.executable, str(FUZZ), f"-max_total_time={seconds}", "-timeout=30", "-rss_limit_mb=3072",
               "-max_len=262144", f"-artifact_prefix={artifacts}/", "-print_final_stats=1", f"-seed={seed}",
               str(tmp_path / "grown"), str(seeds), str(REGRESSIONS)]
        (tmp_path / "grown").mkdir()
    except ImportError:  # the bounded mutation loop instead
        cmd = [sys.executable, str(FUZZ), "--mutate", "--runs", "1000000", "--max-seconds", str(seconds),
               "--seed", str(seed or int(time.time())), "--artifacts", str(artifacts), str(seeds), str(REGRESSIONS)]
    # libFuzzer's -rss_limit_mb reads ru_maxrss, which a child started straight from pytest inherits
    # (pytest's own peak: a CI run failed at start-up with "rss: 3316Mb" after an earlier test's
    # memory). A shell that forks the fuzzer gives it a count of its own.
    cmd = ["sh", "-c", shlex.join(cmd) + "; exit $?"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 600)
    print(proc.stdout[-6000:], proc.stderr[-6000:])  # shown whole on failure (the assertion's repr is cut)
    crashes = sorted(p.name for p in artifacts.iterdir())
    assert proc.returncode == 0 and not crashes, (crashes, (proc.stdout + proc.stderr)[-4000:])


# -- hostile jobs ----------------------------------------------------------------------------------
BUCKET = "hostile"


@pytest.fixture(scope="module")
def s3(s3_server, hostile_corpus):
    client = s3_server.client()
    client.create_bucket(Bucket=BUCKET)
    client.create_bucket(Bucket="elsewhere")
    client.put_object(Bucket=BUCKET, Key="clips/vfr.mp4", Body=hostile_corpus["variable_frame_rate"].read_bytes())
    client.put_object(Bucket=BUCKET, Key="verdicts/clips/vfr.mp4", Body=b"an upload inside the verdict prefix")
    client.put_object(Bucket="elsewhere", Key="clips/vfr.mp4", Body=b"x" * 100)
    return client


@pytest.fixture()
def qsettings(random_model_dir, redis_server, s3_server):
    from worker.settings import Settings

    return Settings(model_dir=random_model_dir, redis_url=redis_server.url, s3_endpoint_url=s3_server.endpoint,
                    allowed_buckets=BUCKET, frames=4, metrics_port=0, log_format="json", job_retries=1)


def raw_enqueue(redis, job_id: str, payload=None, *, data: bytes | None = None, **fields) -> str:
    """A job written with plain Redis commands, as anyone with write access to Redis can."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
    mapping = {"data": data if data is not None else zlib.compress(json.dumps(payload).encode()),
               "created_at": now, "enqueued_at": now, "status": "queued", "origin": "deepfake",
               "description": "hostile", "timeout": 120, "result_ttl": 3600}
    mapping.update(fields)
    redis.hset(f"rq:job:{job_id}", mapping={k: v for k, v in mapping.items() if v is not None})
    redis.sadd("rq:queues", "rq:queue:deepfake")
    redis.rpush("rq:queue:deepfake", job_id)
    return job_id


def status_of(redis, job_id: str) -> str:
    from rq.job import Job
    from rq.serializers import JSONSerializer

    return str(Job.fetch(job_id, connection=redis, serializer=JSONSerializer).get_status().value)


def verdict_keys(s3, bucket: str, prefix: str = "verdicts/") -> set[str]:
    resp = s3.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {o["Key"] for o in resp.get("Contents", [])}


def test_a_json_job_naming_any_other_function_or_callback_never_runs(s3, redis, qsettings, moderator, tmp_path,
                                                                      monkeypatch):
    """RQ imports and calls whatever dotted path a job names: the JSON serializer alone is not enough."""
    marker = tmp_path / "pwned"
    monkeypatch.setenv("HOSTILE_CANARY", str(marker))
    good = ["worker.jobs.moderate_s3_object", None, [BUCKET, "clips/vfr.mp4"], {"frames": 4}]
    jobs = {
        "os": raw_enqueue(redis, "h-os", ["os.makedirs", None, [str(marker)], {}]),
        "canary": raw_enqueue(redis, "h-canary", ["hostile_media.canary", None, [], {}]),
        "method": raw_enqueue(redis, "h-method", ["touch", str(marker), [], {}]),
        "callbacks": raw_enqueue(redis, "h-callbacks", good, success_callback_name="hostile_media.canary",
                                 failure_callback_name="hostile_media.canary",
                                 stopped_callback_name="hostile_media.canary"),
        "failing_callback": raw_enqueue(redis, "h-failing", ["os.getcwd", None, [], {}],
                                        failure_callback_name="hostile_media.canary"),
    }
    burst(redis, qsettings, moderator)
    assert not marker.exists()
    assert status_of(redis, jobs["os"]) == "failed" and status_of(redis, jobs["canary"]) == "failed"
    assert status_of(redis, jobs["method"]) == "failed" and status_of(redis, jobs["failing_callback"]) == "failed"
    assert status_of(redis, jobs["callbacks"]) == "finished"  # the allowed function ran; its callbacks did not
    from worker.queue import job_state

    assert "runs only worker.jobs.moderate_s3_object" in job_state("h-os", settings=qsettings, connection=redis).error


def test_malformed_job_hashes_do_not_stop_the_worker(s3, redis, qsettings, moderator):
    good = ["worker.jobs.moderate_s3_object", None, [BUCKET, "clips/vfr.mp4"], {"frames": 4}]
    raw_enqueue(redis, "m-zlib", data=b"not zlib")
    raw_enqueue(redis, "m-json", data=zlib.compress(b"[1, 2"))
    raw_enqueue(redis, "m-shape", {"func": "x"})
    raw_enqueue(redis, "m-date", good, created_at="yesterday")
    raw_enqueue(redis, "m-timeout", good, timeout="soon")
    raw_enqueue(redis, "m-nodata", data=b"", status="queued")
    redis.rpush("rq:queue:deepfake", "m-no-such-hash")
    # Retries whose waits RQ cannot read: `[]` raised IndexError as the job failed, and again in every
    # maintenance pass that met it, so no worker reached the queue. A failing job (bad arguments) each.
    failing = ["worker.jobs.moderate_s3_object", None, [BUCKET, ["clips", "x"]], {}]
    for name, intervals in (("r-empty", b"[]"), ("r-text", b'["x"]'), ("r-huge", b"[1e300]"), ("r-dict", b"{}")):
        raw_enqueue(redis, name, failing, retries_left=2, retry_intervals=intervals)
    last = raw_enqueue(redis, "m-good", good)
    burst(redis, qsettings, moderator)
    assert status_of(redis, last) == "finished"  # the worker went on to the good job
    for name in ("r-empty", "r-text", "r-huge", "r-dict"):  # retried at once (no waits), then failed
        assert status_of(redis, name) == "failed", name
    from worker.maintenance import clean_abandoned
    from worker.queue import get_queue

    assert clean_abandoned(get_queue(redis, qsettings.queue))  # maintenance still runs


def verdict_objects(s3, bucket: str) -> dict[str, tuple[str, Any]]:
    """Each stored object under the verdict prefix, with what changes when it is written again."""
    resp = s3.list_objects_v2(Bucket=bucket, Prefix="verdicts/")
    return {o["Key"]: (o["ETag"], o["LastModified"]) for o in resp.get("Contents", [])}


@pytest.mark.parametrize("frames", [10**9, -1, True, 2.5, "8", [4]])
def test_hostile_job_arguments_fail_the_job_and_write_nothing(s3, redis, qsettings, moderator, frames,
                                                              hostile_corpus):
    key = f"args/{zlib.crc32(repr(frames).encode())}.mp4"  # an upload of this case's own, never scored
    s3.put_object(Bucket=BUCKET, Key=key, Body=hostile_corpus["variable_frame_rate"].read_bytes())
    before = verdict_objects(s3, BUCKET)
    job = raw_enqueue(redis, "a-frames", ["worker.jobs.moderate_s3_object", None, [BUCKET, key], {"frames": frames}])
    bad_key = raw_enqueue(redis, "a-key", ["worker.jobs.moderate_s3_object", None, [BUCKET, ["clips", "x"]], {}])
    started = time.monotonic()
    burst(redis, qsettings, moderator)
    assert time.monotonic() - started < 60
    assert status_of(redis, job) == "failed" and status_of(redis, bad_key) == "failed"
    assert f"verdicts/{key}.json" not in verdict_objects(s3, BUCKET)
    assert verdict_objects(s3, BUCKET) == before  # not one written, nor written again


@pytest.mark.parametrize("garbage", [b"not json", b"[]", b'"a string"', b'{"input": "x", "model": 3}',
                                     b'{"status": "ok", "input": {"etag": 1}, "model": {}, "error": "x"}'])
def test_a_garbage_stored_verdict_is_recomputed_and_replaced(s3, qsettings, moderator, garbage, hostile_corpus):
    from worker.runtime import WorkerRuntime

    key = f"garbage/{zlib.crc32(garbage)}.mp4"
    s3.put_object(Bucket=BUCKET, Key=key, Body=hostile_corpus["variable_frame_rate"].read_bytes())
    s3.put_object(Bucket=BUCKET, Key=f"verdicts/{key}.json", Body=garbage)
    v = WorkerRuntime(qsettings, moderator=moderator, s3_client=s3).moderate_s3(BUCKET, key)
    assert v["status"] == "ok"
    stored = json.loads(s3.get_object(Bucket=BUCKET, Key=f"verdicts/{key}.json")["Body"].read())
    assert stored["created_at"] == v["created_at"] and stored["input"]["etag"] == v["input"]["etag"]


HOSTILE_KEYS = [
    "verdicts/clips/vfr.mp4",  # the worker's own output
    "clips/../verdicts/clips/vfr.mp4", "./verdicts/x.mp4", "clips/./vfr.mp4", "clips//vfr.mp4", "/clips/vfr.mp4",
    "..", "clips/vfr.mp4/..", "clips/\x00vfr.mp4", "clips/\nvfr.mp4", "clips/\x7fvfr.mp4", "k" * 1025, "",
]


@pytest.mark.parametrize("key", HOSTILE_KEYS, ids=[repr(k)[:30] for k in HOSTILE_KEYS])
def test_keys_with_path_tricks_are_refused_and_nothing_is_written(s3, qsettings, moderator, key):
    from worker.queue import enqueue
    from worker.runtime import WorkerRuntime
    from worker.s3 import S3Location

    rt = WorkerRuntime(qsettings, moderator=moderator, s3_client=s3)
    before = verdict_keys(s3, BUCKET)
    v = rt.moderate_s3(BUCKET, key)
    assert v["status"] == "error" and v["error"]["code"] == "access_denied", v["error"]
    assert verdict_keys(s3, BUCKET) == before and "stored_at" not in v
    if key != "verdicts/clips/vfr.mp4":  # the client refuses them before Redis sees them
        with pytest.raises(ValueError):
            S3Location.parse(f"s3://{BUCKET}/{key}")
        with pytest.raises(ValueError):
            enqueue(BUCKET, key, settings=qsettings, connection=object(), s3_client=s3)


@pytest.mark.parametrize("bucket", ["elsewhere", "HOSTILE", "hostile.", "../hostile", "-hostile", "h", "*"])
def test_buckets_outside_the_allow_list_are_refused_and_nothing_is_written(s3, qsettings, moderator, bucket):
    from worker.runtime import WorkerRuntime

    rt = WorkerRuntime(qsettings, moderator=moderator, s3_client=s3)
    before = verdict_keys(s3, "elsewhere"), verdict_keys(s3, BUCKET)
    v = rt.moderate_s3(bucket, "clips/vfr.mp4")
    assert v["error"]["code"] == "access_denied"
    assert (verdict_keys(s3, "elsewhere"), verdict_keys(s3, BUCKET)) == before


def test_bucket_names_are_ascii_as_s3_requires():
    """`str.isalnum` is true of `ü` and of Arabic-Indic digits; S3 bucket names are ASCII."""
    from worker.s3 import S3Location

    assert S3Location.parse("s3://tenant-a.2/k").bucket == "tenant-a.2"
    for bucket in ("bücket", "b\u0663ucket", "tenant\u2024a"):
        with pytest.raises(ValueError, match="invalid bucket name"):
            S3Location.parse(f"s3://{bucket}/k")


def test_the_allow_list_is_deny_all_by_default():
    from worker.settings import Settings

    assert Settings(allowed_buckets="").bucket_allow_list() == frozenset()
    assert "allowed_buckets" in Settings.model_fields and Settings.model_fields["allowed_buckets"].default == ""
