#!/bin/sh
# edge-ota slot init (PID 1 of a root filesystem slot). Sets up the runtime mounts, arms the
# watchdog, runs the updater's health gate, then keeps the watchdog fed and offers a root
# shell on the serial console. Every stage prints an "edge-init:" marker for the test driver.
#
# /etc/edge-init.conf sets EDGE_VERSION, EDGE_VARIANT (normal|health-fail|panic|hang) and
# EDGE_WATCHDOG_MARGIN (seconds). The agent runs when /var/lib/edge-ota/agent.enabled exists.

export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
# Read before /dev is mounted: redirections to /dev/null would fail on the read-only root.
[ -e /proc/self ] || mount -t proc proc /proc
[ -e /sys/kernel ] || mount -t sysfs sysfs /sys
[ -e /dev/null ] || mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1

log() { echo "edge-init: $*"; }

. /etc/edge-init.conf

mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620 devpts /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm

slot=
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	edgeota.slot=*) slot="${arg#edgeota.slot=}" ;;
	esac
done
log "slot=$slot version=$EDGE_VERSION"

if [ "$EDGE_VARIANT" = panic ]; then
	# Test variant: PID 1 exits, the kernel panics and reboots (panic=5).
	log "panic variant: init exits now"
	exit 1
fi

# The block device whose GPT partition name is $1.
find_partname() {
	for u in /sys/class/block/*/uevent; do
		if grep -qx "PARTNAME=$1" "$u"; then
			echo "/dev/$(sed -n 's/^DEVNAME=//p' "$u")"
			return 0
		fi
	done
	return 1
}

# Persistent state (edge-ota keeps its state in /var/lib/edge-ota).
data=$(find_partname data)
if [ -n "$data" ] && mount -t ext4 -o rw,noatime,nosuid,nodev "$data" /var; then
	log "data partition $data mounted on /var"
else
	log "WARNING: no data partition; /var is a tmpfs (state will not persist)"
	mount -t tmpfs -o mode=0755 tmpfs /var
fi
mkdir -p /var/lib/edge-ota /var/lib/containerd-images /var/log /var/tmp
chmod 1777 /var/tmp

# The GRUB boot partition (grub.cfg, grubenv) for the updater's bootloader backend.
boot=$(find_partname boot)
if [ -n "$boot" ] && mount -t ext4 -o rw,noatime,nosuid,nodev,noexec "$boot" /mnt/boot; then
	log "boot partition $boot mounted on /mnt/boot"
else
	log "WARNING: boot partition not mounted"
fi

hostname edge
ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
	ip link set eth0 up
	if udhcpc -i eth0 -q -n -f -t 3 -T 1 -s /usr/share/udhcpc/default.script >/run/udhcpc.log 2>&1; then
		log "network: eth0 $(ip -4 -o addr show dev eth0 | awk '{print $4}')"
	else
		log "WARNING: no DHCP answer on eth0"
	fi
fi

# Arm the watchdog: from here on a hang resets the machine after the margin.
margin=${EDGE_WATCHDOG_MARGIN:-15}
if modprobe softdog soft_margin="$margin" nowayout=1 && [ -c /dev/watchdog ]; then
	printf '1' >/dev/watchdog
	log "watchdog armed (${margin} s)"
else
	log "WARNING: no watchdog"
fi

if [ "$EDGE_VARIANT" = hang ]; then
	log "hanging"
	while :; do sleep 3600; done
fi

log "running edge-ota health"
/usr/bin/edge-ota health
rc=$?
log "health exit=$rc"
if [ "$rc" -eq 8 ]; then
	# The gate could not judge this slot (state or boot environment broken, or a slot booted
	# as the bootloader's last resort): nothing was confirmed, and rebooting would not help.
	log "WARNING: slot not confirmed; it keeps running (edge-ota status says how to repair)"
elif [ "$rc" -ne 0 ]; then
	# The slot stays unconfirmed; rebooting lets the bootloader count the try and fall back.
	log "health failed, rebooting"
	sync
	reboot -f
fi

# Keep feeding the watchdog (its timeout stays the margin).
watchdog -T "$margin" -t 5 /dev/watchdog

# The container runtime, once the slot is confirmed (under one emulated CPU it would only
# slow the health gate): its store is on the data partition, and the Kubernetes images the
# slot's bundle carried are loaded into it from the slot's files, with no network.
# Seconds since $1 (a /proc/uptime reading): what the runtime costs each boot.
since() { awk -v t="$1" '{ printf "%.1f", $1 - t }' /proc/uptime; }
ctrd_pid=
agent_pid=
if [ -x /usr/bin/containerd ]; then
	t0=$(cut -d' ' -f1 /proc/uptime)
	mkdir -p /var/lib/containerd /run/containerd /sys/fs/cgroup
	mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
	containerd --config /etc/containerd/config.toml >/var/log/containerd.log 2>&1 &
	ctrd_pid=$!
	i=0
	while [ ! -S /run/containerd/containerd.sock ] && [ $i -lt 120 ]; do
		sleep 0.5
		i=$((i + 1))
	done
	log "containerd started (pid $ctrd_pid, answering after $(since "$t0") s)"
	t0=$(cut -d' ' -f1 /proc/uptime)
	/usr/bin/edge-ota import-images
	rc=$?
	if [ "$rc" -eq 0 ]; then
		log "container images imported ($(since "$t0") s)"
	else
		log "WARNING: container images not imported (exit $rc)"
	fi
fi
# The unattended agent (`edge-ota agent run`), when this device has it enabled: the slot's
# configuration has an [agent] section and the data partition holds the switch, which outlives
# slot changes so the new slot's agent reports on the update the old one started. Started last:
# after the health verdict (the agent only reads it) and with containerd answering (it imports
# a new slot's images). The wrapper restarts it whenever it exits.
if [ -e /var/lib/edge-ota/agent.enabled ] && grep -q '^\[agent\]' /etc/edge-ota/config.toml; then
	/usr/lib/edge-ota/edge-ota-agent &
	agent_pid=$!
	log "agent started (wrapper pid $agent_pid)"
fi
log "ready"

# busybox reboot/poweroff/halt signal PID 1; do what they ask.
shutdown_now() {
	log "$1"
	if [ -n "$agent_pid" ]; then
		# The wrapper stops the agent with itself (before containerd, which the agent may be
		# using); the agent's state is persisted before every step, so stopping it anywhere is
		# safe.
		kill "$agent_pid" 2>/dev/null
		i=0
		while kill -0 "$agent_pid" 2>/dev/null && [ $i -lt 20 ]; do
			sleep 0.2
			i=$((i + 1))
		done
	fi
	if [ -n "$ctrd_pid" ]; then
		kill "$ctrd_pid" 2>/dev/null
		i=0
		while kill -0 "$ctrd_pid" 2>/dev/null && [ $i -lt 20 ]; do
			sleep 0.2
			i=$((i + 1))
		done
	fi
	sync
	umount /var 2>/dev/null
	umount /mnt/boot 2>/dev/null
	sync
	"$1" -f
}
trap 'shutdown_now reboot' TERM INT
trap 'shutdown_now poweroff' USR2
trap 'shutdown_now halt' USR1

export PS1='edge# '
(
	while :; do
		setsid cttyhack sh -l
		sleep 1
	done
) &
# wait is interruptible by the traps above, a foreground child would not be.
while :; do
	wait
	sleep 1
done
