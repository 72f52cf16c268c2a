#!/usr/bin/env bash
# Two surge instances in one cluster over a 3-member etcd, ordering from one simulator,
# under a 10x ramp of new connections split across both (the load-test harness against
# each, as a floating IP or DNS round robin would split it). Prints the timeline every
# 2 s: who leads, the leader's desired count, in service on each instance, servers at the
# provider; then both harness reports' totals. Everything on 127.0.0.1, stopped by PID.
#
# Usage: loadtests/cluster-pair.sh   (about 2 minutes; installs etcd and protoc if missing)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v protoc >/dev/null || need+=(protobuf-compiler)
if [ ${#need[@]} -gt 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; fi
(cd "$ROOT" && cargo build --release --quiet --features cluster)
SURGE="$ROOT/target/release/surge"
WORK=$(mktemp -d /tmp/surge-pair.XXXXXX)
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done; wait 2>/dev/null; [ -n "${KEEP:-}" ] || rm -rf "$WORK"' EXIT
export SURGE_ADMIN_TOKEN=pair-demo-token-0123 PAIR_SIM_KEY=pair-sim-key
# One route cookie key for both instances: a cart keeps its blade whichever one it reaches.
export SURGE_ROUTE_KEY=pair-demo-route-key-0123456789abcdef

# A 3-member etcd on loopback.
CLUSTER="e1=http://127.0.0.1:23801,e2=http://127.0.0.1:23802,e3=http://127.0.0.1:23803"
for i in 1 2 3; do
  etcd --name "e$i" --data-dir "$WORK/etcd-$i" \
    --listen-client-urls "http://127.0.0.1:2379$i" --advertise-client-urls "http://127.0.0.1:2379$i" \
    --listen-peer-urls "http://127.0.0.1:2380$i" --initial-advertise-peer-urls "http://127.0.0.1:2380$i" \
    --initial-cluster "$CLUSTER" --initial-cluster-state new >"$WORK/etcd-$i.log" 2>&1 &
  PIDS+=($!)
done
for _ in $(seq 1 100); do curl -fs http://127.0.0.1:23791/health >/dev/null && break; sleep 0.1; done
curl -fs http://127.0.0.1:23791/health >/dev/null || {
  echo "cluster-pair.sh: etcd never became healthy; e1's log:" >&2; tail -n 5 "$WORK/etcd-1.log" >&2; exit 1
}

"$SURGE" sim --listen 127.0.0.1:7171 --token "$PAIR_SIM_KEY" --delivery 3s --install 2s \
  --blade-port 18100 >"$WORK/sim.log" 2>&1 &
PIDS+=($!)

for i in 1 2; do
  cat >"$WORK/lb-$i.toml" <<TOML
[proxy]
listen = "127.0.0.1:818$i"
access_log = false
[admin]
listen = "127.0.0.1:919$i"
[pool]
[pool.sticky]
cookie = "cart"
route_cookie = "surge_route"
[provider]
kind = "scaleway"
api_url = "http://127.0.0.1:7171"
zones = ["fr-par-2"]
offer = "EM-A115X-SSD"
secret_key_env = "PAIR_SIM_KEY"
blade_port = 18100
private_network = "pn-demo"
[autoscale]
interval = "1s"
metrics_window = "5s"
target_connections_per_node = 25.0
up_period = "3s"
scale_down_window = "5m"
ledger = "$WORK/ledger-$i.json"
max_client_share = 1.0
min = 1
max = 12
[cluster]
etcd = ["http://127.0.0.1:23791", "http://127.0.0.1:23792", "http://127.0.0.1:23793"]
name = "pair-demo"
instance = "lb-$i"
lease_ttl = "5s"
TOML
  RUST_LOG=warn "$SURGE" serve --config "$WORK/lb-$i.toml" >"$WORK/lb-$i.log" 2>&1 &
  PIDS+=($!)
done
for i in 1 2; do
  for _ in $(seq 1 300); do curl -fs -o /dev/null "http://127.0.0.1:919$i/readyz" && break; sleep 0.1; done
  # Not ready yet may be slow delivery; not answering at all is an instance that is not there.
  curl -fs -o /dev/null "http://127.0.0.1:919$i/healthz" || {
    echo "cluster-pair.sh: lb-$i does not answer on its admin port 919$i; its log:" >&2
    tail -n 5 "$WORK/lb-$i.log" >&2
    exit 1
  }
done

# Each instance gets half of a 10 -> 100 new sessions/s ramp.
for i in 1 2; do
  cat >"$WORK/plan-$i.toml" <<TOML
target = "http://127.0.0.1:818$i"
timeout = "5s"
[[stages]]
duration = "20s"
rate = 5.0
[[stages]]
duration = "30s"
rate = 5.0
ramp_to = 50.0
[[stages]]
duration = "40s"
rate = 50.0
[[scenarios]]
name = "browse"
weight = 3
steps = [{ name = "catalog", path = "/catalog" }, { name = "product", path = "/product/7", think = "50ms" }]
[[scenarios]]
name = "buy"
weight = 1
steps = [
  { name = "add-to-cart", method = "POST", path = "/cart", body = '{"product": 3}', expect = 201 },
  { name = "view-cart", path = "/cart", think = "50ms" },
]
TOML
done

sample() {
  python3 - "$1" <<'PY'
import json, sys, urllib.request
tok = {"Authorization": "Bearer pair-demo-token-0123"}
def get(port, path):
    try:
        return json.load(urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=tok), timeout=2))
    except Exception:
        return None
