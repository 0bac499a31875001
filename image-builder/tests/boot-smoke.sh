#!/bin/bash
# Smoke test of the OS images: build kernel, initramfs, root filesystems (with a stand-in
# edge-ota) and a disk, check that two builds are byte-identical, then boot under QEMU (TCG):
#   1. slot A boots to "edge-init: ready"
#   2. grubenv flipped on the host to a good slot B: "edge-grub: booting B", ready
#   3. B trying (1 try) with a panicking init: B boots, panics, GRUB falls back to A
#   4. B trying with a hanging init: softdog resets the machine, GRUB falls back to A
#   5. B trying whose health gate fails: init reboots, GRUB falls back to A
# Stages 3-5 are skipped with --quick.
#
# Usage: image-builder/tests/boot-smoke.sh [--tool PATH] [--work DIR] [--flavour F] [--quick]
#                                          [--require-qemu]
#   --tool          edge-ota-image binary [default: cargo build -p edge-ota-image, target/debug]
#   --work          scratch directory [default: <repo>/build/smoke]
#   --flavour       kernel flavour for `kernel --flavour` [default: the tool's, cloud-amd64]
#   --require-qemu  fail instead of skipping when qemu-system-x86_64 is missing
# Dependencies: image-builder/scripts/install-deps.sh
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
tool=
work="$repo/build/smoke"
quick=0
require_qemu=0
flavour=()
while [ $# -gt 0 ]; do
	case "$1" in
	--tool) tool=$2; shift 2 ;;
	--work) work=$2; shift 2 ;;
	--flavour) flavour=(--flavour "$2"); shift 2 ;;
	--quick) quick=1; shift ;;
	--require-qemu) require_qemu=1; shift ;;
	*) echo "boot-smoke: unknown argument $1" >&2; exit 2 ;;
	esac
done

say() { echo "boot-smoke: $*"; }
die() { echo "boot-smoke: FAIL: $*" >&2; exit 1; }

if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
	if [ "$require_qemu" = 1 ]; then
		die "qemu-system-x86_64 not installed (run image-builder/scripts/install-deps.sh)"
	fi
	say "SKIP: qemu-system-x86_64 not installed (run image-builder/scripts/install-deps.sh)"
	exit 0
fi

if [ -z "$tool" ]; then
	(cd "$repo" && cargo build -q -p edge-ota-image)
	tool="${CARGO_TARGET_DIR:-$repo/target}/debug/edge-ota-image"
fi
[ -x "$tool" ] || die "$tool is not executable"
mkdir -p "$work"
work=$(cd "$work" && pwd)
T() { "$tool" "$@"; }

# ---------------------------------------------------------------------------------------
say "building images in $work"
cat >"$work/edge-ota-ok" <<'EOF'
#!/bin/sh
# Stand-in for edge-ota in the smoke test: health passes.
echo "stand-in edge-ota: $*"
exit 0
EOF
cat >"$work/edge-ota-fail" <<'EOF'
#!/bin/sh
# Stand-in for edge-ota in the smoke test: health fails.
echo "stand-in edge-ota: $* -> failing probe"
exit 3
EOF
chmod +x "$work/edge-ota-ok" "$work/edge-ota-fail"
printf '# smoke-test configuration (the stand-in ignores it)\n' >"$work/config.toml"

T kernel --out "$work/kernel" "${flavour[@]}"
T initramfs --kernel "$work/kernel" --out "$work/initrd.img"
rootfs() { # NAME VERSION VARIANT EDGE_OTA [extra args]
	local name=$1 version=$2 variant=$3 bin=$4
	shift 4
	T rootfs --kernel "$work/kernel" --initramfs "$work/initrd.img" --edge-ota "$bin" \
		--config "$work/config.toml" --version "$version" --variant "$variant" \
		--size 64 --out "$work/$name.img" "$@"
}
rootfs rootfs-1 1.0.0 normal "$work/edge-ota-ok"
rootfs rootfs-2 2.0.0 normal "$work/edge-ota-ok"
rootfs rootfs-2-panic 2.0.0 panic "$work/edge-ota-ok"
rootfs rootfs-2-hang 2.0.0 hang "$work/edge-ota-ok"
rootfs rootfs-2-healthfail 2.0.0 health-fail "$work/edge-ota-fail"
T disk --slot-a "$work/rootfs-1.img" --out "$work/disk.img" --slot-size 96 --data-size 32

# Reproducibility: rebuild into other files (--force) and compare.
rootfs rootfs-1-again 1.0.0 normal "$work/edge-ota-ok" --force
T initramfs --kernel "$work/kernel" --out "$work/initrd-again.img" --force
T disk --slot-a "$work/rootfs-1.img" --out "$work/disk-again.img" --slot-size 96 --data-size 32 --force
for pair in initrd.img:initrd-again.img rootfs-1.img:rootfs-1-again.img disk.img:disk-again.img; do
	a=$(sha256sum <"$work/${pair%%:*}" | cut -c1-64)
	b=$(sha256sum <"$work/${pair##*:}" | cut -c1-64)
	[ "$a" = "$b" ] || die "${pair%%:*} is not reproducible ($a vs $b)"
	say "reproducible: ${pair%%:*} sha256 $a"
done
rm -f "$work/rootfs-1-again.img"* "$work/initrd-again.img"* "$work/disk-again.img"*

# ---------------------------------------------------------------------------------------
layout="$work/disk.img.layout.json"
grubenv_offset=$(grep -o '"grubenv_offset": [0-9]*' "$layout" | grep -o '[0-9]*$')
grubenv2_offset=$(grep -o '"grubenv2_offset": [0-9]*' "$layout" | grep -o '[0-9]*$')
part_start() { awk -v n="\"$1\"" '$0 ~ "\"name\": " n { getline; gsub(/[^0-9]/, ""); print; exit }' "$layout"; }
slot_b_start=$(part_start rootfs-B)
[ -n "$grubenv_offset" ] && [ -n "$grubenv2_offset" ] && [ -n "$slot_b_start" ] || die "cannot read $layout"

