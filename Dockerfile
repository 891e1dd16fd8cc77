# syntax=docker/dockerfile:1.7
#
# deepfake-moderation worker images. Two targets, same entry point (`rq worker deepfake`):
#
#   docker build --target gpu -t deepfake-moderation:0.4.8-gpu .
#   docker build --target cpu -t deepfake-moderation:0.4.8-cpu .
#   docker build --target cpu --build-arg MODEL_DIR=models/mdcsd-v1 -t deepfake-moderation:0.4.8-cpu-mdcsd-v1 .
#
# Settings come from DEEPFAKE_* variables (worker/settings.py), the queue from RQ_REDIS_URL, S3
# credentials from AWS_*; none are baked. See docs/deploy.md.
#
# GPU base: nvcr.io/nvidia/tensorrt:25.10-py3 (NGC's monthly TensorRT image: Ubuntu 24.04,
# Python 3.12, CUDA 13.0.x, cuDNN 9, TensorRT 10.13 with its Python bindings, per NGC's release notes
# as remembered, not read here). Why this tag: torch==2.13.0 from PyPI is itself a CUDA 13.0 build;
# its wheel metadata (read here) requires cuda-toolkit==13.0.3 and nvidia-cudnn-cu13==9.20.0.48,
# so torch brings its own CUDA 13.0 runtime and cuDNN and `pip install .` needs no PyTorch index.
# The base only has to supply TensorRT for the coming TensorRT engine (issue "engines") on the same
# CUDA major and minor (13.0), so one driver floor covers both: R580 or newer (the CUDA 13.0 LTS
# branch). A later 25.xx/26.xx tag on CUDA 13.1+ would raise that floor. NOT verified here (no
# registry or Docker engine on the build machine): that this tag exists as described, that
# `import tensorrt` works in it (the build checks that), and the build itself.
# If torch is ever pinned to a CUDA 12 build instead (e.g. pip's
# --index-url https://download.pytorch.org/whl/cu128), pick a CUDA 12.8 base such as 25.03-py3.
ARG GPU_BASE=nvcr.io/nvidia/tensorrt:25.10-py3
# CPU base: Debian bookworm with CPython 3.11 (the version the project is developed and tested on).
ARG CPU_BASE=python:3.11-slim-bookworm
# A model directory (model.json + weights) inside the build context to bake in; the default is an
# empty placeholder, and the image then uses the packaged default model (worker/default_model/).
ARG MODEL_DIR=deploy/docker/no-model

# ---------------------------------------------------------------------------------------------
# The model to bake (or the placeholder).
FROM scratch AS model
ARG MODEL_DIR
COPY ${MODEL_DIR}/ /model/

# ---------------------------------------------------------------------------------------------
# GPU build + runtime: one stage, since the TensorRT base is both (it has no smaller runtime form).
FROM ${GPU_BASE} AS gpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# libgl1 + libglib2.0-0: what opencv-python's cv2 loads; python3-venv: Ubuntu's venv module.
# Versions follow the base's Ubuntu release (security updates), hence no pins.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 deepfake \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin deepfake
# --system-site-packages: TensorRT's Python bindings live in the base's system Python.
RUN python3 -m venv --system-site-packages /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# The dependencies first, in a layer of their own that only a change to them rebuilds: torch's CUDA
# build is several GB, and a release that changes the code alone then reuses it, in the registry and
# on every GPU node that pulled the last one. (The version lives in worker/__init__.py, not here.)
# --isolated: NGC images may carry a pip constraints file pinned to their own packages. torch 2.13.0
# comes from PyPI as its CUDA 13.0 build (see the top of this file).
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
       > /tmp/requirements.txt \
    && pip install --isolated --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt
COPY README.md LICENSE ./
COPY worker/ worker/
COPY training/ training/
# The check: TensorRT's bindings are visible from the venv (found, not loaded: no driver at build
# time), torch is the CUDA build, and the worker imports (cv2 finds its system libraries).
RUN pip install --isolated --no-cache-dir --no-deps . \
    && python -c "import importlib.util as u, torch, worker.rq_worker; assert u.find_spec('tensorrt'), 'no TensorRT bindings'; assert torch.version.cuda, torch.__version__" \
    && rm -rf /src
COPY --from=model /model/ /opt/deepfake/model/
# No baked model: point /opt/deepfake/model at the packaged default (left dangling if none ships).
RUN if [ ! -f /opt/deepfake/model/model.json ]; then \
      rm -rf /opt/deepfake/model \
      && ln -s "$(python -c 'import pathlib, worker; print(pathlib.Path(worker.__file__).parent / "default_model")')" \
         /opt/deepfake/model; \
    fi \
    && install -d -o 10001 -g 10001 -m 0750 /var/cache/deepfake
