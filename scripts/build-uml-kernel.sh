#!/usr/bin/env bash
# Build (once) and cache a User-Mode Linux kernel that runs on every CPU of this machine kind,
# also those with AMX (where Debian 12's linux.uml 6.1 and Debian 13's 6.12 panic at the first
# user process: "ptrace set fp regs failed, errno = 14"; UML sizes its FP registers from the
# host only since about 6.13).
#
# Route, nothing from outside Debian's package registry:
#   Debian's linux-source-X.Y package, fetched by name from another suite's index kept in a
#   private apt state directory (the host's own apt sources and lists stay untouched)
#   -> dpkg -x -> untar -> make ARCH=um defconfig + the options below built in (no modules)
#   -> make ARCH=um linux -> strip -> CACHE/<source-version>.<build time>/linux.uml (unionimg
#   finds its guests by that name) with config, recipe and build-info beside it, built aside
#   and renamed into place; then the symlink CACHE/current is switched to it atomically
#   (builds other than current are removed a day later). A rerun finds CACHE/current built
#   by the same recipe and does nothing (no network).
#
# Usage: build-uml-kernel.sh [--cache DIR] [--jobs N] [--force] [--print-recipe]
#                            [--resolve-only] [--version V]
#   prints the kernel's path on stdout (progress on stderr); --resolve-only prints the source
#   package and version it would build ("PACKAGE VERSION") and stops; --version V asks for
#   another version of the pinned package (the newest >= 6.13 if that one is not there).
# Build dependencies (scripts/setup.sh installs them): gcc make flex bison bc libelf-dev
# xz-utils, and apt-get/dpkg-deb.
set -euo pipefail

# --- the recipe (changing any of it makes a new build) --------------------------------------
# The pinned source: trixie-backports keeps several versions of a package for a while.
PIN_PACKAGE=linux-source-7.2
PIN_VERSION=7.2.12-1~bpo13+1
# Where it is looked up; if the pinned version is gone, the newest linux-source-X.Y >= MIN_SERIES
# found in these suites is used instead (and recorded).
MIRROR=http://deb.debian.org/debian
SUITES=(trixie-backports sid)
MIN_SERIES=6.13
# Built in (each must read =y after olddefconfig, or the build stops).
ENABLE=(
  BLK_DEV_UBD       # ubdN disks
  BLK_DEV_INITRD    # initrd=
  EXT4_FS           # BASE and U
  OVERLAY_FS        # the union root
  DEVTMPFS DEVTMPFS_MOUNT
  UML_NET_VECTOR TUN  # vecN:transport=tap
  MCONSOLE MAGIC_SYSRQ PROC_FS  # unionimg's clean stop (sysrq s/u, proc mounts, halt)
  UNIX INET PACKET
  BINFMT_ELF BINFMT_SCRIPT
)
DISABLE=(MODULES)  # everything built in: there are no modules to carry in the initramfs
RECIPE_REV=1       # bump when the steps below change in a way that changes the binary

CACHE=${UNIONIMG_UML_CACHE:-/var/cache/unionimg/uml}
JOBS=$(nproc)
FORCE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cache) CACHE=$2; shift 2 ;;
    --jobs) JOBS=$2; shift 2 ;;
    --force) FORCE=1; shift ;;
    --print-recipe) PRINT_RECIPE=1; shift ;;
    --resolve-only) RESOLVE_ONLY=1; shift ;;
    --version) PIN_VERSION=$2; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-uml-kernel: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

recipe() {  # the text whose hash names a build's recipe; $1 = source version
  printf 'package=%s\nversion=%s\nrecipe_rev=%s\nenable=%s\ndisable=%s\narch=%s\n' \
    "$PKG" "$1" "$RECIPE_REV" "${ENABLE[*]}" "${DISABLE[*]}" "$(uname -m)"
}
PKG=$PIN_PACKAGE
if [ "${PRINT_RECIPE:-0}" = 1 ]; then recipe "$PIN_VERSION"; exit 0; fi

say() { echo "build-uml-kernel: $*" >&2; }
die() { echo "build-uml-kernel: error: $*" >&2; exit 1; }

