#!/usr/bin/env bash
# Does scripts/setup.sh's package list resolve on Debian 13 (trixie)? Run as root.
#
# Makes (once, cached) a minimal trixie root with mmdebstrap (variant apt, package lists
# kept), refreshes its package lists when they are older than a day, then inside it (chroot):
#   apt-get install --simulate --no-install-recommends $(setup.sh --print-packages --debian 13)
# and checks that the packages providing what unionimg runs carry those files (libvirtd, the
# QEMU driver, linux.uml, a static busybox, mmdebstrap), downloading only those few .debs.
# Nothing on the host changes but the cache directory; only Debian's package registry is used.
#
# Usage: check-debian13.sh [--root DIR] [--refresh]
#   DIR defaults to /var/cache/unionimg/debian13-root; --refresh remakes it.
# Prints one summary line on stdout; exit 0 when everything resolves, 1 otherwise.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
SUITE=trixie
MIRROR=http://deb.debian.org/debian
ROOT=/var/cache/unionimg/debian13-root
REFRESH=0
while [ $# -gt 0 ]; do
  case "$1" in
    --root) ROOT=$2; shift 2 ;;
    --refresh) REFRESH=1; shift ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "check-debian13: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
say() { echo "check-debian13: $*" >&2; }
die() { echo "check-debian13: error: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (mmdebstrap and chroot)"
command -v mmdebstrap >/dev/null || die "mmdebstrap is missing (apt-get install mmdebstrap)"

mkdir -p "$(dirname "$ROOT")"
exec 9>"$ROOT.lock"
flock -w 600 9 || die "another check holds $ROOT.lock"

# 1. the trixie root, made aside and renamed into place
if [ "$REFRESH" = 1 ]; then rm -rf "$ROOT"; fi
if [ ! -f "$ROOT/.unionimg-complete" ]; then
  rm -rf "$ROOT" "$ROOT.new"
  say "making a minimal $SUITE root in $ROOT (mmdebstrap, variant apt)"
  mmdebstrap --quiet --mode=root --variant=apt --components=main \
    --skip=cleanup/apt/lists \
    "$SUITE" "$ROOT.new" \
    "deb $MIRROR $SUITE main" \
    "deb $MIRROR $SUITE-updates main" \
    "deb http://security.debian.org/debian-security $SUITE-security main" >&2 \
    || die "mmdebstrap of $SUITE failed"
  touch "$ROOT.new/.unionimg-complete" "$ROOT.new/var/lib/apt/.unionimg-updated"
  mv -T "$ROOT.new" "$ROOT"
fi
[ "$(cut -d. -f1 "$ROOT/etc/debian_version")" = 13 ] \
  || die "$ROOT is not Debian 13 (debian_version $(cat "$ROOT/etc/debian_version"))"

in_root() {  # run a command in the root with DNS, as apt expects
  cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
  chroot "$ROOT" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive "$@"
}

# 2. fresh package lists (a day old at most)
stamp=$ROOT/var/lib/apt/.unionimg-updated
if [ ! -f "$stamp" ] || [ -n "$(find "$stamp" -mmin +1440)" ]; then
  say "refreshing the package lists of $SUITE"
  in_root apt-get -q update >&2 || die "apt-get update in the $SUITE root failed"
  touch "$stamp"
fi

# 3. the simulated install
mapfile -t pkgs < <("$here/scripts/setup.sh" --print-packages --debian 13)
[ ${#pkgs[@]} -gt 0 ] || die "setup.sh --print-packages printed nothing"
log=$ROOT.simulate.log
if ! in_root apt-get install --simulate --no-install-recommends -q "${pkgs[@]}" >"$log" 2>&1; then
  grep -E "^E:|Unable to locate|has no installation candidate|Depends:|unmet" "$log" >&2 || tail -20 "$log" >&2
  die "apt-get install --simulate of setup.sh's ${#pkgs[@]} packages fails on Debian 13 (log: $log)"
fi
installs=$(grep -c '^Inst ' "$log" || true)
for p in "${pkgs[@]}"; do  # each named package is installed by name (no virtual stand-in)
  grep -qE "^Inst $p( |:)" "$log" \
    || in_root dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "install ok installed" \
    || die "setup.sh names '$p' but Debian 13 would not install a package of that name"
done

# 4. the files unionimg runs, in the packages that should carry them
check_file() {  # $1 = package, $2 = extended regex of a path in it
  local deb
  rm -rf "$ROOT/tmp/debs" && mkdir -p "$ROOT/tmp/debs" && chmod 0777 "$ROOT/tmp/debs"
  (cd "$ROOT/tmp/debs" && in_root sh -c "cd /tmp/debs && apt-get -q download $1" >/dev/null 2>&1) \
    || die "apt-get download $1 failed in the $SUITE root"
  deb=$(ls "$ROOT"/tmp/debs/*.deb)
  listing=$(dpkg-deb -c "$deb" | awk '{print $6}')
  grep -qE "$2" <<<"$listing" || die "Debian 13's $1 has no $2"
  version=$(dpkg-deb -f "$deb" Version)
  rm -rf "$ROOT/tmp/debs"
  say "$1 $version has $2"
}
check_file libvirt-daemon '^\./usr/sbin/libvirtd$'
check_file libvirt-daemon-driver-qemu 'libvirt_driver_qemu\.so$'
check_file user-mode-linux '^\./usr/bin/linux\.uml$'
check_file busybox-static '^\./(usr/)?bin/busybox$'
check_file qemu-system-x86 '^\./usr/bin/qemu-system-x86_64$'
uml=$(grep -E '^Inst user-mode-linux ' "$log" | sed 's/^Inst user-mode-linux (\([^ ]*\).*/\1/')
echo "Debian 13 ($SUITE): setup.sh's ${#pkgs[@]} packages resolve (${installs} to install;" \
  "user-mode-linux $uml)"
