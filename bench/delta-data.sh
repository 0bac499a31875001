#!/usr/bin/env bash
# Build a realistic "monthly update" pair of root filesystem slot images and measure the classic
# delta baselines on them, in one run. bench/delta.sh measures edge-ota's own delta against these.
#
#   v1  Debian 12 (bookworm) minbase, as `debootstrap --variant=minbase` makes it.
#   v2  a copy of v1 after `apt-get update && apt-get upgrade` with bookworm-security and
#       bookworm-updates added (the updates a month brings), plus a few small packages a device
#       would gain: less nano iputils-ping (DELTA_EXTRA_PKGS to change them).
# Both trees lose apt's lists and caches, then become 512 MiB read-only slot images the way
# image-builder/src/os/ext4.rs makes them: mke2fs -d with a private mke2fs.conf, no journal,
# a fixed UUID and hash seed (the same for both versions, as the image builder does), fixed
# times (E2FSPROGS_FAKE_TIME, files touched to the epoch, ctimes rewritten with debugfs), so
# the same tree always gives the same bytes. Owners stay as the tree has them (a real root
# filesystem; the image builder forces root only because its own trees are all root's).
#
# Baselines, in MiB and as % of Z = `zstd -19 -T0` of the whole v2 image:
#   zstd --patch-from=v1 (-19 --long=30), xdelta3 -e -9 -s v1, and the fixed 4 KiB blocks of
#   v2 found nowhere in v1, concatenated and compressed as one zstd -19 stream; with the
#   decoders' peak RSS (/usr/bin/time -v). For information: zstd -19 --long=27 of v2, xdelta3
#   with a source window as large as the image (-B), and tar | zstd -19 of the files of v2 that
#   are new (no delta can avoid shipping those) and of those that changed.
#
# Usage:  sudo bench/delta-data.sh [--rebuild]
#         or `. bench/delta-data.sh [--rebuild]` from a bash script: runs in a subshell, then
#         sources baselines.env into the caller (and leaves set -euo pipefail on there).
# Needs:  root (debootstrap, chroot, mounts), Debian 12 host with apt, network access to the
#         Debian mirrors in /etc/apt/sources.list.d (through the machine's package proxy),
#         python3; installs debootstrap xdelta3 zstd e2fsprogs time if missing.
#         ~2.5 GiB free under $BENCH_DIR.
# Time:   first run ~11 min on 2 cores (debootstrap + apt + mke2fs ~2-3 min, the baselines
#         ~9 min: three zstd -19 passes over 512 MiB images, two xdelta3 runs, the decodes),
#         up to ~17 min while a compile shares the cores; later runs reuse the images (stamp
#         file $BENCH_DIR/delta/images.stamp) and only measure (~9-13 min). --rebuild redoes
#         debootstrap and apt, from the package caches (no package downloads).
# Output: $BENCH_DIR/delta/{v1,v2}.img            the slot images (BENCH_DIR=/var/tmp/edge-ota-bench)
#         $BENCH_DIR/delta/baselines.env          KEY=value lines for other scripts to source
#         $BENCH_DIR/delta/{v1,v2}/               the trees; packages-{v1,v2}.txt, changed-packages.txt
#         $BENCH_DIR/delta/cache/                 debootstrap and apt caches (packages, lists)
#         $BENCH_DIR/delta/logs/                  debootstrap.log, apt.log
#         the table on stdout, ending with "baselines: zstd-19 ... fixed-4K ... MiB (z%)".
set -euo pipefail

BENCH_DIR=${BENCH_DIR:-/var/tmp/edge-ota-bench}

