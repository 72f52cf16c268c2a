#!/usr/bin/env bash
# Instructions per proxied request, counted by valgrind (callgrind): repeatable for the
# same binary and inputs whatever else the shared machine is doing, so a change of 1%
# shows, where wrk's req/s moves ±10% from round to round. User space only: the kernel's
# TCP work (more than half of the CPU on loopback) is not in it.
#
# surge (1 worker) in front of an nginx backend (1 KiB body); `h2load --h1 -c10` sends N1
# then, in a second run, N2 requests; (count(N2) - count(N1)) / (N2 - N1) is the cost of
# one request without start-up and shutdown.
#
# Usage: loadtests/instructions.sh                       (this tree's release build)
#        SURGE_BASELINE=/path/to/older/surge loadtests/instructions.sh
#        SURGE_BASELINE=target/release/surge SURGE_BASELINE_ENGINE=hyper loadtests/instructions.sh
#            (this tree's two HTTP/1.1 engines)
#        N1=5000 N2=25000
#        CONNS=200   (h2load's connections, 10 by default: at 200 many requests are in
#                     progress at once, which is where per-worker pools run short)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
N1=${N1:-5000}
N2=${N2:-25000}
CONNS=${CONNS:-10}
need=()
command -v valgrind >/dev/null || need+=(valgrind)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
(cd "$ROOT" && cargo build --release --quiet)

WORK=$(mktemp -d /tmp/surge-instr.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT INT TERM
. "$ROOT/loadtests/lib.sh"
BACKEND_PORT=$(free_port)
write_backend_conf "$WORK/backend" "$BACKEND_PORT"
"$NGINX" -c "$WORK/backend/nginx.conf" -p "$WORK/backend" 2>/dev/null & PIDS+=($!)

# count BINARY REQUESTS [ENGINE] -> instructions executed by surge over its whole life
count() {
  local port admin out engine=""
  port=$(free_port); admin=$(free_port); out="$WORK/cg.$RANDOM"
  [ -n "${3:-}" ] && engine="engine = \"$3\""
  cat > "$WORK/surge.toml" <<EOF
[proxy]
$engine
listen = "127.0.0.1:$port"
workers = 1
access_log = false
[admin]
listen = "127.0.0.1:$admin"
[pool.health]
path = "/"
interval = "1h"
[[pool.backends]]
address = "127.0.0.1:$BACKEND_PORT"
EOF
  RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$out" "$1" serve --config "$WORK/surge.toml" \
    >/dev/null 2>"$out.log" & local vg=$!
  for _ in $(seq 1 150); do curl -fs -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.2; done
  h2load --h1 -n "$2" -c "$CONNS" -t1 "http://127.0.0.1:$port/" | grep -qE "^requests: .* $2 succeeded" \
    || { echo "h2load did not complete $2 requests against $1" >&2; exit 1; }
  kill -INT $vg; wait $vg 2>/dev/null || true
  grep -E "Collected" "$out.log" | awk '{print $NF}'
}

# Run in $( ), where bash drops `set -e`: a failed count must stop it by hand, or the
# empty count went into the arithmetic as 0 and came out as a figure.
per_request() {
  local a b
  a=$(count "$1" "$N1" "${2:-}") || exit 1
  b=$(count "$1" "$N2" "${2:-}") || exit 1
  need_figure "instructions.sh: callgrind's count for $N1 requests ($1)" "$a"
  need_figure "instructions.sh: callgrind's count for $N2 requests ($1)" "$b"
  need_figure "instructions.sh: instructions per request ($1: $a for $N1, $b for $N2)" $(( (b - a) / (N2 - N1) ))
  echo $(( (b - a) / (N2 - N1) ))
}

echo "machine: $(nproc) cores, $(uname -r); $(date -u +%Y-%m-%dT%H:%MZ); $(valgrind --version); h2load -c$CONNS"
NEW=$(per_request "$ROOT/target/release/surge")
echo "surge (this tree): $NEW instructions per request"
if [ -n "${SURGE_BASELINE:-}" ]; then
  BASE=$(per_request "$SURGE_BASELINE" "${SURGE_BASELINE_ENGINE:-}")
  echo "baseline ($SURGE_BASELINE): $BASE instructions per request"
  python3 -c "print(f'this tree / baseline: {$NEW / $BASE:.3f}')"
fi
