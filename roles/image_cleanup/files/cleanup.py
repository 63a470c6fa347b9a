"""Role image_cleanup's one step (tasks/main.yml), run with the host's python3: remove the
build-only files, empty the package lists, caches and logs, mark the lists as never refreshed,
and empty /tmp but the names to keep. Its settings come as JSON on stdin; it prints each path
it removed, one per line (nothing: nothing changed).

One command for all of it: each module call is a round trip to the host, and a stage runs this
role at its end whatever it built.
"""

import fnmatch
import json
import os
import shutil
import sys
from pathlib import Path

settings = json.load(sys.stdin)
removed = []


def remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.is_symlink() or path.exists():  # a file, a link, a socket
        path.unlink()
    else:
        return
    removed.append(str(path))


for name in settings["paths"]:
    remove(Path(name))

# files and links, not folders (their owners and modes stay), and no "lock" (apt's and dpkg's)
for folder in settings["emptied"]:
    for root, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if (Path(root) / d).is_symlink()]:
            if name != "lock":
                (Path(root) / name).unlink()
                removed.append(str(Path(root) / name))

# apt, and the apt module's cache_valid_time, take the lists folder's mtime for the time of
# the last refresh: emptied just now, it would look fresh, and a later stage or role would
# skip the refresh and find no package at all.
LISTS = Path("/var/lib/apt/lists")
if str(LISTS) in settings["emptied"]:
    LISTS.mkdir(mode=0o755, parents=True, exist_ok=True)
    st = LISTS.stat()
    if st.st_mtime != 0:
        os.utime(LISTS, (st.st_atime, 0))
        removed.append(f"{LISTS} (marked as never refreshed)")

# /tmp but Ansible's scratch space, the running module's payload and Packer's mount point
TMP = Path("/tmp")  # noqa: S108 (the image's /tmp, emptied)
for path in sorted(TMP.iterdir()):
    if not any(fnmatch.fnmatchcase(path.name, keep) for keep in settings["tmp_keep"]):
        remove(path)

for line in removed:
    print(line)
