#!/usr/bin/env bash
# Prepare a Debian host for credless: the packages BCC and the tests need, kernel headers
# where BCC looks for them, and tracefs. Idempotent: every step checks before it acts, so a
# second run installs nothing and changes nothing. Needs root.
set -euo pipefail

log() { printf 'setup-host: %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "setup-host: must run as root (it installs packages and mounts tracefs)" >&2
  exit 1
fi

# python3-bpfcc: BCC's Python bindings and libbcc (BCC is not on PyPI; the PyPI 'bcc' is unrelated).
# linux-headers-amd64: BCC compiles bpf/*.c against kernel headers at load time.
# prometheus: for promtool, which lints our /metrics exposition in the tests.
# bpftool: lets tests and operators list programs, links and maps.
# iproute2: network namespaces for the injection tests.
# podman, runc, debootstrap: build the DaemonSet's image and run it (deploy/k8s/build-image.sh,
# tests/integration/test_container.py); runc because crun refuses hybrid cgroup layouts.
PACKAGES=(python3-bpfcc linux-headers-amd64 prometheus bpftool iproute2 python3-venv ca-certificates nginx wrk nodejs systemd podman runc debootstrap)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # prometheus' postinst wants to start a server; policy-rc.d 101 keeps setup from starting daemons.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d.credless
  chmod +x /usr/sbin/policy-rc.d.credless
  if [ ! -e /usr/sbin/policy-rc.d ]; then cp /usr/sbin/policy-rc.d.credless /usr/sbin/policy-rc.d; cleanup_rc=1; fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [ "${cleanup_rc:-0}" = 1 ] && rm -f /usr/sbin/policy-rc.d
  rm -f /usr/sbin/policy-rc.d.credless
fi

# BCC looks for headers at /lib/modules/$(uname -r)/build. Kernels here are not Debian's, so
# no package provides that link: point it at the newest installed Debian headers.
kdir="/lib/modules/$(uname -r)"
if [ ! -e "$kdir/build/include" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$hdr" ] || [ -z "$common" ]; then
    echo "setup-host: no kernel headers under /usr/src after installing linux-headers-amd64" >&2
    exit 1
  fi
  mkdir -p "$kdir"
  ln -sfn "$hdr" "$kdir/build"
  ln -sfn "$common" "$kdir/source"
  log "linked $kdir/build -> $hdr"
fi

# The redirect's maps are pinned in bpffs so a restarted agent finds live connections.
if ! awk '$2 == "/sys/fs/bpf" && $3 == "bpf" {found=1} END {exit !found}' /proc/mounts; then
  mount -t bpf bpf /sys/fs/bpf
  log "mounted bpffs at /sys/fs/bpf"
fi

# Tracepoint attachment goes through tracefs.
if ! awk '$3 == "tracefs" {found=1} END {exit !found}' /proc/mounts; then
  mount -t tracefs tracefs /sys/kernel/tracing
  log "mounted tracefs at /sys/kernel/tracing"
fi
