# Shared by the benchmark scripts in loadtests/ (sourced, not run).

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
