"""`deepfake` commands over stored data rather than single jobs: backfill a bucket, forget an upload,
record and summarise reviewer feedback (worker.cli holds the parser, the other commands and the shared
helpers; it imports this module, so each command imports it when it runs.)"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable


def add_data_commands(sub) -> None:  # type: ignore[no-untyped-def]
    b = sub.add_parser("backfill", help="queue every upload under an S3 prefix, throttled; one JSON line per job",
                       description="Lists s3://BUCKET/PREFIX in key order and enqueues each upload (not folder "
                                   "markers, verdicts or reports), waiting while the queue holds --max-queued jobs "
                                   "so live uploads are not starved. Duplicates and stored verdicts are not "
                                   "recomputed; the summary on stderr names the key to resume after.")
    b.add_argument("prefix", metavar="s3://BUCKET[/PREFIX]")
    b.add_argument("--since", type=_timestamp, metavar="ISO-8601",
                   help="only objects modified at or after this time, e.g. 2026-11-01 or 2026-11-01T12:00:00+09:00 "
                   "(UTC when it names no zone)")
    b.add_argument("--start-after", metavar="KEY", help="resume: only keys after this one (the summary's last_key)")
    b.add_argument("--limit", type=int, metavar="N", help="queue at most N new jobs (uploads already answered by a "
                   "job do not count)")
    b.add_argument("--max-queued", type=int, default=100, metavar="N",
                   help="wait while the queue holds N or more jobs (default: %(default)s; 0 = never wait)")
    b.add_argument("--frames", type=int, metavar="N", help="frames sampled per video")
    b.set_defaults(func=cmd_backfill)

    g = sub.add_parser("forget", help="erase what the system holds about uploads (jobs, results, verdicts, "
                                      "reports); one JSON line each",
                       description="For an upload the platform deletes: deletes its jobs and duplicate records "
                                   "from Redis, waits for a job running on it, then deletes its stored verdict "
                                   "and report from S3. Exit 1 when a job was still running (run it again).")
    g.add_argument("uris", nargs="+", metavar="s3://BUCKET/KEY")
    g.add_argument("--wait", type=_seconds, default=None, metavar="S",
                   help="how long to wait for a running job (default: the job time limit the settings derive "
                        "+ 28 s, 628 s with the default settings)")
    g.add_argument("--scan", action="store_true",
                   help="also read every finished and failed job (slow): for jobs from before the upload index")
    g.set_defaults(func=cmd_forget)

    v = sub.add_parser("verdict", help="the verdicts stored in S3 for uploads, one JSON line each, with whether "
                                       "each verifies against DEEPFAKE_VERDICT_SECRET and judged the bytes there now "
                                       "(exit 1: missing, forged or stale)")
    v.add_argument("uris", nargs="+", metavar="s3://BUCKET/KEY")
    v.set_defaults(func=cmd_verdict)

    fb = sub.add_parser("feedback", help="record a reviewer's decision (fake|real) beside an upload's verdict")
    fb.add_argument("uri", metavar="s3://BUCKET/KEY")
    fb.add_argument("--label", required=True, choices=["fake", "real"], help="what the reviewer decided")
    fb.add_argument("--reviewer", metavar="ID", help="who decided (an id, not a name)")
    fb.add_argument("--note", metavar="TEXT")
    fb.set_defaults(func=cmd_feedback)

    fs = sub.add_parser("feedback-summary", help="reviewer decisions by the worker's action, per model, as JSON")
    fs.add_argument("prefix", metavar="s3://BUCKET[/PREFIX]", help="the uploads' bucket (and key prefix)")
    fs.add_argument("--since", type=_timestamp, metavar="ISO-8601", help="only feedback recorded at or after this time (UTC when it names no zone)")
    fs.set_defaults(func=cmd_feedback_summary)

    w = sub.add_parser("what-if", help="what a changed threshold, review band or rule would do to the uploads "
                                       "already moderated, from their stored verdicts (nothing is scored again)",
                       description="Reads the stored scored verdicts under s3://BUCKET[/PREFIX], decides each again "
                                   "under its own policy with the options given put over it, and prints per model "
                                   "the actions now and then, the moves between them, and the reviewer labels "
                                   "(deepfake feedback) on each action now and then.")
    w.add_argument("prefix", metavar="s3://BUCKET[/PREFIX]")
    w.add_argument("--threshold", type=probability, metavar="P", help="the fake threshold")
    w.add_argument("--review-threshold", type=_probability_or_none, metavar="P|none",
                   help="the review band's lower end; none removes the band")
    w.add_argument("--rule", choices=("tracks", "mean"))
    w.add_argument("--track-score", choices=("mean", "confident"))
    w.add_argument("--min-track-frames", type=_frames, metavar="N")
    w.add_argument("--mean-floor", choices=("on", "off"),
                   help="under tracks, the paper's video score as the least the decision score can be (0.4.1's "
                   "rule; verdicts stored before it were decided without)")
    w.add_argument("--since", type=_timestamp, metavar="ISO-8601",
                   help="only verdicts (and feedback) written at or after this time, e.g. the last week's (UTC when "
                   "it names no zone)")
    w.set_defaults(func=cmd_what_if)

    sub.add_parser("schema", help="print the JSON Schema (deepfake-verdict/1) this version's verdicts follow",
                   description="The JSON Schema every verdict of this version is valid against "
                               "(worker/schemas/verdict.schema.json), for platforms to validate what they "
                               "receive.").set_defaults(func=cmd_schema)


def _timestamp(text: str):  # type: ignore[no-untyped-def]
    import datetime as dt

    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def cmd_backfill(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from botocore.exceptions import BotoCoreError, ClientError
    from tqdm import tqdm

    from worker import cli
    from worker.backfill import BackfillStats, backfill

    bucket, prefix = cli._prefix(parser, args.prefix)
    if (args.limit is not None and args.limit < 1) or args.max_queued < 0:
        parser.error("--limit must be at least 1 and --max-queued at least 0")
    settings = cli._settings(parser, frames=args.frames)
    cli.warn_unless_allowed(settings, bucket)
    bar = tqdm(desc="backfill", unit="upload", file=sys.stderr, disable=None)

    def enqueued(key: str, job_id: str) -> None:
        print(json.dumps({"key": key, "job_id": job_id}), flush=True)
        bar.update()

    # The summary, with the key to resume after, is printed however the run ends: Ctrl-C, SIGTERM (a
    # pod evicted), S3 or Redis failing part-way.
    stats = BackfillStats()
    rc = cli.EXIT_OK
    try:
        backfill(bucket, prefix, frames=args.frames, since=args.since, start_after=args.start_after,
                 limit=args.limit, max_queued=args.max_queued or None, settings=settings, on_enqueued=enqueued,
                 stats=stats)
    except KeyboardInterrupt:
        stats.stopped, rc = "interrupted", 130
    except (ClientError, BotoCoreError) as exc:
        where = f"cannot list s3://{bucket}/{prefix}" if not stats.listed else f"S3 failed after {stats.last_key!r}"
        print(f"deepfake backfill: {where}: {exc}", file=sys.stderr)
        stats.stopped, rc = "s3_failed", cli.EXIT_FAILURE
    except BaseException as exc:  # SystemExit from SIGTERM, a Redis error (cli.main says which): summary first
        stats.stopped = "terminated" if isinstance(exc, SystemExit) else type(exc).__name__
        raise
    finally:
        bar.close()
        print(json.dumps(stats.to_dict()), file=sys.stderr)
    return rc


def cmd_forget(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from worker import cli
    from worker.forget import forget
    from worker.queue import connect
    from worker.s3 import control_client

    locations = cli._locations(parser, args.uris)
    settings = cli._settings(parser)
    connection = connect(settings)
    s3 = control_client(settings.s3_endpoint_url, settings.s3_region)
    complete = True
    for loc in locations:
        done = forget(loc.bucket, loc.key, wait_s=args.wait, scan=args.scan, settings=settings,
                      connection=connection, s3_client=s3)
        complete &= done.complete
        print(json.dumps(done.to_dict()), flush=True)
    return cli.EXIT_OK if complete else cli.EXIT_FAILURE


def cmd_verdict(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from worker import cli
    from worker.verdict_store import VerdictStore

    locations = cli._locations(parser, args.uris)
    store = VerdictStore.for_settings(cli._settings(parser), verify=True)  # a forged verdict's warning: stderr (cli.main)
    ok = True
    for loc in locations:
        found = store.read(loc)
        found["current"] = None if found["verdict"] is None else store.describes_current(loc, found["verdict"])
        ok &= found["verdict"] is not None and found["verified"] is not False and found["current"] is not False
        print(json.dumps(found), flush=True)
    return cli.EXIT_OK if ok else cli.EXIT_FAILURE


def cmd_feedback(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from worker import cli
    from worker.feedback import NoVerdict, record

    [loc] = cli._locations(parser, [args.uri])
    try:
        done = record(loc.bucket, loc.key, args.label, reviewer=args.reviewer, note=args.note,
                      settings=cli._settings(parser))
    except NoVerdict as exc:
        print(f"deepfake feedback: {exc}", file=sys.stderr)
        return cli.EXIT_FAILURE
    print(json.dumps(done))
    return cli.EXIT_OK


def cmd_feedback_summary(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from tqdm import tqdm

    from worker import cli
    from worker.feedback import summarize

    bucket, prefix = cli._prefix(parser, args.prefix)
    with tqdm(desc="feedback-summary", unit="object", file=sys.stderr, disable=None) as bar:
        summary = summarize(bucket, prefix, settings=cli._settings(parser), since=args.since, on_listed=bar.update)
    print(json.dumps(summary, indent=2))
    return cli.EXIT_OK


NO_BAND = "none"


def _number(parse: Callable[[str], Any], fits: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    """An argparse type: `parse` of the text when `fits` takes it, else a usage error saying `what`
    it must be (text that does not parse, `nan` and `inf` included)."""
    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text} is not {what}") from None
        if not fits(value):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value

    return convert


# A threshold (`python -m training` takes it too), a wait, a track length.
probability = _number(float, lambda v: 0.0 <= v <= 1.0, "a probability from 0 to 1")
_seconds = _number(float, lambda v: 0.0 <= v < float("inf"), "a number of seconds (0 or more)")
_frames = _number(int, lambda v: v >= 1, "a number of frames (1 or more)")


def non_empty(text: str) -> str:
    """A name (argparse type): an empty one would label a model card or a table row with nothing."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _probability_or_none(text: str) -> float | str:
    return NO_BAND if text == NO_BAND else probability(text)


