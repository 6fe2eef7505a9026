#!/bin/sh
# unionimg guest early boot: the /init of the unionimg initramfs (busybox sh).
#
# 1. mount /proc, /sys, /dev (devtmpfs) and take the console;
# 2. insmod the modules listed for `uname -r` in /lib/modules/<ver>/unionimg.load
#    (one initramfs serves several kernels, e.g. Debian amd64 under QEMU/Xen and UML);
# 3. find the disks BY LABEL ONLY (vda, xvda, sda, ubda differ per hypervisor), waiting for
#    LABEL=BASE, LABEL=U and every layer of unionimg.lowers= to show up;
# 4. mount BASE and each layer read-only without journal replay and U read-write under
#    /run/unionimg/, and their overlay union (lower: the layers top to bottom, then BASE;
#    upper U/upper, work U/work) on /newroot;
# 5. move /dev, /proc, /sys and /run (with the BASE and U mounts) into the union and
#    switch_root to the base's init (/sbin/init, or init= from the kernel command line).
#
# Kernel command line: init=PATH, unionimg.debug (a shell instead of power-off on failure),
# unionimg.timeout=SECONDS (how long to wait for the disks, default 10),
# unionimg.lowers=LABEL,...,BASE (the VM's image chain, top to bottom: the labels of its layer
# images, L + 15 hex digits of the layer's diff_id, then BASE; written by the host, never read
# from U). Without unionimg.lowers the only lower layer is BASE.
# Every message starts with "unionimg-init:"; a failure prints "unionimg-init: error: ..."
# and powers the machine off so that nothing waits forever on a console.
#
# The host reads this console (unionimg.layers.running): the last line before the hand-over,
# "unionimg-init: switching root to the union of BASE and U, starting INIT", is the READINESS
# LINE (everything above succeeded); "unionimg-init: error: ..." is a failure quoted to the
# admin (boot exits 9). If switch_root cannot execute INIT, or INIT exits, PID 1 is gone and
# the kernel panics ("Attempted to kill init!"); the kernel runs with panic=-1, so the guest
# resets at once and the host reports the panic. Keep these lines' wording.

PATH=/bin:/sbin
export PATH

# The exact overlay options; the host side (unionimg.mounts.OVERLAY_OPTIONS) uses the same.
OVL_OPTS="redirect_dir=off,metacopy=off,index=off,xino=off"
RUNDIR=/run/unionimg
BASE_MNT=$RUNDIR/base
LAYER_MNT=$RUNDIR/layers
U_MNT=$RUNDIR/u
NEWROOT=/newroot
REAL_INIT=/sbin/init
DEBUG=0
WAIT=10
LOWERS=""
LAYERS="" # the layer labels above BASE, top first, separated by blanks

say() {
	echo "unionimg-init: $*"
}

debug_shell() {
	/bin/busybox --install -s /bin 2>/dev/null
	say "unionimg.debug: starting a shell on the console; exit it to power off"
	setsid cttyhack /bin/sh || /bin/sh
}

fail() {
	say "error: $*"
	if [ "$DEBUG" = 1 ]; then
		debug_shell
	else
		say "powering off (boot with unionimg.debug for a shell instead)"
	fi
	sync
	umount "$NEWROOT" "$U_MNT" "$BASE_MNT" 2>/dev/null
	for label in $LAYERS; do umount "$LAYER_MNT/$label" 2>/dev/null; done
	poweroff -f
	# PID 1 must never exit (that is a kernel panic); wait for the power to go.
	while :; do sleep 60; done
}

mkdir -p /proc /sys /dev /run "$NEWROOT"
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev || fail "cannot mount devtmpfs on /dev"
if [ -c /dev/console ]; then
	exec </dev/console >/dev/console 2>&1
fi

set -f # the command line is split on blanks below, never globbed
read -r CMDLINE </proc/cmdline
for arg in $CMDLINE; do
	case "$arg" in
	init=*) REAL_INIT=${arg#init=} ;;
	unionimg.debug | unionimg.debug=1 | unionimg.debug=y*) DEBUG=1 ;;
	unionimg.timeout=*) WAIT=${arg#unionimg.timeout=} ;;
	unionimg.lowers=*) LOWERS=${arg#unionimg.lowers=} ;;
	esac
done
set +f
case "$WAIT" in
'' | *[!0-9]*)
	say "ignoring unionimg.timeout=$WAIT (not a whole number of seconds)"
	WAIT=10
	;;
esac

