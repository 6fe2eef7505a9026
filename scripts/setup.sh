#!/usr/bin/env bash
# Idempotent set-up for a Debian 12 (bookworm) or 13 (trixie) machine, run as root:
#   1. the Debian packages unionimg uses (only the missing ones are installed);
#   2. .venv with unionimg and its Python dependencies;
#   3. a User-Mode Linux kernel that boots here: Debian's /usr/bin/linux.uml when its probe
#      passes (unionimg uml-kernel), else one built from Debian's linux-source >= 6.13 by
#      scripts/build-uml-kernel.sh and cached in /var/cache/unionimg/uml (CPUs with AMX:
#      Debian 12's UML 6.1 and Debian 13's 6.12 panic at their first user process).
# Safe to rerun: each step does nothing when its result is already there.
#
# Usage: setup.sh                      set up this machine
#        setup.sh --print-packages [--debian 12|13]
#                                      print the Debian package list (for this machine's
#                                      release, or the one given) one a line, and exit
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

# --- the package list ---------------------------------------------------------------------
debian_major() {  # 12, 13, ... from /etc/debian_version ("12.11", "13.2", "trixie/sid")
  local v
  v=$(cat /etc/debian_version 2>/dev/null || echo unknown)
  case "$v" in
    [0-9]*) echo "${v%%.*}" ;;
    bookworm*) echo 12 ;;
    trixie*) echo 13 ;;
    *) echo "setup: /etc/debian_version says '$v'; this set-up knows Debian 12 and 13" >&2
       echo 0 ;;
  esac
}

packages() {  # $1 = Debian major release
  # Guests and hypervisors: QEMU (TCG or KVM) driven by libvirtd; User-Mode Linux. libvirt's
  # QEMU driver is its own package on both releases (libvirt-daemon only Recommends it from
  # Debian 13 on, and setup installs without recommends).
  echo qemu-system-x86 qemu-utils user-mode-linux linux-image-amd64 busybox-static
  echo libvirt-daemon-system libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
  echo libvirt-dev libxml2-utils
  # images, mounts, initramfs, boot disks
  echo fuse-overlayfs e2fsprogs attr cpio kmod iproute2 util-linux zstd
  # fincore: the tests check which of a file's pages a layer import left in the page cache
  echo util-linux-extra
  # hosts reached over SSH (deploy); the tests start one sshd per namespace host
  echo openssh-client openssh-server
  echo syslinux syslinux-common mtools dosfstools mmdebstrap
  # the image repository: CNCF Distribution (unionimg registry serve, the registry tests);
  # skopeo: a standard client the interop test lists, inspects and copies unionimg's nodes with
  echo docker-registry skopeo
  # bench/migrate.py's peers: rsync, casync, zsync
  echo rsync casync zsync
  # the VM repositories; python3-venv for `python3 -m venv` with Debian's own python3
  echo mercurial python3-venv
  # scripts/build-uml-kernel.sh: fetches Debian's linux-source with apt, builds with these
  echo gcc make flex bison bc libelf-dev xz-utils binutils libc6-dev debian-archive-keyring
  case "$1" in
    12) echo pkg-config ;;
    *) echo pkgconf ;;  # Debian 13: pkg-config is pkgconf (the old name is transitional)
  esac
}

if [ "${1:-}" = --print-packages ]; then
  major=$(debian_major)
  if [ "${2:-}" = --debian ]; then major=${3:?--debian needs 12 or 13}; fi
  packages "$major" | tr ' ' '\n' | sed '/^$/d'
  exit 0
fi
[ $# -eq 0 ] || { echo "setup: unknown arguments: $* (see the header of $0)" >&2; exit 2; }

# --- 1. Debian packages ---------------------------------------------------------------------
major=$(debian_major)
mapfile -t APT_PACKAGES < <(packages "$major" | tr ' ' '\n' | sed '/^$/d')
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: missing Debian packages (${missing[*]}); run this as root to install them" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# --- 2. .venv -------------------------------------------------------------------------------
# The python3 on PATH (pyenv's 3.11 on this machine kind); never Debian's python3-* modules.
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.unionimg-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  touch "$stamp"
fi

# --- 3. a UML kernel that boots here ----------------------------------------------------------
uml_source() {  # prints packaged | built | override, or nothing when no UML kernel boots
  # (uml-kernel exits non-zero when none boots; that answer is the empty string, not a failure
  # of this script under pipefail)
  local json
  json=$(env -u UNIONIMG_UML_KERNEL .venv/bin/unionimg uml-kernel --json 2>/dev/null) || true
  sed -n 's/^ *"source": "\([a-z]*\)",\{0,1\}$/\1/p' <<<"$json"
}
source=$(uml_source)
if [ "$source" != packaged ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: Debian's /usr/bin/linux.uml does not boot here; run this as root to build one" >&2
    exit 1
  fi
  echo "setup: Debian's /usr/bin/linux.uml does not boot on this host; building/finding one"
  scripts/build-uml-kernel.sh >/dev/null
  source=$(uml_source)
  if [ "$source" != built ]; then
    env -u UNIONIMG_UML_KERNEL .venv/bin/unionimg uml-kernel >&2 || true
    echo "setup: error: the UML kernel built by scripts/build-uml-kernel.sh does not boot" >&2
    exit 1
  fi
fi
env -u UNIONIMG_UML_KERNEL .venv/bin/unionimg uml-kernel | sed 's/^/setup: /'
echo "setup: ready (.venv/bin/unionimg)"
