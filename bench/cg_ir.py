#!/usr/bin/env python3
"""Instructions in a callgrind dump, without the TLS handshakes: `cg_ir.py DUMP` prints the
total Ir, the Ir of the server-side handshakes it contains and how many there were.

bench/cpu counts instructions per request as the difference of two runs of different lengths, so
that start-up and the connections' handshakes cancel out. Under callgrind the proxy is slow enough
that a client sometimes reconnects, so the two runs need not hold the same number of handshakes
(each ≈ 1M instructions in rustls): their cost is taken out of both runs here. A handshake is the
inclusive cost of rustls's `ExpectClientHello` and `ExpectFinished` states (coatcheck) or of
`ngx_ssl_handshake` (nginx)."""
import sys

HANDSHAKE = (
    ("rustls::server::hs::ExpectClientHello as rustls::common_state::State", True),
    ("rustls::server::tls13::ExpectFinished as rustls::common_state::State", False),
    ("ngx_ssl_handshake", True),
)


def main(path):
    total = handshake = count = 0
    fn = target = None
    pending = False
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith(("summary:", "totals:")) and not total:
                total = int(line.split()[1])
            elif line.startswith("fn="):
                fn = line[3:].strip()
            elif line.startswith("cfn="):
                target = line[4:].strip()
            elif line.startswith("calls="):
                pending = line
            elif pending and line[:1].isdigit():
                calls = int(pending[6:].split()[0])
                pending = False
                for name, counts in HANDSHAKE:
                    # Calls into a handshake function from outside it (not its own recursion).
                    if target and name in target and name not in (fn or ""):
                        handshake += int(line.split()[1])
                        count += calls if counts else 0
    print(total, handshake, count)


if __name__ == "__main__":
    main(sys.argv[1])
