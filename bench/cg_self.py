#!/usr/bin/env python3
"""Self cost per function and per crate, per request, from two callgrind dumps of one process:
`cg_self.py SHORT_DUMP LONG_DUMP REQUESTS [TOP]` prints (Ir_long − Ir_short) / REQUESTS for the
TOP (40) costliest functions and for every crate (the symbol's first path segment).

bench/cpu --callgrind leaves the dumps in bench/results-cpu/raw/ (cg-<proxy>.out.N, one per run,
in run order) and the request counts in its output: REQUESTS is their difference. Fixed costs
(timers, start-up) cancel out as they do in bench/cpu's own figure; the TLS handshakes do not
(bench/cg_ir.py takes them out of the total only)."""
import collections
import re
import sys


def self_costs(path):
    cost = collections.Counter()
    fn = None
    after_calls = False
    with open(path, errors="replace") as f:
        for line in f:
            if after_calls:
                # The line after `calls=` is the call's inclusive cost, not the caller's own.
                after_calls = False
                continue
            c = line[:1]
            if c.isdigit() or c in "+-*":
                parts = line.split()
                if len(parts) > 1 and fn is not None:
                    cost[fn] += int(parts[1])
            elif line.startswith("fn="):
                fn = line[3:].strip()
            elif line.startswith("calls="):
                after_calls = True
    return cost


def crate_of(name):
    # `<a::B as c::D>::f` → a; `a::b::f` → a; `memcpy` → the name itself (libc and friends).
    s = name.lstrip("<&*")
    s = re.sub(r"^(mut |dyn |const )+", "", s)
    m = re.match(r"[A-Za-z_][A-Za-z0-9_]*", s)
    if not m or "::" not in name:
        return name if len(name) < 40 else "(other)"
    return m.group(0)


def main(short, long, requests, top=40):
    a, b = self_costs(short), self_costs(long)
    per = {k: (b[k] - a.get(k, 0)) / requests for k in b}
    total = sum(per.values())
    print(f"total {total:,.0f} instructions/request (self costs, handshakes included)")
    crates = collections.Counter()
    for k, v in per.items():
        crates[crate_of(k)] += v
    print("\nper crate:")
    for k, v in crates.most_common(25):
        print(f"{v:>9,.0f} {v / total:6.1%}  {k}")
    print("\nper function:")
    for k, v in sorted(per.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{v:>9,.0f} {v / total:6.1%}  {k[:200]}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), *map(int, sys.argv[4:5]))
