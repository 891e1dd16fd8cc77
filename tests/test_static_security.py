"""Static security checks on the worker's code (docs/security.md): nothing that loads code (pickle,
eval, shells, unsafe YAML, torch.load without weights_only), the queue path JSON-only behind the job
allow-list, and secrets only from the environment. The image's non-root user is checked with the
Dockerfile (test_dockerfile.py)."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


FORBIDDEN = [
    (r"\bimport\s+(c?pickle|dill|cloudpickle|jsonpickle|marshal|shelve)\b", "a code-loading serializer"),
    (r"\bfrom\s+(c?pickle|dill|cloudpickle|jsonpickle|marshal|shelve)\b", "a code-loading serializer"),
    (r"\bpickle\.", "pickle"),
    (r"allow_pickle\s*=\s*True", "numpy unpickling"),
    (r"yaml\.(load|unsafe_load)\(", "YAML object construction"),
    (r"(?<![\w.])(eval|exec)\(", "eval/exec"),
    (r"shell\s*=\s*True", "a shell"),
    (r"\bos\.system\(", "a shell"),
]


def worker_sources() -> list[Path]:
    return sorted((ROOT / "worker").rglob("*.py"))


def test_no_pickle_or_code_loading_anywhere_in_the_worker():
    offences = []
    for path in worker_sources():
        text = path.read_text()
        for pattern, why in FORBIDDEN:
            for m in re.finditer(pattern, text):
                line = text[: m.start()].count("\n") + 1
                offences.append(f"{path.relative_to(ROOT)}:{line}: {why}")
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                offences.append(f"{path.relative_to(ROOT)}: torch.load without weights_only=True")
    assert not offences, offences


def test_the_queue_path_uses_json_only_and_the_job_allow_list(redis_server):
    from redis import Redis
    from rq.serializers import JSONSerializer

    from worker.jobs import MODERATE_FUNC
    from worker.queue import get_queue
    from worker.rq_worker import ALLOWED_FUNCS, DeepfakeDeathPenalty, DeepfakeJob, DeepfakeWorker

    conn = Redis.from_url(redis_server.url)
    worker = DeepfakeWorker(["deepfake"], connection=conn)
    assert worker.serializer is JSONSerializer and worker.job_class is DeepfakeJob
    assert worker.death_penalty_class is DeepfakeDeathPenalty  # a job timeout ends as `timeout`
    assert all(q.serializer is JSONSerializer and q.job_class is DeepfakeJob for q in worker.queues)
    assert get_queue(conn, "deepfake").serializer is JSONSerializer
    assert ALLOWED_FUNCS == {MODERATE_FUNC}
    # every job the client side loads or lists names the JSON serializer
    for path in (ROOT / "worker" / "queue.py", ROOT / "worker" / "jobs.py", ROOT / "worker" / "cli.py"):
        for line in path.read_text().splitlines():
            if re.search(r"Job\.fetch\(|Queue\(|Registry\(", line) and "def " not in line:
                assert "serializer=JSONSerializer" in line or "queue=queue" in line, (path.name, line)


def test_secrets_come_only_from_the_environment():
    from worker.settings import Settings

    from pydantic import SecretStr

    secretish = [name for name in Settings.model_fields if re.search(r"secret|password|token|credential|access_key",
                                                                      name)]
    # S3 keys come from AWS_* via boto3's own chain, never settings or code; our own secrets (the
    # verdict and webhook signing keys) are SecretStr, so no repr or log line shows them
    assert sorted(secretish) == ["verdict_secret", "webhook_secret"], secretish
    for name in secretish:
        assert SecretStr in getattr(Settings.model_fields[name].annotation, "__args__", ()), name
    pattern = re.compile(r"AKIA[0-9A-Z]{16}|aws_secret_access_key\s*=|aws_access_key_id\s*=|"
                         r"(password|secret)\s*=\s*['\"][^'\"]+['\"]", re.I)
    for path in worker_sources():
        assert not pattern.search(path.read_text()), path

    from worker.s3 import make_client

    assert not {p for p in inspect.signature(make_client).parameters if re.search("key|secret|token", p)}
