#!/usr/bin/env bash
# The audsync demo, end to end on DuckDB, from a fresh clone:
#   1. installs audsync (and dbt with it) into .venv at the repository root, if needed;
#   2. starts a webhook receiver on 127.0.0.1:8765 that verifies every signature;
#   3. day 1: builds the example's seeds, audiences and syncs with dbt, then `audsync run`;
#   4. day 2: moves the shop's date forward two weeks, rebuilds, and syncs again: only the
#      customers who entered, left or changed are sent.
# Each run starts from a fresh warehouse. Outputs land in examples/jaffle_audiences/output/.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$root/.venv"
export DBT_SEND_ANONYMOUS_USAGE_STATS=false PIP_DISABLE_PIP_VERSION_CHECK=1

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

if ! "$venv/bin/python" -c "import audsync, dbt.adapters.duckdb" 2>/dev/null; then
    step "installing audsync into $venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet -e "$root"
fi
dbt="$venv/bin/dbt"
audsync="$venv/bin/audsync"

cd "$here"
rm -rf output target/audsync_parse.json jaffle_audiences.duckdb jaffle_audiences.duckdb.wal
mkdir -p output

step "starting a webhook receiver on 127.0.0.1:8765"
"$venv/bin/python" scripts/webhook_receiver.py --port 8765 --secret "${AUDSYNC_DEMO_WEBHOOK_SECRET:-demo-secret}" --out output/webhook &
receiver=$!
trap 'kill $receiver 2>/dev/null || true' EXIT
for _ in $(seq 50); do
    (echo > /dev/tcp/127.0.0.1/8765) 2>/dev/null && break
    sleep 0.1
done

step "dbt deps"
"$dbt" deps --profiles-dir . --quiet

step "day 1 (2026-09-28): dbt build, then audsync run"
"$dbt" build --profiles-dir . --quiet --vars '{as_of_date: "2026-09-28"}'
"$audsync" --profiles-dir . run --select path:models/syncs

step "day 2 (2026-10-12): the audiences change; dbt run, then audsync run sends only the diff"
"$dbt" run --profiles-dir . --quiet --vars '{as_of_date: "2026-10-12"}'
"$audsync" --profiles-dir . plan high_value_to_webhook
"$audsync" --profiles-dir . run --select path:models/syncs

step "what audsync recorded"
"$audsync" --profiles-dir . status
"$audsync" --profiles-dir . runs churn_risk_to_file --limit 5

step "what the destinations hold"
echo "webhook members: $(python3 -c 'import json; print(len(json.load(open("output/webhook/members.json"))))') (output/webhook/members.json)"
echo "files written:"; ls -1 output/files output/recent_buyers | sed 's/^/  /'
step "the REST API: audsync serve (README, section audsync serve)"
# The service needs a token; the demo's is demo-token unless AUDSYNC_API_TOKEN says otherwise.
export AUDSYNC_API_TOKEN="${AUDSYNC_API_TOKEN:-demo-token}"
"$audsync" --profiles-dir . serve --port 8787 --no-scheduler > output/serve.log 2>&1 &
service=$!
trap 'kill $receiver 2>/dev/null || true; kill $service 2>/dev/null || true' EXIT
for _ in $(seq 300); do
    curl -fs http://127.0.0.1:8787/healthz >/dev/null 2>&1 && break
    sleep 0.2
done
auth=(-H "Authorization: Bearer $AUDSYNC_API_TOKEN" -H "Content-Type: application/json")
echo "create:"
curl -fsS "${auth[@]}" http://127.0.0.1:8787/api/v1/audience-syncs -d '{
  "name": "VIP customers to file", "audience_id": "high_value_customers", "destination_id": "demo_file",
  "field_mapping": [{"source_column": "email", "destination_field": "email"},
                    {"source_column": "lifetime_value", "destination_field": "ltv"}],
  "sync_mode": "mirror", "schedule": "daily", "config": {"path": "output/api"}}' | python3 -m json.tool | sed -n 1,12p  # sed reads it all: head would leave json.tool a broken pipe
sync=$(curl -fsS "${auth[@]}" http://127.0.0.1:8787/api/v1/audience-syncs \
       | python3 -c 'import json,sys; print(next(s["id"] for s in json.load(sys.stdin) if s["slug"] == "vip_customers_to_file"))')
echo "trigger:"
run=$(curl -fsS -X POST "${auth[@]}" "http://127.0.0.1:8787/api/v1/audience-syncs/$sync/trigger" \
      | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
for _ in $(seq 300); do
    status=$(curl -fsS "${auth[@]}" "http://127.0.0.1:8787/api/v1/audience-syncs/$sync/runs/$run" \
             | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')
    case "$status" in queued|running) sleep 0.5 ;; *) break ;; esac
done
echo "run $run: $status"
curl -fsS "${auth[@]}" "http://127.0.0.1:8787/api/v1/audience-syncs/$sync/runs?limit=1" | python3 -m json.tool | sed -n 1,20p  # sed reads it all: head would leave json.tool a broken pipe
echo "delete (the file's members stay where they were sent):"
curl -fsS -X DELETE "${auth[@]}" "http://127.0.0.1:8787/api/v1/audience-syncs/$sync"; echo
kill -TERM $service; wait $service || true

echo
echo "Query the diff and the history in SQL too, e.g. with duckdb:"
echo "  select * from main.churn_risk_to_file__changes;  select * from main_audsync.audsync_runs;"
