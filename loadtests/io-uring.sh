#!/usr/bin/env bash
# What io_uring would change in a proxy's CPU per request, measured before surge's engine
# is moved onto it (issue 18). `io-probe/` is the same one-thread byte relay (each
# shopper's connection gets its own blade connection, bytes relayed as they come) on
# edge-triggered epoll and on io_uring; with keep-alive that is a proxy without any HTTP
# work, so the two probes differ only in the I/O interface. nginx and surge run next to
# them on the same nginx backend (1 KiB body), so the probes' figures read as a floor:
# no readiness-based proxy can spend less than the epoll probe, and io_uring can save at
# most the difference between the two probes.
#
# Rounds interleave the four proxies (ROUNDS=3) so that a noisy neighbour hits all of
# them; each run is `wrk -t1 -cC -dDURATION` on keep-alive connections, requests counted
# by wrk, CPU from /proc/PID/stat (user and kernel). System calls are counted by perf
# (when it is allowed to) in one more run per proxy after the rounds: counting them
# slows every system call, which would flatter io_uring's CPU figures.
#
# Usage: loadtests/io-uring.sh        (DURATION=5s CONNS="50 200" ROUNDS=3)
# Everything listens on 127.0.0.1 and is stopped by PID on exit.
set -euo pipefail

DURATION=${DURATION:-5s}
CONNS=${CONNS:-"50 200"}
ROUNDS=${ROUNDS:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
(cd "$ROOT" && cargo build --release --quiet)
(cd "$ROOT/loadtests/io-probe" && cargo build --release --quiet)
SURGE="$ROOT/target/release/surge"
PROBE="$ROOT/loadtests/io-probe/target/release/surge-io-probe"

. "$ROOT/loadtests/lib.sh"
with_scratch io-uring

BACKEND_PORT=$(free_port); NGINX_PORT=$(free_port)
write_backend_conf "$WORK/backend" "$BACKEND_PORT"
write_proxy_conf "$WORK/nginx" "$NGINX_PORT" "$BACKEND_PORT"
"$NGINX" -c "$WORK/backend/nginx.conf" -p "$WORK/backend" 2>"$WORK/backend.err" & PIDS+=($!)
"$NGINX" -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" 2>"$WORK/nginx.err" & PIDS+=($!)

surge_on surge; SURGE_PID=$ON_PID; SURGE_PORT=$ON_PORT
EPOLL_PORT=$(free_port); URING_PORT=$(free_port)
"$PROBE" epoll "127.0.0.1:$EPOLL_PORT" "127.0.0.1:$BACKEND_PORT" 2>"$WORK/epoll.err" &
EPOLL_PID=$!; PIDS+=($EPOLL_PID)
"$PROBE" uring "127.0.0.1:$URING_PORT" "127.0.0.1:$BACKEND_PORT" 2>"$WORK/uring.err" &
URING_PID=$!; PIDS+=($URING_PID)
wait_answering "$BACKEND_PORT" "$NGINX_PORT" "$SURGE_PORT" "$EPOLL_PORT" "$URING_PORT"
NGINX_WORKER=$(pgrep -P "$(cat "$WORK/nginx/nginx.pid")" | head -1)

# The probes relay bytes without reading them: check that an answer through each one is
# the backend's whole answer before timing anything.
for port in "$EPOLL_PORT" "$URING_PORT"; do
  got=$(curl -s --max-time 5 "http://127.0.0.1:$port/" | wc -c)
  want=$(curl -s --max-time 5 "http://127.0.0.1:$BACKEND_PORT/" | wc -c)
  if [ "$got" != "$want" ]; then
    echo "io-uring.sh: the probe on port $port answered $got bytes, the backend $want" >&2
    exit 1
  fi
done

PERF=no
if command -v perf >/dev/null && perf stat -e raw_syscalls:sys_enter -p "$EPOLL_PID" -o /dev/null -- sleep 0.1 2>/dev/null; then
  PERF=yes
fi
# cpu_ticks PID: the process's user and kernel time so far, in clock ticks.
cpu_ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }
TICK=$(getconf CLK_TCK)
echo "machine: $(nproc) cores, $(uname -r); $(date -u +%Y-%m-%dT%H:%MZ); wrk -t1 -d$DURATION, $ROUNDS rounds"
echo "conns proxy round requests req_per_s user_us_per_req kernel_us_per_req syscalls_per_req" > "$WORK/rows"
# The last round only counts system calls; its CPU and req/s are not used.
LAST=$ROUNDS
[ "$PERF" = yes ] && LAST=$((ROUNDS + 1))
for round in $(seq "$LAST"); do
  for c in $CONNS; do
    for entry in "nginx:$NGINX_WORKER:$NGINX_PORT" "surge:$SURGE_PID:$SURGE_PORT" \
                 "probe-epoll:$EPOLL_PID:$EPOLL_PORT" "probe-uring:$URING_PID:$URING_PORT"; do
      IFS=: read -r name pid port <<<"$entry"
      counting=no
      [ "$PERF" = yes ] && [ "$round" -gt "$ROUNDS" ] && counting=yes
      if [ "$counting" = yes ]; then
        perf stat -e raw_syscalls:sys_enter -p "$pid" -x, -o "$WORK/perf.$name" &
        perf_pid=$!
        sleep 0.3
      fi
      read -r user0 sys0 < <(cpu_ticks "$pid")
      out=$(wrk -t1 -c"$c" -d"$DURATION" "http://127.0.0.1:$port/") || { echo "io-uring.sh: wrk failed against $name" >&2; exit 1; }
      read -r user1 sys1 < <(cpu_ticks "$pid")
      calls=nan
      if [ "$counting" = yes ]; then
        kill -INT "$perf_pid"; wait "$perf_pid" 2>/dev/null || true
        calls=$(awk -F, '/raw_syscalls/ {print $1}' "$WORK/perf.$name")
      fi
      requests=$(awk '/requests in/ {print $1}' <<<"$out")
      rate=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
      if grep -q 'Non-2xx\|Socket errors' <<<"$out"; then
        echo "io-uring.sh: $name at c=$c had errors:" >&2; echo "$out" >&2; exit 1
      fi
      need_figure "io-uring.sh: wrk's requests ($name, c=$c)" "$requests"
      need_figure "io-uring.sh: wrk's requests/s ($name, c=$c)" "$rate"
      [ "$counting" = no ] || need_figure "io-uring.sh: perf's system calls ($name, c=$c)" "$calls"
      python3 -c "print($c, '$name', $round, $requests, $rate, ($user1 - $user0) * 1e6 / $TICK / $requests, ($sys1 - $sys0) * 1e6 / $TICK / $requests, float('$calls') / $requests)" >> "$WORK/rows"
    done
  done