dd_main() {
  local rebuild=0
  while [ $# -gt 0 ]; do
    case "$1" in
      --rebuild) rebuild=1 ;;
      -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; return 0 ;;
      *) echo "delta-data.sh: unknown argument $1 (try --help)" >&2; return 2 ;;
    esac
    shift
  done
  [ "$(id -u)" = 0 ] || { echo "delta-data.sh: run as root (debootstrap, chroot)" >&2; return 1; }
  local t_start=$SECONDS
  export LC_ALL=C DEBIAN_FRONTEND=noninteractive
  # Bump when the build steps change, so cached images built the old way are not reused.
  local build_rev=1
  local suite=bookworm
  # A monthly update: the pending security updates plus a few small tools a device gains.
  # DELTA_EXTRA_PKGS overrides it (e.g. "ca-certificates curl openssh-client iproute2 procps"
  # adds 34 packages, about 29 MiB: mostly new software no delta can avoid shipping).
  local extra_pkgs=${DELTA_EXTRA_PKGS:-"less nano iputils-ping"}
  local size_mib=512 epoch=1700000000
  # The same for v1 and v2 (ext4 metadata checksums are seeded by the UUID), as the image builder does.
  local uuid=8f0e4bbc-6a1f-4e4b-8c3e-0a5b1d2e3f40 hash_seed=3c0c7f1a-5b1e-4d7e-9a51-1f1d5b0c2a77

  work=$BENCH_DIR/delta  # global: the EXIT trap's unmount needs it
  mkdir -p "$work/cache/debootstrap" "$work/cache/apt/partial" "$work/cache/apt-lists/partial" \
    "$work/logs" "$work/out"
  exec 9>"$work/.lock"
  flock -n 9 || { echo "delta-data.sh: another run holds $work/.lock" >&2; return 1; }

  dd_install_deps
  dd_find_mirrors  # sets dd_mirror, dd_security_mirror

  local arch; arch=$(dpkg --print-architecture)
  local stamp_want
  stamp_want=$(printf '%s\n' "build_rev=$build_rev" "suite=$suite variant=minbase arch=$arch" \
    "mirror=$dd_mirror" "security_mirror=$dd_security_mirror" "extra_pkgs=$extra_pkgs" \
    "size_mib=$size_mib epoch=$epoch uuid=$uuid hash_seed=$hash_seed" \
    "mke2fs=$(mke2fs -V 2>&1 | head -n1)")
  local stamp=$work/images.stamp
  if [ "$rebuild" = 0 ] && [ -f "$work/v1.img" ] && [ -f "$work/v2.img" ] && [ -f "$stamp" ] &&
    [ -f "$work/packages-v1.txt" ] && [ -f "$work/packages-v2.txt" ] &&
    [ "$(grep -v '^#' "$stamp")" = "$stamp_want" ]; then
    dd_log "reusing the images from $(sed -n 's/^# built //p' "$stamp") (--rebuild to redo them)"
  else
    rm -f "$stamp"
    local t_build=$SECONDS
    dd_build_trees
    dd_make_image "$work/v1" "$work/v1.img"
    dd_make_image "$work/v2" "$work/v2.img"
    { echo "# built $(date -u +%Y-%m-%dT%H:%M:%SZ) in $((SECONDS - t_build)) s"; echo "$stamp_want"; } >"$stamp"
  fi

  # The baselines take minutes (zstd -19 and --patch-from of 512 MiB images): measured once
  # per pair of images, unless --rebuild.
  local measured=$work/baselines.stamp
  if [ "$rebuild" = 0 ] && [ -f "$work/baselines.env" ] && [ -f "$measured" ] &&
    [ "$(cat "$measured")" = "$(cat "$stamp")" ]; then
    dd_log "reusing the baselines measured for these images ($work/baselines.env)"
    dd_final=$(sed -n 's/^# FINAL=//p' "$work/baselines.env")
  else
    dd_measure  # sets dd_final, the summary line
    echo "# FINAL=$dd_final" >> "$work/baselines.env"
    cp "$stamp" "$measured"
  fi
  dd_log "done in $((SECONDS - t_start)) s"
  echo "$dd_final"
}

dd_log() { echo "delta-data: $*" >&2; }

