#!/usr/bin/env bash
# Benchmark: `edge-ota apply` against raw `dd` of the same image to the same loop device,
# measured in the same run. Needs root (loop devices). Prints figures and, last, one line:
#   apply/dd time ratio: R; peak RSS: N MiB (256 MiB image: M MiB)
# Usage: bench/apply.sh [runs]   (BENCH_DIR, default /var/tmp/edge-ota-bench)
# BASELINE=path/to/edge-ota: also apply the format 1 bundle with that binary (an older engine,
# e.g. built from commit 4e0f5b9, before the guards of issue 7) in the same runs, so the two
# engines are compared on one bundle, one device and one day's disk.
set -euo pipefail
runs=${1:-3}
top=$(cd "$(dirname "$0")/.." && pwd)
work=${BENCH_DIR:-/var/tmp/edge-ota-bench}
[ "$(id -u)" = 0 ] || { echo "bench/apply.sh: needs root for loop devices" >&2; exit 1; }
command -v /usr/bin/time >/dev/null || { echo "bench/apply.sh: needs /usr/bin/time (apt-get install time)" >&2; exit 1; }
mkdir -p "$work"
# The device binary alone (a workspace build would add the builder's features to shared crates).
cargo build --release --quiet --manifest-path "$top/Cargo.toml" -p edge-ota
cargo build --release --quiet --manifest-path "$top/Cargo.toml" -p edge-ota-image
ota=$top/target/release/edge-ota
img_tool=$top/target/release/edge-ota-image
key=$top/keys-example/INSECURE-demo.key.pem

# An image like a root filesystem: half random, a quarter text, a quarter zeros.
make_image() { # size_mib out
  local q=$(($1 / 4))
  [ -f "$2" ] && [ "$(stat -c %s "$2")" = $(($1 << 20)) ] && return
  {
    head -c $((2 * q))M /dev/urandom
    seq -f "%.0f: net.ipv4.conf.all.rp_filter = 1 # kubelet config line" 1 99999999 | head -c ${q}M || true
    head -c ${q}M /dev/zero
  } > "$2.tmp"
  mv "$2.tmp" "$2"
}

make_image 1024 "$work/image-1g.img"
make_image 256 "$work/image-256m.img"
# Bundles as shipped (format 2: 4 MiB chunks, zstd -19), and the 1 GiB image as format 1
# (64 KiB content-defined chunks: what this benchmark measured before format 2, so the same
# code can be compared on the same bundle format). Rebuilt only when the image or the builder
# changed (zstd -19 of 1 GiB takes minutes).
bundle() { # image-size format out
  local stamp
  stamp="$(stat -c '%s %Y' "$work/image-$1.img" "$img_tool")"
  if [ ! -f "$3" ] || [ "$(cat "$3.stamp" 2>/dev/null)" != "$stamp" ]; then
    "$img_tool" bundle create --out "$3" --compatible bench --version 1.0.0 --format "$2" \
      --security-version 1 --key "$key" --image "$work/image-$1.img" --created 0 >/dev/null
    echo "$stamp" > "$3.stamp"
  fi
}
bundle 1g 2 "$work/bundle-1g.eota"
bundle 256m 2 "$work/bundle-256m.eota"
bundle 1g 1 "$work/bundle-1g-f1.eota"

truncate -s 1100M "$work/target.img"
loop=$(losetup -f --show "$work/target.img")
trap 'losetup -d "$loop"' EXIT
truncate -s 1100M "$work/slotA.img"
echo "ro edgeota.slot=A" > "$work/cmdline"
cat > "$work/config.toml" <<CFG
compatible = "bench"
state_dir = "$work/state"
cmdline = "$work/cmdline"
[trust]
keys = ["$top/keys-example/INSECURE-demo.pub.pem"]
[[slot]]
name = "A"
device = "$work/slotA.img"
[[slot]]
name = "B"
device = "$loop"
[bootloader]
backend = "file"
path = "$work/bootenv"
[health]
allow_no_probes = true
CFG
rm -rf "$work/state"
"$ota" --config "$work/config.toml" init-boot-env --good A >/dev/null
baseline=${BASELINE:-}
if [ -n "$baseline" ]; then
  # The configuration as the older binary knows it (no [health] section), its own state.
  sed -e '/^\[health\]/,$d' -e "s#^state_dir = .*#state_dir = \"$work/state-baseline\"#" \
    -e "s#^path = .*#path = \"$work/bootenv-baseline\"#" "$work/config.toml" > "$work/config-baseline.toml"
  rm -rf "$work/state-baseline"
  "$baseline" --config "$work/config-baseline.toml" init-boot-env --good A >/dev/null