c = get(9191, "/v1/cluster") or {}
leader = c.get("leader") or "-"
lead_port = 9191 if leader == "lb-1" else 9192
a = get(lead_port, "/v1/autoscaler") or {}
n = [get(p, "/v1/nodes") or {"nodes": []} for p in (9191, 9192)]
ins = [sum(1 for x in l["nodes"] if x["state"] == "in_service") for l in n]
rate = sum(m.get("connection_rate") or 0 for m in c.get("members", []))
print("%5ss  %-6s  %7.0f  %7s  %9d  %9d  %7s" % (sys.argv[1], leader, rate, a.get("desired", "-"), ins[0], ins[1], a.get("provider_servers", "-")))
PY
}

echo "    t  leader  conn/s  desired  lb-1 in-svc  lb-2 in-svc  servers"
start=$(date +%s)
for i in 1 2; do
  "$SURGE" loadtest "$WORK/plan-$i.toml" --out "$WORK/report-$i" >"$WORK/loadtest-$i.txt" 2>&1 &
  LT[$i]=$!
done
while kill -0 "${LT[1]}" 2>/dev/null || kill -0 "${LT[2]}" 2>/dev/null; do
  sample $(( $(date +%s) - start )); sleep 2
done
# Each harness must have run and had answers: its totals are half of what this prints.
FAILED=()
for i in 1 2; do
  rc=0; wait "${LT[$i]}" || rc=$?
  echo "-- harness against lb-$i:"
  sed -n '2,/^(all)/p' "$WORK/loadtest-$i.txt"
  ok=$(awk '/^\(all\)/ {print $2}' "$WORK/loadtest-$i.txt")
  if [ "$rc" != 0 ] || ! [ "${ok:-0}" -gt 0 ] 2>/dev/null; then
    FAILED+=("harness against lb-$i: exit $rc, ${ok:-no} requests answered")
  fi
done
SERVERS=$(curl -fsS -H 'X-Auth-Token: pair-sim-key' 'http://127.0.0.1:7171/baremetal/v1/zones/fr-par-2/servers?per_page=100' | python3 -c 'import json,sys; print(json.load(sys.stdin)["total_count"])')
echo "servers at the provider at the end: $SERVERS"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "cluster-pair.sh: ${FAILED[*]}" >&2
  exit 1
fi
