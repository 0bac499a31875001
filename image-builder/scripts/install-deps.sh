#!/bin/sh
# Install the Debian packages the OS image build (edge-ota-image kernel/initramfs/rootfs/disk)
# and its QEMU smoke test need. Idempotent: safe to run on every CI job.
#
# qemu-system-x86 comes from bookworm-backports because the machine's qemu-utils is already the
# backports version and the bookworm qemu-system-x86 conflicts with it.
set -eu

if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps.sh: must run as root (apt-get)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive

# The mirror of the existing bookworm sources, so backports comes from the same place.
mirror=""
for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    if grep -q '^Suites:.*\bbookworm\b' "$f"; then
        mirror=$(awk '/^URIs:/ {print $2; exit}' "$f")
        break
    fi
done
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
    mirror=$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list)
fi
[ -n "$mirror" ] || mirror="http://deb.debian.org/debian"

need_update=0
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    cat >/etc/apt/sources.list.d/bookworm-backports.sources <<SRC
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    need_update=1
fi

# Packages from the main suite:
#   grub-pc-bin grub2-common grub-common  grub-mkimage, boot.img, i386-pc modules
#   e2fsprogs                             mke2fs -d, debugfs
#   busybox-static                        the test OS's userland
#   kmod                                  depmod for the kernel's module subset
#   gzip xz-utils zstd cpio               initramfs; decompressing .ko.xz/.ko.zst modules
#   dpkg apt coreutils                    apt-get download, dpkg -x, sha256sum
#   bc                                    timings in image-builder/tests/boot-smoke.sh
#   dosfstools mtools                     FAT images for USB-stick tests (mkfs.vfat -C, mcopy)
pkgs="grub-pc-bin grub2-common grub-common e2fsprogs busybox-static kmod gzip xz-utils zstd cpio dpkg apt coreutils bc dosfstools mtools"
missing=""
for p in $pkgs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
qemu_missing=0
command -v qemu-system-x86_64 >/dev/null 2>&1 || qemu_missing=1

# `edge-ota-image kernel` asks apt-cache for the kernel package: the lists must exist.
if ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then
    need_update=1
fi

if [ -n "$missing" ] || [ "$qemu_missing" -eq 1 ] || [ "$need_update" -eq 1 ]; then
    apt-get update -q
fi
if [ -n "$missing" ]; then
    # shellcheck disable=SC2086 # word splitting of the package list is intended
    apt-get install -y -q --no-install-recommends $missing
fi
if [ "$qemu_missing" -eq 1 ]; then
    apt-get install -y -q -t bookworm-backports --no-install-recommends qemu-system-x86
fi

echo "install-deps.sh: all OS image build dependencies present"
