#!/usr/bin/env bash
# Side-by-side proxy comparison on loopback: nginx, HAProxy and surge, one worker each, in
# front of the same nginx backend serving a fixed 1 KiB body.
#
# For each of ROUNDS interleaved rounds, for each connection count, each proxy in turn gets
# `wrk -t1 -cC -dDURATION --latency`. The proxy's CPU time is read from /proc/PID/stat
# before and after, so the table shows CPU microseconds per proxied request, the figure
# that decides how many cores a shop needs, next to req/s and latency.
#
# Usage: loadtests/compare.sh            (defaults: DURATION=10s ROUNDS=3 CONNS="50 200")
#        DURATION=5s ROUNDS=1 loadtests/compare.sh
#        SURGE_BASELINE=/path/to/older/surge loadtests/compare.sh
#            adds that binary as `surge-base`, same config: a regression check of a change
#            measured in the same run as the three proxies.
#        SURGE_BASELINE=target/release/surge SURGE_BASELINE_ENGINE=hyper loadtests/compare.sh
#            the same binary on its hyper HTTP/1.1 engine as `surge-base`.
# Everything listens on 127.0.0.1 and is stopped by PID on exit.
set -euo pipefail

DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-"50 200"}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}..." >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)

(cd "$ROOT" && cargo build --release --quiet)
SURGE="$ROOT/target/release/surge"

. "$ROOT/loadtests/lib.sh"
with_scratch compare

BACKEND_PORT=$(free_port); NGINX_PORT=$(free_port); HAPROXY_PORT=$(free_port); SURGE_PORT=$(free_port); ADMIN_PORT=$(free_port)

write_backend_conf "$WORK/backend" "$BACKEND_PORT"
write_proxy_conf "$WORK/nginx" "$NGINX_PORT" "$BACKEND_PORT"
cat > "$WORK/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
  option forwardfor
  http-reuse always
frontend f
  bind 127.0.0.1:$HAPROXY_PORT
  default_backend shop
backend shop
  server s1 127.0.0.1:$BACKEND_PORT
EOF
# The same keep-alive quota as the nginx proxy's `keepalive_requests 1000000` (HAProxy has
# none): with surge's default of 1,000, each of wrk's connections was closed and opened
# again every 1,000 requests, work (and latency, at 200 connections) nginx was spared.
cat > "$WORK/surge.toml" <<EOF
[proxy]
listen = "127.0.0.1:$SURGE_PORT"
workers = 1
access_log = false
max_requests_per_connection = 1000000
[pool]
algorithm = "p2c-ewma"
[admin]
listen = "127.0.0.1:$ADMIN_PORT"
[pool.health]
path = "/"
[[pool.backends]]
address = "127.0.0.1:$BACKEND_PORT"
EOF

"$NGINX" -c "$WORK/backend/nginx.conf" -p "$WORK/backend" 2>"$WORK/backend.err" & PIDS+=($!)
"$NGINX" -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" 2>"$WORK/nginx.err" & NGINX_PID=$!; PIDS+=($NGINX_PID)
"$HAPROXY" -db -f "$WORK/haproxy.cfg" >/dev/null 2>"$WORK/haproxy.err" & HAPROXY_PID=$!; PIDS+=($HAPROXY_PID)
start_surges

wait_answering $BACKEND_PORT $NGINX_PORT $HAPROXY_PORT $SURGE_PORT ${BASE_PORT:-}

echo "machine: $(nproc) cores, $(uname -r); $(date -u +%Y-%m-%dT%H:%MZ)"
echo "versions: $("$NGINX" -v 2>&1 | sed 's/.*: //'), $("$HAPROXY" -v | head -1 | awk '{print $1, $3}'), $("$SURGE" --version)"
echo "wrk -t1 -d$DURATION --latency; rounds: $ROUNDS; backend: nginx 1 worker, 1 KiB body"

python3 - "$DURATION" "$ROUNDS" "$CONNS" \
  "nginx=$NGINX_PID:$NGINX_PORT" "haproxy=$HAPROXY_PID:$HAPROXY_PORT" "surge=$SURGE_PID:$SURGE_PORT" "${EXTRA[@]}" <<'PY'
import os, re, subprocess, sys, statistics
duration, rounds, conns = sys.argv[1], int(sys.argv[2]), [int(c) for c in sys.argv[3].split()]
proxies = []
for arg in sys.argv[4:]:
    name, rest = arg.split("=")
    pid, port = rest.split(":")
    proxies.append((name, int(pid), int(port)))
