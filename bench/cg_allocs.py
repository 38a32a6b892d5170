#!/usr/bin/env python3
"""Allocations per request, from two callgrind dumps of one process (bench/cpu --callgrind):
`cg_allocs.py SHORT_DUMP LONG_DUMP REQUESTS [TOP]` prints the calls per request into Rust's
allocator entry points (`__rust_alloc`, `__rust_alloc_zeroed`, `__rust_realloc`,
`__rust_dealloc`) and into aws-lc's (`OPENSSL_malloc`/`zalloc`/`free`), (long − short) / REQUESTS,
and the callers making the most allocations. Counting calls in the dumps needs no counting
allocator in the binary: what is measured is the shipped build."""
import collections
import sys

ENTRY = {
    "__rustc::__rust_alloc": "alloc",
    "__rustc::__rust_alloc_zeroed": "alloc",
    "__rustc::__rust_realloc": "realloc",
    "__rustc::__rust_dealloc": "free",
    "aws_lc_0_47_0_OPENSSL_malloc": "alloc (aws-lc)",
    "aws_lc_0_47_0_OPENSSL_zalloc": "alloc (aws-lc)",
    "aws_lc_0_47_0_OPENSSL_free": "free (aws-lc)",
}


def calls(path):
    kinds = collections.Counter()
    callers = collections.Counter()
    fn = target = None
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("fn="):
                fn = line[3:].strip()
            elif line.startswith("cfn="):
                target = line[4:].strip()
            elif line.startswith("calls=") and target in ENTRY:
                n = int(line[6:].split()[0])
                kinds[ENTRY[target]] += n
                if ENTRY[target] in ("alloc", "realloc", "alloc (aws-lc)"):
                    callers[fn] += n
    return kinds, callers


def main():
    short, long, requests = sys.argv[1], sys.argv[2], float(sys.argv[3])
    top = int(sys.argv[4]) if len(sys.argv) > 4 else 25
    (ks, cs), (kl, cl) = calls(short), calls(long)
    for k in sorted(set(ks) | set(kl)):
        print(f"{(kl[k] - ks[k]) / requests:7.2f}  {k} per request")
    print("\nallocating callers (alloc + realloc per request):")
    diff = {c: (cl[c] - cs[c]) / requests for c in set(cl) | set(cs)}
    for c in sorted(diff, key=lambda c: -diff[c])[:top]:
        if diff[c] >= 0.05:
            print(f"{diff[c]:7.2f}  {c[:140]}")


if __name__ == "__main__":
    main()