# Install what is missing, idempotently (as scripts/install-deps.sh does).
dd_install_deps() {
  local need=(debootstrap xdelta3 zstd e2fsprogs time debian-archive-keyring) missing=() p
  for p in "${need[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  command -v python3 >/dev/null 2>&1 || missing+=(python3)
  if [ ${#missing[@]} -gt 0 ]; then
    dd_log "installing ${missing[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# The mirrors this machine's apt uses for bookworm and bookworm-security (deb822 or one-line).
dd_find_mirrors() {
  local f
  dd_mirror="" dd_security_mirror=""
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    [ -n "$dd_mirror" ] || dd_mirror=$(dd_deb822_uri bookworm "$f")
    [ -n "$dd_security_mirror" ] || dd_security_mirror=$(dd_deb822_uri bookworm-security "$f")
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    [ -n "$dd_mirror" ] || dd_mirror=$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' "$f")
    [ -n "$dd_security_mirror" ] || dd_security_mirror=$(awk '$1 == "deb" && $3 == "bookworm-security" {print $2; exit}' "$f")
  done
  dd_mirror=${dd_mirror:-http://deb.debian.org/debian}
  dd_security_mirror=${dd_security_mirror:-http://security.debian.org/debian-security}
  dd_mirror=${dd_mirror%/} dd_security_mirror=${dd_security_mirror%/}
}

# SUITE FILE: the first URI of the first deb822 stanza of FILE whose Suites lists SUITE.
dd_deb822_uri() {
  awk -v want="$1" '
    function flush() { if (hit && uri != "" && !done) { print uri; done = 1 } hit = 0; uri = "" }
    /^[ \t]*$/ { flush(); next }
    /^URIs:/ { uri = $2 }
    /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == want) hit = 1 }
    END { flush() }' "$2"
}

# Unmount everything under $work (deepest first): the chroot's mounts, and whatever a failed
# debootstrap left behind.
dd_umount_all() {
  local m
  for m in $(awk -v w="$work/" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r); do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || dd_log "warning: could not unmount $m"
  done
}

dd_run_logged() {  # LOG CMD...: run quietly, show the log's end on failure
  local log=$1; shift
  if ! "$@" >"$log" 2>&1; then
    dd_log "failed: $* (log: $log)"; tail -n 30 "$log" >&2; return 1
  fi
}

dd_build_trees() {
  trap dd_umount_all EXIT
  trap 'exit 130' INT TERM
  dd_umount_all
  rm -rf "$work/v1" "$work/v2" "$work/v1.img" "$work/v2.img"

  dd_log "debootstrap --variant=minbase $suite from $dd_mirror (log: $work/logs/debootstrap.log)"
  dd_run_logged "$work/logs/debootstrap.log" \
    debootstrap --variant=minbase --cache-dir="$work/cache/debootstrap" "$suite" "$work/v1" "$dd_mirror"
  dd_umount_all
  # debootstrap copies the host's hostname and resolver; give the image neutral ones.
  echo edge >"$work/v1/etc/hostname"
  printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$work/v1/etc/hosts"
  rm -f "$work/v1/etc/resolv.conf"
  dd_clean_apt "$work/v1"
  dpkg-query --admindir="$work/v1/var/lib/dpkg" -W -f='${Package}\t${Version}\n' >"$work/packages-v1.txt"

  dd_log "v2: copy of v1 + apt-get upgrade from $suite-security/-updates + $extra_pkgs (log: $work/logs/apt.log)"
  cp -a "$work/v1" "$work/v2"
  local r=$work/v2
  cat >>"$r/etc/apt/sources.list" <<EOF
deb $dd_mirror $suite-updates main
deb $dd_security_mirror $suite-security main
EOF
  # For the duration of the apt run: no service starts, the host's resolver (the proxy may be
  # reached through /etc/hosts), and the host's tolerance of snapshot mirrors' old Release files.
  printf '#!/bin/sh\nexit 101\n' >"$r/usr/sbin/policy-rc.d"
  chmod 755 "$r/usr/sbin/policy-rc.d"
  cp -L /etc/resolv.conf "$r/etc/resolv.conf" 2>/dev/null || true
  cp /etc/hosts "$r/etc/hosts"
  local aptopts=()
  if apt-config dump 2>/dev/null | grep -qi '^Acquire::Check-Valid-Until "false"'; then
    aptopts+=(-o Acquire::Check-Valid-Until=false)
  fi
  mount -t proc proc "$r/proc"
  mount -t sysfs sysfs "$r/sys"
  mount --bind /dev "$r/dev"
  if [ -d /dev/pts ]; then mount --bind /dev/pts "$r/dev/pts"; fi
  # The downloaded .debs and package lists go to caches outside the tree, kept for --rebuild.
  mkdir -p "$r/var/lib/apt/lists"
  mount --bind "$work/cache/apt" "$r/var/cache/apt/archives"
  mount --bind "$work/cache/apt-lists" "$r/var/lib/apt/lists"
  # shellcheck disable=SC2086 # the package list is meant to split
  dd_run_logged "$work/logs/apt.log" chroot "$r" /bin/sh -ec "
    apt-get ${aptopts[*]} update
    apt-get -y -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold upgrade
    apt-get -y --no-install-recommends install $extra_pkgs"
  dd_umount_all
  trap - EXIT INT TERM
  rm -f "$r/usr/sbin/policy-rc.d"
  cp -a "$work/v1/etc/hosts" "$r/etc/hosts"
  rm -f "$r/etc/resolv.conf"
  dd_clean_apt "$r"
  dpkg-query --admindir="$r/var/lib/dpkg" -W -f='${Package}\t${Version}\n' >"$work/packages-v2.txt"
  du -sh "$work/v1" | cut -f1 >"$work/du-v1.txt"
  du -sh "$work/v2" | cut -f1 >"$work/du-v2.txt"
}

# The OS, not the downloads.
dd_clean_apt() {
  rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/cache/apt/archives/*.deb
}

# TREE IMG: a read-only slot image as image-builder/src/os/ext4.rs makes it.
dd_make_image() {
  local tree=$1 img=$2 s=$work/mkfs
  rm -rf "$s" && mkdir -p "$s"
  # image-builder/src/os/ext4.rs MKE2FS_CONF, verbatim.
  printf '%s\n' '[defaults]' \
    '	base_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr' \
    '	default_mntopts = acl,user_xattr' '	enable_periodic_fsck = 0' '	blocksize = 4096' \
    '	inode_size = 256' '	inode_ratio = 16384' '' '[fs_types]' '	ext2 = {' '	}' '	ext4 = {' \
    '		features = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize' \
    '	}' '	small = {' '		inode_ratio = 4096' '	}' '	floppy = {' '		inode_ratio = 8192' '	}' \
    >"$s/mke2fs.conf"
  find "$tree" -exec touch -h -d "@$epoch" {} +
  rm -f "$img.tmp"
  truncate -s "${size_mib}M" "$img.tmp"
  dd_log "mke2fs -d $tree -> $img (${size_mib} MiB ext4, no journal)"
  MKE2FS_CONFIG=$s/mke2fs.conf E2FSPROGS_FAKE_TIME=$epoch SOURCE_DATE_EPOCH=$epoch \
    mke2fs -q -F -t ext4 -b 4096 -L rootfs -U "$uuid" -m 0 -O ^has_journal \
    -E "root_owner=0:0,hash_seed=$hash_seed,lazy_itable_init=0,nodiscard" -d "$tree" "$img.tmp"
  # mke2fs -d copies each file's ctime, which touch cannot set: rewrite it on every inode.
  if find "$tree" -name '*"*' -o -name "*"$'\n'"*" | grep -q .; then
    dd_log "a path under $tree has a double quote or newline; debugfs cannot name it"; return 1
  fi
  { echo "sif / ctime @$epoch"; find "$tree" -mindepth 1 -printf "sif \"/%P\" ctime @$epoch\n"; } >"$s/fixup.debugfs"
  E2FSPROGS_FAKE_TIME=$epoch SOURCE_DATE_EPOCH=$epoch \
    debugfs -w -f "$s/fixup.debugfs" "$img.tmp" >/dev/null 2>"$s/debugfs.err" || true
  if grep -v '^debugfs ' "$s/debugfs.err" | grep -q '[^[:space:]]'; then
    dd_log "debugfs failed:"; head -n 20 "$s/debugfs.err" >&2; return 1
  fi
  mv "$img.tmp" "$img"
  rm -rf "$s"
}

# python3 helper, two commands:
#   blocks V1 V2 OUT   writes the 4 KiB blocks of V2 whose content is nowhere in V1 (at any
#                      4 KiB-aligned offset), in order, to OUT; prints
#                      "v2_blocks v2_nonzero novel novel_nonzero".
#   files T1 T2 NEW CHANGED  lists (NUL-separated, relative to T2) the regular files of tree T2
#                      absent from T1 and those whose content differs; prints their counts and bytes.
dd_py() {
  python3 - "$@" <<'PY'
import hashlib, os, sys
B = 4096
ZERO = bytes(B)
def blocks(path):
    with open(path, "rb") as f:
        while True:
            buf = f.read(B * 8192)
            if not buf:
                return
            mv = memoryview(buf)
            for i in range(0, len(buf), B):
                yield mv[i:i + B]
def h(b):
    return hashlib.blake2b(b, digest_size=16).digest()
def same(p, q):
    if os.path.getsize(p) != os.path.getsize(q):
        return False
    with open(p, "rb") as a, open(q, "rb") as b:
        while True:
            x, y = a.read(1 << 20), b.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True
cmd = sys.argv[1]
if cmd == "blocks":
    old = {h(b) for b in blocks(sys.argv[2])}
    total = nonzero = novel = novel_nonzero = 0
    with open(sys.argv[4], "wb") as out:
        for b in blocks(sys.argv[3]):
            total += 1
            z = b == ZERO
            nonzero += not z
            if h(b) not in old:
                novel += 1
                novel_nonzero += not z
                out.write(b)
    print(total, nonzero, novel, novel_nonzero)
elif cmd == "files":
    t1, t2 = sys.argv[2], sys.argv[3]
    new, changed = [], []
    for root, dirs, files in os.walk(t2):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(root, f)
            if os.path.islink(p) or not os.path.isfile(p):
                continue
            rel = os.path.relpath(p, t2)
            q = os.path.join(t1, rel)
            if os.path.islink(q) or not os.path.isfile(q):
                new.append(rel)
            elif not same(p, q):
                changed.append(rel)
    for lst, out in ((new, sys.argv[4]), (changed, sys.argv[5])):
        with open(out, "wb") as o:
            o.write(b"".join(os.fsencode(r) + b"\0" for r in lst))
    size = lambda l: sum(os.path.getsize(os.path.join(t2, r)) for r in l)
    print(len(new), size(new), len(changed), size(changed))
PY
}

# /usr/bin/time -v CMD...: runs CMD, sets dd_secs (wall) and dd_rss_kib (peak RSS).
dd_timed() {
  local tf=$work/out/time.txt t0 t1
  t0=$(date +%s.%N)
  /usr/bin/time -v -o "$tf" "$@" || return
  t1=$(date +%s.%N)
  dd_secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.0f", b - a}')
  dd_rss_kib=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$tf")
}

dd_size() { stat -c %s "$1"; }
dd_mib() { awk -v b="$1" 'BEGIN {printf "%.2f", b / 1048576}'; }
dd_pct() { awk -v b="$1" -v z="$2" 'BEGIN {printf "%.1f", 100 * b / z}'; }

dd_measure() {
  local o=$work/out v1=$work/v1.img v2=$work/v2.img
  rm -f "$o"/*
  dd_log "measuring (zstd -19 of 512 MiB images: a few minutes each)"

  # Z: the whole v2 image, as a full (non-delta) update would ship it.
  dd_log "zstd -19 -T0 v2.img"
  dd_timed zstd -q -19 -T0 "$v2" -o "$o/v2.img.zst"
  local z=$(dd_size "$o/v2.img.zst") z_secs=$dd_secs
  dd_log "zstd -19 --long=27 -T0 v2.img"
  zstd -q -19 --long=27 -T0 "$v2" -o "$o/v2.img.long27.zst"
  local z27=$(dd_size "$o/v2.img.long27.zst")

  # zstd --patch-from: v1 as the dictionary; the window must cover the 512 MiB reference + the
  # file, hence --long=30 on both sides. Single-threaded: the zstd manual's advice for ratio.
  dd_log "zstd -19 --long=30 --single-thread --patch-from=v1.img v2.img"
  # (zstd prints "Optimal parser notes" for --patch-from at high levels even with -q: keep them out.)
  dd_timed zstd -q -19 --long=30 --single-thread --patch-from="$v1" "$v2" -o "$o/v2.patch.zst" \
    2>"$o/patch-from.stderr" || { cat "$o/patch-from.stderr" >&2; return 1; }
  local pf=$(dd_size "$o/v2.patch.zst") pf_secs=$dd_secs pf_enc_rss=$dd_rss_kib
  dd_timed zstd -q -d --long=30 --patch-from="$v1" "$o/v2.patch.zst" -o "$o/v2.from-patch.img"
  local pf_rss=$dd_rss_kib
  cmp -s "$o/v2.from-patch.img" "$v2" || { dd_log "zstd --patch-from did not round-trip"; return 1; }
  rm -f "$o/v2.from-patch.img"

  # xdelta3 as asked (-9, default source window of 64 MiB), then with the whole image as window.
  dd_log "xdelta3 -e -9 -s v1.img v2.img"
  dd_timed xdelta3 -e -9 -f -s "$v1" "$v2" "$o/v2.xd3"
  local xd=$(dd_size "$o/v2.xd3") xd_secs=$dd_secs xd_enc_rss=$dd_rss_kib
  dd_timed xdelta3 -d -f -s "$v1" "$o/v2.xd3" "$o/v2.from-xd3.img"
  local xd_rss=$dd_rss_kib
  cmp -s "$o/v2.from-xd3.img" "$v2" || { dd_log "xdelta3 did not round-trip"; return 1; }
  rm -f "$o/v2.from-xd3.img"
  local bwin=$((size_mib << 20))
  dd_log "xdelta3 -e -9 -B $bwin -s v1.img v2.img"
  dd_timed xdelta3 -e -9 -B "$bwin" -f -s "$v1" "$v2" "$o/v2.B.xd3"
  local xdb=$(dd_size "$o/v2.B.xd3") xdb_secs=$dd_secs xdb_enc_rss=$dd_rss_kib
  dd_timed xdelta3 -d -f -s "$v1" "$o/v2.B.xd3" "$o/v2.from-xd3.img"
  local xdb_rss=$dd_rss_kib
  cmp -s "$o/v2.from-xd3.img" "$v2" || { dd_log "xdelta3 -B did not round-trip"; return 1; }
  rm -f "$o/v2.from-xd3.img"

  # Fixed 4 KiB blocks of v2 found nowhere in v1, as one zstd -19 stream.
  dd_log "fixed 4 KiB blocks of v2 not in v1"
  local stats; stats=$(dd_py blocks "$v1" "$v2" "$o/v2.novel-4k.bin")
  local v2_blocks v2_nonzero novel novel_nonzero
  read -r v2_blocks v2_nonzero novel novel_nonzero <<<"$stats"
  dd_timed zstd -q -19 -T0 "$o/v2.novel-4k.bin" -o "$o/v2.novel-4k.zst"
  local fx=$(dd_size "$o/v2.novel-4k.zst") fx_secs=$dd_secs
  rm -f "$o/v2.novel-4k.bin"

  # For information: the files of v2 that are new or changed, each set as one tar | zstd -19.
  # New files (mostly the added packages) are what no delta can avoid shipping.
  dd_log "files new or changed in the v2 tree"
  local nnew=0 bnew=0 nchf=0 bchf=0 fnew=0 fchf=0
  if [ -d "$work/v1/usr" ] && [ -d "$work/v2/usr" ]; then
    read -r nnew bnew nchf bchf <<<"$(dd_py files "$work/v1" "$work/v2" "$o/new.lst" "$o/changed.lst")"
    local l
    for l in new changed; do
      tar -cf - -C "$work/v2" --no-recursion --numeric-owner --owner=0 --group=0 \
        --mtime=@$epoch --null -T "$o/$l.lst" | zstd -q -19 -T0 -o "$o/$l-files.tar.zst"
    done
    fnew=$(dd_size "$o/new-files.tar.zst") fchf=$(dd_size "$o/changed-files.tar.zst")
  fi

  # Report.
  local du1 du2
  du1=$(cat "$work/du-v1.txt" 2>/dev/null || du -sh "$work/v1" | cut -f1)
  du2=$(cat "$work/du-v2.txt" 2>/dev/null || du -sh "$work/v2" | cut -f1)
  join -t $'\t' -a1 -a2 -e '-' -o 0,1.2,2.2 <(sort "$work/packages-v1.txt") <(sort "$work/packages-v2.txt") |
    awk -F'\t' '$2 != $3 {print $1 "\t" $2 "\t" $3}' >"$work/changed-packages.txt"
  local n1 n2 nchg nup nadd ndel
  n1=$(wc -l <"$work/packages-v1.txt"); n2=$(wc -l <"$work/packages-v2.txt")
  nchg=$(wc -l <"$work/changed-packages.txt")
  nup=$(awk -F'\t' '$2 != "-" && $3 != "-"' "$work/changed-packages.txt" | wc -l)
  nadd=$(awk -F'\t' '$2 == "-"' "$work/changed-packages.txt" | wc -l)
  ndel=$(awk -F'\t' '$3 == "-"' "$work/changed-packages.txt" | wc -l)

  echo "Debian $suite minbase slot images ($size_mib MiB ext4, no journal), $(sed -n 's/^# built //p' "$work/images.stamp")"
  echo "  v1: $work/v1.img  tree $du1, $n1 packages"
  echo "  v2: $work/v2.img  tree $du2, $n2 packages (+ $extra_pkgs)"
  echo "  v2 non-zero 4 KiB blocks: $v2_nonzero of $v2_blocks ($(dd_mib $((v2_nonzero * 4096))) MiB)"
  echo "  v2 4 KiB blocks nowhere in v1: $novel ($novel_nonzero non-zero, $(dd_mib $((novel * 4096))) MiB raw)"
  echo "  v2 files not in v1: $nnew ($(dd_mib "$bnew") MiB); files changed: $nchf ($(dd_mib "$bchf") MiB)"
  echo "packages changed v1 -> v2: $nchg ($nup upgraded, $nadd added, $ndel removed)"
  awk -F'\t' '{printf "  %-28s %-28s -> %s\n", $1, ($2 == "-" ? "(new)" : $2), ($3 == "-" ? "(removed)" : $3)}' "$work/changed-packages.txt"
  echo
  printf '%-46s %12s %8s %7s %9s %11s\n' method bytes MiB "% of Z" "encode s" "decode RSS"
  row() { printf '%-46s %12s %8s %7s %9s %11s\n' "$1" "$2" "$(dd_mib "$2")" "$(dd_pct "$2" "$z")" "$3" "$4"; }
  row "zstd -19 -T0 v2.img (Z, full image)" "$z" "$z_secs" "-"
  row "zstd -19 --long=27 -T0 v2.img (info)" "$z27" "-" "-"
  row "zstd -19 --long=30 --patch-from=v1.img" "$pf" "$pf_secs" "$((pf_rss / 1024)) MiB"
  row "xdelta3 -e -9 -s v1.img" "$xd" "$xd_secs" "$((xd_rss / 1024)) MiB"
  row "xdelta3 -e -9 -B 512MiB -s v1.img (info)" "$xdb" "$xdb_secs" "$((xdb_rss / 1024)) MiB"
  row "fixed 4K blocks not in v1, zstd -19" "$fx" "$fx_secs" "-"
  row "new files of v2, tar | zstd -19 (info)" "$fnew" "-" "-"
  row "changed files of v2, tar | zstd -19 (info)" "$fchf" "-" "-"

  local envf=$work/baselines.env
  cat >"$envf.tmp" <<EOF
# Written by bench/delta-data.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ); sizes in bytes.
V1_IMG=$v1
V2_IMG=$v2
IMG_SIZE_BYTES=$((size_mib << 20))
V1_TREE_DU=$du1
V2_TREE_DU=$du2
V1_PACKAGES=$n1
V2_PACKAGES=$n2
CHANGED_PACKAGES=$nchg
UPGRADED_PACKAGES=$nup
ADDED_PACKAGES=$nadd
REMOVED_PACKAGES=$ndel
V2_BLOCKS=$v2_blocks
V2_NONZERO_BLOCKS=$v2_nonzero
V2_NOVEL_BLOCKS=$novel
V2_NOVEL_NONZERO_BLOCKS=$novel_nonzero
Z_BYTES=$z
Z_LONG27_BYTES=$z27
PATCH_FROM_BYTES=$pf
PATCH_FROM_DECODE_RSS_KIB=$pf_rss
PATCH_FROM_ENCODE_RSS_KIB=$pf_enc_rss
XDELTA_BYTES=$xd
XDELTA_DECODE_RSS_KIB=$xd_rss
XDELTA_ENCODE_RSS_KIB=$xd_enc_rss
XDELTA_B512_BYTES=$xdb
XDELTA_B512_DECODE_RSS_KIB=$xdb_rss
XDELTA_B512_ENCODE_RSS_KIB=$xdb_enc_rss
FIXED4K_BYTES=$fx
NEW_FILES=$nnew
NEW_FILES_RAW_BYTES=$bnew
NEW_FILES_TAR_ZSTD_BYTES=$fnew
CHANGED_FILES=$nchf
CHANGED_FILES_RAW_BYTES=$bchf
CHANGED_FILES_TAR_ZSTD_BYTES=$fchf
EOF
  mv "$envf.tmp" "$envf"
  echo
  echo "images: $v1 $v2; figures: $envf"
  dd_final="baselines: zstd-19 $(dd_mib "$z") MiB; patch-from $(dd_mib "$pf") MiB ($(dd_pct "$pf" "$z")%);"
  dd_final+=" xdelta3 $(dd_mib "$xd") MiB ($(dd_pct "$xd" "$z")%); fixed-4K $(dd_mib "$fx") MiB ($(dd_pct "$fx" "$z")%)"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  dd_main "$@"
else
  # Sourced (e.g. by bench/delta.sh): run in a subshell so the traps and exits stay there, then
  # bring the figures into the caller.
  (dd_main "$@") || return
  . "$BENCH_DIR/delta/baselines.env"
fi
