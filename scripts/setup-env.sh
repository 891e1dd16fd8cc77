# Sourced by scripts/*.sh: make .venv with the project and the given extra installed, once.
# torch is pinned to 2.13.0, its CPU build taken from PyTorch's CPU index (PyPI's is a multi-GB CUDA build).
# Extras: demo (the sample clip), stack (scripts/local-stack.sh: + redis-server and SeaweedFS), test
# (+ the browser, Prometheus and deploy checks the tests use), train.
extra="${1:-}"
if [ "$extra" = test ] || [ "$extra" = stack ]; then
  missing=""
  command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
  if [ "$extra" = test ]; then
    # Debian's chromium package; Ubuntu has none (its chromium-browser is a snap): install one first there.
    command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
      || missing="$missing chromium fonts-liberation"
    command -v promtool >/dev/null 2>&1 || missing="$missing prometheus"  # promtool + prometheus: tests/test_monitoring.py
  fi
  if [ -n "$missing" ]; then
    echo "installing Debian packages for the $extra extra:$missing" >&2
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive \
      $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
fi
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv || {
    rm -rf .venv
    echo "could not make a virtual environment: install python3-venv (Debian, Ubuntu) and run this again" >&2
    return 1 2>/dev/null || exit 1
  }
fi
. .venv/bin/activate
stamp=".venv/.installed-${extra:-base}"
# worker/__init__.py holds the version: an editable install's metadata follows it only when reinstalled.
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ worker/__init__.py -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  # PyPI's torch 2.13.0 for Linux x86-64 is a CUDA build of several GB: the CPU build from PyTorch's
  # CPU index first, as the Dockerfile does; the project's install then finds torch satisfied.
  python -m pip install -q --retries 1 --timeout 15 --index-url "${TORCH_CPU_INDEX_URL:-https://download.pytorch.org/whl/cpu}" \
    "torch==2.13.0" 2>/dev/null || echo "note: no CPU build of torch from ${TORCH_CPU_INDEX_URL:-https://download.pytorch.org/whl/cpu}: torch comes from the usual index" >&2
  python -m pip install -q -e ".[${extra}]"
  touch "$stamp"
fi
if [ "$extra" = test ]; then
  bash deploy/ci/install-kubectl.sh  # kubectl >= 1.27 for `kubectl kustomize` (no-op when present)
fi
