#!/usr/bin/env bash
# The sales opening as a step, at the mission's scale: 150 new sessions/s, then at once
# STEP times that (8x: 1,200/s; 10x: 1,500/s), then back. Rehearsed as a shop would:
# frontends as slow as real ones (100 ms a request) and held at their concurrency limit
# (pool.shed), every blade the simulator delivers just as slow, delivered in seconds,
# the waiting room on, the production default autoscale.max_client_share (0.1), and
# `surge loadtest` spreading its sessions over CLIENTS loopback addresses and following
# waiting pages as a browser does.
#
# It then checks what a shopper and the shop's owner would notice, and exits non-zero
# when any fails:
#   - no newcomer turned away without a place (no plain 503, no dropped connection);
#   - no failed request for a session that got in; every buying session reached its cart;
#   - nobody let in out of ticket order, no place lost;
#   - `desired` at its peak within two decisions of the step, never down while anyone
#     waits; no order released before it served (none cancelled);
#   - the line empty within delivery time + 5 s of the last node joining.
#
# Usage: loadtests/sales-step.sh [STEP]   (STEP 8 or 10; default 8; about 2 minutes)
#        CLIENTS=1 loadtests/sales-step.sh   (one source address: the signal goes blind)
# Everything on 127.0.0.0/8, bounded in time, every process stopped by its PID.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/loadtests/lib.sh"
STEP=${1:-8}
CLIENTS=${CLIENTS:-4096}
CALM=150
PEAK=$((CALM * STEP))
(cd "$ROOT" && cargo build --release --quiet)
SURGE="$ROOT/target/release/surge"
with_scratch sales-step
PORT=$(free_port); ADMIN=$(free_port); BLADES=$(free_port)
# Delivery as the simulator does it: 3 s to deliver, 2 s to install, then two health
# checks a second apart before the blade takes traffic.
DELIVERY=7
cat > "$WORK/surge.toml" <<EOF
[proxy]
listen = "127.0.0.1:$PORT"
workers = 0
access_log = false
max_connections_per_ip = 1000
[pool]
name = "shop"
[pool.sticky]
cookie = "cart"
[pool.health]
interval = "1s"
rise = 2
[pool.shed]
max_in_flight_per_node = 48
queue_timeout = "200ms"
[waiting_room]
refresh = "2s"
abandon_after = "10s"
[local_blades]
count = 2
latency = "100ms"
[admin]
listen = "127.0.0.1:$ADMIN"
[provider]
kind = "scaleway"
api_url = "sim"
zones = ["fr-par-2"]
offer = "EM-A115X-SSD"
blade_port = $BLADES
private_network = "pn-step"
[autoscale]
min = 2
max = 24
interval = "500ms"
metrics_window = "10s"
fast_window = "1s"
scale_down_window = "120s"
delivery_time = "${DELIVERY}s"
ledger = "$WORK/orders.json"
[sim]
delivery = "3s"
install = "2s"
capacity = 40
blade_port = $BLADES
blade_latency = "100ms"
EOF
cat > "$WORK/plan.toml" <<EOF
target = "http://127.0.0.1:$PORT"
timeout = "10s"
queue_patience = "90s"
clients = $CLIENTS
[[stages]]
duration = "20s"
rate = $CALM.0
[[stages]]
duration = "40s"
rate = $PEAK.0
[[stages]]
duration = "20s"
rate = $CALM.0
[[scenarios]]
name = "browse"
weight = 3
steps = [
  { name = "home", path = "/" },
  { name = "catalog", path = "/catalog", think = "300ms" },
  { name = "product", path = "/product/12", think = "500ms" },
]
[[scenarios]]
name = "buy"
weight = 1
steps = [
  { name = "landing", path = "/" },
  { name = "add-to-cart", method = "POST", path = "/cart", body = '{"product": 12, "qty": 2}', expect = 201 },
  { name = "view-cart", path = "/cart", think = "500ms" },
  { name = "checkout", method = "POST", path = "/checkout", think = "1s" },
]
EOF
(cd "$WORK" && RUST_LOG=warn "$SURGE" serve --config "$WORK/surge.toml" >"$WORK/surge.out" 2>"$WORK/surge.err") &
PIDS+=($!)
wait_answering "$PORT"
# The rehearsal starts with the floor in service (two static blades, no spare needed).
sleep 2
echo "step: $CALM -> $PEAK new sessions/s (${STEP}x) from $CLIENTS addresses; blades 100 ms, 48 at a time"
"$SURGE" loadtest "$WORK/plan.toml" --admin "http://127.0.0.1:$ADMIN" --out "$WORK/out" | tee "$WORK/table.txt" || true
cp "$WORK/out/report.json" "${REPORT:-/tmp/sales-step-${STEP}x.json}" 2>/dev/null || true
python3 - "$WORK/out/report.json" 20 "$DELIVERY" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
step_at, delivery = int(sys.argv[2]), int(sys.argv[3])
t = r["timeline"]
problems = []
def need(ok, what):
    print(("ok    " if ok else "FAIL  ") + what)
    if not ok:
        problems.append(what)
newcomers = r["failures"]["newcomers"]; served = r["failures"]["served"]
need(not newcomers, f"plain refusals of newcomers (503 without a place, dropped connections): {newcomers or 0}")
need(not served, f"failed requests of sessions that got in: {served or 0}")
buy = r["scenarios"].get("buy", 0)
cart = r["steps"].get("add-to-cart", {}).get("ok", 0)
need(cart == buy, f"buying sessions that reached their cart: {cart} of {buy}")
w = r["waiting_room"]
need(w["overtaken"] == 0, f"sessions let in out of ticket order: {w['overtaken']}")
need(w["places_lost"] == 0, f"places lost: {w['places_lost']}")
need(w["abandoned"] == 0, f"sessions that gave up waiting: {w['abandoned']}")
cancelled = r.get("orders_released_unserved")
need(cancelled == 0, f"orders released before they served (cancelled): {cancelled}")
desired = [s.get("desired") for s in t]
seen = [(i, d) for i, d in enumerate(desired) if d is not None]
peak = max(d for _, d in seen)
first_peak = next(i for i, d in seen if d == peak)
need(first_peak <= step_at + 2, f"desired at its peak {peak} at second {first_peak} (step at {step_at}: within two decisions of 500 ms, read once a second)")
down = [i for i in range(1, len(t)) if desired[i] is not None and desired[i-1] is not None
        and desired[i] < desired[i-1] and (t[i]["queued"] > 0 or t[i-1]["queued"] > 0)]
need(not down, f"seconds where desired went down while anyone waited: {down}")
ins = [s.get("in_service") or 0 for s in t]
joins = [i for i in range(1, len(ins)) if ins[i] > ins[i-1]]
last_join = joins[-1] if joins else step_at
queued = [s["queued"] for s in t]
empty = next((i for i in range(last_join, len(queued)) if queued[i] == 0), None)
need(empty is not None and empty - last_join <= delivery + 5,
     f"line empty at second {empty}, last node joined at {last_join} (within delivery {delivery} s + 5 s)")
print(f"sessions {r['started_sessions']}, late starts {r['late_starts']}, queued {w['queued']}, let in {w['admitted']}, "
      f"peak line {max(queued)}, wait p99 {w['wait_p99_ms']:.0f} ms; in service {ins[step_at]} -> {max(ins)}, desired peak {peak}")
sys.exit(1 if problems else 0)
PY
