# Shared by bench/delta.sh and bench/link.sh (sourced, not run): the Debian "monthly update"
# pair (bench/delta-data.sh), its bundles, a file-backed device running v1, and a real HTTP
# origin (nginx) behind edge-ota's test proxy, which counts every byte it sends.
# Needs root (debootstrap, nginx). Sets: ue_work, ue_ota, ue_tool, ue_v1, ue_v2, ue_bundle,
# ue_full_bytes (head + full chunks: what a device without v1 fetches), ue_bundle_size.

ue_top=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

ue_setup() {
  # The pair and the baselines (cached; loads baselines.env: Z_BYTES, PATCH_FROM_BYTES, ...).
  # shellcheck source=bench/delta-data.sh
  source "$ue_top/bench/delta-data.sh"
  ue_work=${BENCH_DIR:-/var/tmp/edge-ota-bench}/update
  mkdir -p "$ue_work"
  command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || apt-get install -y -qq --no-install-recommends nginx-light >/dev/null
  cargo build --release --quiet --manifest-path "$ue_top/Cargo.toml" -p edge-ota
  cargo build --release --quiet --manifest-path "$ue_top/Cargo.toml" -p edge-ota-image -p edge-ota-testkit
  ue_ota=$ue_top/target/release/edge-ota
  ue_tool=$ue_top/target/release/edge-ota-image
  ue_v1=$V1_IMG
  ue_v2=$V2_IMG
  local key=$ue_top/keys-example/INSECURE-demo.key.pem
  # v2, with a delta from v1 (format 2 defaults: 4 MiB chunks, zstd -19). Cached by inputs.
  ue_bundle=$ue_work/v2.eota
  local stamp; stamp=$(cat "$ue_v1.stamp" "$ue_v2.stamp" 2>/dev/null; stat -c '%s %Y' "$ue_v1" "$ue_v2" "$ue_tool")
  if [ ! -f "$ue_bundle" ] || [ "$(cat "$ue_bundle.stamp" 2>/dev/null)" != "$stamp" ]; then
    echo "update-env: building $ue_bundle (zstd -19 and a delta from v1: a few minutes)" >&2
    "$ue_tool" bundle create --out "$ue_bundle" --compatible bench --version 2.0.0 \
      --security-version 2 --key "$key" --image "$ue_v2" --delta-from "$ue_v1=1.0.0" \
      --created 1700000000 >&2
    echo "$stamp" > "$ue_bundle.stamp"
  fi
  ue_bundle_size=$(stat -c %s "$ue_bundle")
  # A device without v1 fetches the head and the full chunks, never the delta frames.
  ue_full_bytes=$("$ue_tool" bundle info --json "$ue_bundle" | python3 -c '
import json, sys
b = json.load(sys.stdin)
h = b["header"]
full = sum(c["c"] for p in b["manifest"]["payloads"] for c in p["chunks"])
print(64 + h["manifest_len"] + h["signatures_len"] + full)')
}

# ue_device DIR: slots as files (A = v1, recorded as its image; B empty), config, state.
ue_device() {
  local d=$1
  rm -rf "$d"; mkdir -p "$d"
  cp --sparse=always "$ue_v1" "$d/slotA"
  truncate -s "$(stat -c %s "$ue_v2")" "$d/slotB"
  echo "ro edgeota.slot=A" > "$d/cmdline"
  cat > "$d/config.toml" <<CFG
compatible = "bench"
state_dir = "$d/state"
cmdline = "$d/cmdline"
[trust]
keys = ["$ue_top/keys-example/INSECURE-demo.pub.pem"]
[[slot]]
name = "A"
device = "$d/slotA"
[[slot]]
name = "B"
device = "$d/slotB"
[bootloader]
backend = "file"
path = "$d/bootenv"
[health]
allow_no_probes = true
[network]
idle_timeout_secs = 5
backoff_base_secs = 0.2
backoff_cap_secs = 2
CFG
  "$ue_ota" --config "$d/config.toml" init-boot-env --good A --version 1.0.0 --record-image >/dev/null
}

# ue_serve FILE [proxy flags...]: nginx serving FILE's directory, the proxy in front of it.
# Sets ue_url, ue_proxy_pid, ue_proxy_status, ue_nginx_pid.
ue_serve() {
  local file=$1; shift
  local root; root=$(dirname "$file")
  local port; port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  local prefix=$ue_work/nginx
  mkdir -p "$prefix/logs"
  cat > "$prefix/nginx.conf" <<NGX
daemon off;
worker_processes 1;
error_log $prefix/logs/error.log;
pid $prefix/nginx.pid;
events { worker_connections 64; }
http {
  access_log off;
  server {
    listen 127.0.0.1:$port;
    root $root;
  }
}
NGX
  local nginx=nginx; command -v nginx >/dev/null || nginx=/usr/sbin/nginx
  "$nginx" -c "$prefix/nginx.conf" -p "$prefix" &
  ue_nginx_pid=$!
  ue_proxy_status=$ue_work/proxy.status
  rm -f "$ue_proxy_status"
  "$ue_top/target/release/edge-ota-test-proxy" --origin "http://127.0.0.1:$port" \
    --status-file "$ue_proxy_status" "$@" > "$ue_work/proxy.out" 2>&1 &
  ue_proxy_pid=$!
  local i
  for i in $(seq 100); do
    grep -q "listening on" "$ue_work/proxy.out" 2>/dev/null && break
    sleep 0.1
  done
  ue_url="$(sed -n 's/^listening on //p' "$ue_work/proxy.out")/$(basename "$file")"
  [ -n "$ue_url" ] || { echo "update-env: the proxy did not start" >&2; cat "$ue_work/proxy.out" >&2; return 1; }
}

ue_stop() {
  [ -n "${ue_proxy_pid:-}" ] && kill "$ue_proxy_pid" 2>/dev/null && wait "$ue_proxy_pid" 2>/dev/null
  [ -n "${ue_nginx_pid:-}" ] && kill "$ue_nginx_pid" 2>/dev/null && wait "$ue_nginx_pid" 2>/dev/null
  ue_proxy_pid= ue_nginx_pid=
  return 0
}

# Body bytes the proxy has sent so far.
ue_sent() { sed -n 's/.*body_bytes_sent=\([0-9]*\).*/\1/p' "$ue_proxy_status" 2>/dev/null || echo 0; }

mib() { python3 -c "print(f'{$1 / 1048576:.2f}')"; }

# Body bytes the proxy sent in all, from its final line (after ue_stop).
ue_final_sent() { sed -n 's/.*body_bytes_sent=\([0-9]*\).*/\1/p' "$ue_work/proxy.out" | tail -n1; }
