#!/usr/bin/env python3
"""bench/copies.py DUMP REQUESTS [TOP]: the copies bench/memcpy_count.c counted, per request.

Sums the bytes of every counted memcpy/memmove (128 bytes or more) per request, and lists the call
sites that copy the most, symbolized with addr2line (inlined frames joined by `<-`, innermost first).
"""
import collections
import subprocess
import sys


def read(path):
    maps, rows, base, in_rows = [], [], {}, False
    for line in open(path):
        if line.startswith('---'):
            in_rows = True
            continue
        p = line.split()
        if in_rows:
            rows.append((int(p[0], 16), int(p[1]), int(p[2])))
        elif len(p) >= 6:
            start, end = (int(x, 16) for x in p[0].split('-'))
            if int(p[2], 16) == 0:
                base.setdefault(p[5], start)
            if 'x' in p[1]:
                maps.append((start, end, p[5]))
    return maps, rows, base


def symbolize(binary, addrs):
    out = subprocess.run(['addr2line', '-e', binary, '-f', '-C', '-i', '-a'] + [hex(a) for a in addrs],
                         capture_output=True, text=True, check=True).stdout
    frames, cur = {}, None
    for line in out.splitlines():
        if line.startswith('0x'):
            cur = int(line, 16)
            frames[cur] = []
        else:
            frames[cur].append(line)
    names = {}
    for addr, lines in frames.items():
        pairs = list(zip(lines[0::2], lines[1::2]))[:3]
        names[addr] = ' <- '.join(f"{fn[:70]} @{loc.rsplit('/', 1)[-1]}" for fn, loc in pairs)
    return names


def main():
    path, requests = sys.argv[1], float(sys.argv[2])
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 30
    maps, rows, base = read(path)
    by_file = collections.defaultdict(list)
    for ra, size, count in rows:
        for start, end, f in maps:
            if start <= ra < end:
                by_file[f].append((ra - base.get(f, start), size, count))
                break
    sites = []
    for f, lst in by_file.items():
        names = symbolize(f, sorted({a for a, _, _ in lst})) if f.startswith('/') else {}
        for addr, size, count in lst:
            name = names.get(addr, f"{f.rsplit('/', 1)[-1]}+{addr:x}")
            sites.append((size * count / requests, size, count / requests, name))
    total = sum(s[0] for s in sites)
    calls = sum(s[2] for s in sites)
    print(f"{total:,.0f} bytes per request in {calls:.1f} copies of 128 bytes or more")
    for per, size, n, name in sorted(sites, reverse=True)[:top]:
        print(f"{per:7,.0f} B  {size:6} B x {n:4.2f}  {name[:230]}")


if __name__ == '__main__':
    main()
