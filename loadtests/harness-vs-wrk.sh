#!/usr/bin/env bash
# Throughput of the load harness itself: `surge loadtest` in closed-model mode with one
# thread against `wrk -t1`, same blade (`surge blade`, 127.0.0.1), same connection count,
# interleaved rounds in one run. Prints requests/s and the generator's own CPU time per
# request (from the child's rusage), medians over the rounds, and the ratio harness/wrk.
#
# Usage: loadtests/harness-vs-wrk.sh      (defaults: DURATION=10 ROUNDS=3 USERS=50)
# Needs wrk (installed from Debian if missing). Everything stops on exit.
set -euo pipefail

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
USERS=${USERS:-50}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

if ! command -v wrk >/dev/null; then
  echo "installing wrk..." >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
fi
(cd "$ROOT" && cargo build --release --quiet)
SURGE="$ROOT/target/release/surge"

WORK=$(mktemp -d /tmp/surge-harness.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
RUST_LOG=warn "$SURGE" blade --listen "127.0.0.1:$PORT" >/dev/null 2>"$WORK/blade.err" & PIDS+=($!)
for _ in $(seq 1 50); do curl -fs -o /dev/null "http://127.0.0.1:$PORT/catalog" && break; sleep 0.1; done
curl -fs -o /dev/null "http://127.0.0.1:$PORT/catalog" || {
  echo "harness-vs-wrk.sh: the blade never answered on port $PORT; its log:" >&2
  tail -n 5 "$WORK/blade.err" >&2
  exit 1
}

sed -e "s|^target = .*|target = \"http://127.0.0.1:$PORT\"|" \
    -e "s|^users = .*|users = $USERS|" \
    -e "s|^duration = .*|duration = \"${DURATION}s\"|" \
    "$ROOT/loadtests/closed.toml" > "$WORK/closed.toml"

echo "machine: $(nproc) cores, $(uname -r); $(date -u +%Y-%m-%dT%H:%MZ)"
echo "target: surge blade /catalog on 127.0.0.1; $USERS connections; ${DURATION}s x $ROUNDS interleaved rounds"
python3 - "$SURGE" "$WORK/closed.toml" "$PORT" "$DURATION" "$ROUNDS" "$USERS" <<'PY'
import re, resource, statistics, subprocess, sys
surge, plan, port, duration, rounds, users = sys.argv[1:]
rounds = int(rounds)

def run(cmd):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return out, cpu

def wrk():
    out, cpu = run(["wrk", "-t1", f"-c{users}", f"-d{duration}s", f"http://127.0.0.1:{port}/catalog"])
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)
    total = re.search(r"(\d+) requests in", out.stdout)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out.stdout)
    errors = int(errors.group(1)) if errors else 0
    # Both figures must come from requests that were answered: a run against nothing
    # gives 0 req/s (or no output), which is not the generator's throughput.
    if not rps or not total or int(total.group(1)) == 0 or errors >= int(total.group(1)):
        sys.exit("harness-vs-wrk.sh: wrk measured no answered request:\n" + out.stdout + out.stderr)
    return float(rps.group(1)), cpu / int(total.group(1)) * 1e6, errors

def harness():
    out, cpu = run([surge, "loadtest", plan, "--threads", "1"])
    m = re.search(r"([\d.]+) requests/s", out.stdout)
    if not m:
        sys.exit("harness output not understood:\n" + out.stdout + out.stderr)
    rps = float(m.group(1))
    row = re.search(r"^\(all\)\s+(\d+)\s+(\d+)", out.stdout, re.M)
    if not row or int(row.group(1)) == 0:
        sys.exit("harness-vs-wrk.sh: the harness measured no answered request:\n" + out.stdout + out.stderr)
    ok, err = int(row.group(1)), int(row.group(2))
    return rps, cpu / max(ok + err, 1) * 1e6, err

results = {"wrk": [], "surge loadtest": []}
for r in range(rounds):
    for name, f in (("wrk", wrk), ("surge loadtest", harness)):
        rps, us, errors = f()
        results[name].append((rps, us, errors))
        print(f"round {r + 1} {name:<15} {rps:>10.0f} req/s {us:>7.2f} µs CPU/req  errors {errors}", flush=True)

med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for k, v in results.items()}
print()
print(f"{'generator':<15} {'req/s (median)':>15} {'CPU µs/req':>11}")
for k, (rps, us) in med.items():
    print(f"{k:<15} {rps:>15.0f} {us:>11.2f}")
ratio = med["surge loadtest"][0] / med["wrk"][0]
print(f"\nharness / wrk: {ratio:.2f}x requests/s, {med['surge loadtest'][1] / med['wrk'][1]:.2f}x CPU per request (target: >= 0.80x requests/s)")
PY
