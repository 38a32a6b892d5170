#!/usr/bin/env python3
"""Simulated cache and branch events per request from two callgrind dumps of one process run with
`--cache-sim=yes --branch-sim=yes` (bench/cpu with CPU_CG_SIM=1): `cg_sim.py SHORT LONG REQUESTS`
prints (event_long − event_short) / REQUESTS for the first-level instruction and data cache
misses (I1mr, D1mr, D1mw), the last-level misses (ILmr, DLmr, DLmw) and the mispredicted
conditional and indirect branches (Bcm, Bim).

These are valgrind's model of a cache and a predictor, not the machine's, but like the instruction
count they repeat from run to run: where req/s moves by more than a change between sittings (this
VM's), they say whether a build that runs fewer instructions also misses its caches more (a
profile-guided build lays out code differently from one training run to the next)."""
import sys

SHOWN = ("I1mr", "D1mr", "D1mw", "ILmr", "DLmr", "DLmw", "Bcm", "Bim")


def events(path):
    names = values = None
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("events:"):
                names = line.split()[1:]
            elif line.startswith(("summary:", "totals:")) and values is None:
                values = [int(v) for v in line.split()[1:]]
    if not names or values is None:
        sys.exit(f"{path}: no events/summary lines")
    return dict(zip(names, values))


def main(short, long, requests):
    a, b = events(short), events(long)
    missing = [e for e in SHOWN if e not in b]
    if missing:
        sys.exit(f"{long}: no {', '.join(missing)} (run callgrind with --cache-sim=yes --branch-sim=yes)")
    per = {e: (b[e] - a.get(e, 0)) / requests for e in SHOWN}
    print("  ".join(f"{e} {v:,.1f}" for e, v in per.items()))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
