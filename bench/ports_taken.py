#!/usr/bin/env python3
"""bench/ports_taken.py PORT...: print each of the given local TCP ports that a socket on this machine
holds (listening, or the local end of a connection), one "PORT STATE" line each; exit 1 if any is.

A listener cannot bind a port that an outgoing connection already uses as its local end (that
connection did not set SO_REUSEADDR), and a connection to a port that is merely checked for a
listener misses that case. Sockets in TIME_WAIT are left out: every server here binds with
SO_REUSEADDR, which ignores them. Reads /proc/net/tcp and tcp6, so it needs no iproute2."""
import sys

STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1",
          "05": "FIN_WAIT2", "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK", "0A": "LISTEN",
          "0B": "CLOSING"}
wanted = {int(p) for p in sys.argv[1:]}
taken = {}
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    try:
        lines = open(table).read().splitlines()[1:]
    except OSError:
        continue
    for line in lines:
        fields = line.split()
        port, state = int(fields[1].rsplit(":", 1)[1], 16), fields[3]
        if port in wanted and state in STATES:
            taken.setdefault(port, STATES[state])
for port in sorted(taken):
    print(port, taken[port])
sys.exit(1 if taken else 0)
