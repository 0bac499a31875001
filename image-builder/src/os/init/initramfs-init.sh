#!/bin/sh
# edge-ota initramfs /init: load the drivers, find the slot named by root=PARTLABEL=<name> on
# the kernel command line, mount it read-only and switch_root to its /sbin/init.
# Every stage prints an "edge-init:" marker on the console for the test driver.

/bin/busybox mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys

log() { echo "edge-init: $*"; }
# A slot that cannot be mounted must lead to a reboot, so the bootloader's tries counter
# moves on to the other slot.
fatal() {
	log "FATAL: $*"
	log "rebooting in 5 s"
	sleep 5
	reboot -f
}

log "initramfs started, kernel $(uname -r)"

root=
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	root=*) root="${arg#root=}" ;;
	esac
done

log "loading modules"
while read -r mod params; do
	[ -n "$mod" ] || continue
	# shellcheck disable=SC2086 # params are separate words
	insmod "$mod" $params || log "insmod $mod failed (continuing)"
done </etc/edge-init/modules
log "modules loaded"

# The block device whose GPT partition name is $1 (from the kernel's uevent files).
find_partname() {
	found=
	for u in /sys/class/block/*/uevent; do
		grep -qx "PARTNAME=$1" "$u" || continue
		dev=$(sed -n 's/^DEVNAME=//p' "$u")
		if [ -n "$found" ]; then
			log "WARNING: several partitions named $1 (/dev/$found, /dev/$dev); using /dev/$found"
		else
			found=$dev
		fi
	done
	[ -n "$found" ] && echo "/dev/$found"
}

case "$root" in
PARTLABEL=*) label="${root#PARTLABEL=}" ;;
*) fatal "root=$root: expected root=PARTLABEL=<partition name>" ;;
esac

log "waiting for partition $label"
dev=
i=0
while [ $i -lt 100 ]; do
	dev=$(find_partname "$label")
	[ -n "$dev" ] && break
	usleep 100000
	i=$((i + 1))
done
[ -n "$dev" ] || fatal "no partition named $label after 10 s"
[ -b "$dev" ] || fatal "$dev is not a block device"

log "mounting $label ($dev) read-only"
mount -t ext4 -o ro "$dev" /newroot || fatal "cannot mount $dev"
[ -x /newroot/sbin/init ] || fatal "$label has no /sbin/init"

mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
log "switching to $label"
exec switch_root /newroot /sbin/init