# A finished build: DIR/linux.uml executable and DIR/recipe equal to this script's recipe.
done_build() {  # $1 = dir, $2 = version
  [ -x "$1/linux.uml" ] && [ -f "$1/recipe" ] && [ "$(cat "$1/recipe")" = "$(recipe "$2")" ]
}
finish() {  # $1 = dir: point CACHE/current at it (atomic rename), drop older builds, print
  local dir name
  name=$(basename "$1")
  if [ "$(readlink "$CACHE/current" 2>/dev/null)" != "$name" ]; then
    ln -sfn "$name" "$CACHE/.current.new"
    mv -T "$CACHE/.current.new" "$CACHE/current"
  fi
  for dir in "$CACHE"/*/; do  # other builds, once a day old (nobody is about to start them)
    dir=${dir%/}
    if [ -f "$dir/recipe" ] && [ "$(basename "$dir")" != "$name" ] \
        && [ -n "$(find "$dir/recipe" -mmin +1440)" ]; then
      rm -rf "$dir"
    fi
  done
  echo "$1/linux.uml"
}
CURRENT=$CACHE/current

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock -w 3600 9 || die "another build holds $CACHE/.lock"

# 1. The pinned version already built: nothing to do (no network).
if [ "$FORCE" = 0 ] && [ "${RESOLVE_ONLY:-0}" = 0 ] && done_build "$CURRENT" "$PIN_VERSION"; then
  say "cached: $(readlink -f "$CURRENT")/linux.uml"
  finish "$(readlink -f "$CURRENT")"
  exit 0
fi

for tool in apt-get apt-cache dpkg-deb make gcc flex bison bc tar xz strip; do
  command -v "$tool" >/dev/null || die "'$tool' is missing; run scripts/setup.sh as root"
done
[ -f /usr/include/gelf.h ] || die "libelf-dev is missing; run scripts/setup.sh as root"

# 2. A private apt state: its own sources, lists and package cache.
APTDIR=$CACHE/apt
mkdir -p "$APTDIR/lists/partial" "$APTDIR/cache/archives/partial" "$APTDIR/sources.list.d"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -f "$keyring" ] || die "$keyring is missing (apt-get install debian-archive-keyring)"
: >"$APTDIR/sources.list.new"
for s in "${SUITES[@]}"; do
  echo "deb [signed-by=$keyring] $MIRROR $s main" >>"$APTDIR/sources.list.new"
done
mv "$APTDIR/sources.list.new" "$APTDIR/sources.list"
APT_OPTS=(
  -o "Dir::State::Lists=$APTDIR/lists" -o "Dir::Etc::SourceList=$APTDIR/sources.list"
  -o "Dir::Etc::SourceParts=$APTDIR/sources.list.d" -o "Dir::Cache=$APTDIR/cache"
  -o "Dir::State::Status=/var/lib/dpkg/status" -o "APT::Get::List-Cleanup=1"
)
say "reading the package index of ${SUITES[*]} (private lists in $APTDIR)"
apt-get -q "${APT_OPTS[@]}" update >&2 || die "apt-get update of ${SUITES[*]} failed"

# 3. Choose the source: the pin, or the newest linux-source-X.Y >= MIN_SERIES.
version_ge() { dpkg --compare-versions "$1" ge "$2"; }
VERSION=
if apt-cache "${APT_OPTS[@]}" madison "$PIN_PACKAGE" | awk -F'|' '{gsub(/ /,"",$2); print $2}' \
    | grep -qxF "$PIN_VERSION"; then
  VERSION=$PIN_VERSION
else
  best_pkg= best_ver=
  while read -r name; do
    series=${name#linux-source-}
    [[ $series =~ ^[0-9]+\.[0-9]+$ ]] || continue
    version_ge "$series" "$MIN_SERIES" || continue
    while read -r ver; do
      if [ -z "$best_ver" ] || dpkg --compare-versions "$ver" gt "$best_ver"; then
        best_pkg=$name best_ver=$ver
      fi
    done < <(apt-cache "${APT_OPTS[@]}" madison "$name" | awk -F'|' '{gsub(/ /,"",$2); print $2}')
  done < <(apt-cache "${APT_OPTS[@]}" pkgnames linux-source- | sort)
  [ -n "$best_ver" ] || die "no linux-source >= $MIN_SERIES in ${SUITES[*]} of $MIRROR"
  say "pinned $PIN_PACKAGE $PIN_VERSION is gone from ${SUITES[*]}; using $best_pkg $best_ver"
  PKG=$best_pkg VERSION=$best_ver
fi
if [ "${RESOLVE_ONLY:-0}" = 1 ]; then echo "$PKG $VERSION"; exit 0; fi
if [ "$FORCE" = 0 ] && done_build "$CURRENT" "$VERSION"; then
  say "cached: $(readlink -f "$CURRENT")/linux.uml"
  finish "$(readlink -f "$CURRENT")"
  exit 0
fi
DEST=$CACHE/$VERSION.$(date -u +%Y%m%dT%H%M%SZ)

# 4. Build aside, in the cache's file system (so the final rename is atomic).
WORK=$(mktemp -d "$CACHE/.build-XXXXXX")
trap 'rm -rf "$WORK"' EXIT
start=$(date +%s)
say "downloading $PKG $VERSION"
mkdir "$WORK/dl"
if id _apt >/dev/null 2>&1; then  # apt downloads as _apt where it can (its sandbox)
  chmod 0755 "$WORK"
  chown _apt "$WORK/dl"
fi
(cd "$WORK/dl" && apt-get -q "${APT_OPTS[@]}" download "$PKG=$VERSION" >&2) \
  || die "apt-get download $PKG=$VERSION failed"
deb=$(ls "$WORK"/dl/*.deb)
deb_sha=$(sha256sum "$deb" | cut -d' ' -f1)
dpkg-deb -x "$deb" "$WORK/pkg"
tarball=$(ls "$WORK"/pkg/usr/src/linux-source-*.tar.*)
say "unpacking $(basename "$tarball")"
mkdir "$WORK/src"
tar -xf "$tarball" -C "$WORK/src" --strip-components=1
rm -rf "$WORK/pkg" "$deb"
cd "$WORK/src"
say "configuring (ARCH=um defconfig + ${ENABLE[*]}; without ${DISABLE[*]})"
make -s ARCH=um defconfig >&2
args=()
for o in "${ENABLE[@]}"; do args+=(--enable "$o"); done
for o in "${DISABLE[@]}"; do args+=(--disable "$o"); done
scripts/config "${args[@]}"
make -s ARCH=um olddefconfig >&2
for o in "${ENABLE[@]}"; do
  grep -qx "CONFIG_$o=y" .config || die "CONFIG_$o is not =y after olddefconfig ($PKG $VERSION)"
done
for o in "${DISABLE[@]}"; do
  ! grep -q "^CONFIG_$o=" .config || die "CONFIG_$o is still set after olddefconfig"
done
say "building (make ARCH=um -j$JOBS linux; a few minutes)"
make ARCH=um -j"$JOBS" KBUILD_BUILD_USER=unionimg KBUILD_BUILD_HOST=unionimg \
  KBUILD_BUILD_TIMESTAMP="$VERSION" linux >"$WORK/build.log" 2>&1 \
  || { tail -30 "$WORK/build.log" >&2; die "kernel build failed ($PKG $VERSION)"; }
mkdir "$WORK/out"
strip -o "$WORK/out/linux.uml" linux
cp .config "$WORK/out/config"
release=$(make -s ARCH=um kernelrelease)
end=$(date +%s)
{
  echo "package=$PKG"
  echo "version=$VERSION"
  echo "release=$release"
  echo "deb_sha256=$deb_sha"
  echo "suites=${SUITES[*]}"
  echo "mirror=$MIRROR"
  echo "build_seconds=$((end - start))"
  echo "built_on=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
  echo "gcc=$(gcc --version | head -1)"
} >"$WORK/out/build-info"
recipe "$VERSION" >"$WORK/out/recipe"
cd /
mv -T "$WORK/out" "$DEST"
say "built $PKG $VERSION (release $release) in $((end - start)) s: $DEST/linux.uml"
finish "$DEST"
