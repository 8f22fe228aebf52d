#!/usr/bin/env python3
"""Draws loadtest/bench.sh's phases as one SVG (standard library only).

    loadtest/chart.py DIR OUT.svg

DIR holds, per phase, `lat-<phase>.txt` (wrk's latency distribution: lines
"<percentile> <microseconds>", written by loadtest/wrk/reserve.lua's done())
and, for the phases served by flashsale, `rate-<phase>.txt` (lines
"<unix seconds> <requests answered so far>", sampled from /metrics once a
second while the phase ran). Left: latency by percentile (log scale, the
tail on the right). Right: requests per second over time.
"""

import math
import os
import sys

W, H = 1100, 460
PAD_L, PAD_R, PAD_T, PAD_B = 70, 20, 40, 60
GAP = 80
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
           "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def read_pairs(path):
    pairs = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 2:
                pairs.append((float(parts[0]), float(parts[1])))
    return pairs


def nines(p):
    """Percentile to the x of a tail-stretching axis: 90 -> 1, 99 -> 2, ..."""
    return -math.log10(max(1e-4, 1 - min(p, 99.99) / 100))


def esc(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def main():
    src, out = sys.argv[1], sys.argv[2]
    phases = sorted({f.split("-", 1)[1][:-4] for f in os.listdir(src)
                     if f.startswith(("lat-", "rate-")) and f.endswith(".txt")})
    lat = {p: read_pairs(os.path.join(src, f"lat-{p}.txt"))
           for p in phases if os.path.exists(os.path.join(src, f"lat-{p}.txt"))}
    rate = {}
    for p in phases:
        path = os.path.join(src, f"rate-{p}.txt")
        if os.path.exists(path):
            s = read_pairs(path)
            rate[p] = [(t1 - s[0][0], (n1 - n0) / max(t1 - t0, 1e-3))
                       for (t0, n0), (t1, n1) in zip(s, s[1:])]
    pw = (W - PAD_L - PAD_R - GAP) / 2
    ph = H - PAD_T - PAD_B
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>']

    def frame(x0, title, xlabel, ylabel):
        svg.append(f'<text x="{x0 + pw / 2}" y="{PAD_T - 15}" text-anchor="middle" '
                   f'font-size="14">{esc(title)}</text>')
        svg.append(f'<rect x="{x0}" y="{PAD_T}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
        svg.append(f'<text x="{x0 + pw / 2}" y="{H - 15}" text-anchor="middle">{esc(xlabel)}</text>')
        svg.append(f'<text x="{x0 - 50}" y="{PAD_T + ph / 2}" text-anchor="middle" '
                   f'transform="rotate(-90 {x0 - 50} {PAD_T + ph / 2})">{esc(ylabel)}</text>')

    # Latency by percentile, ms on a log scale.
    x0 = PAD_L
    frame(x0, "latency by percentile (wrk)", "percentile", "ms (log)")
    values = [v / 1000 for pairs in lat.values() for _, v in pairs if v > 0]
    if values:
        lo = 10 ** math.floor(math.log10(min(values)))
        hi = 10 ** math.ceil(math.log10(max(values)))
        xmax = nines(99.99)
        y = lambda ms: PAD_T + ph - (math.log10(max(ms, lo)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * ph
        x = lambda p: x0 + nines(p) / xmax * pw
        for p in (0, 50, 90, 99, 99.9, 99.99):
            svg.append(f'<line x1="{x(p)}" y1="{PAD_T}" x2="{x(p)}" y2="{PAD_T + ph}" stroke="#eee"/>')
            svg.append(f'<text x="{x(p)}" y="{PAD_T + ph + 15}" text-anchor="middle">{p:g}</text>')
        d = lo
        while d <= hi * 1.0001:
            svg.append(f'<line x1="{x0}" y1="{y(d)}" x2="{x0 + pw}" y2="{y(d)}" stroke="#eee"/>')
            svg.append(f'<text x="{x0 - 5}" y="{y(d) + 4}" text-anchor="end">{d:g}</text>')
            d *= 10
        for i, (name, pairs) in enumerate(sorted(lat.items())):
            pts = " ".join(f"{x(p):.1f},{y(v / 1000):.1f}" for p, v in pairs if p <= 99.99 and v > 0)
            svg.append(f'<polyline points="{pts}" fill="none" stroke="{COLOURS[i % len(COLOURS)]}" stroke-width="2"/>')
            svg.append(f'<text x="{x0 + 8}" y="{PAD_T + 16 + 15 * i}" fill="{COLOURS[i % len(COLOURS)]}">{esc(name)}</text>')

    # Rate over time.
    x0 = PAD_L + pw + GAP
    frame(x0, "requests/s over time (server's counter, 1 s samples)", "seconds into the phase", "requests/s")
    series = {k: v for k, v in rate.items() if v}
    if series:
        tmax = max(t for s in series.values() for t, _ in s) or 1
        rmax = max(r for s in series.values() for _, r in s) or 1
        step = 10 ** math.floor(math.log10(rmax))
        rtop = math.ceil(rmax / step) * step
        x = lambda t: x0 + t / tmax * pw
        y = lambda r: PAD_T + ph - r / rtop * ph
        r = 0
        while r <= rtop:
            svg.append(f'<line x1="{x0}" y1="{y(r)}" x2="{x0 + pw}" y2="{y(r)}" stroke="#eee"/>')
            svg.append(f'<text x="{x0 - 5}" y="{y(r) + 4}" text-anchor="end">{r:g}</text>')
            r += step
        for t in range(0, int(tmax) + 1, max(1, int(tmax) // 10)):
            svg.append(f'<text x="{x(t)}" y="{PAD_T + ph + 15}" text-anchor="middle">{t}</text>')
        names = sorted(series)
        for i, name in enumerate(names):
            colour = COLOURS[(sorted(lat).index(name) if name in lat else i) % len(COLOURS)]
            pts = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in series[name])
            svg.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2"/>')
            svg.append(f'<text x="{x0 + 8}" y="{PAD_T + 16 + 15 * i}" fill="{colour}">{esc(name)}</text>')
    svg.append("</svg>")
    with open(out, "w") as f:
        f.write("\n".join(svg) + "\n")


if __name__ == "__main__":
    main()
