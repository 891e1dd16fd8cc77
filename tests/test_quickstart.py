"""The README's quick starts, run as a new user would: `scripts/demo.sh` (the embedded default, a local
video in and a verdict out) and the three-command local stack (`scripts/local-stack.sh`, `deepfake
enqueue`, `rq worker deepfake --burst`), with their real servers, on ports of their own."""
from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
from servers import free_ports

ROOT = Path(__file__).resolve().parents[1]


def user_env(**extra: str) -> dict[str, str]:
    """This process's environment without the settings tests or the machine may have set."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DEEPFAKE_", "RQ_", "AWS_")) and k != "VIRTUAL_ENV"}
    return {**env, "DEEPFAKE_LOG_FORMAT": "json", **extra}


def run(command: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


def free_port_block(n: int) -> int:
    """A port whose next n-1 neighbours are free too, and each one 10000 above (weed's gRPC ports)."""
    for base in free_ports(40):
        if base + n - 1 + 10000 > 65535:
            continue
        socks = []
        try:
            for port in [p for b in range(base, base + n) for p in (b, b + 10000)]:
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no block of {n} free ports")


@pytest.mark.slow
def test_the_demo_command_scores_the_sample_clip_and_any_video_given(corpus):
    # named from where it is called (0.4.5 looked for it in the repository: not_found)
    cut_file = corpus["damaged_tail_mp4"]
    done = run(f"cd {cut_file.parent} && {ROOT}/scripts/demo.sh {cut_file.name}", user_env())
    verdicts = {(v := json.loads(line))["source"].rsplit("/", 1)[-1]: v for line in done.stdout.splitlines()}
    assert sorted(verdicts) == ["carphone_pristine.mp4", "damaged_tail.mp4"]
    sample, cut = verdicts["carphone_pristine.mp4"], verdicts["damaged_tail.mp4"]
    assert sample["status"] == "ok" and sample["label"] in ("fake", "real") and sample["faces"]
    assert "not on deepfake data" in sample["model"]["warning"]  # the packaged demo model says what it is
    assert (cut["status"], cut["error"]["code"]) == ("error", "corrupt")  # a bad file does not stop the others


@pytest.mark.slow
def test_the_local_stack_runs_a_job_from_enqueue_to_stored_verdict(tmp_path):
    stack_env = tmp_path / "stack.env"
    env = user_env(REDIS_PORT=str(free_ports(1)[0]), S3_PORT=str(free_port_block(10)), STACK_DIR=str(tmp_path / "stack"),
                   LOCAL_STACK_ENV=str(stack_env), DEEPFAKE_METRICS_PORT="0")
    try:
        assert "local stack ready" in run("scripts/local-stack.sh", env).stdout
        job_id = run(f". {stack_env} && deepfake enqueue s3://uploads/carphone.mp4", env).stdout.strip()
        run(f". {stack_env} && rq worker deepfake --burst", env)
        state = json.loads(run(f". {stack_env} && deepfake result {job_id}", env).stdout)
        assert state["status"] == "finished" and state["result"]["status"] == "ok"
        assert state["result"]["input"]["key"] == "carphone.mp4" and state["result"]["action"] in ("allow", "block")
        assert "faces" not in state["result"] and state["result"]["detail"]["faces"] >= 1  # the summary
        full = json.loads(run(f". {stack_env} && deepfake result --full {job_id}", env).stdout)
        assert len(full["result"]["faces"]) == state["result"]["detail"]["faces"] and "detail" not in full["result"]
        assert full["result"]["created_at"] == state["result"]["created_at"] and full["verified"] is None
        stored = json.loads(run(f". {stack_env} && deepfake verdict s3://uploads/carphone.mp4", env).stdout)
        assert stored["stored_at"] == "s3://uploads/verdicts/carphone.mp4.json"
        assert stored["verdict"]["created_at"] == state["result"]["created_at"]
        run("scripts/local-stack.sh stop", env)
        for port in (env["REDIS_PORT"], env["S3_PORT"]):  # stopped, not stopping: a restart finds them free
            with socket.socket() as s:
                assert s.connect_ex(("127.0.0.1", int(port))) != 0, f"port {port} still listening after stop"
    finally:
        subprocess.run(["bash", "scripts/local-stack.sh", "stop"], cwd=ROOT, env=env, timeout=60)
