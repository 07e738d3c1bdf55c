"""Plots of ``kernels.csv`` (written by ``bench_kernels.py``), one PNG per op, one line per provider.

    python benchmarks/plot_kernels.py runs/bench/kernels.csv [--out runs/bench] [--H 4096] [--r 16]

- the CPU comparison (``lora_forward``): ms vs experts, one panel per token distribution;
- the GPU suite (``lora_shrink``, ``lora_expand``, ``lora_shrink_expand``, ``lora_weight_grad``, ``lora_train``):
  ms (top) and share of the measured copy bandwidth (bottom) vs T, one panel per expert count, at one H and r;
- ``topk_routing`` / ``align_by_expert``: ms vs T, one panel per expert count.

Writes ``<op>.png`` next to the CSV (or in --out). Rows with an error or no time are left out.
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

GPU_LORA_OPS = ("lora_shrink", "lora_expand", "lora_shrink_expand", "lora_weight_grad", "lora_train")


def load(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return [r for r in csv.DictReader(fh) if r.get("p50_ms") and not r.get("error")]


def _num(v: str):
    return int(v) if v.isdigit() else v


def plot(rows: list[dict], op: str, panel_key: str, x_key: str, title, out: Path, share: bool) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["op"] == op]
    if not rows:
        return None
    share = share and any(r.get("bw_share") for r in rows)
    panels = sorted({r[panel_key] for r in rows}, key=lambda v: (not v.isdigit(), _num(v)))
    providers = sorted({r["provider"] for r in rows})
    color = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(providers)}       # one colour per provider
    nrow = 2 if share else 1
    fig, axes = plt.subplots(nrow, len(panels), figsize=(4.5 * len(panels), 3.6 * nrow), squeeze=False)
    for col, panel in enumerate(panels):
        lines = defaultdict(list)
        for r in rows:
            if r[panel_key] == panel:
                lines[r["provider"]].append((int(r[x_key]), float(r["p50_ms"]), float(r["p20_ms"]),
                                             float(r["p80_ms"]), float(r.get("bw_share") or "nan")))
        for name, pts in sorted(lines.items()):
            pts.sort()
            xs = [p[0] for p in pts]
            ax = axes[0][col]
            ax.plot(xs, [p[1] for p in pts], marker="o", label=name, color=color[name])
            ax.fill_between(xs, [p[2] for p in pts], [p[3] for p in pts], alpha=0.15, color=color[name])
            if share:
                axes[1][col].plot(xs, [p[4] for p in pts], marker="o", label=name, color=color[name])
        for i in range(nrow):
            ax = axes[i][col]
            ax.set_xscale("log", base=2)
            ax.set_xlabel(x_key)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        axes[0][col].set_yscale("log")
        axes[0][col].set_ylabel("ms (median; band: p20-p80)")
        axes[0][col].set_title(title(panel, rows[0]))
        if share:
            axes[1][col].set_ylabel("share of the copy bandwidth")
            axes[1][col].axhline(0.7, color="grey", linestyle="--", linewidth=0.8)
    first = rows[0]
    fig.suptitle(f"{op} on {first['device']} ({first['dtype']}, torch {first['torch']}"
                 f"{', triton ' + first['triton'] if first.get('triton') else ''})")
    fig.tight_layout()
    path = out / f"{op}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", type=Path, help="kernels.csv from bench_kernels.py")
    ap.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: the CSV's folder)")
    ap.add_argument("--H", default=None, help="hidden size of the GPU LoRA plots (default: the smallest measured)")
    ap.add_argument("--r", default=None, help="rank of the GPU LoRA plots (default: 16 if measured)")
    args = ap.parse_args(argv)
    if not args.csv.is_file():
        ap.error(f"{args.csv} does not exist; run benchmarks/bench_kernels.py --out DIR first")
    rows = load(args.csv)
    if not rows:
        print(f"{args.csv}: no successful rows to plot", file=sys.stderr)
        return 1
    out = args.out or args.csv.parent
    out.mkdir(parents=True, exist_ok=True)
    lora = [r for r in rows if r["op"] in GPU_LORA_OPS]
    if lora:
        hs = sorted({r["H"] for r in lora}, key=int)
        rs = sorted({r["r"] for r in lora}, key=int)
        H = args.H or hs[0]
        rank = args.r or ("16" if "16" in rs else rs[0])
        lora = [r for r in lora if r["H"] == H and r["r"] == rank]
    written = [plot(rows, "lora_forward", "distribution", "experts",
                    lambda d, r: f"{d} (T={r['T']}, H={r['H']}, r={r['r']})", out, share=False)]
    for op in GPU_LORA_OPS:
        written.append(plot(lora, op, "experts", "T", lambda e, r: f"{e} experts (H={r['H']}, r={r['r']})", out,
                            share=True))
    for op in ("topk_routing", "align_by_expert"):
        by_t = any(r["op"] == op and r["provider"] == "triton" for r in rows)
        written.append(plot(rows, op, "experts" if by_t else "T", "T" if by_t else "experts",
                            lambda p, r: f"{p} ({'experts' if by_t else 'T'}), k = {r['k']}", out, share=by_t))
    for path in written:
        if path:
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
