#!/usr/bin/env bash
# A compressed sales-day ramp against the embedded default (surge + in-process simulator),
# printing the autoscaler's timeline every 2 s: new connections/s, desired, in service,
# servers at the provider, sheds. Load is wrk with `Connection: close` (every request a new
# connection, as new shoppers are), stepped by connection count: a closed model, so use it
# to watch the autoscaler, not to measure latency (that is `surge loadtest`'s job).
#
# Usage: loadtests/ramp-demo.sh   (about 4 minutes; everything on 127.0.0.1, stopped by PID)
#        SURGE_CONFIG=loadtests/budget-surge.toml loadtests/ramp-demo.sh   (a tight budget)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
(cd "$ROOT" && cargo build --release --quiet)
. "$ROOT/loadtests/lib.sh"
cd "$ROOT"
WORK=$(mktemp -d /tmp/surge-ramp.XXXXXX)
"$ROOT/target/release/surge" serve ${SURGE_CONFIG:+--config "$SURGE_CONFIG"} >"$WORK/serve.log" 2>&1 & SURGE=$!
trap 'kill $SURGE 2>/dev/null; wait $SURGE 2>/dev/null; rm -rf "$WORK"' EXIT
for _ in $(seq 1 50); do curl -fs -o /dev/null http://127.0.0.1:8080/catalog && break; sleep 0.1; done
# Alive too: with 8080 taken by something else, that would answer and be ramped instead.
kill -0 $SURGE 2>/dev/null && curl -fs -o /dev/null http://127.0.0.1:8080/catalog || {
  echo "ramp-demo.sh: surge is not serving /catalog on 8080; its log:" >&2; tail -n 5 "$WORK/serve.log" >&2; exit 1
}

sample() {
  curl -s localhost:9090/v1/autoscaler | python3 -c '
import json, sys, urllib.request
d = json.load(sys.stdin)
o = d.get("observations") or {}
m = urllib.request.urlopen("http://127.0.0.1:9090/metrics").read().decode()
shed = sum(float(l.rsplit(" ", 1)[1]) for l in m.splitlines() if l.startswith("surge_shed_total"))
rate = o.get("connections_per_second", 0)
c = d.get("cost") or {}
row = (sys.argv[1], rate, d["desired"], d["in_service"], d["ordered"], d["provider_servers"], shed,
       c.get("per_hour", 0), c.get("today", 0), "budget" if d.get("budget_reached") else "")
print("%5ss  %8.0f  %7d  %10d  %7d  %7d  %6.0f  %6.2f  %6.2f  %s" % row)
' "$1"
}

echo "    t  conn/s  desired  in_service  ordered  servers   sheds  EUR/h   today"
start=$(date +%s)
phase() { # connections seconds label
  wrk -t1 -c"$1" -d"$2"s -H "Connection: close" --latency http://127.0.0.1:8080/catalog > "$WORK/wrk-$3.txt" &
  local w=$!
  while kill -0 $w 2>/dev/null; do sample $(( $(date +%s) - start )); sleep 2; done
  wait $w || { echo "ramp-demo.sh: wrk failed in $3" >&2; exit 1; }
  local rate p99 non2xx
  rate=$(awk '/Requests\/sec/ {print $2}' "$WORK/wrk-$3.txt")
  p99=$(awk '/^ +99%/ {print $2}' "$WORK/wrk-$3.txt")
  non2xx=$(awk '/Non-2xx or 3xx responses/ {print $NF}' "$WORK/wrk-$3.txt")
  # A phase that got no answer has no req/s to print: stop rather than print a blank.
  need_figure "ramp-demo.sh: wrk's requests/s in $3" "$rate"
  echo "  -- $3: $rate req/s, p99 $p99, non-2xx ${non2xx:-0}"
}
phase 1 20 ordinary-day
phase 16 40 sales-opening
phase 1 150 after-the-rush
curl -s localhost:9090/v1/autoscaler | python3 -c '
import json, sys
d = json.load(sys.stdin)
c = d["cost"]
print("cost: %d servers, %.2f EUR/h; %.2f EUR since start, %.2f EUR today" % (c["servers"], c["per_hour"], c["since_start"], c["today"]))
for r in ([d["budget_reached"]] if d.get("budget_reached") else []):
    print(r)
'
