"""report.md: the results of a stream run as tables, and sentences generated from the numbers alone.

Input: the summary.json document (``MetricsWriter.write_summary``: ``methods.<m>`` = ``StreamEvaluator.summary``),
the metrics rows (metrics.jsonl), the resolved config. Every sentence of "The story in numbers" is produced by a
rule over those numbers (thresholds below); none is written in advance.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from lumoe_engine.eval.metrics import FORGET_FORMS
from lumoe_engine.fileio import atomic_write

FORM_NAMES = {"image_text": "image+text", "text_only": "text-only", "paraphrase": "paraphrase",
              "fresh_image": "fresh image"}
CHANGE_EPS = 0.02  # a change of a fraction (leak, retain ratio) smaller than this is called "no change"
SMALL_KNOWN = 20  # a leak measured on fewer known queries than this is flagged as resting on few queries
MAX_STEP_ROWS = 30  # step tables of longer streams show this many steps, evenly spread, first and last included
PLOTS = (("retain_curve.png", "retain ratio vs requests"), ("forget_curves.png", "leak vs requests"),
         ("gate.png", "gate accuracy and FPR vs experts"))


def _f(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}f}"


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _bytes(v) -> str:
    if v is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(v) < 1024 or unit == "GiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024.0
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _spread(n: int, k: int) -> list[int]:
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _mean(vs):
    vs = [v for v in vs if v is not None]
    return sum(vs) / len(vs) if vs else None


# ------------------------------------------------------------------------------------------------------- tables
def _final_table(methods: Mapping[str, dict]) -> list[str]:
    header = ["method", "retain ratio", "retain acc / base"]
    header += [f"worst leak {FORM_NAMES[f]} (known)" for f in FORGET_FORMS]
    header += ["max relapse", "route acc", "FPR", "s / request", "bytes / expert"]
    rows = []
    for m, s in methods.items():
        fin = s["final"]
        r = [m, _f(fin["retain_ratio"]), f"{_f(fin['retain_acc'])} / {_f(fin['base_acc'])}"]
        r += [f"{_f(fin['max_forget_leak'].get(f))} ({fin['n_known'].get(f, 0)})" for f in FORGET_FORMS]
        r += [_f(_maxv(fin["max_relapse"].values())), _f(fin.get("route_acc")), _f(fin.get("fpr")),
              _f(s.get("mean_seconds_per_request"), 2), _bytes(fin.get("bytes_per_expert"))]
        rows.append(r)
    return _table(header, rows)


def _maxv(vs):
    vs = [v for v in vs if v is not None]
    return max(vs) if vs else None


def _method_table(m: str, s: dict) -> list[str]:
    fin = s["final"]
    rows = [["retain ratio (retain + never-requested)", _f(fin["retain_ratio"])],
            ["retain ratio: retain sets", _f(fin["retain_ratio_by_set"].get("retain"))],
            ["retain ratio: never-requested", _f(fin["retain_ratio_by_set"].get("unrequested"))],
            ["retain accuracy / taught base", f"{_f(fin['retain_acc'])} / {_f(fin['base_acc'])} "
                                              f"({fin['n_retain']} queries)"]]
    for f in FORGET_FORMS:
        rows.append([f"worst leak, {FORM_NAMES[f]} (request; known queries)",
                     f"{_f(fin['max_forget_leak'].get(f))} ({fin['worst_request'].get(f) or '–'}; "
                     f"{fin['n_known'].get(f, 0)} known)"])
    for f in FORGET_FORMS:
        rows.append([f"max relapse, {FORM_NAMES[f]}", _f(fin["max_relapse"].get(f))])
    secs = [v for v in s.get("seconds_per_request", []) if v is not None]
    rows.append(["seconds per request (mean; first -> last)",
                 f"{_f(s.get('mean_seconds_per_request'), 2)} ({_f(secs[0], 2) if secs else '–'} -> "
                 f"{_f(secs[-1], 2) if secs else '–'})"])
    rows.append(["bytes per expert", _bytes(fin.get("bytes_per_expert"))])
    if fin.get("route_acc") is not None:
        rows.append([f"gate with {fin.get('n_experts')} experts: route acc / FPR",
                     f"{_f(fin['route_acc'])} / {_f(fin['fpr'])}"])
        rows.append(["gate FNR (no expert) per form",
                     ", ".join(f"{FORM_NAMES[f]} {_f(fin['fnr'].get(f))}" for f in FORGET_FORMS)])
    tps = [v for v in s["curves"].get("tokens_per_s", []) if v is not None]
    if tps:
        rows.append(["evaluation tokens/s (mean)", _f(_mean(tps), 1)])
    return _table(["quantity", "value"], rows)


def _step_table(s: dict) -> list[str]:
    c = s["curves"]
    n = len(c["step"])
    idx = _spread(n, MAX_STEP_ROWS)
    gated = any(v is not None for v in c["route_acc"])
    header = ["step", "request learned", "retain ratio"]
    header += [f"leak now {FORM_NAMES[f]}" for f in FORGET_FORMS]
    header += [f"max past leak {FORM_NAMES[f]}" for f in ("image_text", "paraphrase")]
    header += ["max relapse"]
    header += ["route acc", "FPR"] if gated else []
    header += ["seconds"]
    rows = []
    for i in idx:
        r = [str(c["step"][i]), str(c["request"][i]), _f(c["retain_ratio"][i])]
        r += [_f(c["current_leak"][f][i]) for f in FORGET_FORMS]
        r += [_f(c["max_past_leak"][f][i]) for f in ("image_text", "paraphrase")]
        r += [_f(_maxv(c["max_relapse"][f][i] for f in FORGET_FORMS))]
        r += [_f(c["route_acc"][i]), _f(c["fpr"][i])] if gated else []
        r += [_f(c["seconds"][i], 2)]
        rows.append(r)
    out = _table(header, rows)
    if len(idx) < n:
        out.append(f"\n({len(idx)} of {n} steps shown, evenly spread; every step is in metrics.jsonl.)")
    return out


# -------------------------------------------------------------------------------------------------------- story
def _retain_story(m: str, s: dict) -> list[str]:
    c = s["curves"]
    pts = [(st, v) for st, v in zip(c["n_learned"], c["retain_ratio"]) if v is not None]
    if not pts:
        return [f"{m}: no retain ratio could be measured (no retain or never-requested queries the base knew)."]
    if len(pts) == 1:
        return [f"{m}: retain ratio {_f(pts[0][1])} after {pts[0][0]} request(s) (one step measured)."]
    (n0, r0), (n1, r1) = pts[0], pts[-1]
    drops = sum(1 for (_, a), (_, b) in zip(pts, pts[1:]) if b < a - CHANGE_EPS)
    rises = sum(1 for (_, a), (_, b) in zip(pts, pts[1:]) if b > a + CHANGE_EPS)
    steps = len(pts) - 1
    if r1 < r0 - CHANGE_EPS:
        kind = ("cumulatively (it fell at most steps)" if drops * 2 >= steps else
                "overall, though it fell at only a minority of steps")
        return [f"{m}: retain ratio fell from {_f(r0)} after request {n0} to {_f(r1)} after request {n1} "
                f"({drops} drops and {rises} rises of more than {CHANGE_EPS} over {steps} steps): retained knowledge "
                f"degraded {kind}."]
    if r1 > r0 + CHANGE_EPS:
        return [f"{m}: retain ratio rose from {_f(r0)} after request {n0} to {_f(r1)} after request {n1} "
                f"({drops} drops, {rises} rises over {steps} steps)."]
    lo = min(v for _, v in pts)
    return [f"{m}: retain ratio held between {_f(lo)} and {_f(max(v for _, v in pts))} over {len(pts)} measured "
            f"steps ({_f(r0)} after request {n0}, {_f(r1)} after request {n1}): no cumulative degradation beyond "
            f"{CHANGE_EPS}."]


def _relapse_story(m: str, s: dict, rows: list[dict]) -> list[str]:
    mine = [r for r in rows if r.get("method") == m and r.get("set") == "forget" and r.get("relapse") is not None
            and not r.get("current")]
    if not mine:
        if len(s["curves"]["step"]) < 2:
            return [f"{m}: relapse cannot be judged from a single measured step."]
        return [f"{m}: relapse cannot be judged: no earlier request has a leak measured both when it was learned "
                f"and later (no known queries, or its learning step was not evaluated)."]
    worst = max(mine, key=lambda r: r["relapse"])
    if worst["relapse"] > CHANGE_EPS:
        n_rel = len({(r["request"], r["form"]) for r in mine if r["relapse"] > CHANGE_EPS})
        was = worst["leak"] - worst["relapse"]
        return [f"{m}: forgetting relapsed: request {worst['request']}'s {FORM_NAMES[worst['form']]} leak rose from "
                f"{_f(was)} when it was learned to {_f(worst['leak'])} at step {worst['step']} "
                f"({worst['n_known']} known queries); {n_rel} (request, form) pair(s) rose by more than "
                f"{CHANGE_EPS} at some step."]
    return [f"{m}: no relapse: no earlier request's leak rose by more than {CHANGE_EPS} above its value when it was "
            f"learned (largest rise {_f(worst['relapse'])}, over {len({r['request'] for r in mine})} earlier "
            f"requests)."]


def _forget_story(m: str, s: dict) -> list[str]:
    c, fin = s["curves"], s["final"]
    parts = []
    for f in FORGET_FORMS:
        cur = _mean(c["current_leak"][f])
        if cur is not None:
            parts.append(f"{FORM_NAMES[f]} {_pct(cur)}")
    out = []
    if parts:
        out.append(f"{m}: leak of the request just learned, mean over steps (known queries): " + ", ".join(parts)
                   + ".")
    it, para = fin["max_forget_leak"].get("image_text"), fin["max_forget_leak"].get("paraphrase")
    if it is not None and para is not None and para > it + CHANGE_EPS:
        out.append(f"{m}: forgetting generalises less to unseen wordings: worst paraphrase leak {_f(para)} vs "
                   f"{_f(it)} on the trained image+text wordings after the last request.")
    txt = fin["max_forget_leak"].get("text_only")
    if it is not None and txt is not None and txt > it + CHANGE_EPS:
        out.append(f"{m}: the text-only route leaks more than image+text (worst {_f(txt)} vs {_f(it)}).")
    small = [f"{FORM_NAMES[f]} ({fin['n_known'][f]})" for f in FORGET_FORMS
             if 0 < fin["n_known"].get(f, 0) < SMALL_KNOWN]
    if small:
        out.append(f"{m}: these final leaks rest on fewer than {SMALL_KNOWN} known queries: {', '.join(small)}.")
    return out


def _gate_story(m: str, s: dict) -> list[str]:
    fin, c = s["final"], s["curves"]
    if fin.get("route_acc") is None:
        return []
    pts = [(n, a, p) for n, a, p in zip(c["n_experts"], c["route_acc"], c["fpr"]) if a is not None]
    out = [f"{m}: with {fin.get('n_experts')} experts the gate sent {_pct(fin['route_acc'])} of forget queries to "
           f"their own expert and {_pct(fin['fpr'])} of retain/never-requested queries to some expert (FPR)."]
    if len(pts) >= 2 and pts[-1][1] < pts[0][1] - CHANGE_EPS:
        out.append(f"{m}: routing accuracy fell from {_pct(pts[0][1])} with {pts[0][0]} expert(s) to "
                   f"{_pct(pts[-1][1])} with {pts[-1][0]}.")
    return out


def _compare_story(methods: Mapping[str, dict]) -> list[str]:
    fin = {m: s["final"] for m, s in methods.items()}
    rr = {m: f["retain_ratio"] for m, f in fin.items() if f["retain_ratio"] is not None}
    out = []
    if len(rr) >= 2:
        hi, lo = max(rr, key=rr.get), min(rr, key=rr.get)
        out.append(f"After the last request the highest retain ratio is {hi}'s ({_f(rr[hi])}), the lowest "
                   f"{lo}'s ({_f(rr[lo])}).")
    wl = {m: f["max_forget_leak"].get("image_text") for m, f in fin.items()
          if f["max_forget_leak"].get("image_text") is not None}
    if len(wl) >= 2:
        best, worst = min(wl, key=wl.get), max(wl, key=wl.get)
        out.append(f"Worst image+text leak over all requests: lowest for {best} ({_f(wl[best])}), highest for "
                   f"{worst} ({_f(wl[worst])}).")
    return out


def _cost_story(m: str, s: dict) -> list[str]:
    secs = [v for v in s.get("seconds_per_request", []) if v is not None]
    if len(secs) < 2:
        return []
    k = max(1, len(secs) // 4)
    a, b = _mean(secs[:k]), _mean(secs[-k:])
    trend = "grew" if b > a * 1.25 else "shrank" if b < a / 1.25 else "stayed flat"
    return [f"{m}: seconds per request {trend}: {_f(a, 2)} s over the first {k} request(s), {_f(b, 2)} s over the "
            f"last {k}."]


def story(methods: Mapping[str, dict], rows: list[dict]) -> list[str]:
    """The sentences of "The story in numbers", each derived from the summary and rows by a fixed rule."""
    out = []
    for m, s in methods.items():
        out += _retain_story(m, s) + _relapse_story(m, s, rows) + _forget_story(m, s) + _gate_story(m, s)
        out += _cost_story(m, s)
    out += _compare_story(methods)
    empty = [FORM_NAMES[f] for f in FORGET_FORMS
             if all(s["final"]["n_known"].get(f, 0) == 0 for s in methods.values())]
    if empty:
        out.append(f"No known queries in form(s) {', '.join(empty)}: the benchmark has none, or the taught base "
                   f"answered none of them; those leaks are not measured.")
    return out


# ------------------------------------------------------------------------------------------------------- report
def write_report(out_dir: Union[str, Path], summary: Mapping, rows: Sequence[dict],
                 config: Optional[Mapping] = None) -> Path:
    """Writes ``out_dir/report.md`` (atomically) and returns its path.

    summary: the summary.json document ({"methods": {m: StreamEvaluator.summary(m)}, ...}); rows: metrics rows
    (metrics.jsonl); config: the resolved run config (shown as given).
    """
    if not isinstance(summary, Mapping) or not isinstance(summary.get("methods"), Mapping) or not summary["methods"]:
        raise ValueError("write_report: summary must be the summary.json document with a non-empty 'methods' "
                         "mapping (MetricsWriter.write_summary)")
    methods = summary["methods"]
    rows = list(rows)
    config = dict(config or summary.get("config") or {})
    out_dir = Path(out_dir)
    any_s = next(iter(methods.values()))
    lines = ["# lumoe-engine: lifelong unlearning report", ""]
    desc = [f"{any_s.get('n_requests', '?')} requests"]
    for k in ("stream", "benchmark", "data", "model"):
        if config.get(k) is not None:
            desc.append(f"{k} `{config[k]}`")
    lines.append("Run: " + "; ".join(desc) + f"; methods: {', '.join(methods)}.")
    if summary.get("seeds"):
        lines.append("Seeds: " + ", ".join(f"{k}={v}" for k, v in summary["seeds"].items()) + ".")
    if config.get("surrogate_images"):
        lines.append(f"Note: {config['surrogate_images']} image records had no image file; a deterministic "
                     f"surrogate per entity stood in.")
    lines += ["", "Leak = fraction of *known* forget queries (those the taught base answered correctly) whose answer "
              "reveals the ground truth (a key fact, or ROUGE-L recall >= 0.5); the number of known queries stands "
              "beside it. Retain ratio = accuracy on retain and never-requested queries over the taught base's "
              "on the same queries (1.0 = nothing lost). Relapse = a request's leak now minus its leak when it "
              "was learned.", ""]
    lines += ["## Final results", ""] + _final_table(methods) + [""]
    for name, what in PLOTS:
        if (out_dir / name).is_file():
            lines += [f"![{what}]({name})", ""]
    for m, s in methods.items():
        lines += [f"## {m}", ""] + _method_table(m, s) + ["", f"### {m}: step by step", ""] + _step_table(s) + [""]
    lines += ["## The story in numbers", ""] + [f"- {t}" for t in story(methods, rows)] + [""]
    if config:
        lines += ["## Config", "", "```"] + [f"{k}: {v}" for k, v in config.items()] + ["```", ""]
    return atomic_write(out_dir / "report.md", "\n".join(lines))


__all__ = ["write_report", "story", "CHANGE_EPS", "SMALL_KNOWN"]
