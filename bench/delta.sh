#!/usr/bin/env bash
# Benchmark: what a device running v1 fetches to update to v2, on a real "monthly update"
# pair of Debian slot images (bench/delta-data.sh: debootstrap minbase, then apt-get upgrade
# with the pending security updates and a few packages), measured in the same run against
# the classic baselines: a whole-file `zstd -19` of v2 (Z), `zstd --patch-from`, xdelta3,
# fixed 4 KiB blocks.
#
# edge-ota's figure is what crosses the wire: `edge-ota apply URL` on a file-backed device
# whose slot A holds v1, from nginx through the counting test proxy (every byte the device
# receives: head and delta frames). The full bundle figure is what a device without v1
# fetches (head and full chunks). Peak RSS of the apply with /usr/bin/time -v.
#
# Needs root. First run: about 20 minutes (debootstrap, zstd -19 of two 512 MiB images, the
# bundle); later runs reuse the images, baselines and bundle.
# Last line: delta fetched: F MiB of full B MiB (P% of zstd-19 full Z MiB); peak RSS: N MiB
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" = 0 ] || { echo "bench/delta.sh: run as root" >&2; exit 1; }
# shellcheck source=bench/lib/update-env.sh
source "$top/bench/lib/update-env.sh"
ue_setup
trap ue_stop EXIT
command -v /usr/bin/time >/dev/null || apt-get install -y -qq --no-install-recommends time >/dev/null

dev=$ue_work/device
ue_device "$dev"
ue_serve "$ue_bundle"
echo "applying $ue_url to a device running v1 (delta)" >&2
/usr/bin/time -v -o "$ue_work/time.txt" "$ue_ota" --config "$dev/config.toml" --json apply \
  --no-reboot --progress none "$ue_url" > "$ue_work/report.json"
ue_stop
cmp -n "$(stat -c %s "$ue_v2")" "$dev/slotB" "$ue_v2" || { echo "slot B is not v2" >&2; exit 1; }
fetched=$(ue_final_sent)
rss_kib=$(awk '/Maximum resident set size/ {print $6}' "$ue_work/time.txt")
secs=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$ue_work/time.txt")
delta_from=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["delta_from"])' "$ue_work/report.json")

pct() { python3 -c "print(f'{100 * $1 / $2:.1f}')"; }
echo
echo "pair: $V1_PACKAGES -> $V2_PACKAGES packages ($UPGRADED_PACKAGES upgraded, $ADDED_PACKAGES added); images $(mib "$IMG_SIZE_BYTES") MiB ext4"
printf '%-52s %10s %8s\n' "what a device running v1 fetches" "MiB" "% of Z"
printf '%-52s %10s %8s\n' "zstd -19 of v2, whole file (Z)" "$(mib "$Z_BYTES")" "100.0"
printf '%-52s %10s %8s\n' "zstd -19 --patch-from=v1 (decode: $((PATCH_FROM_DECODE_RSS_KIB / 1024)) MiB RAM)" "$(mib "$PATCH_FROM_BYTES")" "$(pct "$PATCH_FROM_BYTES" "$Z_BYTES")"
printf '%-52s %10s %8s\n' "xdelta3 -9 (decode: $((XDELTA_DECODE_RSS_KIB / 1024)) MiB RAM)" "$(mib "$XDELTA_BYTES")" "$(pct "$XDELTA_BYTES" "$Z_BYTES")"
printf '%-52s %10s %8s\n' "fixed 4 KiB blocks not in v1, zstd -19" "$(mib "$FIXED4K_BYTES")" "$(pct "$FIXED4K_BYTES" "$Z_BYTES")"
printf '%-52s %10s %8s\n' "edge-ota apply over HTTP, delta from $delta_from" "$(mib "$fetched")" "$(pct "$fetched" "$Z_BYTES")"
printf '%-52s %10s %8s\n' "edge-ota full bundle (a device without v1)" "$(mib "$ue_full_bytes")" "$(pct "$ue_full_bytes" "$Z_BYTES")"
echo "bundle file (full chunks and the delta): $(mib "$ue_bundle_size") MiB; apply took $secs, peak RSS $((rss_kib / 1024)) MiB"
echo "full bundle / zstd-19: $(python3 -c "print(f'{$ue_full_bytes / $Z_BYTES:.3f}')")"
echo "delta fetched: $(mib "$fetched") MiB of full $(mib "$ue_full_bytes") MiB ($(pct "$fetched" "$Z_BYTES")% of zstd-19 full $(mib "$Z_BYTES") MiB); peak RSS: $(python3 -c "print(f'{$rss_kib / 1024:.1f}')") MiB"
