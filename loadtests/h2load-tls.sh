#!/usr/bin/env bash
# HTTPS side by side: surge vs nginx, one worker each, the same ECDSA P-256 certificate,
# TLS 1.3, in front of the same nginx backend (plain HTTP/1.1, 1 KiB body), on loopback.
#
# Two figures, each from `h2load -t1` in interleaved rounds (medians):
#   handshakes/s — HANDSHAKES new connections, one request each (-c N -n N): full TLS
#                  handshakes, no resumption;
#   requests/s   — 50 HTTP/2 connections x 10 streams, REQUESTS requests;
#   h1 requests/s — HTTPS/1.1: 50 keep-alive connections, REQUESTS requests.
# Proxy CPU time per handshake / per request is read from /proc like compare.sh.
#
# h2load's own handshakes cost about as much CPU as the server's, and it has one thread:
# the handshake *rate* is bounded by the client; the proxy's CPU per handshake is the
# figure that tells how many cores a sales-day morning of new shoppers needs.
#
# Usage: loadtests/h2load-tls.sh     (ROUNDS=3 HANDSHAKES=5000 REQUESTS=200000)
#        SURGE_BASELINE=/path/to/older/surge loadtests/h2load-tls.sh
#            adds that binary as `base`, same config, in the same rounds.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
HANDSHAKES=${HANDSHAKES:-5000}
REQUESTS=${REQUESTS:-200000}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

need=()
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v openssl >/dev/null || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}..." >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
(cd "$ROOT" && cargo build --release --quiet)
SURGE="$ROOT/target/release/surge"

WORK=$(mktemp -d /tmp/surge-h2load.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.3
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

. "$ROOT/loadtests/lib.sh"
BACKEND_PORT=$(free_port); NGINX_PORT=$(free_port); SURGE_PORT=$(free_port); PLAIN_PORT=$(free_port); ADMIN_PORT=$(free_port)

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
  -subj "/CN=shop.test" -addext "subjectAltName=DNS:shop.test,DNS:localhost,IP:127.0.0.1" \
  -keyout "$WORK/shop.key" -out "$WORK/shop.crt" 2>/dev/null

mkdir -p "$WORK/nginx"
write_backend_conf "$WORK/backend" "$BACKEND_PORT"
cat > "$WORK/nginx/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream shop { server 127.0.0.1:$BACKEND_PORT; keepalive 256; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:$NGINX_PORT ssl http2;
    ssl_certificate $WORK/shop.crt;
    ssl_certificate_key $WORK/shop.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {
      proxy_pass http://shop;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    }
  }
}
CONF
cat > "$WORK/surge.toml" <<CONF
[proxy]
workers = 1
access_log = false
[[listeners]]
listen = "127.0.0.1:$PLAIN_PORT"
[[listeners]]
listen = "127.0.0.1:$SURGE_PORT"
[listeners.tls]
certificates = [{ cert = "$WORK/shop.crt", key = "$WORK/shop.key" }]
[admin]
listen = "127.0.0.1:$ADMIN_PORT"
[pool]
algorithm = "p2c-ewma"
[pool.health]
path = "/"
[[pool.backends]]
address = "127.0.0.1:$BACKEND_PORT"
CONF

"$NGINX" -c "$WORK/backend/nginx.conf" -p "$WORK/backend" 2>"$WORK/backend.err" & PIDS+=($!)
"$NGINX" -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" 2>"$WORK/nginx.err" & NGINX_PID=$!; PIDS+=($NGINX_PID)
RUST_LOG=warn "$SURGE" serve --config "$WORK/surge.toml" >/dev/null 2>"$WORK/surge.err" & SURGE_PID=$!; PIDS+=($SURGE_PID)
EXTRA=()
if [ -n "${SURGE_BASELINE:-}" ]; then
  BASE_PORT=$(free_port); BASE_PLAIN=$(free_port); BASE_ADMIN=$(free_port)
  sed -e "s/127.0.0.1:$SURGE_PORT\"/127.0.0.1:$BASE_PORT\"/" -e "s/127.0.0.1:$PLAIN_PORT\"/127.0.0.1:$BASE_PLAIN\"/" \
    -e "s/127.0.0.1:$ADMIN_PORT\"/127.0.0.1:$BASE_ADMIN\"/" "$WORK/surge.toml" > "$WORK/surge-base.toml"
  RUST_LOG=warn "$SURGE_BASELINE" serve --config "$WORK/surge-base.toml" >/dev/null 2>"$WORK/surge-base.err" & BASE_PID=$!; PIDS+=($BASE_PID)
  EXTRA+=("base=$BASE_PID:$BASE_PORT")
