#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine (run as root): apt packages + .venv.
# Safe to rerun: installs only what is missing.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

APT_PACKAGES=(
  qemu-system-x86 qemu-utils user-mode-linux linux-image-amd64 busybox-static mercurial
  libvirt-daemon-system libvirt-clients fuse-overlayfs e2fsprogs libxml2-utils libvirt-dev
  pkg-config mmdebstrap attr cpio kmod iproute2 util-linux syslinux syslinux-common mtools
  dosfstools zstd
)

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
echo "setup: ready (.venv/bin/unionimg)"
