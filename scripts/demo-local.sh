#!/usr/bin/env bash
# Local demo (no VM): build a bundle signed with the INSECURE example key, apply it to the inactive slot of
# a simulated device (loop device when root, else a plain file), and show the status.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] && bash scripts/install-deps.sh
cargo build --release --workspace --quiet
ota=$PWD/target/release/edge-ota
img=$PWD/target/release/edge-ota-image
demo=${DEMO_DIR:-$PWD/build/demo}
rm -rf "$demo" && mkdir -p "$demo"

echo "== a 64 MiB root filesystem image (ext4 with some files)"
mkdir -p "$demo/root/etc" && echo "VERSION_ID=2.0.0" > "$demo/root/etc/os-release"
seq 1 200000 > "$demo/root/etc/data.txt"
mke2fs -q -t ext4 -d "$demo/root" -E root_owner=0:0 "$demo/rootfs-v2.img" 64M

echo "== bundle signed with keys-example/INSECURE-demo.key.pem (demo only!)"
"$img" bundle create --out "$demo/update-v2.eota" --compatible edge-demo --version 2.0.0 \
  --security-version 2 --key keys-example/INSECURE-demo.key.pem --image "$demo/rootfs-v2.img"

echo "== a device with slots A (booted) and B"
truncate -s 80M "$demo/slotA.img" "$demo/slotB.img"
slot_b=$demo/slotB.img
if [ "$(id -u)" = 0 ] && loop=$(losetup -f --show "$demo/slotB.img" 2>/dev/null); then
  slot_b=$loop
  trap 'losetup -d "$loop"' EXIT
  echo "slot B is loop device $loop"
fi
echo "BOOT_IMAGE=/boot/vmlinuz ro edgeota.slot=A" > "$demo/cmdline"
cat > "$demo/config.toml" <<CFG
compatible = "edge-demo"
state_dir = "$demo/state"
cmdline = "$demo/cmdline"
[trust]
keys = ["$PWD/keys-example/INSECURE-demo.pub.pem"]
[[slot]]
name = "A"
device = "$demo/slotA.img"
[[slot]]
name = "B"
device = "$slot_b"
[bootloader]
backend = "file"
path = "$demo/bootenv"
CFG
"$ota" --config "$demo/config.toml" init-boot-env --good A

echo "== edge-ota apply"
"$ota" --config "$demo/config.toml" apply --no-reboot "$demo/update-v2.eota"
echo "== edge-ota status"
"$ota" --config "$demo/config.toml" status