# The chain, checked whole before any disk is looked for: each label L + 15 lower-case hex
# digits (so it is safe in a variable name and a path), none twice, BASE last and only there.
if [ -n "$LOWERS" ]; then
	rest="$LOWERS,"
	bottom=0
	while [ -n "$rest" ]; do
		label=${rest%%,*}
		rest=${rest#*,}
		[ "$bottom" = 0 ] || fail "unionimg.lowers=$LOWERS: BASE must be the last (bottom) layer"
		case "$label" in
		BASE) bottom=1 ;;
		L???????????????)
			case "${label#L}" in *[!0-9a-f]*)
				fail "unionimg.lowers=$LOWERS: '$label' is not a layer label (L and 15 hex digits)"
				;;
			esac
			case " $LAYERS " in *" $label "*)
				fail "unionimg.lowers=$LOWERS: layer $label is named twice"
				;;
			esac
			LAYERS="${LAYERS:+$LAYERS }$label"
			;;
		*) fail "unionimg.lowers=$LOWERS: '$label' is not a layer label (L and 15 hex digits)" ;;
		esac
	done
	[ "$bottom" = 1 ] || fail "unionimg.lowers=$LOWERS: the last (bottom) layer must be BASE"
fi

KVER=$(uname -r)
say "starting (kernel $KVER)"

# --- modules -------------------------------------------------------------------------------
MODDIR=/lib/modules/$KVER
if [ -f "$MODDIR/unionimg.load" ]; then
	loaded=0
	skipped=""
	while read -r mod; do
		[ -n "$mod" ] || continue
		if why=$(insmod "$MODDIR/$mod" 2>&1); then
			loaded=$((loaded + 1))
		else
			name=${mod##*/}
			skipped="$skipped ${name%.ko} (${why##*: })"
			[ "$DEBUG" = 1 ] && say "insmod $mod: $why"
		fi
	done <"$MODDIR/unionimg.load"
	say "loaded $loaded modules${skipped:+; not loaded:$skipped}"
else
	say "no modules for kernel $KVER in this initramfs; relying on built-in drivers"
fi

# --- disks, by label only ------------------------------------------------------------------
uptime_now() { # NOW = seconds since boot, in hundredths (/proc/uptime has two decimals)
	read -r NOW _ </proc/uptime
	NOW=$((${NOW%.*} * 100 + 1${NOW#*.} - 100))
}

# One pass reads the label of every block device that has a size (bytes 1144-1159 of the
# device: s_volume_name of an ext2/3/4 superblock), one small dd each, and keeps the first
# device of each label wanted. (busybox findfs probes every device once per label looked for:
# ~170 ms a label under UML, measured.) A label found stays found.
scan_labels() {
	for sys in /sys/class/block/*; do
		size=0
		read -r size <"$sys/size" 2>/dev/null
		[ "${size:-0}" -gt 0 ] 2>/dev/null || continue
		name=${sys##*/}
		dev=/dev/${name//!/\/}
		[ -b "$dev" ] || continue
		found=$(dd if="$dev" bs=8 skip=143 count=2 2>/dev/null) # ash drops the NUL padding
		case "$found" in
		BASE) [ -n "$BASE_DEV" ] || BASE_DEV=$dev ;;
		U) [ -n "$U_DEV" ] || U_DEV=$dev ;;
		L???????????????)
			# a label of the chain (checked above: L + hex digits) is safe in eval; the label
			# read from a disk is not (U is the guest's), so it must equal one of them
			case " $LAYERS " in *" $found "*)
				eval "[ -n \"\$DEV_$found\" ] || DEV_$found=\$dev"
				;;
			esac
			;;
		esac
	done
}

BASE_DEV=""
U_DEV=""
uptime_now
deadline=$((NOW + WAIT * 100))
while :; do
	scan_labels
	lacking="" # layer labels not found yet
	for label in $LAYERS; do
		eval "dev=\$DEV_$label"
		[ -n "$dev" ] || lacking="${lacking:+$lacking }$label"
	done
	[ -n "$BASE_DEV" ] && [ -n "$U_DEV" ] && [ -z "$lacking" ] && break
	uptime_now
	if [ "$NOW" -ge "$deadline" ]; then
		missing=""
		[ -n "$BASE_DEV" ] || missing="LABEL=BASE"
		[ -n "$U_DEV" ] || missing="${missing:+$missing and }LABEL=U"
		for label in $lacking; do missing="${missing:+$missing and }LABEL=$label"; done
		what=""
		[ -n "$BASE_DEV" ] && [ -n "$U_DEV" ] || what="the BASE image and this VM's U image"
		[ -z "$lacking" ] ||
			what="${what:+$what and }the layer images of its chain ($lacking; unionimg layer show)"
		seen=$(ls /sys/class/block 2>/dev/null | tr '\n' ' ')
		fail "no disk with $missing after ${WAIT} s (block devices: ${seen:-none});" \
			"attach $what"
	fi
	sleep 0.1
