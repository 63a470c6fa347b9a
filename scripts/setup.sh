#!/usr/bin/env bash
# One-time set-up on a fresh Debian 12 machine, as root; safe to run again.
# Installs Docker Engine, Packer, debootstrap, the linters' system tools and the
# CNCF registry (docker-registry, htpasswd: the publishing tests), Chromium (Playwright drives
# it in the notebook tests) and mmdebstrap + QEMU (the VM base disk, booted) from Debian,
# starts dockerd when none runs, and makes .venv with gpubake.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'setup: %s\n' "$*" >&2; }

packages=(docker.io packer debootstrap shellcheck openssl python3-venv git ca-certificates
  docker-registry apache2-utils chromium
  mmdebstrap qemu-system-x86 qemu-utils fdisk e2fsprogs mount openssh-client)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if ! docker info >/dev/null 2>&1; then
  log "starting dockerd"
  mkdir -p /var/log
  nohup dockerd >/var/log/gpubake-dockerd.log 2>&1 &
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  docker info >/dev/null 2>&1 || { log "dockerd did not start: see /var/log/gpubake-dockerd.log"; exit 1; }
fi

if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  python3 -m venv .venv
fi
if ! .venv/bin/python -c 'import gpubake, ansible_collections.community.docker, pytest' 2>/dev/null ||
   [ pyproject.toml -nt .venv/.gpubake-installed ]; then
  log "installing gpubake and its tools into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  touch .venv/.gpubake-installed
fi
log "ready: $(packer version | head -n 1), $(docker version --format 'Docker Engine {{.Server.Version}}')"