done
python3 - "$WORK/rows" <<'PY'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1]).read().splitlines()[1:]]
by, calls_of = {}, {}
for c, name, rnd, _req, rate, user, kernel, calls in rows:
    if calls != "nan":
        calls_of[(int(c), name)] = float(calls)
    else:
        by.setdefault((int(c), name), []).append((float(rate), float(user), float(kernel)))
print(f"{'conns':<6} {'proxy':<12} {'req/s':>9} {'user us/req':>12} {'kernel us/req':>14} {'cpu us/req':>11} {'syscalls/req':>13}   (medians of the rounds)")
med = {}
for (c, name), runs in sorted(by.items(), key=lambda kv: (kv[0][0], ["nginx", "surge", "probe-epoll", "probe-uring"].index(kv[0][1]))):
    m = [statistics.median(col) for col in zip(*runs)]
    med[(c, name)] = m
    calls = calls_of.get((c, name), float("nan"))
    print(f"{c:<6} {name:<12} {m[0]:>9.0f} {m[1]:>12.2f} {m[2]:>14.2f} {m[1] + m[2]:>11.2f} {calls:>13.2f}")
print()
# Runs next to each other in one round share the machine's mood: the median of the
# rounds' own uring/epoll ratios is steadier than the ratio of the medians.
paired = {}
for c, name, rnd, _req, rate, user, kernel, calls in rows:
    if calls == "nan":
        paired.setdefault((int(c), rnd), {})[name] = float(user) + float(kernel)
for c in sorted({c for c, _ in med}):
    ratios = sorted(r["probe-uring"] / r["probe-epoll"] for (cc, _), r in paired.items() if cc == c)
    print(f"c={c}: uring/epoll CPU/req by round {' '.join(f'{x:.2f}' for x in ratios)}, median {statistics.median(ratios):.2f}x")
for c in sorted({c for c, _ in med}):
    e, u, s, n = (med[(c, k)] for k in ("probe-epoll", "probe-uring", "surge", "nginx"))
    cpu = lambda m: m[1] + m[2]
    print(f"c={c}: uring/epoll CPU/req {cpu(u) / cpu(e):.2f}x, req/s {u[0] / e[0]:.2f}x; "
          f"surge CPU/req {cpu(s) / cpu(n):.2f}x nginx, epoll probe {cpu(e) / cpu(n):.2f}x nginx; "
          f"surge with the probes' saving {(cpu(s) - (cpu(e) - cpu(u))) / cpu(n):.2f}x nginx")
PY
