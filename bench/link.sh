#!/usr/bin/env bash
# Benchmark: an update over a throttled, flaky link. edge-ota's test proxy between the device
# and nginx: 256 KB/s, the connection dropped after every 1 MiB, and one stall of 8 s (longer
# than the device's 5 s idle timeout, so it must notice and reconnect). Two applies on the
# Debian pair of bench/delta.sh: a full bundle (a device that does not hold v1) and the delta
# (a device running v1). For each: bytes on the wire over bytes needed (the head plus what
# the plan says to fetch), and the time over the ideal (bytes needed at the link rate).
# Needs root; reuses bench/delta.sh's images and bundle (built on first use).
# Last line: link: wire/needed R, time/ideal T      (both cases together)
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" = 0 ] || { echo "bench/link.sh: run as root" >&2; exit 1; }
# shellcheck source=bench/lib/update-env.sh
source "$top/bench/lib/update-env.sh"
ue_setup
trap ue_stop EXIT
rate=$((256 * 1024))

# run_case NAME RECORD_V1(yes|no): prints "wire needed seconds".
run_case() {
  local name=$1 record=$2 dev=$ue_work/link-$1
  ue_device "$dev"
  if [ "$record" = no ]; then
    # The device does not know what its slot A holds: no delta, every chunk from the link.
    "$ue_ota" --config "$dev/config.toml" init-boot-env --good A --version 1.0.0 >/dev/null
  fi
  local needed_fetch head
  head=$("$ue_tool" bundle info --json "$ue_bundle" | python3 -c '
import json, sys
h = json.load(sys.stdin)["header"]
print(64 + h["manifest_len"] + h["signatures_len"])')
  # The stall comes a third of the way into what this case needs.
  local plan_fetch
  plan_fetch=$( [ "$record" = no ] && echo $((ue_full_bytes - head)) || echo 0)
  ue_serve "$ue_bundle" --throttle "$rate" --drop-every-kib 1024 \
    --stall-after-kib $(( (plan_fetch > 0 ? plan_fetch : 3 << 20) / 3 / 1024 )) --stall-secs 8
  local t0 t1
  t0=$(date +%s.%N)
  "$ue_ota" --config "$dev/config.toml" apply --no-reboot --progress jsonl "$ue_url" > "$dev/events.jsonl"
  t1=$(date +%s.%N)
  ue_stop
  cmp -n "$(stat -c %s "$ue_v2")" "$dev/slotB" "$ue_v2" >/dev/null || { echo "link: $name: slot B is not v2" >&2; exit 1; }
  needed_fetch=$(python3 -c '
import json, sys
for l in open(sys.argv[1]):
    e = json.loads(l)
    if e["event"] == "plan":
        print(e["fetch"])
        break' "$dev/events.jsonl")
  local wire; wire=$(ue_final_sent)
  echo "$wire $((head + needed_fetch)) $(python3 -c "print($t1 - $t0)")"
}

printf '%-8s %12s %12s %10s %8s %8s\n' case "needed B" "wire B" "time s" wire/need time/ideal
tw=0 tn=0 tt=0
for c in full:no delta:yes; do
  name=${c%%:*}
  read -r wire needed secs < <(run_case "$name" "${c##*:}")
  ideal=$(python3 -c "print($needed / $rate)")
  printf '%-8s %12s %12s %10.1f %8.3f %8.2f\n' "$name" "$needed" "$wire" "$secs" \
    "$(python3 -c "print($wire / $needed)")" "$(python3 -c "print($secs / $ideal)")"
  tw=$((tw + wire)) tn=$((tn + needed))
  tt=$(python3 -c "print($tt + $secs)")
done
echo "link: wire/needed $(python3 -c "print(f'{$tw / $tn:.3f}')"), time/ideal $(python3 -c "print(f'{$tt / ($tn / $rate):.2f}')")"
