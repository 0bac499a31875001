#!/usr/bin/env bash
# Install the Debian packages edge-ota's demo, tests and benchmarks use (idempotent).
# Debian 12 (bookworm); run as root. qemu-system-x86 comes from bookworm-backports because
# the machine's qemu-utils is the backports version (see ../shared/HOST-NOTES.md).
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "install-deps.sh: run as root" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive

# Tools the unit and CLI tests need: real grub-editenv and fw_printenv for round trips,
# grub-emu to run the real grub.cfg, U-Boot for qemu-arm64 to run the real boot.cmd.
# fw_printenv/fw_setenv are in libubootenv-tool on Debian 12, not u-boot-tools.
# nginx-light is the real HTTP server (ranges, multi-range, If-Range) the network tests use.
# iproute2 (ip netns, veth, bridges) and util-linux (unshare) build the LAN of tests/lan.rs.
# containerd and runc: the real runtime tests/containerd.rs imports container images into.
need=(grub2-common grub-emu u-boot-tools u-boot-qemu libubootenv-tool e2fsprogs util-linux fdisk time bc dosfstools mtools nginx-light openssl iproute2 containerd runc)
missing=()
for p in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The image builder and the QEMU end-to-end tests (this adds bookworm-backports).
if [ -x image-builder/scripts/install-deps.sh ] || [ -f image-builder/scripts/install-deps.sh ]; then
  bash image-builder/scripts/install-deps.sh
fi

# qemu-system-aarch64 for the U-Boot test: from bookworm-backports, like qemu-system-x86,
# because the machine's qemu-utils is the backports version.
if ! command -v qemu-system-aarch64 >/dev/null 2>&1; then
  apt-get install -y -qq -t bookworm-backports --no-install-recommends qemu-system-arm >/dev/null
fi
