#!/usr/bin/env bash
# Chaos rehearsal on loopback: steady shop traffic (loadtests/chaos.toml, 60 new
# sessions/s, 150/s from 20 s on, 80 s in all) while, in turn,
#    10 s  a frontend is killed (kill -9 of its `surge blade` process)
#    20 s  the provider simulator goes into chaos mode (every 3rd call 429, 30% 503,
#          30% of orders end in error, one order's answer lost) just as the rate rises
#          and the autoscaler orders servers; 35 s chaos off
#    38 s  a node is drained through the admin API
#    48 s  the config is reloaded (SIGHUP; a changed timeout)
#    60 s  surge is upgraded in place (SIGUSR2: a new process takes the sockets over)
# then prints, per event, the requests and the failed requests (503 sheds apart) until
# the next event, and whether the provider holds exactly the servers surge knows.
#
# Usage: loadtests/chaos.sh     (about 2 minutes; everything on 127.0.0.1, stopped by PID)
# Ports: 18080 proxy, 19090 admin, 17070 simulator, 18101-18103 frontends, 18200 ordered.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
(cd "$ROOT" && cargo build --release --quiet)
SURGE="$ROOT/target/release/surge"
WORK=$(mktemp -d /tmp/surge-chaos.XXXXXX)
OUT="$ROOT/loadtests/out/chaos"
mkdir -p "$OUT"
export SURGE_CHAOS_SIM_KEY="chaos-$RANDOM$RANDOM"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}" $(grep -oE 'process [0-9]+ now serves' "$WORK/surge.log" 2>/dev/null | awk '{print $2}'); do
    kill "$p" 2>/dev/null || true
  done
  sleep 0.5
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

for port in 18080 19090 17070 18101 18102 18103; do
  if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
    echo "port $port is in use; stop what listens there first" >&2; exit 1
  fi
done

"$SURGE" sim --listen 127.0.0.1:17070 --token "$SURGE_CHAOS_SIM_KEY" --blade-port 18200 \
  --delivery 3s --install 2s >"$WORK/sim.log" 2>&1 & PIDS+=($!)
declare -A BLADE
for n in 1 2 3; do
  "$SURGE" blade --listen 127.0.0.1:1810$n --id web-$n >"$WORK/web-$n.log" 2>&1 & BLADE[$n]=$!; PIDS+=($!)
done
cp "$ROOT/loadtests/chaos-surge.toml" "$WORK/surge.toml"
"$SURGE" serve --config "$WORK/surge.toml" >"$WORK/surge.log" 2>&1 & SURGE_PID=$!; PIDS+=($!)
for _ in $(seq 1 100); do curl -fs -o /dev/null http://127.0.0.1:18080/catalog && break; sleep 0.1; done
curl -fs -o /dev/null http://127.0.0.1:18080/catalog || {
  echo "chaos.sh: surge never answered /catalog on 18080; its log:" >&2
  tail -n 5 "$WORK/surge.log" >&2
  exit 1
}

# The report directory outlives runs: a load test that writes nothing must not leave the
# last run's report to be read as this one's.
rm -f "$OUT/report.json"
"$SURGE" loadtest "$ROOT/loadtests/chaos.toml" --out "$OUT" --admin http://127.0.0.1:19090 \
  >"$WORK/loadtest.txt" 2>&1 & LOAD=$!
T0=$(date +%s.%N)
EVENTS="$WORK/events.tsv"
: >"$EVENTS"
at() { # offset label command...
  local offset=$1 label=$2; shift 2
  local now; now=$(python3 -c "import time; print(time.time() - $T0)")
  sleep "$(python3 -c "print(max(0.0, $offset - $now))")"
  printf '%s\t%s\n' "$(python3 -c "import time; print(round(time.time() - $T0, 2))")" "$label" >>"$EVENTS"
  echo "[$(printf '%5.1f' "$offset")s] $label" >&2
  "$@" >>"$WORK/events.log" 2>&1 || echo "   (command failed: see $WORK/events.log)" >&2
}
current_surge() {
  local last
  last=$(grep -oE 'process [0-9]+ now serves' "$WORK/surge.log" | tail -1 | awk '{print $2}')
  echo "${last:-$SURGE_PID}"
}
sim_faults() {
  curl -fsS -X PUT -H "X-Auth-Token: $SURGE_CHAOS_SIM_KEY" -H 'content-type: application/json' \
    --data "$1" http://127.0.0.1:17070/sim/v1/faults
}
printf '0\tsteady load\n' >>"$EVENTS"
at 10 "frontend web-1 killed" kill -9 "${BLADE[1]}"
at 20 "provider chaos on (429s, 503s, failed and lost orders)" \
  sim_faults '{"rate_limit_every": 3, "retry_after_secs": 1, "server_error_share": 0.3, "order_error_share": 0.3, "lose_orders": 1, "lost_delay": "3s"}'
