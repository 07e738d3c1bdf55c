"""What a stream run writes besides its metrics rows: summary.json, report.md (with the failed requests, revocations
and training cost), the PNG plots, config.json's document, the one-line log per step and the final table.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Optional

from lumoe_engine.data.streams import Request
from lumoe_engine.eval.metrics import MetricsWriter
from lumoe_engine.fileio import atomic_write
from lumoe_engine.stream.config import StreamConfig
from lumoe_engine.stream.steps import MethodState, StepLog
from lumoe_engine.unlearn.baselines import baseline_loss

logger = logging.getLogger("lumoe_engine.stream")


def write_outputs(out, evaluator, writer, config_doc, teach_summary, failures, extra, eval_info) -> dict:
    """summary.json (every method's ``StreamEvaluator.summary`` + costs + failures + revocations), plots, report.md;
    returns the summary document."""
    summaries = {m: evaluator.summary(m) for m in evaluator.methods}
    for m, s in summaries.items():
        s.update(extra.get(m, {}))
        s["failures"] = failures.get(m, [])
    revs = StepLog(out, "lumoe").revocations()
    if revs and "lumoe" in summaries:
        summaries["lumoe"]["revocations"] = [{k: v for k, v in r.items() if k != "rows"} for r in revs]
    doc_extra = {"failures": failures, "teach": teach_brief(teach_summary), "total_seconds": None,
                 "evaluation": eval_info}
    writer.write_summary(summaries, config=config_doc["config"], seeds=config_doc["seeds"], **doc_extra)
    summary = json.loads(writer.summary_path.read_text())
    write_figures_and_report(out, summary, writer, config_doc, failures)
    return summary


def method_extra(method: str, cfg: StreamConfig, state: MethodState, gate_config: Optional[dict] = None) -> dict:
    train_seconds = [r["train_seconds"] for r in state.records if r.get("train_seconds") is not None]
    if method == "lumoe":
        loss_cfg, train_cfg = cfg.loss_config(), cfg.train_config()
    else:
        loss_cfg, train_cfg = baseline_loss(method, beta=cfg.beta), cfg.train_config(baseline=True, method=method)
    doc = {"train_seconds_per_request": train_seconds, "flat_cost": flat_cost(train_seconds),
           "loss": dataclasses.asdict(loss_cfg), "train": train_cfg.to_dict()}
    if gate_config is not None:
        doc["gate"] = gate_config
    return doc


def failure_row(method: str, step: int, req: Request, exc: BaseException) -> dict:
    logger.error("%s: request %s (step %d) failed: %s: %s", method, req.id, step, type(exc).__name__, exc)
    return {"step": step, "method": method, "request": req.id, "request_index": step, "set": "failure",
            "form": None, "error_type": getattr(exc, "error_type", type(exc).__name__), "error": str(exc)}


def numeric(cost: dict) -> dict:
    return {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None)
            for k, v in cost.items()}


def flat_cost(seconds: list) -> dict:
    """Training seconds of the first and last request and their ratio (flat cost: the last request's training must not
    cost more than the first's); ``ratio_last_second`` leaves out the first request's one-time warm-up."""
    if not seconds:
        return {"first": None, "last": None, "ratio_last_first": None, "ratio_last_second": None, "n": 0}
    ratio = lambda a, b: round(a / b, 3) if b > 0 else None  # noqa: E731
    return {"first": seconds[0], "last": seconds[-1], "ratio_last_first": ratio(seconds[-1], seconds[0]),
            "ratio_last_second": ratio(seconds[-1], seconds[1]) if len(seconds) > 1 else None,
            "max_over_min": ratio(max(seconds), min(seconds)), "n": len(seconds)}


def config_document(cfg, teach_summary, bench, requests, max_new, world, eval_info) -> dict:
    conf = cfg.to_dict()
    conf.update(resolved_max_new_tokens=max_new, world_size=world, benchmark=str(bench.root),
                n_requests=len(requests), requests=[r.id for r in requests],
                surrogate_images=bench.surrogate_images, lumoe_loss=dataclasses.asdict(cfg.loss_config()),
                train=cfg.train_config().to_dict(), teach_config=cfg.teach_config().to_dict(),
                teach_model_dir=teach_summary.get("model_dir"), evaluation=eval_info)
    # one seed draws the whole chain: the synthetic world, the teaching of the base, the protocol's split, the stream
    conf["seed_roles"] = {"world": (cfg.teach_config().synthetic_overrides or {}).get("seed"),
                          "teach": cfg.teach_config().seed, "protocol": cfg.seed, "stream": cfg.seed}
    return {"config": conf, "seeds": [cfg.seed]}


def teach_brief(s: dict) -> dict:
    """The taught base's numbers a stream's summary carries (every fact accuracy, the picture checks, the time)."""
    keep = ("reached_target", "cached", "seconds", "train_seconds", "cache_key", "model_dir", "steps",
            "scene_recognition", "scene_target", "lookup_pixel", "lookup_features", "lookup_ceiling", "lookup_chance",
            "scene_checks_pass", "vision_pretrain_acc", "vision_pretrain_seconds")
    return {k: v for k, v in s.items() if k in keep or k.startswith("fact_accuracy_")}


def log_step(method, step, req, evaluator, cost) -> None:
    fin = evaluator.summary(method)["final"]
    leak = fin["test"]["leak"]
    logger.info("%s step %d (%s): retain ratio %s, general %s, worst test leak %s; judge %s; %.1f s (eval %.1f s)",
                method, step, req.id, _fmt(fin["retain_ratio_test"]), _fmt(fin["general_utility_ratio"]),
                ", ".join(f"{f} {_fmt(v)}" for f, v in leak.items()), _fmt(fin["test"]["judge_forget"]),
                cost.get("seconds") or 0, cost.get("eval_seconds") or 0)


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def write_figures_and_report(out: Path, summary: dict, writer: MetricsWriter, config_doc: dict, failures) -> None:
    from lumoe_engine.eval.metrics import read_rows
    from lumoe_engine.eval.plots import write_plots
    from lumoe_engine.eval.report import write_report

    write_plots(out, summary)
    path = write_report(out, summary, read_rows(writer.metrics_path), config_doc["config"])
    lines = [f"- {f['method']}, step {f['step']}, request `{f['request']}`: {f['error_type']}: {f['error']}"
             for fs in failures.values() for f in fs]
    flat = [(m, s.get("flat_cost", {})) for m, s in summary["methods"].items()]
    text = path.read_text(encoding="utf-8").rstrip("\n") + "\n\n## Failed requests\n\n"
    text += ("\n".join(lines) if lines else "None: every request was learned.") + "\n"
    revs = summary["methods"].get("lumoe", {}).get("revocations") or []
    if revs:
        text += ("\n## Revocations\n\nEach revoked request's expert and gate entry were removed, then every request "
                 "so far was evaluated again (rows with `revocation` in metrics.jsonl): the revoked request's leak "
                 "comes back.\n\n| request | reason | after step | test leak before -> after (image+text / "
                 "text-only / reworded) | retain ratio after |\n|---|---|---|---|---|\n")
        for r in revs:
            lb, la = r.get("leak_before") or {}, r.get("leak_after") or {}
            leaks = " / ".join(f"{_fmt(lb.get(f))} -> {_fmt(la.get(f))}" for f in ("test:image_text", "test:text_only",
                                                                                    "test:reworded"))
            fin = r.get("final") or {}
            text += (f"| `{r['request']}` | {r.get('reason') or '–'} | {r.get('after_step')} | {leaks} | "
                     f"{_fmt(fin.get('retain_ratio_test'))} |\n")
    text += "\n## Training cost per request\n\n| method | first (s) | last (s) | last / first |\n|---|---|---|---|\n"
    for m, fc in flat:
        text += f"| {m} | {_fmt(fc.get('first'))} | {_fmt(fc.get('last'))} | {_fmt(fc.get('ratio_last_first'))} |\n"
    atomic_write(path, text)


def print_table(summary: dict, out: Path) -> None:
    from lumoe_engine.data.protocol import TEST_FORMS

    short = {"image_text": "img+txt", "text_only": "text", "reworded": "reword", "name_variants": "variant",
             "alias": "alias", "fresh_scene": "scene"}
    print(f"\nstream results ({out}; test data: worst request's leak per form):")
    print(f"  {'method':<8} {'retain':>7} {'general':>8} " + " ".join(f"{short[f]:>8}" for f in TEST_FORMS)
          + f" {'judge':>6} {'refuse':>7} {'empty':>6} {'over-ref':>8} {'s/req':>7}")
    for m, s in summary["methods"].items():
        fin = s["final"]
        rates = fin["rates"]
        leaks = " ".join(f"{_fmt(fin['test']['leak'].get(f)):>8}" for f in TEST_FORMS)
        print(f"  {m:<8} {_fmt(fin['retain_ratio_test']):>7} {_fmt(fin['general_utility_ratio']):>8} {leaks} "
              f"{_fmt(fin['test']['judge_forget']):>6} {_fmt(rates.get('refusal_forget')):>7} "
              f"{_fmt(rates.get('empty_forget')):>6} {_fmt(rates.get('over_refusal')):>8} "
              f"{_fmt(s.get('mean_seconds_per_request')):>7}")
    fails = sum(len(s.get("failures", [])) for s in summary["methods"].values())
    if fails:
        print(f"  {fails} request(s) failed: see report.md")
    t = summary.get("teach") or {}
    if "train_seconds" in t:  # one seed (a --seeds summary keeps each seed's teaching under its seed)
        taught = f"taught in {t.get('train_seconds', 0):.0f} s" + (" (cached: loaded now)" if t.get("cached") else "")
        print(f"  base: {taught}; the run took {summary.get('total_seconds') or 0:.0f} s in all")
    print(f"  summary: {out / 'summary.json'}  report: {out / 'report.md'}")


def rewrite_outputs(out: Path, cfg: StreamConfig) -> None:
    """summary.json and report.md again (after a revocation), when the run wrote them; the summary keeps its
    measured values and gains ``methods.lumoe.revocations``."""
    path = out / "summary.json"
    if not path.is_file():
        return
    summary = json.loads(path.read_text(encoding="utf-8"))
    revs = StepLog(out, "lumoe").revocations()
    if "lumoe" in summary.get("methods", {}):
        summary["methods"]["lumoe"]["revocations"] = [{k: v for k, v in r.items() if k != "rows"} for r in revs]
    writer = MetricsWriter(out, resume=True)
    writer.write_summary(summary["methods"], config=summary.get("config"), seeds=summary.get("seeds"),
                         **{k: v for k, v in summary.items() if k not in ("methods", "config", "seeds",
                                                                           "schema_version")})
    config_doc = json.loads((out / "config.json").read_text(encoding="utf-8"))
    write_figures_and_report(out, summary, writer, config_doc, summary.get("failures", {}))


# ----------------------------------------------------------------------------------------------------- seeds
def _leaves(d, prefix=()):
    """(path, number or None) of every numeric or empty leaf of a nested dict (lists and texts skipped)."""
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _leaves(v, prefix + (k,))
    elif d is None:
        yield prefix, None
    elif isinstance(d, (int, float)) and not isinstance(d, bool):
        yield prefix, float(d)


def _put(doc: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        doc = doc.setdefault(k, {})
    doc[path[-1]] = value


def over_seeds(per_seed: dict[int, dict]) -> dict:
    """The summaries of several seeds' runs ({seed: summary.json document}) as one document: per method, ``final``
    = the mean over seeds of every numeric leaf of the seeds' finals (a leaf None in some seed: the mean of the
    others), and ``over_seeds`` = {seeds, per_seed: {seed: final}, mean, min, max} (the same leaves)."""
    seeds = sorted(per_seed)
    methods = list(dict.fromkeys(m for s in seeds for m in per_seed[s]["methods"]))
    out: dict = {}
    for m in methods:
        finals = {s: per_seed[s]["methods"][m]["final"] for s in seeds if m in per_seed[s]["methods"]}
        values: dict[tuple, list] = {}
        for f in finals.values():
            for path, v in _leaves(f):
                values.setdefault(path, []).append(v)
        stats = {"mean": {}, "min": {}, "max": {}}
        for path, vs in values.items():
            vs = [v for v in vs if v is not None]
            _put(stats["mean"], path, round(sum(vs) / len(vs), 6) if vs else None)
            _put(stats["min"], path, min(vs) if vs else None)
            _put(stats["max"], path, max(vs) if vs else None)
        first = per_seed[seeds[0]]["methods"].get(m, {})
        out[m] = {"final": stats["mean"], "over_seeds": {"seeds": sorted(finals), "per_seed": finals, **stats},
                  "mean_seconds_per_request": sum(per_seed[s]["methods"][m].get("mean_seconds_per_request") or 0
                                                  for s in finals) / len(finals),
                  "n_requests": first.get("n_requests"), "requests": first.get("requests")}
    return out


def write_seeds_report(out: Path, doc: dict) -> Path:
    """report.md of a several-seed run: per method and key number, mean (min, max) over the seeds, and a row per
    seed; each seed's own report is in ``seed-<s>/report.md``."""
    from lumoe_engine.data.protocol import TEST_FORMS

    keys = [("retain ratio (test)", ("retain_ratio_test",)), ("general utility", ("general_utility_ratio",))]
    keys += [(f"test leak {f}", ("test", "leak", f)) for f in TEST_FORMS]
    keys += [("request-data leak image_text", ("request_data", "leak", "image_text")),
             ("request-data leak text_only", ("request_data", "leak", "text_only")),
             ("judge forget (0-2)", ("test", "judge_forget")), ("refusal (forget)", ("rates", "refusal_forget")),
             ("empty (forget)", ("rates", "empty_forget")), ("over-refusal", ("rates", "over_refusal")),
             ("route acc (test)", ("test", "route_acc")), ("FPR", ("fpr",)), ("FPR general", ("fpr_general",))]

    def get(d, path):
        for k in path:
            d = (d or {}).get(k) if isinstance(d, dict) else None
        return d

    lines = ["# lumoe-engine: lifelong unlearning report over seeds", "",
             f"Seeds {', '.join(map(str, doc['seeds']))}: each seed draws the whole chain (the world, the teaching of "
             f"the base, the protocol's split, the stream). Mean (min, max) over the seeds; each seed's own report "
             f"is seed-<s>/report.md.", ""]
    for m, s in doc["methods"].items():
        o = s["over_seeds"]
        lines += [f"## {m}", "", "| quantity | mean (min, max) | " + " | ".join(f"seed {x}" for x in o["seeds"]) + " |",
                  "|---|---|" + "---|" * len(o["seeds"])]
        for label, path in keys:
            mean, lo, hi = get(o["mean"], path), get(o["min"], path), get(o["max"], path)
            per = " | ".join(_fmt(get(o["per_seed"][x], path)) for x in o["seeds"])
            lines.append(f"| {label} | {_fmt(mean)} ({_fmt(lo)}, {_fmt(hi)}) | {per} |")
        lines.append("")
    return atomic_write(out / "report.md", "\n".join(lines) + "\n")
