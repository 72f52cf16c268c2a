#!/usr/bin/env bash
# System calls per proxied request, counted by the kernel (`perf stat -e
# raw_syscalls:sys_enter` on the proxy's process), for surge's two HTTP/1.1 engines and
# nginx side by side: the same nginx backend (1 KiB body), `wrk -t1 -cC -dDURATION` on
# keep-alive connections, requests counted by wrk. Next to the system calls, the proxy's
# CPU per request split into user space and kernel (utime and stime from /proc/PID/stat
# over the same run): on loopback the kernel's TCP work is most of every proxy's CPU, and
# this split shows how much of a difference user-space code can make at all.
#
# Usage: loadtests/syscalls.sh            (DURATION=5s CONNS="50 200")
# Needs perf with tracepoints readable (root, or kernel.perf_event_paranoid <= -1).
# Everything listens on 127.0.0.1 and is stopped by PID on exit.
set -euo pipefail

DURATION=${DURATION:-5s}
CONNS=${CONNS:-"50 200"}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v perf >/dev/null || need+=(linux-perf)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
(cd "$ROOT" && cargo build --release --quiet)
SURGE="$ROOT/target/release/surge"

. "$ROOT/loadtests/lib.sh"
with_scratch syscalls

BACKEND_PORT=$(free_port); NGINX_PORT=$(free_port)
write_backend_conf "$WORK/backend" "$BACKEND_PORT"
write_proxy_conf "$WORK/nginx" "$NGINX_PORT" "$BACKEND_PORT"
"$NGINX" -c "$WORK/backend/nginx.conf" -p "$WORK/backend" 2>"$WORK/backend.err" & PIDS+=($!)
"$NGINX" -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" 2>"$WORK/nginx.err" & PIDS+=($!)

surge_on surge; SURGE_PID=$ON_PID; SURGE_PORT=$ON_PORT
surge_on hyper; HYPER_PID=$ON_PID; HYPER_PORT=$ON_PORT
wait_answering "$BACKEND_PORT" "$NGINX_PORT" "$SURGE_PORT" "$HYPER_PORT"
NGINX_WORKER=$(pgrep -P "$(cat "$WORK/nginx/nginx.pid")" | head -1)

echo "machine: $(nproc) cores, $(uname -r); $(date -u +%Y-%m-%dT%H:%MZ); wrk -t1 -d$DURATION"
printf "%-6s %-14s %12s %12s %14s %12s %12s\n" conns proxy requests syscalls "syscalls/req" "user us/req" "kernel us/req"
# cpu_ticks PID: the process's user and kernel time so far, in clock ticks.
cpu_ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }
TICK=$(getconf CLK_TCK)
for c in $CONNS; do
  for entry in "nginx:$NGINX_WORKER:$NGINX_PORT" "surge:$SURGE_PID:$SURGE_PORT" "surge-hyper:$HYPER_PID:$HYPER_PORT"; do
    IFS=: read -r name pid port <<<"$entry"
    perf stat -e raw_syscalls:sys_enter -p "$pid" -x, -o "$WORK/perf.$name" &
    perf_pid=$!
    sleep 0.3
    read -r user0 sys0 < <(cpu_ticks "$pid")
    out=$(wrk -t1 -c"$c" -d"$DURATION" "http://127.0.0.1:$port/") || { echo "syscalls.sh: wrk failed against $name" >&2; exit 1; }
    read -r user1 sys1 < <(cpu_ticks "$pid")
    kill -INT "$perf_pid"; wait "$perf_pid" 2>/dev/null || true
    # Counted per answered request: error answers (a 502 without a backend) or a run that
    # answered nothing would make other figures, not this one's.
    if grep -q 'Non-2xx\|Socket errors' <<<"$out"; then
      echo "syscalls.sh: $name at c=$c had errors:" >&2; echo "$out" >&2; exit 1
    fi
    requests=$(awk '/requests in/ {print $1}' <<<"$out")
    calls=$(awk -F, '/raw_syscalls/ {print $1}' "$WORK/perf.$name")
    need_figure "syscalls.sh: wrk's requests ($name, c=$c)" "$requests"
    need_figure "syscalls.sh: perf's system calls ($name, c=$c; perf allowed?)" "$calls"
    python3 -c "print(f'{\"$c\":<6} {\"$name\":<14} {$requests:>12} {$calls:>12} {$calls / $requests:>14.2f} {($user1 - $user0) * 1e6 / $TICK / $requests:>12.2f} {($sys1 - $sys0) * 1e6 / $TICK / $requests:>12.2f}')"
  done
done
