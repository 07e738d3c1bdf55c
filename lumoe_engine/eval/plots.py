"""Figures of a stream run (PNG, matplotlib Agg), every method on one figure.

- retain_curve.png: two panels vs requests learned: the retain ratio (retain + never-requested test queries, over
  the taught base) and the general-utility ratio (entity-free scene and world questions), every method;
- forget_curves.png: one panel per test form: worst leak over the requests learned so far (solid) and the leak of
  the request just learned (dashed), with the request data's worst leak (dotted) on the image+text and text-only
  panels: request data and test data side by side;
- gate.png: routing accuracy and false-positive rate vs number of experts (methods with a gate only; skipped when
  no method has one).

Input: the summary.json document (``{"methods": {m: StreamEvaluator.summary(m)}}``). When matplotlib is missing
the figures are skipped with one logged line.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Union

from lumoe_engine.data.protocol import TEST_FORMS
from lumoe_engine.eval.report import FORM_NAMES

log = logging.getLogger(__name__)


def _xy(xs, ys):
    pts = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def write_plots(out_dir: Union[str, Path], summary: Mapping) -> list[Path]:
    """Writes the figures into ``out_dir`` and returns their paths ([] when matplotlib is not installed)."""
    if not isinstance(summary, Mapping) or not isinstance(summary.get("methods"), Mapping) or not summary["methods"]:
        raise ValueError("write_plots: summary must be the summary.json document with a non-empty 'methods' "
                         "mapping (MetricsWriter.write_summary)")
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        log.warning("matplotlib is not installed: no plots written (pip install matplotlib)")
        return []
    methods = summary["methods"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    written = []

    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.0), sharey=True)
    for ax, key, title in ((axes[0], "retain_ratio_test", "Retained knowledge (retain + never-requested)"),
                           (axes[1], "general_utility_ratio", "General utility (scene and world questions)")):
        for m, s in methods.items():
            x, y = _xy(s["curves"]["n_learned"], s["curves"][key])
            ax.plot(x, y, marker="o", ms=3, color=colors[m], label=m)
        ax.axhline(1.0, color="0.6", lw=0.8, ls=":")
        ax.set_xlabel("requests learned")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("ratio (acc / taught base)")
    axes[1].legend(fontsize=8)
    written.append(_save(fig, out_dir / "retain_curve.png", plt))

    fig, axes = plt.subplots(2, 3, figsize=(12.0, 7.2), sharey=True, squeeze=False)
    for ax, form in zip([a for row in axes for a in row], TEST_FORMS):
        empty = True
        for m, s in methods.items():
            c = s["curves"]
            x, y = _xy(c["n_learned"], c["test_leak"][form])
            if x:
                empty = False
                ax.plot(x, y, marker="o", ms=3, color=colors[m], label=f"{m} worst so far (test)")
            x, y = _xy(c["n_learned"], c["current_test_leak"][form])
            if x:
                ax.plot(x, y, ls="--", lw=1, color=colors[m], label=f"{m} just learned (test)")
            if form in c["request_leak"]:
                x, y = _xy(c["n_learned"], c["request_leak"][form])
                if x:
                    ax.plot(x, y, ls=":", lw=1.2, color=colors[m], label=f"{m} worst so far (request data)")
        if empty:
            ax.text(0.5, 0.5, "no known queries", ha="center", va="center", transform=ax.transAxes, color="0.5")
        ax.set_title(f"leak: {FORM_NAMES[form]}", fontsize=10)
        ax.set_xlabel("requests learned")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("leak (known queries)")
    axes[1][0].set_ylabel("leak (known queries)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in [a for row in axes for a in row][1:]:
        if not handles:
            handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.tight_layout(rect=(0, 0.12, 1, 1))
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    else:
        fig.tight_layout()
    written.append(_save(fig, out_dir / "forget_curves.png", plt, tight=False))

    gated = {m: s for m, s in methods.items() if any(v is not None for v in s["curves"]["route_acc"])}
    if gated:
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for m, s in gated.items():
            c = s["curves"]
            xs = [n if n is not None else k for n, k in zip(c["n_experts"], c["n_learned"])]
            x, y = _xy(xs, c["route_acc"])
            ax.plot(x, y, marker="o", ms=3, color=colors[m], label=f"{m} routing accuracy")
            x, y = _xy(xs, c["fpr"])
            ax.plot(x, y, marker="x", ms=3, ls="--", color=colors[m], label=f"{m} FPR")
        ax.set_xlabel("experts in the bank")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("fraction of queries")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("Gate: routing accuracy and false positives")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save(fig, out_dir / "gate.png", plt))
    return written


def _save(fig, path: Path, plt, tight: bool = True) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    if tight:
        fig.tight_layout()
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


__all__ = ["write_plots"]
