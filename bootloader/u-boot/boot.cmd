# edge-ota A/B boot script for U-Boot (hush shell).
# Build: mkimage -A arm64 -O linux -T script -C none -n "edge-ota boot" -d boot.cmd boot.scr
#
# Protocol, shared with edge-ota's GRUB and file backends (see README.md):
#   EDGE_ORDER       slot names separated by single spaces, e.g. "A B"
#   EDGE_<S>_STATE   good | trying | bad
#   EDGE_<S>_TRIES   decimal 0..9, tries left while trying
# Walk EDGE_ORDER: a "good" slot boots at once (no env write); a "trying" slot with tries left
# gets EDGE_<S>_TRIES decremented and the env saved, then boots; anything else is skipped, and
# so is a slot whose kernel cannot be loaded. If nothing boots, the first slot of EDGE_ORDER
# is booted as a last resort, with a warning.
#
# Board settings, all optional (put them in the default environment):
#   edge_devtype, edge_devnum  disk with the rootfs-<S> GPT partitions (default: the
#                              ${devtype} ${devnum} distro boot found this script on, else mmc 0)
#   edge_kernel    kernel path inside rootfs-<S> (default /boot/Image)
#   edge_fdt       device tree path inside rootfs-<S> (default: U-Boot's own, ${fdtcontroladdr})
#   edge_initrd    initramfs path inside rootfs-<S> (default: none)
#   edge_bootargs  kernel arguments before ours (default "ro rootwait")
#   edge_bootcmd   command that boots what was loaded (default: booti, arm64); it can use
#                  ${edge_initrd_arg} (addr:size or -) and ${edge_fdt_addr}
#
# Hush local variables (name=value) never reach the environment, so saveenv cannot persist
# them. The few variables that must be environment variables (set by setenv, setexpr, part,
# load) are cleared before every saveenv. Note: in U-Boot's hush "name=" does not clear a
# local variable, so locals are reset to explicit values (0, -), never to empty.

if test -z "${EDGE_ORDER}"; then
	echo "edge-ota: WARNING: EDGE_ORDER is not set, using A B"
	setenv EDGE_ORDER "A B"
fi

edge_dev_type=mmc
edge_dev_num=0
if test -n "${devtype}"; then
	edge_dev_type=${devtype}
	edge_dev_num=${devnum}
fi
if test -n "${edge_devtype}"; then
	edge_dev_type=${edge_devtype}
	edge_dev_num=${edge_devnum}
fi
edge_kernel_path=/boot/Image
if test -n "${edge_kernel}"; then
	edge_kernel_path=${edge_kernel}
fi
edge_args="ro rootwait"
if test -n "${edge_bootargs}"; then
	edge_args="${edge_bootargs}"
fi

# "-" after the slots marks the last resort.
for S in ${EDGE_ORDER} -; do
	edge_go=0
	if test "${S}" = "-"; then
		edge_slot=-
		for F in ${EDGE_ORDER}; do
			if test "${edge_slot}" = "-"; then
				edge_slot=${F}
			fi
		done
		echo "edge-ota: WARNING: no bootable slot in EDGE_ORDER (${EDGE_ORDER}), booting ${edge_slot} as a last resort"
		edge_go=1
	else
		edge_slot=${S}
		# Hush has no ${EDGE_${S}_STATE}: build the lookup as a command, then run it.
		setenv edge_get "setenv edge_state \${EDGE_${S}_STATE}; setenv edge_tries \${EDGE_${S}_TRIES}"
		run edge_get
		if test "${edge_state}" = "good"; then
			echo "edge-ota: slot ${S} is good"
			edge_go=1
		elif test "${edge_state}" = "trying" && test -n "${edge_tries}" && test ${edge_tries} -gt 0; then
			# setexpr computes in hex: fine for the protocol's 0..9, so clamp anything above.
			if test ${edge_tries} -gt 9; then
				setenv edge_tries 9
			fi
			setexpr edge_tries ${edge_tries} - 1
			setenv EDGE_${S}_TRIES ${edge_tries}
			echo "edge-ota: trying slot ${S}, ${edge_tries} tries left after this boot"
			setenv edge_get
			setenv edge_state
			setenv edge_tries
			setenv edge_part
			setenv edge_fdt_addr
			setenv edge_initrd_arg
			setenv bootargs
			# Boot a trying slot only once its countdown is stored, or it could retry forever.
			if saveenv; then
				edge_go=1
			else
				echo "edge-ota: WARNING: saveenv failed, skipping trying slot ${S}"
			fi
		else
			echo "edge-ota: skipping slot ${S} (state ${edge_state}, tries ${edge_tries})"
		fi
		setenv edge_get
		setenv edge_state
		setenv edge_tries
	fi

	if test "${edge_go}" = "1"; then
		setenv bootargs "${edge_args} root=PARTLABEL=rootfs-${edge_slot} edgeota.slot=${edge_slot}"
		setenv edge_fdt_addr ${fdtcontroladdr}
		setenv edge_initrd_arg -
		if part number ${edge_dev_type} ${edge_dev_num} rootfs-${edge_slot} edge_part; then
			echo "edge-ota: booting slot ${edge_slot} from ${edge_dev_type} ${edge_dev_num}:${edge_part}"
			if load ${edge_dev_type} ${edge_dev_num}:${edge_part} ${kernel_addr_r} ${edge_kernel_path}; then
				if test -n "${edge_fdt}"; then
					if load ${edge_dev_type} ${edge_dev_num}:${edge_part} ${fdt_addr_r} ${edge_fdt}; then
						setenv edge_fdt_addr ${fdt_addr_r}
					else
						echo "edge-ota: WARNING: could not load ${edge_fdt}, using the U-Boot device tree"
					fi
				fi
				if test -n "${edge_initrd}"; then
					if load ${edge_dev_type} ${edge_dev_num}:${edge_part} ${ramdisk_addr_r} ${edge_initrd}; then
						setenv edge_initrd_arg ${ramdisk_addr_r}:${filesize}
					else
						echo "edge-ota: WARNING: could not load ${edge_initrd}, booting without initramfs"
					fi
				fi
				if test -n "${edge_bootcmd}"; then
					run edge_bootcmd
				else
					booti ${kernel_addr_r} ${edge_initrd_arg} ${edge_fdt_addr}
				fi
			fi
		else
			echo "edge-ota: no partition rootfs-${edge_slot} on ${edge_dev_type} ${edge_dev_num}"
		fi
		echo "edge-ota: ERROR: could not boot slot ${edge_slot}"
	fi
done
echo "edge-ota: ERROR: nothing could be booted"
