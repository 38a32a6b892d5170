#!/usr/bin/env python3
"""Turns bench/results/ into tables, a chart and the generated section of BENCHMARKS.md.

    python3 bench/report.py bench/results BENCHMARKS.md bench/chart.png

Called by bench/run at the end; can be re-run alone on existing results. Only the text between
the GENERATED markers of BENCHMARKS.md is replaced; the rest of the file is hand-written.
"""
import json
import os
import statistics
import sys

BEGIN = "<!-- BEGIN GENERATED (bench/report.py) -->"
END = "<!-- END GENERATED -->"
SUBJECTS = ["direct", "nginx", "none", "auth", "auth-miss", "node-bff"]
LABELS = {
    "direct": "direct (upstream, TLS)",
    "nginx": "nginx (plain TLS proxy)",
    "none": "coatcheck `none` route",
    "auth": "coatcheck authenticated (cache hit)",
    "auth-miss": "coatcheck authenticated (cache miss)",
    "node-bff": "Node.js BFF (express)",
}
RSS_OF = {"direct": "direct", "nginx": "nginx", "none": "coatcheck", "auth": "coatcheck",
          "auth-miss": "coatcheck-miss", "node-bff": "node-bff"}


def load(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def lines(path):
    try:
        with open(path) as f:
            return [json.loads(l) for l in f if l.strip()]
    except OSError:
        return []


def med(rows, key):
    v = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(v) if v else None


def summarize(runs, phase):
    out = {}
    for s in SUBJECTS:
        rows = [r for r in runs if r["phase"] == phase and r["subject"] == s]
        if not rows:
            continue
        out[s] = {
            "rounds": len(rows),
            "rps": med(rows, "rps"),
            "rps_min": min(r["rps"] for r in rows),
            "rps_max": max(r["rps"] for r in rows),
            "p50_ms": med(rows, "p50_us") / 1000,
            "p99_ms": med(rows, "p99_us") / 1000,
            "p999_ms": med(rows, "p999_us") / 1000,
            "cpu_s_per_10k": med(rows, "cpu_s_per_10k"),
            "non_2xx": sum(r.get("non_2xx", 0) for r in rows),
            "errors": sum(r.get("errors_total", 0) for r in rows),
            "target_rate": rows[0].get("target_rate", 0),
            "late": sum(r.get("late_requests", 0) for r in rows),
            "co_p99_ms": (med(rows, "co_p99_us") or 0) / 1000,
        }
    return out


def fmt(v, digits=2):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}"


def ratio(a, b):
    return f"{a / b:.2f}×" if a and b else "–"


def mib(kib):
    return f"{kib / 1024:,.1f} MiB" if kib else "–"


def paired_values(rows, s, ref, rate=False):
    """Subject `s` against `ref` round by round: req/s ratios, or p99 differences in ms at a fixed
    rate. Each round runs every subject back to back, so a pair shares that round's state of a
    machine whose capacity drifts from outside. (bench/cpu's summary uses this too.)"""
    by = {(r["subject"], r.get("round")): r for r in rows}
    pairs = [(a, by[(ref, n)]) for (t, n), a in by.items() if t == s and n is not None and (ref, n) in by]
    if rate:
        return [a["p99_ms"] - b["p99_ms"] for a, b in pairs]
    return [a["rps"] / b["rps"] for a, b in pairs if b["rps"]]


def paired(rows, s, ref):
    """The median of the per-round req/s ratios of `s` to `ref`, for a table cell."""
    v = paired_values(rows, s, ref)
    return f"{statistics.median(v):.2f}×" if v and s != ref else "–"


