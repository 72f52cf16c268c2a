#!/usr/bin/env bash
# Memory per idle keep-alive connection, side by side: nginx and surge (one worker each)
# in front of the same nginx backend. For each proxy in turn, a client opens N connections
# (default 10,000), sends one request on each and reads the answer, then leaves them all
# idle; the proxy's resident memory (VmRSS) is read before and while they idle. A sales
# morning of slow mobile shoppers is exactly this: many kept-alive connections, few bytes.
#
# Usage: loadtests/idle-rss.sh              (N=10000)
#        N=2000 loadtests/idle-rss.sh
#        TLS=1 loadtests/idle-rss.sh        (HTTPS/1.1 connections to both proxies)
#        SURGE_BASELINE=/path/to/older/surge loadtests/idle-rss.sh   (adds surge-base)
# Everything listens on 127.0.0.1 and is stopped by PID on exit.
set -euo pipefail

N=${N:-10000}
TLS=${TLS:-0}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
need=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
# As many descriptors as this machine allows (the client and each proxy hold N).
ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" != unlimited ] && [ "$N" -gt $(( $(ulimit -n) - 500 )) ]; then
  echo "N=$N needs more open files than the limit of $(ulimit -n)" >&2; exit 1
fi
(cd "$ROOT" && cargo build --release --quiet)
SURGE="$ROOT/target/release/surge"

. "$ROOT/loadtests/lib.sh"
with_scratch idle

BACKEND_PORT=$(free_port); NGINX_PORT=$(free_port); SURGE_PORT=$(free_port); ADMIN_PORT=$(free_port)
write_backend_conf "$WORK/backend" "$BACKEND_PORT"
mkdir -p "$WORK/nginx"
NGINX_SSL=";"
SURGE_LISTEN="listen = \"127.0.0.1:$SURGE_PORT\""
SURGE_TLS=""
if [ "$TLS" = 1 ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=shop.test \
    -keyout "$WORK/shop.key" -out "$WORK/shop.crt" 2>/dev/null
  NGINX_SSL=" ssl; ssl_certificate $WORK/shop.crt; ssl_certificate_key $WORK/shop.key;"
  SURGE_LISTEN=""
  SURGE_TLS="[[listeners]]
listen = \"127.0.0.1:$SURGE_PORT\"
[listeners.tls]
[[listeners.tls.certificates]]
cert = \"$WORK/shop.crt\"
key = \"$WORK/shop.key\""
fi
cat > "$WORK/nginx/nginx.conf" <<EOF
worker_processes 1;
worker_rlimit_nofile $(ulimit -n);
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 30000; }
http {
  access_log off;
  keepalive_timeout 120s;
  keepalive_requests 1000000;
  upstream shop { server 127.0.0.1:$BACKEND_PORT; keepalive 256; }
  server {
    listen 127.0.0.1:$NGINX_PORT$NGINX_SSL
    location / {
      proxy_pass http://shop;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
cat > "$WORK/surge.toml" <<EOF
[proxy]
$SURGE_LISTEN
workers = 1
access_log = false
idle_timeout = "120s"
max_connections_per_ip = 0
[admin]
listen = "127.0.0.1:$ADMIN_PORT"
[pool.health]
path = "/"
[[pool.backends]]
address = "127.0.0.1:$BACKEND_PORT"
$SURGE_TLS
EOF

"$NGINX" -c "$WORK/backend/nginx.conf" -p "$WORK/backend" 2>"$WORK/backend.err" & PIDS+=($!)
"$NGINX" -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" 2>"$WORK/nginx.err" & PIDS+=($!)
start_surges
wait_answering $BACKEND_PORT
SCHEME=$([ "$TLS" = 1 ] && echo https || echo http) wait_answering $NGINX_PORT $SURGE_PORT ${BASE_PORT:-}
# nginx's worker is the child of its master: measure the worker.
NGINX_WORKER=$(pgrep -P "$(cat "$WORK/nginx/nginx.pid")" | head -1)

echo "machine: $(nproc) cores, $(uname -r); $(date -u +%Y-%m-%dT%H:%MZ); $N idle keep-alive connections each$([ "$TLS" = 1 ] && echo ", over TLS")"
TLS=$TLS python3 - "$N" "nginx=$NGINX_WORKER:$NGINX_PORT" "surge=$SURGE_PID:$SURGE_PORT" "${EXTRA[@]}" <<'PY'
import asyncio, os, ssl, sys

n = int(sys.argv[1])
proxies = [(a.split("=")[0], int(a.split("=")[1].split(":")[0]), int(a.split(":")[1])) for a in sys.argv[2:]]

def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    sys.exit(f"idle-rss.sh: no VmRSS for pid {pid} (not running?)")

tls = None
if os.environ.get("TLS") == "1":
    tls = ssl.create_default_context()
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE
    tls.set_alpn_protocols(["http/1.1"])

async def one(port, held):
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
    w.write(b"GET / HTTP/1.1\r\nHost: shop\r\n\r\n")
    await w.drain()
    head = await r.readuntil(b"\r\n\r\n")
    # An error answer (a 502, often with `Connection: close`) is not an idle keep-alive
    # connection of the kind measured.
    status = head.split(b"\r\n", 1)[0]
    if not status.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"answered {status.decode(errors='replace')}, not 200")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await r.readexactly(length)
    held.append((r, w))

async def measure(name, pid, port):
    before = rss_kib(pid)
    held = []
    for start in range(0, n, 500):
        await asyncio.gather(*(one(port, held) for _ in range(min(500, n - start))))
    await asyncio.sleep(2)
    during = rss_kib(pid)
    # Connections the proxy closed while they idled (a timeout shorter than the run) hold
    # nothing: the figure per connection counts those still open.
    still_open = sum(1 for r, _ in held if not r.at_eof())
    for _, w in held:
        w.close()
    await asyncio.sleep(1)
    return before, during, len(held), still_open

async def main():
    rows = []
    for name, pid, port in proxies:
        try:
            rows.append((name,) + await measure(name, pid, port))
        except (OSError, RuntimeError, asyncio.IncompleteReadError) as e:
            sys.exit(f"idle-rss.sh: {name} on port {port}: {e!r}")
    nginx = next(r for r in rows if r[0] == "nginx")
    print(f"{'proxy':<12} {'RSS before':>12} {'RSS idle':>12} {'still open':>11} {'per open conn':>14} {'RSS vs nginx':>13}")
    for name, before, during, held, still_open in rows:
        per = (during - before) / max(still_open, 1)
        print(f"{name:<12} {before/1024:>9.1f} MB {during/1024:>9.1f} MB {still_open:>11} {per:>10.2f} KiB {during/max(nginx[2],1):>12.2f}×")
    for name, _, _, held, still_open in rows:
        if still_open < held:
            print(f"note: {name} closed {held - still_open} of {held} idle keep-alive connections before they were measured")

asyncio.run(main())
PY