fi

for port in $NGINX_PORT $SURGE_PORT ${BASE_PORT:-}; do
  for _ in $(seq 1 50); do
    curl -fsk -o /dev/null "https://127.0.0.1:$port/" && break
    sleep 0.1
  done
  curl -fsk --http2 -o /dev/null "https://127.0.0.1:$port/" || {
    echo "nothing answers on port $port; logs:" >&2
    tail -n 5 "$WORK"/*.err "$WORK"/*/error.log >&2 2>/dev/null || true
    exit 1
  }
done

echo "machine: $(nproc) cores, $(uname -r); $(date -u +%Y-%m-%dT%H:%MZ)"
echo "versions: $("$NGINX" -v 2>&1 | sed 's/.*: //'), $(h2load --version | head -1), $("$SURGE" --version)"
echo "certificate: ECDSA P-256 (same file for both); h2load -t1; rounds: $ROUNDS"

python3 - "$ROUNDS" "$HANDSHAKES" "$REQUESTS" "nginx=$NGINX_PID:$NGINX_PORT" "surge=$SURGE_PID:$SURGE_PORT" "${EXTRA[@]}" <<'PY'
import os, re, subprocess, sys, statistics
rounds, handshakes, requests = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
proxies = [(a.split("=")[0], int(a.split("=")[1].split(":")[0]), int(a.split(":")[1])) for a in sys.argv[4:]]
tick = os.sysconf("SC_CLK_TCK")

def pids_of(pid):
    out = [pid]
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(p))
            except OSError:
                pass
    return out

def cpu(pid):
    t = 0
    for p in pids_of(pid):
        with open(f"/proc/{p}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        t += int(fields[11]) + int(fields[12])
    return t / tick

def h2load(port, args):
    out = subprocess.run(["h2load", "-t1", *args, f"https://127.0.0.1:{port}/"],
                         capture_output=True, text=True).stdout
    m = re.search(r"finished in ([\d.]+)(ms|s), ([\d.]+) req/s", out)
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    proto = re.search(r"Application protocol: (\S+)", out)
    if not m or not done:
        sys.exit("h2load output not understood:\n" + out)
    # No request succeeded: a rate of 0 (and CPU "per" nothing) is no figure of the proxy.
    if int(done.group(2)) == 0:
        print(out, file=sys.stderr)
        sys.exit(f"h2load-tls.sh: no request succeeded against port {port}")
    secs = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
    return secs, int(done.group(2)), int(done.group(3)) + int(done.group(4)), proto.group(1) if proto else "?"

tests = [
    ("handshakes/s", None, handshakes),
    ("requests/s", ["-c", "50", "-m", "10", "-n", str(requests)], requests),
    # HTTPS/1.1: 50 keep-alive connections, one request at a time on each (no pipelining).
    ("h1 requests/s", ["--h1", "-c", "50", "-m", "1", "-n", str(requests)], requests),
]
results = {}
for r in range(rounds):
    for label, args, n in tests:
        for name, pid, port in proxies:
            before = cpu(pid)
            if label == "handshakes/s":
                # n connections of one request each, c at a time.
                c = min(handshakes, 500)
                secs_total, ok, bad = 0.0, 0, 0
                for _ in range(n // c):
                    secs, o, b, proto = h2load(port, ["-c", str(c), "-n", str(c), "-m", "1"])
                    secs_total += secs; ok += o; bad += b
                rate = ok / secs_total
            else:
                secs, ok, bad, proto = h2load(port, args)
                rate = ok / secs
            used = cpu(pid) - before
            results.setdefault((label, name), []).append((rate, used * 1e6 / max(ok, 1), bad))
            print(f"round {r+1} {label:<13} {name:<6} {rate:>9.0f}  cpu {used*1e6/max(ok,1):7.1f} us each  failed {bad}  ({proto})", flush=True)

print()
print(f"{'figure':<13} {'proxy':<6} {'median':>9} {'cpu us each':>11} {'vs nginx':>9} {'cpu vs nginx':>12}")
for label, _, _ in tests:
    med = {name: [statistics.median(x[i] for x in results[(label, name)]) for i in range(2)] for name, _, _ in proxies}
    for name, _, _ in proxies:
        rate, us = med[name]
        print(f"{label:<13} {name:<6} {rate:>9.0f} {us:>11.1f} {rate/med['nginx'][0]:>9.2f} {us/med['nginx'][1]:>12.2f}")
print("(target: surge >= nginx on both)")
PY
