"""Plots of ``kernels.csv`` (written by ``bench_kernels.py``): one PNG per op, one panel per distribution (grouped
LoRA forward: ms vs experts) or per T (top-k routing: ms vs experts), one line per provider (Triton per block_m).

    python benchmarks/plot_kernels.py runs/bench/kernels.csv [--out runs/bench]

Writes ``lora_forward.png`` and ``topk_routing.png`` (when the CSV has rows of that op) next to the CSV or in --out.
Rows with an error or no time are left out.
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path


def load(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return [r for r in csv.DictReader(fh) if r.get("p50_ms") and not r.get("error")]


def label(row: dict) -> str:
    if row["provider"] == "triton" and row.get("block_m"):
        return f"triton bm={row['block_m']}"
    return row["provider"]


def plot_op(rows: list[dict], op: str, panel_key: str, panel_title, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["op"] == op]
    if not rows:
        return None
    panels = sorted({r[panel_key] for r in rows}, key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else v))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        lines = defaultdict(list)
        for r in rows:
            if r[panel_key] == panel:
                lines[label(r)].append((int(r["experts"]), float(r["p50_ms"]), float(r["p20_ms"]),
                                        float(r["p80_ms"])))
        for name, pts in sorted(lines.items()):
            pts.sort()
            xs = [p[0] for p in pts]
            ax.plot(xs, [p[1] for p in pts], marker="o", label=name)
            ax.fill_between(xs, [p[2] for p in pts], [p[3] for p in pts], alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("experts")
        ax.set_ylabel("ms (median; band: p20-p80)")
        ax.set_title(panel_title(panel, rows[0]))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    first = rows[0]
    fig.suptitle(f"{op} on {first['device']} ({first['dtype']}, torch {first['torch']}"
                 f"{', triton ' + first['triton'] if first.get('triton') else ''})")
    fig.tight_layout()
    path = out / f"{op}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", type=Path, help="kernels.csv from bench_kernels.py")
    ap.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: the CSV's folder)")
    args = ap.parse_args(argv)
    if not args.csv.is_file():
        ap.error(f"{args.csv} does not exist; run benchmarks/bench_kernels.py --out DIR first")
    rows = load(args.csv)
    if not rows:
        print(f"{args.csv}: no successful rows to plot", file=sys.stderr)
        return 1
    out = args.out or args.csv.parent
    out.mkdir(parents=True, exist_ok=True)
    written = [
        plot_op(rows, "lora_forward", "distribution", lambda d, r: f"{d} (T={r['T']}, H={r['H']}, r={r['r']})", out),
        plot_op(rows, "topk_routing", "T", lambda t, r: f"T = {t}, k = {r['k']}", out),
    ]
    for path in written:
        if path:
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
