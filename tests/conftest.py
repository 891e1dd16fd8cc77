"""Shared fixtures: the real test corpus, a small model directory, one loaded moderator."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/media.py

from media import build_corpus  # noqa: E402

torch.set_num_threads(max(1, torch.get_num_threads()))

# Knobs of the tests themselves (read by test_soak, test_hostile, test_report), not worker settings.
TEST_KNOBS = frozenset({"DEEPFAKE_SOAK_JOBS", "DEEPFAKE_SOAK_REPORT", "DEEPFAKE_FUZZ_SECONDS", "DEEPFAKE_FUZZ_SEED",
                        "DEEPFAKE_REPORT_SCREENSHOT"})
_shell_settings: dict[str, str] = {}


def pytest_configure(config):
    """The worker's settings come from the tests alone: DEEPFAKE_* and RQ_* exported in the shell that
    runs pytest (DEEPFAKE_MAX_DURATION_S=3600, RQ_REDIS_URL, ...) would reach every Settings() and every
    worker process the tests start. Removed before any fixture or test module runs; put back after."""
    for name in [n for n in os.environ if n.startswith(("DEEPFAKE_", "RQ_")) and n not in TEST_KNOBS]:
        _shell_settings[name] = os.environ.pop(name)


def pytest_unconfigure(config):
    os.environ.update(_shell_settings)
    _shell_settings.clear()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised reduced-width MD-CSDNetwork, labelled untrained: tests only."""
    from training.export import save_model_dir
    from training.models import create_model

    torch.manual_seed(0)
    model = create_model("mdcsd_tiny")
    out = tmp_path_factory.mktemp("model_random")
    save_model_dir(model, out, name="mdcsd-tiny-random", version="0.0.0-test", architecture="mdcsd_tiny",
                   trained=False, training_data="none: randomly initialised for tests")
    return out


@pytest.fixture(scope="session")
def nan_model_dir(tmp_path_factory) -> Path:
    """The reduced-width MD-CSDNetwork with weights gone bad (a NaN classifier bias, as a diverged
    training run leaves): every score it gives is NaN."""
    from training.export import save_model_dir
    from training.models import create_model

    torch.manual_seed(0)
    model = create_model("mdcsd_tiny")
    with torch.no_grad():
        model.classifier.bias.fill_(float("nan"))
    out = tmp_path_factory.mktemp("model_nan")
    save_model_dir(model, out, name="mdcsd-tiny-nan", version="0.0.0-test", architecture="mdcsd_tiny",
                   trained=False, training_data="none: weights gone bad, for tests")
    return out


@pytest.fixture(scope="session")
def cut_model_dir(tmp_path_factory) -> Path:
    """The packaged model copied with its model.onnx and weights.pt cut short (their first kilobyte),
    as a copy that stopped mid-way leaves them."""
    import shutil

    from worker.pipeline import DEFAULT_MODEL_DIR

    cut = tmp_path_factory.mktemp("model_cut") / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, cut)
    for name in ("model.onnx", "weights.pt"):
        (cut / name).write_bytes((cut / name).read_bytes()[:1000])
    return cut


@pytest.fixture(scope="session")
def settings(random_model_dir):
    from worker.settings import Settings

    return Settings(model_dir=random_model_dir, frames=32, log_format="json")


@pytest.fixture(scope="session")
def moderator(settings):
    from worker.pipeline import Moderator

    return Moderator(settings)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    from servers import RedisServer, stop

    server = RedisServer.start(tmp_path_factory.mktemp("redis"))
    yield server
    stop(server.proc)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real SeaweedFS S3 server; the worker code under test finds its keys in the AWS_* environment."""
    from servers import S3_ACCESS_KEY, S3_SECRET_KEY, S3Server, stop

    os.environ["AWS_ACCESS_KEY_ID"] = S3_ACCESS_KEY
    os.environ["AWS_SECRET_ACCESS_KEY"] = S3_SECRET_KEY
    server = S3Server.start(tmp_path_factory.mktemp("s3"))
    yield server
    stop(server.proc)


@pytest.fixture()
def redis(redis_server):
    """A client of the session's redis-server, its database emptied for this test."""
    from redis import Redis

    conn = Redis.from_url(redis_server.url)
    conn.flushdb()
    return conn