def per_subject_table(rows, title):
    """A median req/s table (with ÷ nginx, paired ÷ nginx and CPU per 10k requests) from per-round
    JSON lines."""
    out = [title, "", "| subject | req/s (min–max) | ÷ nginx | paired ÷ nginx | CPU s / 10k req |",
           "|---|---:|---:|---:|---:|"]
    subjects = list(dict.fromkeys(r["subject"] for r in rows))
    med_of = {s: statistics.median(r["rps"] for r in rows if r["subject"] == s) for s in subjects}
    for s in subjects:
        rs = [r["rps"] for r in rows if r["subject"] == s]
        ref = "nginx/h2" if s.endswith("/h2") else "nginx"
        cpu = statistics.median(r["cpu_s_per_10k"] for r in rows if r["subject"] == s)
        out.append(f"| {s} | {med_of[s]:,.0f} ({min(rs):,.0f}–{max(rs):,.0f}) | {ratio(med_of[s], med_of.get(ref))} | "
                   f"{paired(rows, s, ref)} | {cpu:.3f} |")
    out.append("")
    out.append("Paired ÷ nginx: the median of the per-round ratios (every round runs all subjects back to back).")
    out.append("")
    return out


def main():
    results, md_path, chart_path = sys.argv[1:4]
    machine = load(os.path.join(results, "machine.json"), {})
    runs = lines(os.path.join(results, "runs.jsonl"))
    sat = summarize(runs, "saturation")
    fixed = summarize(runs, "fixed")
    peak = load(os.path.join(results, "peak_rss.json"), {})
    stream = load(os.path.join(results, "stream.json"))
    refresh = lines(os.path.join(results, "refresh.jsonl"))
    login = load(os.path.join(results, "login.json"))
    scale = lines(os.path.join(results, "scale.jsonl"))
    micro = load(os.path.join(results, "micro.json"), {})
    suite = load(os.path.join(results, "suite.json"), {})

    md = [BEGIN, ""]
    md.append(f"_Generated by `bench/run` on {machine.get('date', '?')} (git {machine.get('git', '?')}), "
              f"suite time {suite.get('seconds', '?')} s; coatcheck's {machine.get('build', 'release')} build._")
    md.append("")
    md.append("### Machine")
    md.append("")
    md.append(f"{machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, {machine.get('mem_gib', '?')} GiB, "
              f"{machine.get('os', '?')}, Linux {machine.get('kernel', '?')}; {machine.get('rustc', '?')}, "
              f"nginx {machine.get('nginx', '?')}, Node.js {machine.get('node', '?')}, wrk {machine.get('wrk', '?')}. "
              f"Load average at start: {machine.get('load_avg_at_start', '?')} (a shared machine: other jobs ran "
              f"beside the suite). Load generator, upstream and subject share the same "
              f"{machine.get('cores', '?')} cores.")
    md.append("")

    if sat:
        d, n = sat.get("direct", {}).get("rps"), sat.get("nginx", {}).get("rps")
        md.append(f"### Saturation (wrk -t1 -c{machine.get('connections', '?')} -d{machine.get('duration_s', '?')}s, "
                  f"keep-alive HTTPS, HTTP/1.1, 1 KiB JSON; median of {machine.get('rounds', '?')} alternating rounds)")
        md.append("")
        md.append("| subject | req/s (min–max) | ÷ direct | ÷ nginx | paired ÷ nginx | p50 ms | p99 ms | p99.9 ms | CPU s / 10k req | peak RSS | non-2xx |")
        md.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        sat_rows = [r for r in runs if r["phase"] == "saturation"]
        for s, r in sat.items():
            md.append(f"| {LABELS[s]} | {r['rps']:,.0f} ({r['rps_min']:,.0f}–{r['rps_max']:,.0f}) | "
                      f"{ratio(r['rps'], d)} | {ratio(r['rps'], n)} | {paired(sat_rows, s, 'nginx')} | "
                      f"{fmt(r['p50_ms'])} | {fmt(r['p99_ms'])} | "
                      f"{fmt(r['p999_ms'])} | {fmt(r['cpu_s_per_10k'], 3)} | {mib(peak.get(RSS_OF[s]))} | "
                      f"{r['non_2xx'] + r['errors']} |")
        md.append("")
        md.append("Paired ÷ nginx: the median of the per-round ratios (every round runs all subjects back to "
                  "back). CPU is the subject's own processes only (for `direct`, the upstream's; for the proxies, not the "
                  "upstream's), from `/proc/<pid>/stat` utime+stime. Peak RSS is `VmHWM` at the end of the load "
                  "phases (`none` and `auth` are served by the same coatcheck process).")
        md.append("")
    h2 = lines(os.path.join(results, "h2.jsonl"))
    if h2:
        md.extend(per_subject_table(
            h2, f"### HTTP/2 from the client (h2load -c4 -m8 -D{machine.get('duration_s', '?')}: 32 streams over "
            f"4 connections; median of {machine.get('rounds', '?')} alternating rounds)"))
    percore = lines(os.path.join(results, "percore", "runs.jsonl"))
    if percore:
        md.extend(per_subject_table(
            percore, "### Per core (bench/cpu: proxy and upstream pinned to CPU 0, wrk/h2load alone on CPU 1; "
            "coatcheck TOKIO_WORKER_THREADS=1, nginx worker_processes 1 injecting an 800-byte bearer; "
            "`/h2`: h2load -c4 -m8)"))
    cg_path = os.path.join(results, "percore", "callgrind.txt")
    if os.path.exists(cg_path):
        md.append("Instructions per request (user space, valgrind callgrind, the proxy's process; two h2load runs "
                  "of 2,000 and 6,000 requests, difference ÷ 4,000):")
        md.append("")
        md.append("```")
        md.extend(l.rstrip() for l in open(cg_path))
        md.append("```")
        md.append("")
    if fixed:
        n99 = fixed.get("nginx", {}).get("p99_ms")
        rate = next(iter(fixed.values()))["target_rate"]
        md.append(f"### Fixed rate: {rate:,.0f} req/s = 50% of nginx's maximum "
                  f"(bench_load, 64 connections, median of 2 rounds)")
        md.append("")
        md.append("| subject | achieved req/s | p50 ms | p99 ms | p99 − nginx p99 | p99.9 ms | CPU s / 10k req | late sends |")
        md.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for s, r in fixed.items():
            delta = f"{r['p99_ms'] - n99:+.2f} ms" if n99 is not None else "–"
            md.append(f"| {LABELS[s]} | {r['rps']:,.0f} | {fmt(r['p50_ms'])} | {fmt(r['p99_ms'])} | {delta} | "
                      f"{fmt(r['p999_ms'])} | {fmt(r['cpu_s_per_10k'], 3)} | {r['late']:,} |")
        md.append("")
        md.append("Latency is measured from the moment a request is written (like wrk). A \"late send\" is a request "
                  "whose scheduled time came before the previous answer on its connection arrived: the subject "
                  "fell behind the rate there.")
        md.append("")
    if sat or fixed:
        md.append("![requests/s and p99 per subject](bench/chart.png)")
        md.append("")

    if stream:
        md.append("### Streaming 1 GiB through coatcheck (issue 2)")
        md.append("")
        md.append("| direction | bytes | seconds | MiB/s | RSS before | max RSS during | RSS after |")
        md.append("|---|---:|---:|---:|---:|---:|---:|")
        md.append(f"| download (upstream → client) | {stream['download_bytes']:,} | {stream['download_s']:.1f} | "
                  f"{stream['download_bytes'] / 1048576 / stream['download_s']:,.0f} | {mib(stream['rss_before_kib'])} | "
                  f"{mib(stream['rss_max_download_kib'])} | – |")
        up = stream.get("upload_bytes_received_upstream") or 0
        up_s = stream.get("upload_s") or 0
        md.append(f"| upload (client → upstream) | {up:,} | {up_s:.1f} | "
                  f"{(up / 1048576 / up_s) if up_s else 0:,.0f} | – | {mib(stream['rss_max_upload_kib'])} | "
                  f"{mib(stream['rss_after_kib'])} |")
        md.append("")
    if refresh:
        md.append("### Refresh path (issue 4)")
        md.append("")
        md.append("20 sessions each. `refresh`: a provider whose access tokens live 4 s, so every session "
                  "refreshes about every 2 s (coatcheck refreshes when less than half the lifetime is left); "
                  "`norefresh`: 2-hour tokens. bench_load, 16 connections, 12 s, requests spread over the sessions.")
        md.append("")
        md.append("| load | tokens | req/s | p50 ms | p99 ms | p99.9 ms | max ms | refresh grants at the provider | requests ≥ 5 ms: count / mean / max ms | statuses |")
        md.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in refresh:
            load_name = "saturation" if r["mode"] == "saturation" else f"{r['target_rate']:,.0f} req/s"
            md.append(f"| {load_name} | {'4 s' if r['subject'] == 'refresh' else '2 h'} | {r['rps']:,.0f} | "
                      f"{r['p50_us'] / 1000:.2f} | {r['p99_us'] / 1000:.2f} | {r['p999_us'] / 1000:.2f} | "
                      f"{r['max_us'] / 1000:.1f} | {r['refresh_grants']} | {r['slow_requests']:,} / "
                      f"{r['slow_mean_us'] / 1000:.1f} / {r['slow_max_us'] / 1000:.1f} | "
                      f"{', '.join(f'{k}: {v:,}' for k, v in r['statuses'].items())} |")
        md.append("")
    if login:
        ms = login["mean_ms"]
        md.append("### Login throughput (full OIDC flow through coatcheck and the real provider)")
        md.append("")
        md.append(f"{login['logins']} logins ({login['failures']} failed), {login['concurrency']} at a time: "
                  f"**{login['logins_per_s']:.1f} logins/s**. Mean time per login: coatcheck `/bff/login` "
                  f"{ms['bff_login_start']:.1f} ms, the provider (authorization endpoint, login and consent forms, "
                  f"redirects) {ms['provider_forms']:.1f} ms, coatcheck `/bff/callback` (code exchange at the "
                  f"provider, ID token validation, durable session create) {ms['bff_callback']:.1f} ms.")
        own = login.get("own") or {}
        if own.get("cpu_ms_per_login") is not None and own.get("bff_ms_per_login_without_provider") is not None:
            md.append("")
            md.append(f"Without the provider: coatcheck waited {own['token_endpoint_ms_per_login']:.1f} ms per login "
                      f"for the provider's token endpoint (its own `coatcheck_idp_request_duration_seconds`), so its "
                      f"own wall time per login is {own['bff_ms_per_login_without_provider']:.1f} ms — "
                      f"**{own['logins_per_s_without_provider']:.0f} logins/s** at {login['concurrency']} at a time; "
                      f"its CPU time is {own['cpu_ms_per_login']:.2f} ms per login (all threads, `schedstat`), "
                      f"**{own['logins_per_cpu_second']:.0f} logins per CPU second**.")
        md.append("")
    if scale:
        md.append("### Scale: sessions in the embedded store (redb) and in the cache")
        md.append("")
        md.append("| sessions | on disk | bytes/session on disk | created via `Sessions::create` (fsync each) | bulk-loaded (10k per transaction) | miss lookup p50 µs | p99 µs | p99.9 µs | RSS after open + 20k lookups | cache: RSS bytes per cached session | … beyond its tokens |")
        md.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in scale:
            p, l = r["populate"], r["lookup"]
            c, u = r.get("cachemem_cached"), r.get("cachemem_uncached")
            if c and u:
                per = c["rss_growth_bytes_per_session"] - u["rss_growth_bytes_per_session"]
                beyond = per - c["token_bytes_per_session"]
                cache_txt, beyond_txt = f"{per:,.0f}", f"{beyond:,.0f}"
            else:
                cache_txt = beyond_txt = "–"
            api = (f"{p['api_creates']:,} in {p['api_seconds']:.1f} s ({p['api_creates_per_s']:,.0f}/s)"
                   if p["api_creates"] else "–")
            bulk = f"{p['bulk_creates']:,} in {p['bulk_seconds']:.1f} s" if p["bulk_creates"] else "–"
            md.append(f"| {r['n']:,} | {p['file_bytes'] / 1048576:,.1f} MiB | "
                      f"{p['disk_bytes_per_session']:,.0f} | {api} | {bulk} | {l['p50_us']:,.0f} | "
                      f"{l['p99_us']:,.0f} | {l['p999_us']:,.0f} | {mib(l['rss_after_lookups_kib'])} | "
                      f"{cache_txt} | {beyond_txt} |")
        md.append("")
        md.append("Lookups are `Sessions::lookup` with `[session.cache] capacity = 0` (every one reads redb and "
                  "decrypts the record) of 20 000 sessions spread over the store, in shuffled order; with 0 "
                  "sessions they look up valid tickets that have no record. Cache bytes per session: RSS growth "
                  "of N sessions created with cache capacity N minus the same with capacity 0 (memory store), "
                  "divided by N; the tokens are 1 743 bytes per session (800 B access, 900 B ID, 43 B refresh).")
        md.append("")
    if micro:
        md.append("### Micro-benchmarks (criterion, `cargo bench --bench micro`)")
        md.append("")
        md.append("| benchmark | mean ns | median ns |")
        md.append("|---|---:|---:|")
        for k, v in micro.items():
            md.append(f"| `{k}` | {v['mean_ns']:,.0f} | {v['median_ns']:,.0f} |")
        md.append("")

    # --- targets ---
    md.append("### Targets (issues 2, 3, 5)")
    md.append("")
    md.append("| target | measured | met? |")
    md.append("|---|---|---|")

    def row(name, measured, ok):
        md.append(f"| {name} | {measured} | {'yes' if ok else '**no**'} |")

    a, n, none, node = (sat.get(k, {}).get("rps") for k in ("auth", "nginx", "none", "node-bff"))
    if a and n:
        row("authenticated ≥ 1.0× nginx req/s", f"{a / n:.2f}×", a >= n)
    if sat.get("none") and n:
        row("coatcheck `none` ≥ 1.0× nginx req/s (issue 2)", f"{none / n:.2f}×", none >= n)
    if sat.get("none") and sat.get("nginx"):
        row("coatcheck `none` p99 ≤ nginx p99 at saturation (issue 2)",
            f"{sat['none']['p99_ms']:.2f} vs {sat['nginx']['p99_ms']:.2f} ms",
            sat["none"]["p99_ms"] <= sat["nginx"]["p99_ms"])
    if fixed.get("auth") and fixed.get("nginx"):
        d99 = fixed["auth"]["p99_ms"] - fixed["nginx"]["p99_ms"]
        row("authenticated p99 at the fixed rate ≤ nginx p99 + 0.5 ms", f"{d99:+.2f} ms", d99 <= 0.5)
    if a and none:
        row("authenticated ≥ 0.95× coatcheck `none`", f"{a / none:.2f}×", a >= 0.95 * none)
    if a and node:
        row("authenticated ≥ 5× Node.js BFF", f"{a / node:.1f}×", a >= 5 * node)
    if stream:
        grow = max(stream["rss_max_download_kib"], stream["rss_max_upload_kib"]) - stream["rss_before_kib"]
        row("flat memory streaming 1 GiB (issue 2)", f"max RSS +{grow / 1024:.1f} MiB over the start", grow < 64 * 1024)
    big = [r for r in scale if r.get("cachemem_cached") and r.get("cachemem_uncached")]
    if big:
        r = big[-1]
        per = r["cachemem_cached"]["rss_growth_bytes_per_session"] - r["cachemem_uncached"]["rss_growth_bytes_per_session"]
        beyond = per - r["cachemem_cached"]["token_bytes_per_session"]
        row(f"≤ 2 KiB per cached session beyond its tokens ({r['n']:,} sessions)", f"{beyond:,.0f} B", beyond <= 2048)
    mill = [r for r in scale if r["n"] >= 1_000_000]
    if mill:
        p99 = mill[-1]["lookup"]["p99_us"]
        row(f"{mill[-1]['n']:,} sessions: cache-miss lookup p99 < 1 ms", f"{p99 / 1000:.3f} ms", p99 < 1000)
    md.append("")
    md.append(END)
    generated = "\n".join(md)

    # --- chart ---
    if sat:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        names = [s for s in SUBJECTS if s in sat]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        colors = ["#888888", "#2e7d32", "#1565c0", "#0d47a1", "#5e35b1", "#c62828"][: len(names)]
        ax1.bar(names, [sat[s]["rps"] for s in names], color=colors)
        ax1.set_title("saturation: requests/s (higher is better)")
        ax1.tick_params(axis="x", rotation=20)
        for i, s in enumerate(names):
            ax1.text(i, sat[s]["rps"], f"{sat[s]['rps']:,.0f}", ha="center", va="bottom", fontsize=8)
        w = 0.4
        xs = range(len(names))
        ax2.bar([x - w / 2 for x in xs], [sat[s]["p99_ms"] for s in names], w, label="p99 at saturation")
        if fixed:
            ax2.bar([x + w / 2 for x in xs], [fixed.get(s, {}).get("p99_ms", 0) for s in names], w,
                    label=f"p99 at {next(iter(fixed.values()))['target_rate']:,.0f} req/s")
        ax2.set_xticks(list(xs))
        ax2.set_xticklabels(names, rotation=20)
        ax2.set_yscale("log")
        ax2.set_ylabel("ms (log scale)")
        ax2.set_title("p99 latency (lower is better)")
        ax2.legend(fontsize=8)
        fig.suptitle(f"coatcheck benchmark — {machine.get('cores', '?')} cores, {machine.get('date', '')}", fontsize=10)
        fig.tight_layout()
        fig.savefig(chart_path, dpi=90)
        fig.savefig(os.path.join(results, "chart.png"), dpi=90)

    with open(os.path.join(results, "tables.md"), "w") as f:
        f.write(generated + "\n")
    try:
        with open(md_path) as f:
            doc = f.read()
    except OSError:
        doc = f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN in doc and END in doc:
        head, rest = doc.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        doc = head + generated + tail
    else:
        doc = doc.rstrip() + "\n\n" + generated + "\n"
    with open(md_path, "w") as f:
        f.write(doc)
    print(generated)


