"""The notebook VM's boot script: GCE runs it as `startup-script` at every boot, EC2's
cloud-init runs it (user-data) at the first. Run as root, it is safe to run again:

- the user's public key in the JupyterLab user's authorized_keys (`connect` logs in as it);
- the /storage disk: made ext4 when blank, mounted at /storage (an fstab entry by UUID with
  nofail, so later boots mount it without the script), owned by the JupyterLab user and shown
  in the notebook root as `storage`;
- the idle watcher (idle_watch.py, stdlib only) as the unit gpubake-notebook-idle with its
  settings in /etc/gpubake/notebook.json.

The script carries the watcher itself, so any gpubake image with JupyterLab takes it.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from gpubake.notebooks.options import jupyter

WATCHER = Path(__file__).with_name("idle_watch.py")
WATCHER_PATH = "/usr/local/lib/gpubake/notebook_idle.py"
CONFIG_PATH = "/etc/gpubake/notebook.json"
UNIT = "gpubake-notebook-idle"
#: How long the script waits for the storage disk to appear (EC2 attaches it after boot).
STORAGE_WAIT_S = 300

_UNIT_TEXT = f"""[Unit]
Description=gpubake notebook idle watcher (powers the VM off when nobody uses it)
After=network-online.target gpubake-jupyter.service
Wants=network-online.target

[Service]
ExecStart=/usr/bin/python3 {WATCHER_PATH} --config {CONFIG_PATH}
Restart=always
RestartSec=10

[Install]
WantedBy=multi-user.target
"""

_SCRIPT = """#!/bin/bash
# gpubake notebook {name}: written by `gpubake notebook up`; safe to run at every boot.
set -euo pipefail
log() {{ echo "gpubake-notebook: $*"; }}
user={user}
key={key}
devices={devices}
wait_s={wait}

home=$(getent passwd "$user" | cut -d: -f6)
install -d -m 0700 -o "$user" -g "$user" "$home/.ssh"
touch "$home/.ssh/authorized_keys"
grep -qxF "$key" "$home/.ssh/authorized_keys" || echo "$key" >> "$home/.ssh/authorized_keys"
chown "$user:$user" "$home/.ssh/authorized_keys"
chmod 0600 "$home/.ssh/authorized_keys"

install -d -m 0755 /usr/local/lib/gpubake /etc/gpubake
cat > {watcher_path} <<'GPUBAKE_WATCHER_EOF'
{watcher}GPUBAKE_WATCHER_EOF
cat > {config_path} <<'GPUBAKE_CONFIG_EOF'
{config}
GPUBAKE_CONFIG_EOF
cat > /etc/systemd/system/{unit}.service <<'GPUBAKE_UNIT_EOF'
{unit_text}GPUBAKE_UNIT_EOF
systemctl daemon-reload
systemctl enable {unit}.service
systemctl restart {unit}.service  # starts it, or runs a new watcher / settings

install -d -m 0755 /storage
device=""
waited=0
while true; do
  for candidate in $devices; do
    if [ -e "$candidate" ]; then device=$candidate; break; fi
  done
  if [ -n "$device" ] || [ "$waited" -ge "$wait_s" ]; then break; fi
  sleep 2
  waited=$((waited + 2))
done
if [ -n "$device" ]; then
  if ! blkid "$device" >/dev/null 2>&1; then
    log "formatting the new storage disk $device"
    mkfs.ext4 -q -F -L gpubake-store -m 0 "$device"
  fi
  uuid=$(blkid -s UUID -o value "$device")
  if ! grep -q "UUID=$uuid " /etc/fstab; then
    echo "UUID=$uuid /storage ext4 defaults,nofail,discard 0 2" >> /etc/fstab
  fi
  if mountpoint -q /storage || mount /storage; then
    [ "$(stat -c %U /storage)" = "$user" ] || chown "$user:$user" /storage
    log "/storage is mounted"
  else
    log "the storage disk $device could not be mounted at /storage"
  fi
else
  log "no storage disk ($devices) after $wait_s s: /storage is on the boot disk"
  chown "$user:$user" /storage
fi
install -d -m 0755 -o "$user" -g "$user" {root}
ln -sfn /storage {root}/storage
chown -h "$user:$user" {root}/storage
log "ready"
"""


def script(name: str, public_key: str, storage_devices: str, watcher: dict[str, Any]) -> str:
    """The boot script of notebook `name`; `storage_devices`: the paths (space-separated)
    the storage disk may appear at, the first found is used."""
    return _SCRIPT.format(
        name=name,
        user=shlex.quote(str(jupyter()["jupyter_user"])),
        key=shlex.quote(public_key),
        devices=shlex.quote(storage_devices),
        wait=STORAGE_WAIT_S,
        watcher_path=WATCHER_PATH,
        watcher=WATCHER.read_text(encoding="utf-8"),
        config_path=CONFIG_PATH,
        config=json.dumps(watcher, indent=2, sort_keys=True),
        unit=UNIT,
        unit_text=_UNIT_TEXT,
        root=shlex.quote(str(jupyter()["jupyter_notebook_dir"])),
    )