# The worker: settings by environment (a Kubernetes ConfigMap overrides any of these).
ENV RQ_WORKER_CLASS=worker.rq_worker.DeepfakeWorker \
    RQ_JOB_CLASS=worker.rq_worker.DeepfakeJob \
    RQ_CONNECTION_CLASS=worker.redis_client.WaitingRedis \
    DEEPFAKE_MODEL_DIR=/opt/deepfake/model \
    DEEPFAKE_DEVICE=cuda \
    DEEPFAKE_ENGINE=pytorch \
    DEEPFAKE_PRECISION=fp16 \
    DEEPFAKE_METRICS_PORT=9100 \
    DEEPFAKE_LOG_FORMAT=json \
    DEEPFAKE_CACHE_DIR=/var/cache/deepfake \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/var/cache/deepfake/xdg \
    CUDA_CACHE_PATH=/var/cache/deepfake/cuda
# Writable under a read-only root filesystem (emptyDirs in Kubernetes, `--tmpfs`/volumes in Docker).
VOLUME ["/tmp", "/var/cache/deepfake"]
WORKDIR /tmp
USER 10001:10001
EXPOSE 9100
# 600 s to start, as the Kubernetes startup probe allows: a first TensorRT engine build takes minutes.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('DEEPFAKE_METRICS_PORT') or '9100'; port == '0' or urllib.request.urlopen('http://127.0.0.1:%s/healthz' % port, timeout=4)"]
# The base's entrypoint prints a banner into the (JSON) logs and is not needed: run rq directly.
ENTRYPOINT []
CMD ["rq", "worker", "deepfake"]

# ---------------------------------------------------------------------------------------------
# CPU build: a virtual environment with the CPU build of torch, copied whole into the runtime.
FROM ${CPU_BASE} AS cpu-build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# PyPI's torch 2.13.0 for Linux x86-64 is a CUDA build (several GB of CUDA libraries): take the CPU
# build from PyTorch's CPU index first; `pip install .` then finds torch==2.13.0 satisfied
# (2.13.0+cpu). Keep this version equal to pyproject.toml's pin (tests/test_dockerfile.py checks).
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --index-url "${TORCH_CPU_INDEX_URL}" torch==2.13.0
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# The other dependencies next, then the project alone (see the gpu stage): a code change rebuilds
# only the last layer here. The runtime below copies the whole venv, in one layer.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
       > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt
COPY README.md LICENSE ./
COPY worker/ worker/
COPY training/ training/
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import torch, worker.rq_worker; assert torch.version.cuda is None, torch.__version__"

# ---------------------------------------------------------------------------------------------
# CPU runtime.
FROM ${CPU_BASE} AS cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# libgl1 + libglib2.0-0: what opencv-python's cv2 loads. Versions follow Debian bookworm's security
# updates, hence no pins.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 deepfake \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin deepfake
COPY --from=cpu-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY --from=model /model/ /opt/deepfake/model/
# No baked model: point /opt/deepfake/model at the packaged default (left dangling if none ships).
RUN if [ ! -f /opt/deepfake/model/model.json ]; then \
      rm -rf /opt/deepfake/model \
      && ln -s "$(python -c 'import pathlib, worker; print(pathlib.Path(worker.__file__).parent / "default_model")')" \
         /opt/deepfake/model; \
    fi \
    && install -d -o 10001 -g 10001 -m 0750 /var/cache/deepfake
# The worker: settings by environment (a Kubernetes ConfigMap overrides any of these).
ENV RQ_WORKER_CLASS=worker.rq_worker.DeepfakeWorker \
    RQ_JOB_CLASS=worker.rq_worker.DeepfakeJob \
    RQ_CONNECTION_CLASS=worker.redis_client.WaitingRedis \
    DEEPFAKE_MODEL_DIR=/opt/deepfake/model \
    DEEPFAKE_DEVICE=cpu \
    DEEPFAKE_METRICS_PORT=9100 \
    DEEPFAKE_LOG_FORMAT=json \
    DEEPFAKE_CACHE_DIR=/var/cache/deepfake \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/var/cache/deepfake/xdg
# Writable under a read-only root filesystem (emptyDirs in Kubernetes, `--tmpfs`/volumes in Docker).
VOLUME ["/tmp", "/var/cache/deepfake"]
WORKDIR /tmp
USER 10001:10001
EXPOSE 9100
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('DEEPFAKE_METRICS_PORT') or '9100'; port == '0' or urllib.request.urlopen('http://127.0.0.1:%s/healthz' % port, timeout=4)"]
CMD ["rq", "worker", "deepfake"]
