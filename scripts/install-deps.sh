#!/usr/bin/env bash
# install-deps.sh [--lab] [--tests] [--kernel-vm]   Install what wgpunch needs, as root,
# on Debian (apt + pip). Idempotent: installed packages are skipped quickly.
#   (no flag)    the programs: python3 packages pyroute2, cffi and cryptography
#   --lab        + the netns lab: iproute2, nftables, wireguard-tools, wireguard-go, ping
#   --tests      + the test suite: the lab, pytest, scapy, prometheus-client, conntrack,
#                  tcpdump, redis-server (the --store tests start their own)
#   --kernel-vm  + the kernel WireGuard VM tests: qemu, busybox-static and a Debian
#                  kernel with the wireguard module (see ../shared/kernel-wg-vm.md)
set -euo pipefail
cd "$(dirname "$0")/.."
lab=0 tests=0 vm=0
for a in "$@"; do
  case $a in
    --lab) lab=1 ;;
    --tests) lab=1 tests=1 ;;
    --kernel-vm) vm=1 ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install-deps.sh: unknown option $a (see --help)" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "install-deps.sh: run as root (apt-get needs it)" >&2; exit 1; }

pkgs=(python3 python3-pip)
[ $lab = 1 ] && pkgs+=(iproute2 nftables wireguard-tools wireguard-go iputils-ping procps util-linux)
[ $tests = 1 ] && pkgs+=(conntrack tcpdump redis-server)
[ $vm = 1 ] && pkgs+=(qemu-system-x86 busybox-static cpio xz-utils zstd kmod linux-image-6.12-rt-amd64)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps.sh: apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # The VM boots the kernel image directly; no initramfs is needed for it.
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
pip_pkgs=("pyroute2>=0.7" "cffi>=1.15" "cryptography>=41")
[ $tests = 1 ] && pip_pkgs+=("pytest>=7" "scapy>=2.5" "prometheus-client>=0.17")
if ! "$PY" -c 'import pyroute2, cffi, cryptography' 2>/dev/null || { [ $tests = 1 ] && ! "$PY" -c 'import pytest, scapy, prometheus_client' 2>/dev/null; }; then
  echo "install-deps.sh: pip install ${pip_pkgs[*]}"
  "$PY" -m pip install -q --disable-pip-version-check "${pip_pkgs[@]}" 2>/dev/null ||
    "$PY" -m pip install -q --disable-pip-version-check --break-system-packages "${pip_pkgs[@]}"
fi
echo "install-deps.sh: ready"
