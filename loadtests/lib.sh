# Shared by the benchmark scripts in loadtests/ (sourced, not run).

# with_scratch NAME: a scratch directory in $WORK and a PIDS array; on exit every process
# in PIDS is stopped (TERM, then KILL) and the directory removed (kept if KEEP is set).
with_scratch() {
  WORK=$(mktemp -d "/tmp/surge-$1.XXXXXX")
  PIDS=()
  trap scratch_cleanup EXIT INT TERM
}
scratch_cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.3
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}

# wait_answering PORT...: each port on 127.0.0.1 answers HTTP within 5 s, or exit 1 with
# the logs in $WORK.
wait_answering() {
  # Local: a caller's own `port` (a script's surge port) must survive the call.
  # SCHEME=https for TLS listeners (their certificates are the script's own: not checked).
  local port scheme=${SCHEME:-http}
  for port in "$@"; do
    for _ in $(seq 1 50); do curl -kfs -o /dev/null "$scheme://127.0.0.1:$port/" && break; sleep 0.1; done
    curl -kfs -o /dev/null "$scheme://127.0.0.1:$port/" || {
      echo "nothing answers on port $port; logs:" >&2
      tail -n 5 "$WORK"/*.err "$WORK"/*/error.log >&2 2>/dev/null || true
      exit 1
    }
  done
}

# start_surges: $SURGE on $WORK/surge.toml and, when SURGE_BASELINE names an older binary,
# that one on a copy of the config with ports of its own (SURGE_PORT and ADMIN_PORT
# replaced). Sets SURGE_PID, BASE_PID, BASE_PORT and EXTRA ("surge-base=PID:PORT", for the
# measuring script's list of proxies). SURGE_BASELINE_ENGINE=hyper runs the baseline with
# `proxy.engine = "hyper"`: with SURGE_BASELINE=target/release/surge, the same binary's
# two HTTP/1.1 engines side by side.
start_surges() {
  RUST_LOG=warn "$SURGE" serve --config "$WORK/surge.toml" >/dev/null 2>"$WORK/surge.err" & SURGE_PID=$!; PIDS+=($SURGE_PID)
  EXTRA=()
  if [ -n "${SURGE_BASELINE:-}" ]; then
    BASE_PORT=$(free_port); BASE_ADMIN=$(free_port)
    sed -e "s/127.0.0.1:$SURGE_PORT/127.0.0.1:$BASE_PORT/" -e "s/127.0.0.1:$ADMIN_PORT/127.0.0.1:$BASE_ADMIN/" \
      "$WORK/surge.toml" > "$WORK/surge-base.toml"
    if [ -n "${SURGE_BASELINE_ENGINE:-}" ]; then
      sed -i "s/^\[proxy\]$/[proxy]\nengine = \"$SURGE_BASELINE_ENGINE\"/" "$WORK/surge-base.toml"
    fi
    RUST_LOG=warn "$SURGE_BASELINE" serve --config "$WORK/surge-base.toml" >/dev/null 2>"$WORK/surge-base.err" & BASE_PID=$!; PIDS+=($BASE_PID)
    EXTRA+=("surge-base=$BASE_PID:$BASE_PORT")
  fi
}

# need_figure WHAT VALUE: VALUE is a number above zero, or exit 1 saying WHAT gave none. A
# figure that was never produced (an empty parse, a run against nothing) must not be
# printed, or divided by, as a measurement.
need_figure() {
  awk -v v="$2" 'BEGIN { exit !(v ~ /^[0-9]+([.][0-9]+)?$/ && v + 0 > 0) }' && return
  echo "$1: no figure (got '$2')" >&2
  exit 1
}

# A port free on 127.0.0.1 now.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# write_backend_conf DIR PORT: the shared backend of every comparison, one nginx worker
# answering every request with a fixed 1 KiB body, written to DIR/nginx.conf.
write_backend_conf() {
  local dir=$1 port=$2 body
  body=$(head -c 1024 /dev/zero | tr '\0' 'x')
  mkdir -p "$dir"
  cat > "$dir/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  keepalive_requests 1000000;
  default_type text/plain;
  server { listen 127.0.0.1:$port reuseport; location / { return 200 "$body"; } }
}
CONF
}

# write_proxy_conf DIR PORT BACKEND_PORT: nginx as the proxy of the comparisons (one
# worker, upstream keep-alive, X-Forwarded-For as surge sets it), written to DIR/nginx.conf.
write_proxy_conf() {
  local dir=$1 port=$2 backend=$3
  mkdir -p "$dir"
  cat > "$dir/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream shop { server 127.0.0.1:$backend; keepalive 256; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:$port;
    location / {
      proxy_pass http://shop;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    }
  }
}
CONF
}

# surge_on ENGINE: a surge on that HTTP/1.1 engine in front of 127.0.0.1:$BACKEND_PORT, one
# worker, no access log, keep-alive without a request limit (the figures per request of
# syscalls.sh and io-uring.sh); sets ON_PID and ON_PORT.
surge_on() {
  local port admin
  port=$(free_port); admin=$(free_port)
  cat > "$WORK/surge-$1.toml" <<EOF
[proxy]
engine = "$1"
listen = "127.0.0.1:$port"
workers = 1
access_log = false
max_requests_per_connection = 1000000
[admin]
listen = "127.0.0.1:$admin"
[pool.health]
path = "/"
[[pool.backends]]
address = "127.0.0.1:$BACKEND_PORT"
EOF
  RUST_LOG=warn "$SURGE" serve --config "$WORK/surge-$1.toml" >/dev/null 2>"$WORK/surge-$1.err" &
  ON_PID=$!; ON_PORT=$port; PIDS+=($ON_PID)
}