at 35 "provider chaos off" sim_faults '{}'
at 38 "node web-2 drained" curl -fsS -X POST -H 'content-type: application/json' http://127.0.0.1:19090/v1/nodes/web-2/drain -d '{"timeout": "10s", "force": true}'
sed -i 's/response_timeout = "5s"/response_timeout = "6s"/' "$WORK/surge.toml"
# The pid is looked up when the event fires: after a reload it is the new process's.
signal_surge() { kill "-$1" "$(current_surge)"; }
at 48 "config reloaded (SIGHUP)" signal_surge HUP
at 60 "surge upgraded in place (SIGUSR2)" signal_surge USR2
set +e
wait $LOAD; LOAD_RC=$?
set -e
sleep 2

echo
cat "$WORK/loadtest.txt" | sed -n '/step /,$p'
echo
echo "surge's own account of the restarts:"
grep -E 'reload|upgrade|now serves|refused|failed' "$WORK/surge.log" | sed 's/^/  /' || true
echo
[ -s "$OUT/report.json" ] || {
  echo "chaos.sh: the load test (exit $LOAD_RC) wrote no report; its output ends:" >&2
  tail -n 5 "$WORK/loadtest.txt" >&2
  exit 1
}
python3 - "$OUT/report.json" "$EVENTS" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
events = [l.rstrip("\n").split("\t") for l in open(sys.argv[2]) if l.strip()]
events = [(float(t), label) for t, label in events]
timeline = report["timeline"]
end = len(timeline)
print(f"{'from':>6} {'to':>6}  {'event':<58} {'requests':>9} {'failed':>7} {'503 shed':>9}")
total_failed = 0
for i, (t, label) in enumerate(events):
    until = events[i + 1][0] if i + 1 < len(events) else end
    lo, hi = int(t), int(until)
    req = failed = shed = 0
    for b in timeline[lo:hi]:
        sheds = b["outcomes"].get("503", 0)
        req += b["ok"] + b["errors"]
        shed += sheds
        failed += b["errors"] - sheds
    total_failed += failed
    print(f"{lo:>5}s {hi:>5}s  {label:<58} {req:>9} {failed:>7} {shed:>9}")
outcomes = {}
for b in timeline:
    for k, v in b["outcomes"].items():
        if k not in ("ok", "2xx"):
            outcomes[k] = outcomes.get(k, 0) + v
print(f"\nfailed requests in all (503 sheds apart): {total_failed}; outcomes other than ok: {outcomes}")
# No request answered, or none sent: "0 failed" above then says nothing about the events.
if sum(b["ok"] for b in timeline) == 0:
    sys.exit("chaos.sh: no request of the load test was answered")
EOF
echo
SERVERS=0
for zone in fr-par-2 nl-ams-1; do
  n=$(curl -fsS -H "X-Auth-Token: $SURGE_CHAOS_SIM_KEY" "http://127.0.0.1:17070/baremetal/v1/zones/$zone/servers" \
      | python3 -c 'import json,sys; print(json.load(sys.stdin)["total_count"])')
  SERVERS=$((SERVERS + n))
done
POOL=$(curl -fsS http://127.0.0.1:19090/v1/nodes | python3 -c '
import json, sys
d = json.load(sys.stdin)
nodes = d["nodes"] if isinstance(d, dict) else d
print(sum(1 for n in nodes if n.get("origin") == "provisioned"))')
echo "provider: $SERVERS servers exist; surge's pool holds $POOL provider nodes $( [ "$SERVERS" = "$POOL" ] && echo '(none leaked, none twice)' || echo '(MISMATCH)')"
echo "autoscaler decisions:"
curl -fsS http://127.0.0.1:19090/v1/autoscaler | python3 -c '
import json, sys
d = json.load(sys.stdin)
for x in reversed(d.get("decisions", [])[:8]):
    print("  ", x["at"], x["current"], "->", x["desired"], "; ".join(x["reasons"]))'
echo "provider calls refused or failed during the run (simulator log):"
grep -cE '429|503|error' "$WORK/sim.log" | sed 's/^/   log lines: /' || true
echo "report: $OUT/report.html   load test exit code: $LOAD_RC"
# The one check of the run: printed above, and the exit code says it too.
if [ "$SERVERS" != "$POOL" ]; then
  echo "chaos.sh: the provider holds $SERVERS servers, surge's pool $POOL provider nodes" >&2
  exit 1
fi
