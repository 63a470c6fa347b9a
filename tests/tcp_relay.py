"""stdin/stdout <-> a TCP server: the program QEMU's `guestfwd=...-cmd:` spawns for each
connection a guest opens to a forwarded address (tests/integration/qemu_boot.py), relaying
it to a server on the host's loopback. Usage: tcp_relay.py HOST PORT"""

from __future__ import annotations

import os
import selectors
import socket
import sys


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    conn = socket.create_connection((host, port), timeout=30)
    conn.settimeout(None)
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    sel = selectors.DefaultSelector()
    sel.register(stdin, selectors.EVENT_READ, "guest")
    sel.register(conn, selectors.EVENT_READ, "server")
    open_ends = 2
    while open_ends:
        for key, _ in sel.select():
            if key.data == "guest":
                data = os.read(stdin, 65536)
                if data:
                    conn.sendall(data)
                else:  # the guest closed its side: so does the relay, towards the server
                    sel.unregister(stdin)
                    conn.shutdown(socket.SHUT_WR)
                    open_ends -= 1
            else:
                data = conn.recv(65536)
                if data:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(stdout, view) :]
                else:
                    sel.unregister(conn)
                    open_ends = 0  # the server is done: the guest sees the end
    conn.close()


if __name__ == "__main__":
    main()