done
say "BASE is $BASE_DEV, U is $U_DEV"
LOWERDIR=""
LOWER_DEVS=""
for label in $LAYERS; do
	eval "dev=\$DEV_$label"
	say "layer $label is $dev"
	LOWERDIR="$LOWERDIR$LAYER_MNT/$label:"
	LOWER_DEVS="$LOWER_DEVS$dev, "
done
LOWERDIR=$LOWERDIR$BASE_MNT
LOWER_DEVS=$LOWER_DEVS$BASE_DEV

# --- mounts --------------------------------------------------------------------------------
mount -t tmpfs -o nosuid,nodev,mode=0755,size=10% tmpfs /run || fail "cannot mount tmpfs on /run"
layer_dirs="" # one mkdir for all (each program run costs a fork: ~tens of ms under UML)
for label in $LAYERS; do layer_dirs="$layer_dirs $LAYER_MNT/$label"; done
# shellcheck disable=SC2086 # labels are L + hex digits: nothing to split or glob
mkdir -p "$BASE_MNT" "$U_MNT" $layer_dirs
mount -t ext4 -o ro,noload "$BASE_DEV" "$BASE_MNT" ||
	fail "cannot mount BASE ($BASE_DEV) read-only on $BASE_MNT"
for label in $LAYERS; do
	eval "dev=\$DEV_$label"
	mount -t ext4 -o ro,noload "$dev" "$LAYER_MNT/$label" ||
		fail "cannot mount layer $label ($dev) read-only on $LAYER_MNT/$label"
done
mount -t ext4 -o rw "$U_DEV" "$U_MNT" || fail "cannot mount U ($U_DEV) read-write on $U_MNT"
for d in upper work; do
	if [ ! -d "$U_MNT/$d" ]; then
		mkdir -m 0755 "$U_MNT/$d" || fail "U ($U_DEV) has no $d/ and it cannot be made"
		say "made the missing $d/ on U"
	fi
done
mount -t overlay -o "lowerdir=$LOWERDIR,upperdir=$U_MNT/upper,workdir=$U_MNT/work,$OVL_OPTS" \
	overlay "$NEWROOT" || fail "cannot mount the overlay of ${LAYERS:+the layers, }BASE and U on $NEWROOT"

# NIC naming for this VM's fixed MAC: unionimg renders a udev rule and a systemd .link file
# (udev_rules/) into the instance's part of the initramfs; the guest's
# udev reads them from /run, which moves into the union root below. Nothing is written into
# BASE or U.
if [ -d /unionimg/net ]; then
	mkdir -p /run/udev/rules.d /run/systemd/network
	for f in /unionimg/net/*.rules; do [ -f "$f" ] && cp "$f" /run/udev/rules.d/; done
	for f in /unionimg/net/*.link; do [ -f "$f" ] && cp "$f" /run/systemd/network/; done
	say "NIC naming rules installed in /run for udev"
	# A NIC the hypervisor names otherwise (UML's vector driver: vec0) gets its name here,
	# from the rule udev would apply, so guests without udev see it too.
	while read -r line; do
		case "$line" in *'ATTR{address}=="'*'NAME="'*) ;; *) continue ;; esac
		mac=${line#*ATTR\{address\}==\"}
		mac=${mac%%\"*}
		nic=${line#*NAME=\"}
		nic=${nic%%\"*}
		for dev in /sys/class/net/*; do
			[ -e "$dev/address" ] && [ "${dev##*/}" != "$nic" ] || continue
			[ "$(cat "$dev/address")" = "$mac" ] || continue
			if ip link set "${dev##*/}" name "$nic"; then
				say "NIC ${dev##*/} (MAC $mac) renamed $nic"
			else
				say "warning: cannot rename NIC ${dev##*/} (MAC $mac) to $nic"
			fi
		done
	done </unionimg/net/70-unionimg-net.rules 2>/dev/null
fi

if [ ! -L "$NEWROOT$REAL_INIT" ] && [ ! -x "$NEWROOT$REAL_INIT" ]; then
	fail "no init $REAL_INIT in the union root (set init= on the kernel command line)"
fi

# --- hand over -----------------------------------------------------------------------------
# /run goes first and carries the BASE, layer and U mounts along, so admins find them at
# /run/unionimg/{base,layers/LABEL,u}; an init that finds /run already mounted keeps it.
for m in run dev proc sys; do
	if [ -d "$NEWROOT/$m" ]; then
		mount -o move "/$m" "$NEWROOT/$m" || say "warning: cannot move /$m into the union root"
	else
		say "warning: the base has no /$m directory; /$m stays behind in the initramfs"
	fi
done

say "switching root to the union of $LOWER_DEVS and $U_DEV, starting $REAL_INIT"
exec switch_root "$NEWROOT" "$REAL_INIT" "$@"
