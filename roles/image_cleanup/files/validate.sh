#!/bin/sh
# Validate a sealed VM image, in the spirit of amazon-eks-ami's validate.sh.
# Usage: validate.sh [DKMS_MODULE ...]   (modules that must be installed for the
# image's newest kernel). Prints one line per check; exits 1 if any failed.
set -u
failed=0
ok() { echo "ok: $*"; }
bad() { echo "FAILED: $*"; failed=1; }
# none_left WHAT FOUND: ok when FOUND is empty
none_left() {
  if [ -z "$2" ]; then ok "no $1"; else bad "$1 left: $(echo "$2" | tr '\n' ' ')"; fi
}

keys=$(find /etc/ssh -maxdepth 1 -name 'ssh_host_*key*' 2>/dev/null)
none_left "SSH host keys" "$keys"

if [ -s /etc/machine-id ]; then bad "/etc/machine-id is not empty"; else ok "machine-id empty"; fi

if [ -e /var/lib/cloud/instance ] || [ -e /var/lib/cloud/instances ]; then
  bad "cloud-init instance state left in /var/lib/cloud"
else
  ok "no cloud-init state"
fi

authorized=$(find /root /home -maxdepth 3 -name authorized_keys 2>/dev/null)
none_left "authorized_keys" "$authorized"

history=$(find /root /home -maxdepth 2 \( -name .bash_history -o -name .python_history \) 2>/dev/null)
none_left "shell history" "$history"

if [ -e /run/gpubake-build ]; then bad "build-time CA bundle left"; else ok "no build-time CA bundle"; fi

if [ "$#" -gt 0 ]; then
  kernel=$(find /lib/modules -mindepth 1 -maxdepth 1 -type d -printf '%f\n' 2>/dev/null | sort -V | tail -n 1)
  for module in "$@"; do
    if ! command -v dkms >/dev/null 2>&1; then
      bad "dkms not installed (expected module $module)"
    elif dkms status "$module" 2>/dev/null | grep -q "$kernel.*: installed"; then
      ok "DKMS module $module installed for kernel $kernel"
    else
      bad "DKMS module $module not installed for kernel $kernel: $(dkms status "$module" 2>&1 | tr '\n' ' ')"
    fi
  done
fi
exit "$failed"
