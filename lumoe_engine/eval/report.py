"""report.md: the results of a stream run as tables, and sentences generated from the numbers alone.

Input: the summary.json document (``MetricsWriter.write_summary``: ``methods.<m>`` = ``StreamEvaluator.summary``),
the metrics rows (metrics.jsonl), the resolved config. Every sentence of "The story in numbers" is produced by a
rule over those numbers (thresholds below); none is written in advance.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from lumoe_engine.data.protocol import REQUEST_FORMS, TEST_FORMS
from lumoe_engine.fileio import atomic_write

FORM_NAMES = {"image_text": "image+text", "text_only": "text-only", "reworded": "reworded", "name_variants":
              "name variants", "alias": "alias", "fresh_scene": "fresh scene"}
CHANGE_EPS = 0.02  # a change of a fraction (leak, retain ratio) smaller than this is called "no change"
SMALL_KNOWN = 20  # a leak measured on fewer known queries than this is flagged as resting on few queries
MAX_STEP_ROWS = 30  # step tables of longer streams show this many steps, evenly spread, first and last included
PLOTS = (("retain_curve.png", "retain and general utility vs requests"), ("forget_curves.png", "leak vs requests"),
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
def _maxv(vs):
    vs = [v for v in vs if v is not None]
    return max(vs) if vs else None


def _final_table(methods: Mapping[str, dict]) -> list[str]:
    header = ["method", "retain ratio (test)", "general utility"]
    header += [f"leak {FORM_NAMES[f]}" for f in TEST_FORMS]
    header += ["judge (forget, 0-2)", "refusal / empty (forget)", "over-refusal", "route acc", "FPR",
               "s / request"]
    rows = []
    for m, s in methods.items():
        fin = s["final"]
        t, rates = fin["test"], fin["rates"]
        r = [m, _f(fin["retain_ratio_test"]), _f(fin["general_utility_ratio"])]
        r += [f"{_f(t['leak'].get(f))} ({t['n_known'].get(f, 0)})" for f in TEST_FORMS]
        r += [_f(t.get("judge_forget"), 2), f"{_f(rates.get('refusal_forget'))} / {_f(rates.get('empty_forget'))}",
              _f(rates.get("over_refusal")), _f(t.get("route_acc")), _f(fin.get("fpr")),
              _f(s.get("mean_seconds_per_request"), 2)]
        rows.append(r)
    return _table(header, rows)


def _side_by_side(methods: Mapping[str, dict]) -> list[str]:
    """Request data and test data side by side per form: what the request showed vs what the world asks later."""
    header = ["method"] + [f"request {FORM_NAMES[f]}" for f in REQUEST_FORMS] + \
        [f"test {FORM_NAMES[f]}" for f in TEST_FORMS] + ["judge request / test"]
    rows = []
    for m, s in methods.items():
        fin = s["final"]
        rd, t = fin["request_data"], fin["test"]
        r = [m] + [f"{_f(rd['leak'].get(f))} ({rd['n_known'].get(f, 0)})" for f in REQUEST_FORMS]
        r += [f"{_f(t['leak'].get(f))} ({t['n_known'].get(f, 0)})" for f in TEST_FORMS]
        r += [f"{_f(rd.get('judge_forget'), 2)} / {_f(t.get('judge_forget'), 2)}"]
        rows.append(r)
    return _table(header, rows)


def _method_table(m: str, s: dict) -> list[str]:
    fin = s["final"]
    t, rates = fin["test"], fin["rates"]
    rows = [["retain ratio, test queries (retain + never-requested)", _f(fin["retain_ratio_test"])],
            ["retain ratio: retain sets / never-requested", f"{_f(fin['retain_ratio_by_set'].get('retain'))} / "
                                                            f"{_f(fin['retain_ratio_by_set'].get('unrequested'))}"],
            ["retain accuracy / taught base", f"{_f(fin['retain_acc'])} / {_f(fin['base_acc'])} "
                                              f"({fin['n_retain']} queries)"],
            ["general utility ratio (accuracy / taught base)", f"{_f(fin['general_utility_ratio'])} "
                                                               f"({_f(fin['general_acc'])} / "
                                                               f"{_f(fin['general_base_acc'])}, "
                                                               f"{fin['n_general']} queries)"],
            ["judge: forget (test) / forget (request data) / retain",
             f"{_f(t.get('judge_forget'), 2)} / {_f(fin['request_data'].get('judge_forget'), 2)} / "
             f"{_f(fin.get('judge_retain'), 2)}"],
            ["forget answers: refusal / empty / degenerate", f"{_f(rates.get('refusal_forget'))} / "
                                                              f"{_f(rates.get('empty_forget'))} / "
                                                              f"{_f(rates.get('degenerate_forget'))}"],
            ["over-refusal (retain, never-requested, general)", _f(rates.get("over_refusal"))]]
    for f in TEST_FORMS:
        rows.append([f"worst test leak, {FORM_NAMES[f]} (request; known queries)",
                     f"{_f(t['leak'].get(f))} ({t['worst_request'].get(f) or '–'}; {t['n_known'].get(f, 0)} known)"])
    rows.append(["max relapse (test forms)", _f(_maxv(t["max_relapse"].values()))])
    secs = [v for v in s.get("seconds_per_request", []) if v is not None]
    rows.append(["seconds per request (mean; first -> last)",
                 f"{_f(s.get('mean_seconds_per_request'), 2)} ({_f(secs[0], 2) if secs else '–'} -> "
                 f"{_f(secs[-1], 2) if secs else '–'})"])
    rows.append(["bytes per expert", _bytes(fin.get("bytes_per_expert"))])
    if t.get("route_acc") is not None:
        rows.append([f"gate with {fin.get('n_experts')} experts: route acc test / request data, FPR, FPR general",
                     f"{_f(t['route_acc'])} / {_f(fin['request_data'].get('route_acc'))}, {_f(fin['fpr'])}, "
                     f"{_f(fin.get('fpr_general'))}"])
        rows.append(["gate FNR (no expert) per test form",
                     ", ".join(f"{FORM_NAMES[f]} {_f(t['fnr'].get(f))}" for f in TEST_FORMS)])
    tps = [v for v in s["curves"].get("tokens_per_s", []) if v is not None]
    if tps:
        rows.append(["evaluation tokens/s (mean)", _f(_mean(tps), 1)])
    return _table(["quantity", "value"], rows)


def _step_table(s: dict) -> list[str]:
    c = s["curves"]
    n = len(c["step"])
    idx = _spread(n, MAX_STEP_ROWS)
    gated = any(v is not None for v in c["route_acc"])
    header = ["step", "request learned", "retain ratio", "general utility"]
    header += [f"worst leak {FORM_NAMES[f]}" for f in TEST_FORMS]
    header += ["judge", "over-refusal"] + (["route acc", "FPR"] if gated else []) + ["seconds"]
    rows = []
    for i in idx:
        sampled = c.get("sweep") and not c["sweep"][i]  # bounded evaluation: the new request and an audit sample
        step = str(c["step"][i])
        if sampled:
            step += f" ({c['n_measured'][i]} of {c['n_learned'][i]} measured)"
        r = [step, str(c["request"][i]), _f(c["retain_ratio_test"][i]),
             _f(c["general_utility_ratio"][i])]
        r += [_f(c["test_leak"][f][i]) for f in TEST_FORMS]
        r += [_f(c["judge_forget"][i], 2), _f(c["over_refusal"][i])]
        r += [_f(c["route_acc"][i]), _f(c["fpr"][i])] if gated else []
        r += [_f(c["seconds"][i], 2)]
        rows.append(r)
    out = _table(header, rows)
    if len(idx) < n:
        out.append(f"\n({len(idx)} of {n} steps shown, evenly spread; every step is in metrics.jsonl.)")
    return out


# -------------------------------------------------------------------------------------------------------- story
def _curve_story(m: str, what: str, n_learned, values) -> list[str]:
    pts = [(st, v) for st, v in zip(n_learned, values) if v is not None]
    if not pts:
        return [f"{m}: no {what} could be measured (no such queries the base knew)."]
    if len(pts) == 1:
        return [f"{m}: {what} {_f(pts[0][1])} after {pts[0][0]} request(s) (one step measured)."]
    (n0, r0), (n1, r1) = pts[0], pts[-1]
    drops = sum(1 for (_, a), (_, b) in zip(pts, pts[1:]) if b < a - CHANGE_EPS)
    rises = sum(1 for (_, a), (_, b) in zip(pts, pts[1:]) if b > a + CHANGE_EPS)
    steps = len(pts) - 1
    if r1 < r0 - CHANGE_EPS:
        kind = ("cumulatively (it fell at most steps)" if drops * 2 >= steps else
                "overall, though it fell at only a minority of steps")
        return [f"{m}: {what} fell from {_f(r0)} after request {n0} to {_f(r1)} after request {n1} ({drops} drops "
                f"and {rises} rises of more than {CHANGE_EPS} over {steps} steps): it degraded {kind}."]
    if r1 > r0 + CHANGE_EPS:
        return [f"{m}: {what} rose from {_f(r0)} after request {n0} to {_f(r1)} after request {n1} ({drops} drops, "
                f"{rises} rises over {steps} steps)."]
    lo = min(v for _, v in pts)
    return [f"{m}: {what} held between {_f(lo)} and {_f(max(v for _, v in pts))} over {len(pts)} measured steps "
            f"({_f(r0)} after request {n0}, {_f(r1)} after request {n1}): no cumulative degradation beyond "
            f"{CHANGE_EPS}."]


def _relapse_story(m: str, s: dict, rows: list[dict]) -> list[str]:
    mine = [r for r in rows if r.get("method") == m and r.get("set") == "forget" and r.get("data") == "test"
            and r.get("relapse") is not None and not r.get("current")]
    if not mine:
        if len(s["curves"]["step"]) < 2:
            return [f"{m}: relapse cannot be judged from a single measured step."]
        return [f"{m}: relapse cannot be judged: no earlier request has a test leak measured both when it was "
                f"learned and later (no known queries, or its learning step was not evaluated)."]
    worst = max(mine, key=lambda r: r["relapse"])
    if worst["relapse"] > CHANGE_EPS:
        n_rel = len({(r["request"], r["form"]) for r in mine if r["relapse"] > CHANGE_EPS})
        was = worst["leak"] - worst["relapse"]
        return [f"{m}: forgetting relapsed: request {worst['request']}'s {FORM_NAMES[worst['form']]} test leak rose "
                f"from {_f(was)} when it was learned to {_f(worst['leak'])} at step {worst['step']} "
                f"({worst['n_known']} known queries); {n_rel} (request, form) pair(s) rose by more than "
                f"{CHANGE_EPS} at some step."]
    return [f"{m}: no relapse: no earlier request's test leak rose by more than {CHANGE_EPS} above its value when "
            f"it was learned (largest rise {_f(worst['relapse'])}, over {len({r['request'] for r in mine})} earlier "
            f"requests)."]


def _forget_story(m: str, s: dict) -> list[str]:
    fin = s["final"]
    t, rd, rates = fin["test"], fin["request_data"], fin["rates"]
    out = []
    seen, unseen = _maxv(rd["leak"].values()), _maxv(t["leak"].values())
    if seen is not None and unseen is not None and unseen > seen + CHANGE_EPS:
        worst = max((f for f in TEST_FORMS if t["leak"].get(f) is not None), key=lambda f: t["leak"][f])
        out.append(f"{m}: forgetting does not carry from what the request showed to what the world asks: worst leak "
                   f"on request data {_f(seen)}, on test data {_f(unseen)} (worst form {FORM_NAMES[worst]}).")
    elif seen is not None and unseen is not None:
        out.append(f"{m}: forgetting carries to the test data: worst leak on request data {_f(seen)}, on test data "
                   f"{_f(unseen)}.")
    ef, rf = rates.get("empty_forget"), rates.get("refusal_forget")
    if ef is not None and ef > 0.1:
        out.append(f"{m}: {_pct(ef)} of the forget test answers are empty: silence, not forgetting (judge 1).")
    if rf is not None and rf > 0.5:
        out.append(f"{m}: {_pct(rf)} of the forget test answers are refusals.")
    orr = rates.get("over_refusal")
    if orr is not None and orr > 0.01:
        out.append(f"{m}: it refuses {_pct(orr)} of the retain, never-requested and general queries (over-refusal).")
    small = [f"{FORM_NAMES[f]} ({t['n_known'][f]})" for f in TEST_FORMS if 0 < t["n_known"].get(f, 0) < SMALL_KNOWN]
    if small:
        out.append(f"{m}: these final test leaks rest on fewer than {SMALL_KNOWN} known queries: {', '.join(small)}.")
    return out


def _gate_story(m: str, s: dict) -> list[str]:
    fin, c = s["final"], s["curves"]
    if fin["test"].get("route_acc") is None:
        return []
    pts = [(n, a) for n, a in zip(c["n_experts"], c["route_acc"]) if a is not None]
    out = [f"{m}: with {fin.get('n_experts')} experts the gate sent {_pct(fin['test']['route_acc'])} of forget test "
           f"queries to their own expert, {_pct(fin['fpr'])} of retain/never-requested and "
           f"{_pct(fin.get('fpr_general'))} of general queries to some expert."]
    if len(pts) >= 2 and pts[-1][1] < pts[0][1] - CHANGE_EPS:
        out.append(f"{m}: routing accuracy fell from {_pct(pts[0][1])} with {pts[0][0]} expert(s) to "
                   f"{_pct(pts[-1][1])} with {pts[-1][0]}.")
    return out


def _compare_story(methods: Mapping[str, dict]) -> list[str]:
    fin = {m: s["final"] for m, s in methods.items()}
    out = []
    for key, what in (("retain_ratio_test", "retain ratio"), ("general_utility_ratio", "general utility ratio")):
        rr = {m: f[key] for m, f in fin.items() if f.get(key) is not None}
        if len(rr) >= 2:
            hi, lo = max(rr, key=rr.get), min(rr, key=rr.get)
            out.append(f"After the last request the highest {what} is {hi}'s ({_f(rr[hi])}), the lowest "
                       f"{lo}'s ({_f(rr[lo])}).")
    wl = {m: _maxv(f["test"]["leak"].values()) for m, f in fin.items()}
    wl = {m: v for m, v in wl.items() if v is not None}
    if len(wl) >= 2:
        best, worst = min(wl, key=wl.get), max(wl, key=wl.get)
        out.append(f"Worst test leak over all forms and requests: lowest for {best} ({_f(wl[best])}), highest for "
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
        c = s["curves"]
        out += _curve_story(m, "retain ratio", c["n_learned"], c["retain_ratio_test"])
        out += _curve_story(m, "general utility ratio", c["n_learned"], c["general_utility_ratio"])
        out += _relapse_story(m, s, rows) + _forget_story(m, s) + _gate_story(m, s) + _cost_story(m, s)
    out += _compare_story(methods)
    empty = [FORM_NAMES[f] for f in TEST_FORMS
             if all(s["final"]["test"]["n_known"].get(f, 0) == 0 for s in methods.values())]
    if empty:
        out.append(f"No known test queries in form(s) {', '.join(empty)}: the benchmark has none, or the taught base "
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
        lines.append("Seeds: " + ", ".join(str(s) for s in summary["seeds"]) + " (a seed draws the whole chain: the "
                     "world, the teaching of the base, the protocol's split, the stream).")
    if config.get("audit") is not None:
        every = (f"after every {config['sweep_every']}-th request and " if config.get("sweep_every") else "")
        lines.append(f"Bounded evaluation: after each request, that request in full and a seeded sample of at most "
                     f"{config['audit']} earlier ones; every request so far {every}after the last one. A step's worst "
                     f"leak and relapse are over the requests it measured (the step table says how many); the final "
                     f"results are a full sweep.")
    if config.get("surrogate_images"):
        lines.append(f"Note: {config['surrogate_images']} image records had no image file; a deterministic "
                     f"surrogate per entity stood in.")
    lines += ["", "Request data = what a removal request carried (some pictures, some wordings); test data = what "
              "the world asks later and no request, trainer, gate or calibration saw: the entity's other taught "
              "questions, held-out wordings (reworded), its name as people type it (name variants), its alias, "
              "new scenes (fresh scene) (lumoe_engine/data/protocol.py). Leak = fraction of *known* forget queries "
              "(those the taught base answered correctly) whose answer reveals the ground truth (a key fact, or "
              "ROUGE-L recall >= 0.5), worst request; the number of known queries stands beside it. Judge = "
              "MLUBench's 0/1/2 (forget: 2 refusal or an answer without the fact, 1 part of it, empty or babble, "
              "0 the fact). Retain ratio = accuracy on retain and never-requested test queries over the taught "
              "base's; general utility = the same on entity-free scene and world questions.", ""]
    lines += ["## Final results (test data)", ""] + _final_table(methods) + [""]
    lines += ["## Request data vs test data", ""] + _side_by_side(methods) + [""]
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