# write_env IMAGE KEY=VALUE...: rewrite both 1024-byte grubenv copies in place, as userspace
# does, in the layout of src/bootloader/grubenv.rs: EDGE_SEQ first, a comment line up to byte
# 960, EDGE_END there, '#' padding.
env_seq=100
write_env() {
	local img=$1
	shift
	env_seq=$((env_seq + 1))
	{
		printf '# GRUB Environment Block\nEDGE_SEQ=%s\n' "$env_seq"
		printf '%s\n' "$@"
	} >"$work/env.tmp"
	local n
	n=$(stat -c %s "$work/env.tmp")
	{ head -c $((959 - n)) /dev/zero | tr '\0' '#'; printf '\nEDGE_END=%s\n' "$env_seq"; } >>"$work/env.tmp"
	n=$(stat -c %s "$work/env.tmp")
	head -c $((1024 - n)) /dev/zero | tr '\0' '#' >>"$work/env.tmp"
	for off in "$grubenv_offset" "$grubenv2_offset"; do
		dd if="$work/env.tmp" of="$img" bs=1024 seek=$((off / 1024)) conv=notrunc status=none
	done
}
read_env() { dd if="$1" bs=1024 skip=$((grubenv_offset / 1024)) count=1 status=none | tr -d '#'; }
set_slot_b() { dd if="$2" of="$1" bs=1M seek=$((slot_b_start / 1048576)) conv=notrunc status=none; }

# boot IMAGE LOG TIMEOUT PATTERN...: boot until every pattern appeared in order on the serial
# console; prints the seconds from QEMU start to each.
boot() {
	local img=$1 log=$2 timeout=$3
	shift 3
	: >"$log"
	local t0
	t0=$(date +%s%N)
	qemu-system-x86_64 -accel tcg -cpu max -m 512 -display none -monitor none \
		-drive "file=$img,if=virtio,format=raw" \
		-netdev user,id=n0 -device virtio-net-pci,netdev=n0,romfile= \
		-serial "file:$log" </dev/null >/dev/null 2>"$log.qemu" &
	local pid=$! line=1 pat found now
	for pat in "$@"; do
		found=0
		while :; do
			# Search only after the previous match so patterns are checked in order.
			if tail -n +"$line" "$log" | tr -d '\r' | grep -qE "$pat"; then
				line=$((line + $(tail -n +"$line" "$log" | tr -d '\r' | grep -nE "$pat" | head -1 | cut -d: -f1) ))
				now=$(date +%s%N)
				say "  $(printf '%6.1f' "$(echo "($now - $t0) / 1000000000" | bc -l)") s  $pat"
				found=1
				break
			fi
			if [ $(( ($(date +%s%N) - t0) / 1000000000 )) -ge "$timeout" ] || ! kill -0 "$pid" 2>/dev/null; then
				break
			fi
			sleep 0.1
		done
		if [ "$found" = 0 ]; then
			kill "$pid" 2>/dev/null || true
			wait "$pid" 2>/dev/null || true
			echo "----- last lines of $log -----" >&2
			tail -n 40 "$log" | tr -d '\r' >&2
			die "no \"$pat\" within ${timeout}s"
		fi
	done
	kill "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
}

command -v bc >/dev/null || die "bc is needed for timings (apt-get install bc)"

say "1. boot slot A"
cp --sparse=always "$work/disk.img" "$work/run.img"
boot "$work/run.img" "$work/boot-1.log" 120 \
	'edge-grub: booting A' 'edge-init: initramfs started' 'edge-init: slot=A version=1.0.0' \
	'edge-init: health exit=0' 'edge-init: ready'

say "2. grubenv flipped to slot B (good)"
set_slot_b "$work/run.img" "$work/rootfs-2.img"
write_env "$work/run.img" 'EDGE_ORDER=B A' EDGE_A_STATE=good EDGE_A_TRIES=0 EDGE_B_STATE=good EDGE_B_TRIES=0
boot "$work/run.img" "$work/boot-2.log" 120 \
	'edge-grub: booting B' 'edge-init: slot=B version=2.0.0' 'edge-init: ready'

if [ "$quick" = 1 ]; then
	say "PASS (quick)"
	exit 0
fi

rollback() { # N NAME IMAGE PATTERN-IN-B
	say "$1. B trying (1 try), $2: falls back to A"
	set_slot_b "$work/run.img" "$3"
	write_env "$work/run.img" 'EDGE_ORDER=B A' EDGE_A_STATE=good EDGE_A_TRIES=0 EDGE_B_STATE=trying EDGE_B_TRIES=1
	boot "$work/run.img" "$work/boot-$1.log" 180 \
		'edge-grub: slot B trying, 0 tries left' 'edge-grub: booting B' 'edge-init: slot=B version=2.0.0' \
		"$4" 'edge-grub: slot B: trying with no tries left' 'edge-grub: booting A' \
		'edge-init: slot=A version=1.0.0' 'edge-init: ready'
	read_env "$work/run.img" | grep -qx 'EDGE_B_TRIES=0' || die "grubenv: EDGE_B_TRIES not decremented"
}
rollback 3 "init panics" "$work/rootfs-2-panic.img" 'Kernel panic'
rollback 4 "init hangs" "$work/rootfs-2-hang.img" 'edge-init: hanging'
rollback 5 "health fails" "$work/rootfs-2-healthfail.img" 'edge-init: health exit=3'

say "PASS"
