#!/usr/bin/env python3
"""Turn the BENCH_JSON line of `cargo bench --bench e2e` into an SVG bar chart.

    cargo bench --bench e2e | tee target/e2e.out
    python3 scripts/bench_chart.py target/e2e.out docs/benchmarks.svg

Each bar is a measured rate as a percentage of the ceiling it is judged against (measured in
the same run). No third-party packages: the SVG is written by hand.
"""
import json
import sys
from html import escape


def load(path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("BENCH_JSON "):
                return json.loads(line[len("BENCH_JSON "):])
    sys.exit(f"{path}: no BENCH_JSON line")


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    data = load(sys.argv[1])
    rows = [(v["case"], v["rate"], v["ceiling"]) for v in data.values()
            if isinstance(v, dict) and "ceiling" in v]
    width, left, bar_h, gap, top = 980, 430, 22, 8, 50
    scale = (width - left - 90) / 100.0
    height = top + len(rows) * (bar_h + gap) + 60
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="24" font-size="15" font-weight="bold">'
           'rmos-runs: measured rate as % of its ceiling (same run)</text>']
    for pct in (0, 25, 50, 75, 100):
        x = left + pct * scale
        out.append(f'<line x1="{x}" y1="{top - 6}" x2="{x}" y2="{height - 40}" '
                   'stroke="#ddd"/>')
        out.append(f'<text x="{x}" y="{height - 24}" text-anchor="middle">{pct}%</text>')
    for i, (case, rate, ceiling) in enumerate(rows):
        y = top + i * (bar_h + gap)
        pct = 100.0 * rate / ceiling if ceiling else 0.0
        w = min(pct, 100.0) * scale
        color = "#2b8a3e" if pct >= 50 else ("#e67700" if pct >= 25 else "#c92a2a")
        out.append(f'<text x="{left - 8}" y="{y + 15}" text-anchor="end">{escape(case)}</text>')
        out.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{color}"/>')
        out.append(f'<text x="{left + w + 6:.1f}" y="{y + 15}">{pct:.0f}% '
                   f'({rate:,.0f} / {ceiling:,.0f} per s)</text>')
    out.append("</svg>")
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        f.write("\n".join(out) + "\n")
    print(f"wrote {sys.argv[2]} ({len(rows)} bars)")


if __name__ == "__main__":
    main()
