#!/usr/bin/env bash
# 1,000 phantom files through two `bonewatch worker` processes on the local Redis and PostgreSQL,
# with a kill -9 of one worker mid-run and a new worker started in its place; prints the final
# `bonewatch status`. Usage: scripts/distributed-demo.sh [WORKDIR]   (needs psql and redis-cli)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
B=${BONEWATCH:-$here/.venv/bin/bonewatch}
work=$(mkdir -p "${1:-build/distributed-demo}" && cd "${1:-build/distributed-demo}" && pwd)
db=bonewatch_demo
export BONEWATCH_BROKER_URL=${BONEWATCH_BROKER_URL:-redis://127.0.0.1:6379/13}
export BONEWATCH_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/$db
export BONEWATCH_DATA_DIR=$work/data BONEWATCH_PHI_SALT=demo-salt BONEWATCH_RECONCILE_INTERVAL=10
psql() { command psql -qtAh 127.0.0.1 -U postgres "$@"; }
finished() { psql $db -c "SELECT count(*) FROM images WHERE status NOT IN ('queued', 'processing')"; }

cd "$work"
rm -rf archive phantoms ./*.log
"$B" synth phantoms --studies 580 --seed 4242 --format both >/dev/null 2>&1
# the first 1,000 images of the seven upper-limb parts (the phantoms also hold chest, knee, pelvis)
find phantoms -type f \( -name '*.png' -o -name '*.dcm' \) \
  | grep -E 'XR_(ELBOW|FINGER|FOREARM|HAND|HUMERUS|SHOULDER|WRIST)/' | sort | head -1000 \
  | while read -r f; do mkdir -p "archive/$(dirname "${f#phantoms/}")"; cp "$f" "archive/${f#phantoms/}"; done
echo "archive: $(find archive -type f | wc -l) files"

psql postgres -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
redis-cli -u "$BONEWATCH_BROKER_URL" flushdb >/dev/null
"$B" db upgrade
setsid "$B" worker --concurrency 1 --hostname w1@%h >w1.log 2>&1 & w1=$!
setsid "$B" worker --concurrency 1 --hostname w2@%h >w2.log 2>&1 & w2=$!
trap 'kill -- -$w2 ${w3:+-$w3} 2>/dev/null || true' EXIT
"$B" process archive 2>/dev/null | tail -1
until [ "$(finished)" -ge 300 ]; do sleep 0.5; done
echo "$(date +%T) $(finished) finished; kill -9 of worker w1 with these leases held:"
psql $db -c "SELECT leased_by, count(*) FROM images WHERE status = 'processing' GROUP BY leased_by"
kill -9 -- -"$w1"
setsid "$B" worker --concurrency 1 --hostname w3@%h >w3.log 2>&1 & w3=$!
echo "$(date +%T) started worker w3"
until [ "$(finished)" -ge 1000 ]; do sleep 1; done
echo "$(date +%T) all 1,000 finished"
"$B" status
"$B" status --format json
psql $db -c "SELECT 'predictions: ' || count(*) || ', distinct images: ' || count(DISTINCT image_id) FROM predictions"
grep -h "released\|reconcile:" w2.log w3.log | cut -c1-160 || true