def cmd_what_if(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from tqdm import tqdm

    from worker import cli
    from worker.shown_text import json_for_terminal
    from worker.whatif import what_if

    bucket, prefix = cli._prefix(parser, args.prefix)
    changes = {k: getattr(args, k) for k in ("threshold", "rule", "track_score", "min_track_frames")
               if getattr(args, k) is not None}
    if args.review_threshold is not None:
        changes["review_threshold"] = None if args.review_threshold == NO_BAND else args.review_threshold
    if args.mean_floor is not None:
        changes["mean_floor"] = args.mean_floor == "on"
    if not changes:
        parser.error("what-if: give at least one of --threshold, --review-threshold, --rule, --track-score, "
                     "--min-track-frames, --mean-floor")
    try:
        with tqdm(desc="what-if", unit="object", file=sys.stderr, disable=None) as bar:
            result = what_if(bucket, prefix, changes, settings=cli._settings(parser), since=args.since,
                             on_listed=bar.update)
    except ValueError as exc:  # e.g. a review threshold above a verdict's threshold
        parser.error(f"what-if: {exc}")
    print(json_for_terminal(result, indent=2))
    return cli.EXIT_OK


def cmd_schema(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from worker import cli
    from worker.verdict import SCHEMA_PATH

    sys.stdout.write(SCHEMA_PATH.read_text())
    return cli.EXIT_OK