tick = os.sysconf("SC_CLK_TCK")

def pids_of(pid):
    # The proxy and its children (nginx's worker).
    out = [pid]
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    out.append(int(p))
            except OSError:
                pass
    return out

def cpu_seconds(pid):
    total = 0
    for p in pids_of(pid):
        with open(f"/proc/{p}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / tick

def ms(v):
    m = re.match(r"([\d.]+)(us|ms|s)", v)
    x = float(m.group(1))
    return {"us": x / 1000, "ms": x, "s": x * 1000}[m.group(2)]

results = {}
for r in range(rounds):
    for c in conns:
        for name, pid, port in proxies:
            before = cpu_seconds(pid)
            out = subprocess.run(["wrk", "-t1", f"-c{c}", f"-d{duration}", "--latency",
                                  f"http://127.0.0.1:{port}/"], capture_output=True, text=True).stdout
            cpu = cpu_seconds(pid) - before
            # A run without figures stops the comparison: skipped, it became a row of zeros
            # in the table (and a proxy that stopped answering fails every later run too).
            if not re.search(r"(\d+) requests in", out) or not re.search(r"^\s+99%\s+(\S+)", out, re.M):
                print(out, file=sys.stderr)
                sys.exit(f"compare.sh: {name} c={c}: wrk gave no result")
            reqs = int(re.search(r"(\d+) requests in", out).group(1))
            rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
            # Anchored: "73.50%" in the Stdev column must not pass for the 50% line.
            p50 = ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))
            p99 = ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
            errs = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
            sock = re.search(r"Socket errors: (.*)", out)
            if errs or sock:
                print(f"  warning: {name} c={c}: {errs.group(0) if errs else ''} {sock.group(0) if sock else ''}")
            # Nothing proxied: every answer an error (a 502 without the backend) or none at all.
            if reqs == 0 or rps <= 0 or (errs and int(errs.group(1)) >= reqs):
                sys.exit(f"compare.sh: {name} c={c}: no successful request ({reqs} requests, {rps} req/s)")
            results.setdefault((c, name), []).append((rps, p50, p99, cpu * 1e6 / max(reqs, 1)))
            print(f"  round {r+1} c={c:<4} {name:<10} {rps:>10.0f} req/s  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  cpu {cpu*1e6/max(reqs,1):6.2f} us/req", flush=True)

print()
print(f"{'conns':>5}  {'proxy':<10} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'cpu us/req':>10}  {'req/s vs nginx':>14} {'cpu vs nginx':>12}")
for c in conns:
    med = {}
    for name, _, _ in proxies:
        rows = results.get((c, name))
        if not rows:
            sys.exit(f"compare.sh: no run of {name} at c={c}")
        med[name] = [statistics.median(x[i] for x in rows) for i in range(4)]
    base = med["nginx"]
    for name, _, _ in proxies:
        rps, p50, p99, cpu = med[name]
        print(f"{c:>5}  {name:<10} {rps:>9.0f} {p50:>7.2f} {p99:>7.2f} {cpu:>10.2f}  {rps/max(base[0],1):>14.2f} {cpu/max(base[3],1e-9):>12.2f}")
print("(medians over rounds; ratios are to nginx in the same run)")
# The machine is shared: a neighbour's load moves every proxy of a round alike, and moves
# the medians above between rounds. Each round's own ratio to the nginx round run just
# before it cancels most of that drift; their median is the steadier figure.
print()
print(f"{'conns':>5}  {'proxy':<10} {'req/s vs nginx, per round':>26} {'cpu vs nginx, per round':>24}  (median [min-max] of each round's own ratio)")
for c in conns:
    base = results.get((c, "nginx")) or []
    for name, _, _ in proxies:
        rows = results.get((c, name)) or []
        if name == "nginx" or not rows or len(rows) != len(base):
            continue
        rr = [r[0] / max(b[0], 1) for r, b in zip(rows, base)]
        cr = [r[3] / max(b[3], 1e-9) for r, b in zip(rows, base)]
        fmt = lambda xs: f"{statistics.median(xs):.2f} [{min(xs):.2f}-{max(xs):.2f}]"
        print(f"{c:>5}  {name:<10} {fmt(rr):>26} {fmt(cr):>24}")
PY
