#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what is missing (redis-server, a virtualenv with
# the project and its test extras), then runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup-env.sh test
exec python -m pytest "$@"
