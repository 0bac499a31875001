#!/usr/bin/env bash
# Demo: build v1 and v2 OS images, boot v1 in QEMU (serial console on this terminal), update
# it to v2 from a virtual USB stick as an air-gapped site would (`edge-ota apply
# /media/usb/image.bin`), watch it reboot into slot B and pass its health check, then print
# the guest's `edge-ota status`. Needs root (installs packages, downloads the kernel .deb).
# For a quick demo without a VM: scripts/demo-local.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ]; then
  bash scripts/install-deps.sh
else
  echo "demo.sh: run as root (package installs, kernel download)" >&2
  exit 1
fi
cargo run --release --quiet -p qemu-tests --bin edge-ota-demo
