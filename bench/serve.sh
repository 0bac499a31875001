#!/usr/bin/env bash
# Benchmark: N clients (default 50) pull the same bundle at once, with ranges, through a
# pull-through `edge-ota serve` (the base station) whose upstream is a second `serve` (the
# update server), all on loopback. Each client is `edge-ota verify URL`: it reads the bundle
# with range requests and checks the signatures and every chunk. The cache starts empty, so
# the clients arrive while the bundle is still coming from the upstream.
# Measured in the same run: a plain copy of the same bundle (cp, page cache warm), serve's
# peak RSS (/usr/bin/time -v), its counters (/stats.json). Fails unless every client verified
# and the upstream was fetched once. Last line:
#   serve: N clients, X MB/s total (copy Y MB/s), upstream fetches: U, peak RSS: M MiB
# Usage: bench/serve.sh [clients]   (BENCH_DIR, default /var/tmp/edge-ota-bench;
#        SERVE_BENCH_TIMEOUT, seconds for the whole pull, default 600)
set -euo pipefail
clients=${1:-50}
limit=${SERVE_BENCH_TIMEOUT:-600}
top=$(cd "$(dirname "$0")/.." && pwd)
work=${BENCH_DIR:-/var/tmp/edge-ota-bench}/serve
die() { echo "bench/serve.sh: $*" >&2; exit 1; }
[ "$clients" -ge 1 ] && [ "$clients" -le 500 ] || die "clients: 1..500"
[ -x /usr/bin/time ] || die "needs /usr/bin/time (apt-get install time)"
command -v curl >/dev/null || die "needs curl"
mkdir -p "$work"
cargo build --release --quiet --manifest-path "$top/Cargo.toml" -p edge-ota
cargo build --release --quiet --manifest-path "$top/Cargo.toml" -p edge-ota-image
ota=$top/target/release/edge-ota
img_tool=$top/target/release/edge-ota-image

# A 64 MiB image like a root filesystem (half random, a quarter text, a quarter zeros), in
# 1 MiB chunks at zstd level 3: many ranges per client.
img=$work/image-64m.img
if [ ! -f "$img" ] || [ "$(stat -c %s "$img")" != $((64 << 20)) ]; then
  {
    head -c 32M /dev/urandom
    seq -f "%.0f: net.ipv4.conf.all.rp_filter = 1 # kubelet config line" 1 99999999 | head -c 16M || true
    head -c 16M /dev/zero
  } > "$img.tmp"
  mv "$img.tmp" "$img"
fi
rm -rf "$work/up" "$work/base" "$work/cache" "$work/logs" "$work/dev"
mkdir -p "$work/up" "$work/base" "$work/logs" "$work/dev"
bundle=$work/up/b.eota
"$img_tool" bundle create --out "$bundle" --compatible bench --version 1.0.0 \
  --security-version 1 --key "$top/keys-example/INSECURE-demo.key.pem" --image "$img" \
  --created 0 --level 3 --chunk-kib 1024 >/dev/null
size=$(stat -c %s "$bundle")

# One device configuration for every client (verify reads it, writes nothing).
truncate -s 80M "$work/dev/slotA" "$work/dev/slotB"
echo "ro edgeota.slot=A" > "$work/dev/cmdline"
cat > "$work/dev/config.toml" <<CFG
compatible = "bench"
state_dir = "$work/dev/state"
cmdline = "$work/dev/cmdline"
[trust]
keys = ["$top/keys-example/INSECURE-demo.pub.pem"]
[[slot]]
name = "A"
device = "$work/dev/slotA"
[[slot]]
name = "B"
device = "$work/dev/slotB"
[bootloader]
backend = "file"
path = "$work/dev/bootenv"
[health]
allow_no_probes = true
CFG
"$ota" --config "$work/dev/config.toml" init-boot-env --good A >/dev/null

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
addr_of() { # log -> the address serve listens on
  for _ in $(seq 200); do
    a=$(sed -n 's/^edge-ota serve: listening on \([^ ]*\) .*/\1/p' "$1")
    [ -n "$a" ] && { echo "$a"; return; }
    sleep 0.05
  done
  die "serve did not start: $(cat "$1")"
}
stat_of() { # addr key
  curl -fsS "http://$1/stats.json" | python3 -c "import json,sys; print(json.load(sys.stdin)['$2'])"
}

"$ota" --config /nonexistent/serve.toml serve --listen 127.0.0.1:0 --no-announce \
  --dir "$work/up" 2> "$work/logs/upstream.log" &
pids+=($!)
up=$(addr_of "$work/logs/upstream.log")
/usr/bin/time -v -o "$work/logs/time.txt" "$ota" --config /nonexistent/serve.toml serve \
  --listen 127.0.0.1:0 --no-announce --dir "$work/base" --cache-dir "$work/cache" \
  --upstream "http://$up/" --trust-key "$top/keys-example/INSECURE-demo.pub.pem" \
  2> "$work/logs/base.log" &
timepid=$!
pids+=("$timepid")
base=$(addr_of "$work/logs/base.log")

# The plain copy of the same bundle (page cache warm, as the served bytes are).
cat "$bundle" > /dev/null
copy_secs=()
for i in 1 2 3; do
  t0=$(date +%s.%N); cp "$bundle" "$work/copy.eota"; sync "$work/copy.eota"; t1=$(date +%s.%N)
  copy_secs+=("$(echo "$t1 - $t0" | bc)")
done
rm -f "$work/copy.eota"
copy_med=$(printf '%s\n' "${copy_secs[@]}" | sort -g | sed -n 2p)
copy_mbs=$(echo "scale=1; $size / 1000000 / $copy_med" | bc)

t0=$(date +%s.%N)
cpids=()
for i in $(seq "$clients"); do
  timeout "$limit" "$ota" --config "$work/dev/config.toml" verify "http://$base/b.eota" \
    > /dev/null 2> "$work/logs/client-$i.log" &
  cpids+=($!)
done
failed=0
for p in "${cpids[@]}"; do wait "$p" || failed=$((failed + 1)); done
t1=$(date +%s.%N)
secs=$(echo "$t1 - $t0" | bc)

sent=$(stat_of "$base" bytes_sent)
fetches=$(stat_of "$base" upstream_fetches)
requests=$(stat_of "$base" requests)
up_sent=$(stat_of "$up" bytes_sent)
# Stop the base station (SIGTERM to serve, the child of time) and read its peak RSS.
kill -TERM "$(cat "/proc/$timepid/task/$timepid/children")"
wait "$timepid" || true
rss=$(awk '/Maximum resident set size/ {printf "%.1f", $6 / 1024}' "$work/logs/time.txt")
total_mbs=$(echo "scale=1; $sent / 1000000 / $secs" | bc)

echo "bundle: $size bytes (64 MiB image, 1 MiB chunks); $clients clients in ${secs} s, $requests requests"
echo "served: $sent bytes ($(echo "scale=2; $sent / $size" | bc) bundles); upstream sent $up_sent bytes ($(echo "scale=3; $up_sent / $size" | bc) bundles)"
echo "copy: median of 3 cp runs ${copy_med} s"
[ "$failed" = 0 ] || die "$failed of $clients clients did not verify (logs in $work/logs)"
[ "$fetches" = 1 ] || die "upstream fetched $fetches times"
awk -v u="$up_sent" -v s="$size" 'BEGIN { exit !(u <= 1.05 * s) }' || die "the upstream sent $up_sent bytes for one $size-byte bundle"
echo "serve: $clients clients, $total_mbs MB/s total (copy $copy_mbs MB/s), upstream fetches: $fetches, peak RSS: $rss MiB"
