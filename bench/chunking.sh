#!/usr/bin/env bash
# Measure how chunking choices affect delta reuse between two versions of a root filesystem
# image (ext4, built with mke2fs -d like the real slots): v2 adds a "package" (a directory
# of files) and changes a few files. For each chunking it prints the share of v2's compressed
# bytes a device holding v1 would still have to fetch. Usage: bench/chunking.sh
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
work=${BENCH_DIR:-/var/tmp/edge-ota-chunking}
rm -rf "$work" && mkdir -p "$work"
cargo build --release --quiet --manifest-path "$top/Cargo.toml" -p edge-ota-image
tool=$top/target/release/edge-ota-image
key=$top/keys-example/INSECURE-demo.key.pem

# v1: a slice of this machine's /usr; v2: the same plus one more tree, and two edited files.
mkdir -p "$work/v1/usr/lib" "$work/v1/etc"
cp -a /usr/lib/python3.11 "$work/v1/usr/lib/"
cp -a /usr/share/perl "$work/v1/usr/lib/" 2>/dev/null || true
seq 1 20000 > "$work/v1/etc/config.txt"
cp -a "$work/v1" "$work/v2"
cp -a /usr/share/zoneinfo "$work/v2/usr/lib/"
seq 5 20004 > "$work/v2/etc/config.txt"
echo "VERSION_ID=2" > "$work/v2/etc/os-release"
for v in v1 v2; do
  find "$work/$v" -exec touch -h -d @1700000000 {} +
  E2FSPROGS_FAKE_TIME=1700000000 mke2fs -q -t ext4 -b 4096 -d "$work/$v" -U 8f0e4bbc-6a1f-4e4b-8c3e-0a5b1d2e3f40 \
    -E root_owner=0:0,hash_seed=3c0c7f1a-5b1e-4d7e-9a51-1f1d5b0c2a77 "$work/$v.img" 256M
done
echo "v1 and v2 ext4 images: $(du -sh "$work/v1" | cut -f1) and $(du -sh "$work/v2" | cut -f1) of files"
for mode in "cdc 64" "cdc 16" "fixed 64" "fixed 4"; do
  set -- $mode
  extra=()
  [ "$1" = fixed ] && extra=(--fixed-chunks)
  for v in v1 v2; do
    "$tool" bundle create --out "$work/$v-$1-$2.eota" --compatible bench --version 1.0.0 \
      --security-version 1 --key "$key" --image "$work/$v.img" --created 0 \
      --chunk-kib "$2" "${extra[@]}" >/dev/null
  done
  printf '%-6s %3s KiB: ' "$1" "$2"
  "$tool" bundle reuse "$work/v1-$1-$2.eota" "$work/v2-$1-$2.eota"
done
