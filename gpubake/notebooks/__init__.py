"""Interactive notebook VMs: `gpubake notebook up|connect|status|list|stop|down`.

A notebook is one GPU VM from a gpubake image (JupyterLab on 127.0.0.1 with a token), a
persistent disk mounted at /storage that outlives the VM, the user's SSH key, and an idle
watcher (idle_watch.py, installed by the boot script) that powers the VM off when nobody
uses it. `connect` opens an SSH tunnel to JupyterLab and prints its URL with the token.
"""
