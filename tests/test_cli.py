"""`deepfake moderate` as a user runs it: JSON Lines on stdout, logs on stderr, exit codes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from servers import free_ports


def run_cli(*args, env_extra=None):
    env = {**os.environ, "DEEPFAKE_LOG_FORMAT": "json", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "worker", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_moderate_prints_one_verdict_per_input_and_bad_files_do_not_stop_the_rest(corpus, random_model_dir):
    proc = run_cli("moderate", "--model", str(random_model_dir), "--frames", "8",
                   str(corpus["text_mp4"]), str(corpus["carphone"]), str(corpus["audio_only_mp4"]))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3
    verdicts = [json.loads(line) for line in lines]
    assert [v["status"] for v in verdicts] == ["error", "ok", "error"]
    assert verdicts[0]["error"]["code"] == "not_a_video" and verdicts[2]["error"]["code"] == "no_video_stream"
    assert verdicts[1]["video"]["frames_sampled"] == 8
    events = [json.loads(line) for line in proc.stderr.strip().splitlines()]
    assert {"verdict", "error_verdict"} <= {e["event"] for e in events}


def test_usage_errors_exit_2(tmp_path, random_model_dir):
    assert run_cli("moderate").returncode == 2
    assert run_cli("moderate", "--frames", "zero", "x.mp4").returncode == 2
    assert run_cli("moderate", "--model", str(tmp_path), "x.mp4").returncode == 2
    proc = run_cli("moderate", "--model", str(random_model_dir), "--detector", "haar", "x.mp4")
    assert proc.returncode == 2 and "haar" in proc.stderr
    for args, said in ((("what-if", "s3://b/", "--threshold", "abc"), "abc is not a probability from 0 to 1"),
                       (("what-if", "s3://b/", "--threshold", "nan"), "nan is not a probability from 0 to 1"),
                       (("what-if", "s3://b/", "--min-track-frames", "0"), "0 is not a number of frames"),
                       (("forget", "s3://b/k.mp4", "--wait", "-5"), "-5 is not a number of seconds"),
                       (("forget", "s3://b/k.mp4", "--wait", "nan"), "nan is not a number of seconds"),
                       # an option is named as given, not as a variable nobody set (0.4.4: DEEPFAKE_FRAMES)
                       (("moderate", "--example", "--frames", "0"), "invalid setting: --frames: Input should be"),
                       (("enqueue", "s3://b/k.mp4", "--frames", "2000"), "invalid setting: --frames: Input should")):
        proc = run_cli(*args)
        assert proc.returncode == 2 and said in proc.stderr, (args, proc.stderr)
    proc = subprocess.run([sys.executable, "-m", "training", "evaluate", "--checkpoint", "x.pt", "--data", "d",
                           "--out", "o", "--threshold", "5"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "5 is not a probability from 0 to 1" in proc.stderr, proc.stderr


def test_enqueue_checks_the_webhook_url(redis_server, s3_server):
    """`deepfake enqueue --webhook`: an unusable URL is a usage error; one the workers' default policy
    refuses (an internal address) is enqueued with a warning, not silently left unheard."""
    env = {"DEEPFAKE_REDIS_URL": redis_server.url, "DEEPFAKE_S3_ENDPOINT_URL": s3_server.endpoint,
           "DEEPFAKE_QUEUE": "cli-webhooks"}
    for url in ("ftp://hooks.example/x", "http://hooks.example:99999/x", "http://[::1/x",  # a port, an IPv6 host
                "https://user:hunter2@hooks.example/x", "https://user:hun/ter2@hooks.example/x"):
        bad = run_cli("enqueue", "s3://uploads/a.mp4", "--webhook", url, env_extra=env)
        assert bad.returncode == 2 and "--webhook must be an http(s) URL" in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr and "hunter2" not in bad.stderr and "ter2" not in bad.stderr
    internal = run_cli("enqueue", "s3://uploads/a.mp4", "--webhook", "http://127.0.0.1:9/hook", env_extra=env)
    assert internal.returncode == 0, internal.stderr
    assert len(internal.stdout.split()) == 1  # the job id
    assert "will not call this webhook" in internal.stderr and "not a public address" in internal.stderr
    listed = run_cli("enqueue", "s3://uploads/b.mp4", "--webhook", "http://127.0.0.1:9/hook",
                     env_extra={**env, "DEEPFAKE_WEBHOOK_HOSTS": "127.0.0.1"})
    assert listed.returncode == 0 and "will not call" not in listed.stderr


def test_enqueue_refuses_a_key_too_long_for_its_verdict_path_before_queueing_anything(redis_server, s3_server):
    env = {"DEEPFAKE_REDIS_URL": redis_server.url, "DEEPFAKE_S3_ENDPOINT_URL": s3_server.endpoint,
           "DEEPFAKE_QUEUE": "cli-long-keys"}
    long_key = "/".join(["x" * 199] * 5)  # 999 bytes: a valid S3 key, but not with `verdicts/` and `.json`
    proc = run_cli("enqueue", "s3://uploads/a.mp4", f"s3://uploads/{long_key}", env_extra=env)
    assert proc.returncode == 2 and "too long for its verdict path" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""  # not even the first one was queued


def test_an_unreachable_redis_or_a_missing_bucket_is_one_line_and_exit_1(redis_server, s3_server):
    """The operator's mistakes (Redis down or misaddressed, a bucket that does not exist) are said in
    one line naming what to check, not a traceback."""
    closed = free_ports(1)[0]  # nothing listens there
    for args in (("status",), ("enqueue", "s3://uploads/a.mp4"), ("failed",)):
        proc = run_cli(*args, env_extra={"DEEPFAKE_REDIS_URL": f"redis://127.0.0.1:{closed}/0",
                                         "DEEPFAKE_S3_ENDPOINT_URL": s3_server.endpoint,
                                         "DEEPFAKE_ALLOWED_BUCKETS": "uploads"})
        assert proc.returncode == 1, (args, proc.stderr)
        assert proc.stderr.startswith(f"deepfake {args[0]}: Redis did not answer (") and "Traceback" not in proc.stderr
        assert f"127.0.0.1:{closed}" in proc.stderr and "DEEPFAKE_REDIS_URL" in proc.stderr
    env = {"DEEPFAKE_REDIS_URL": redis_server.url, "DEEPFAKE_S3_ENDPOINT_URL": s3_server.endpoint}
    for args, said in ((("feedback-summary", "s3://no-such-bucket/"), "deepfake feedback-summary: S3 request failed ("),
                       (("backfill", "s3://no-such-bucket/"), "deepfake backfill: cannot list s3://no-such-bucket/")):
        proc = run_cli(*args, env_extra=env)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert said in proc.stderr and "NoSuchBucket" in proc.stderr, proc.stderr


def test_redis_refusing_the_password_or_not_being_redis_is_said_as_such(tmp_path):
    """A wrong password is not Redis failing to answer; a port where something else listens is not Redis."""
    import socket
    import threading

    from servers import RedisServer, stop

    guarded = RedisServer.start(tmp_path, "--requirepass", "s3cret")
    other = socket.socket()  # a server that answers, but not in Redis's protocol
    other.bind(("127.0.0.1", 0))
    other.listen()

    def answer_http() -> None:
        while True:
            try:
                conn, _ = other.accept()
            except OSError:
                return
            conn.recv(1024)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            conn.close()

    threading.Thread(target=answer_http, daemon=True).start()
    try:
        wrong = run_cli("status", env_extra={"DEEPFAKE_REDIS_URL": f"redis://:hunter2@127.0.0.1:{guarded.port}/0"})
        assert wrong.returncode == 1 and "Traceback" not in wrong.stderr and "hunter2" not in wrong.stderr
        assert wrong.stderr.startswith("deepfake status: Redis refused the credentials ("), wrong.stderr
        http = run_cli("status", env_extra={"DEEPFAKE_REDIS_URL": f"redis://127.0.0.1:{other.getsockname()[1]}/0",
                                            "DEEPFAKE_REDIS_OUTAGE_S": "1"})
        assert http.returncode == 1 and "Traceback" not in http.stderr, http.stderr
        assert http.stderr.startswith("deepfake status: what answers at DEEPFAKE_REDIS_URL or RQ_REDIS_URL is not Redis"), \
            http.stderr
    finally:
        stop(guarded.proc)
        other.close()


def test_ctrl_c_ends_a_command_in_one_line_with_130(corpus, random_model_dir):
    import signal

    env = {**os.environ, "DEEPFAKE_LOG_FORMAT": "json"}
    proc = subprocess.Popen([sys.executable, "-m", "worker", "moderate", "--model", str(random_model_dir),
                             *[str(corpus["carphone"])] * 50], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert json.loads(proc.stdout.readline())["status"] == "ok"  # at work on the next videos
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err.rstrip().endswith("deepfake moderate: interrupted"), err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_error_actions_come_from_the_environment(corpus, random_model_dir):
    args = ("moderate", "--model", str(random_model_dir), "--frames", "4", str(corpus["damaged_tail_mp4"]))
    assert json.loads(run_cli(*args).stdout)["action"] == "review"  # the default for corrupt
    blocked = run_cli(*args, env_extra={"DEEPFAKE_ERROR_ACTIONS": "corrupt=block"})
    assert blocked.returncode == 0 and json.loads(blocked.stdout)["action"] == "block"
    bad = run_cli(*args, env_extra={"DEEPFAKE_ERROR_ACTIONS": "corrupt=bloc"})
    assert bad.returncode == 2 and "invalid setting: DEEPFAKE_ERROR_ACTIONS: " in bad.stderr and "'corrupt=bloc'" in bad.stderr


def test_configuration_mistakes_are_one_line(tmp_path, random_model_dir, redis_server, cut_model_dir):
    """A bad setting or file is said in one line with exit 2 (Redis refusing the database: exit 1), never a
    traceback; an empty variable counts as unset."""
    import torch

    text = tmp_path / "weights.pth"
    text.write_text("not weights\n")
    (tmp_path / "file").write_text("")
    model = ("--model", str(random_model_dir))
    cut = cut_model_dir  # a copy that stopped short
    cases = [
        (("moderate", *model, "--detector-weights", str(text), "x.mp4"), {}, 2, "not a PyTorch checkpoint"),
        (("moderate", *model, "--report", str(tmp_path / "file" / "sub"), "x.mp4"), {}, 2, "--report"),
        (("moderate", *model, "x.mp4"), {"DEEPFAKE_LOG_LEVEL": "LOUD"}, 2, "invalid setting: DEEPFAKE_LOG_LEVEL: "),
        (("status",), {"DEEPFAKE_REDIS_URL": "foo://bar"}, 2, "must start with redis://"),
        (("verdict", "s3://uploads/a.mp4"), {"DEEPFAKE_S3_ENDPOINT_URL": "notaurl"}, 2, "http:// or https://"),
        (("verdict", "s3://uploads/a.mp4"), {"DEEPFAKE_S3_ENDPOINT_URL": "http://"}, 2, "must name a host"),
        (("status",), {"DEEPFAKE_REDIS_URL": "redis://:hunter2@127.0.0.1:abc/0"}, 2, "port is not a number"),
        (("status",), {"DEEPFAKE_REDIS_URL": "redis://[::1/0"}, 2, "not a usable URL"),
        (("status",), {"DEEPFAKE_REDIS_URL": "redis://127.0.0.1:6379/notadb"}, 2, "database number"),
        (("status",), {"DEEPFAKE_REDIS_URL": redis_server.url.rsplit("/", 1)[0] + "/99"}, 1, "Redis refused"),
        (("status",), {"DEEPFAKE_MAX_DURATION_S": "inf"}, 2, "DEEPFAKE_MAX_DURATION_S: Input should be a finite number"),
        (("status",), {"DEEPFAKE_RESULT_TTL_S": "9" * 20}, 2, "DEEPFAKE_RESULT_TTL_S: Input should be less than or equal"),
        (("moderate", "--model", str(cut), "x.mp4"), {}, 2, f"cannot load the model in {cut}: InvalidProtobuf"),
        # the packaged demo model, where production says it must not moderate (the cpu and gpu overlays)
        (("moderate", "--example"), {"DEEPFAKE_REQUIRE_VETTED_MODEL": "true"}, 2,
         "DEEPFAKE_REQUIRE_VETTED_MODEL: the model 'mdcsd-tiny-sbi-demo' is not one to moderate with: "),
        (("moderate", "--model", str(cut), "--engine", "pytorch", "x.mp4"), {}, 2,
         f"{cut / 'weights.pt'}: not a PyTorch checkpoint of tensors, or cut short"),
    ]
    if not torch.cuda.is_available():
        cases.append((("moderate", *model, "--device", "cuda", "x.mp4"), {}, 2, "this PyTorch was built without CUDA"))
    for args, env, code, said in cases:
        proc = run_cli(*args, env_extra=env)
        assert proc.returncode == code and said in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert "hunter2" not in proc.stderr
    from worker.settings import Settings

    for url in ("redis://h:6379/0/", "redis://h:6379//0", "redis://h:6379/%30", "redis://h/x?db=3", "redis://[::1]:6379/2",
                "rediss://:pw@h:6380/1?ssl_cert_reqs=none", "unix:///run/redis.sock?db=1"):
        assert Settings(redis_url=url).redis_url == url  # what redis-py reads as a database number
    empty = run_cli("moderate", "--example", "--frames", "2", env_extra={"DEEPFAKE_MODEL_DIR": "", "DEEPFAKE_CACHE_DIR": ""})
    assert empty.returncode == 0 and json.loads(empty.stdout)["model"]["name"], empty.stderr


def test_the_queue_commands_and_the_client_library_do_not_load_the_model_stack(redis_server, s3_server):
    """A client that enqueues (worker.queue) and the operator commands that only talk to Redis and S3
    load neither torch nor PyAV nor ONNX Runtime: through the job's webhook code, 0.4.6 loaded the
    whole pipeline for `deepfake status` (4.3 s and 298 MB instead of 1.4 s and 97 MB here)."""
    heavy = ("torch", "av", "onnxruntime", "worker.pipeline")
    env = {"DEEPFAKE_REDIS_URL": redis_server.url, "DEEPFAKE_S3_ENDPOINT_URL": s3_server.endpoint,
           "DEEPFAKE_QUEUE": "cli-light"}
    code = ("import sys\nfrom worker.cli import main\ntry:\n    code = main(sys.argv[1:])\nfinally:\n"
            f"    print('loaded:', *(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)\nsys.exit(code)")

    def loaded(*args):
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "DEEPFAKE_LOG_FORMAT": "json", **env})
        assert proc.returncode == 0, (args, proc.stderr[-2000:])
        return proc.stdout, proc.stderr.splitlines()[-1]

    job_id, said = loaded("enqueue", "s3://uploads/a.mp4")
    assert said == "loaded:", said
    for args in (("status",), ("result", job_id.strip())):
        assert loaded(*args)[1] == "loaded:", args
    proc = subprocess.run([sys.executable, "-c", "import sys, worker.queue, worker.jobs\n"
                           f"print(*(m for m in {heavy!r} if m in sys.modules))"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "", (proc.stdout, proc.stderr[-2000:])


def test_enqueue_says_what_the_workers_will_refuse(redis_server, s3_server):
    """A key in the verdict prefix is a usage error; a bucket the workers refuse and an upload S3 cannot
    show here are queued with a warning (the workers' settings and view of S3 may differ)."""
    env = {"DEEPFAKE_REDIS_URL": redis_server.url, "DEEPFAKE_S3_ENDPOINT_URL": s3_server.endpoint,
           "DEEPFAKE_QUEUE": "cli-enqueue", "DEEPFAKE_ALLOWED_BUCKETS": "uploads"}
    own = run_cli("enqueue", "s3://uploads/verdicts/a.mp4.json", env_extra=env)
    assert own.returncode == 2 and "inside the verdict prefix" in own.stderr
    for uri, said in (("s3://elsewhere/a.mp4", "elsewhere is not in DEEPFAKE_ALLOWED_BUCKETS"),
                      ("s3://uploads/missing.mp4", "could not be read here")):
        proc = run_cli("enqueue", uri, env_extra=env)
        assert proc.returncode == 0 and len(proc.stdout.split()) == 1 and said in proc.stderr, proc.stderr


def test_a_misspelt_variable_is_named_and_a_reader_that_left_is_no_traceback(tmp_path):
    """`DEEPFAKE_FRAME=10 deepfake enqueue` used 32 frames without a word (only the worker warned);
    `deepfake status | head` printed a BrokenPipeError traceback."""
    from conftest import TEST_KNOBS

    env = {k: v for k, v in os.environ.items() if k not in TEST_KNOBS}
    proc = subprocess.run([sys.executable, "-m", "worker", "schema"], capture_output=True, text=True, timeout=120,
                          env={**env, "DEEPFAKE_LOG_FORMAT": "json", "DEEPFAKE_FRAME": "10"})
    assert proc.returncode == 0 and json.loads(proc.stdout)
    [said] = [json.loads(line) for line in proc.stderr.splitlines()]
    assert (said["event"], said["names"]) == ("unknown_settings", ["DEEPFAKE_FRAME"])
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the command writes: its first write fails
    try:
        gone = subprocess.run([sys.executable, "-m", "worker", "schema"], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=120, env=env)
    finally:
        os.close(write)
    assert gone.returncode == 141 and gone.stderr == "", gone.stderr[-2000:]
