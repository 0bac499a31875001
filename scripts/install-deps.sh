#!/usr/bin/env bash
# Install the Debian packages edge-ota's demo, tests and benchmarks use (idempotent).
# Debian 12 (bookworm); run as root. qemu-system-x86 comes from bookworm-backports because
# the machine's qemu-utils is the backports version (see ../shared/HOST-NOTES.md).
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "install-deps.sh: run as root" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive

# Tools the unit and CLI tests need (real grub-editenv and fw_printenv for round trips).
# fw_printenv/fw_setenv are in libubootenv-tool on Debian 12, not u-boot-tools.
need=(grub2-common u-boot-tools libubootenv-tool e2fsprogs util-linux fdisk time bc)
missing=()
for p in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The image builder and the QEMU end-to-end tests.
if [ -x image-builder/scripts/install-deps.sh ] || [ -f image-builder/scripts/install-deps.sh ]; then
  bash image-builder/scripts/install-deps.sh
fi