fi

now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

dd_times=() apply_times=() f1_times=() base_times=()
for i in $(seq "$runs"); do
  drop_caches; t0=$(now)
  dd if="$work/image-1g.img" of="$loop" bs=4M oflag=direct conv=fsync status=none
  t1=$(now); dd_times+=("$(echo "$t1 - $t0" | bc)")
  drop_caches; t0=$(now)
  "$ota" --config "$work/config.toml" apply --no-reboot -q "$work/bundle-1g.eota" >/dev/null
  t1=$(now); apply_times+=("$(echo "$t1 - $t0" | bc)")
  drop_caches; t0=$(now)
  "$ota" --config "$work/config.toml" apply --no-reboot -q "$work/bundle-1g-f1.eota" >/dev/null
  t1=$(now); f1_times+=("$(echo "$t1 - $t0" | bc)")
  if [ -n "$baseline" ]; then
    drop_caches; t0=$(now)
    "$baseline" --config "$work/config-baseline.toml" apply --no-reboot -q "$work/bundle-1g-f1.eota" >/dev/null
    t1=$(now); base_times+=("$(echo "$t1 - $t0" | bc)")
  fi
  echo "run $i: dd ${dd_times[-1]} s, apply ${apply_times[-1]} s, apply format 1 ${f1_times[-1]} s${baseline:+, baseline format 1 ${base_times[-1]} s}"
done
dd_med=$(printf '%s\n' "${dd_times[@]}" | median)
apply_med=$(printf '%s\n' "${apply_times[@]}" | median)
f1_med=$(printf '%s\n' "${f1_times[@]}" | median)

rss() { # bundle [binary config] -> peak RSS in MiB
  drop_caches
  /usr/bin/time -v "${2:-$ota}" --config "${3:-$work/config.toml}" apply --no-reboot -q "$1" 2>&1 >/dev/null \
    | awk '/Maximum resident set size/ {printf "%.1f", $6 / 1024}'
}
rss_1g=$(rss "$work/bundle-1g.eota")
rss_256=$(rss "$work/bundle-256m.eota")
rss_f1=$(rss "$work/bundle-1g-f1.eota")
bundle_mib=$(( $(stat -c %s "$work/bundle-1g.eota") >> 20 ))
f1_mib=$(( $(stat -c %s "$work/bundle-1g-f1.eota") >> 20 ))
echo "image 1024 MiB, bundle ${bundle_mib} MiB; median of $runs: dd ${dd_med} s, apply ${apply_med} s (apply includes read-back verification)"
echo "format 1 bundle (64 KiB chunks) ${f1_mib} MiB: apply ${f1_med} s, apply/dd time ratio: $(printf "%.2f" "$(echo "scale=4; $f1_med / $dd_med" | bc)"); peak RSS: $rss_f1 MiB"
if [ -n "$baseline" ]; then
  base_med=$(printf '%s\n' "${base_times[@]}" | median)
  rss_base=$(rss "$work/bundle-1g-f1.eota" "$baseline" "$work/config-baseline.toml")
  echo "baseline $baseline, same format 1 bundle: apply ${base_med} s, apply/dd time ratio: $(printf "%.2f" "$(echo "scale=4; $base_med / $dd_med" | bc)"); peak RSS: $rss_base MiB; this engine/baseline time ratio: $(printf "%.2f" "$(echo "scale=4; $f1_med / $base_med" | bc)")"
fi
ratio=$(printf "%.2f" "$(echo "scale=4; $apply_med / $dd_med" | bc)")
echo "apply/dd time ratio: $ratio; peak RSS: $rss_1g MiB (256 MiB image: $rss_256 MiB)"