def line(kind):
    """One progress line for bench/run from a JSON object on stdin."""
    r = json.load(sys.stdin)
    if kind == "run":
        print(f"  {r['phase']:>10} {r['subject']:>9} r{r['round']}: {r['rps']:9.0f} req/s  "
              f"p50 {r['p50_us'] / 1000:6.2f} ms  p99 {r['p99_us'] / 1000:6.2f} ms  "
              f"p99.9 {r['p999_us'] / 1000:6.2f} ms  non-2xx {r['non_2xx'] + r['errors_total']}")
    elif kind == "refresh":
        print(f"  {r['mode']:>10} {r['subject']:>9}: {r['rps']:8.0f} req/s  p99 {r['p99_us'] / 1000:.2f} ms  "
              f"refreshes {r['refresh_grants']}  slow {r['slow_requests']}  statuses {r['statuses']}")
    elif kind == "scale":
        p, l = r["populate"], r["lookup"]
        print(f"  n={r['n']}: disk {p['disk_bytes_per_session']:.0f} B/session, API creates "
              f"{p['api_creates_per_s']:.0f}/s, bulk {p['bulk_seconds']:.1f} s, miss lookup p99 {l['p99_us']:.0f} us")


if __name__ == "__main__":
    if sys.argv[1] == "--line":
        line(sys.argv[2])
    else:
        main()
