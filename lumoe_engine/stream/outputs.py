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
        loss_cfg, train_cfg = baseline_loss(method, beta=cfg.beta), cfg.train_config(baseline=True)
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
    seeds = {"stream": cfg.seed, "teach": cfg.teach_config().seed, "torch": cfg.seed, "evaluation": cfg.seed}
    return {"config": conf, "seeds": seeds}


def teach_brief(s: dict) -> dict:
    keys = ("fact_accuracy_image_text", "fact_accuracy_text_only", "fact_accuracy_heldout_phrasing",
            "fact_accuracy_fresh_images", "reached_target", "cached", "seconds", "cache_key", "model_dir")
    return {k: s.get(k) for k in keys}


def log_step(method, step, req, evaluator, cost) -> None:
    agg = evaluator.summary(method)["final"]
    leak = agg["max_forget_leak"]
    logger.info("%s step %d (%s): retain ratio %s, worst leak image+text %s text-only %s paraphrase %s; %.1f s "
                "(eval %.1f s)", method, step, req.id, _fmt(agg["retain_ratio"]), _fmt(leak.get("image_text")),
                _fmt(leak.get("text_only")), _fmt(leak.get("paraphrase")), cost.get("seconds") or 0,
                cost.get("eval_seconds") or 0)


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
                 "comes back.\n\n| request | reason | after step | leak before -> after (image+text / text-only / "
                 "paraphrase) | retain ratio after |\n|---|---|---|---|---|\n")
        for r in revs:
            lb, la = r.get("leak_before") or {}, r.get("leak_after") or {}
            leaks = " / ".join(f"{_fmt(lb.get(f))} -> {_fmt(la.get(f))}" for f in ("image_text", "text_only",
                                                                                    "paraphrase"))
            fin = r.get("final") or {}
            text += (f"| `{r['request']}` | {r.get('reason') or '–'} | {r.get('after_step')} | {leaks} | "
                     f"{_fmt(fin.get('retain_ratio'))} |\n")
    text += "\n## Training cost per request\n\n| method | first (s) | last (s) | last / first |\n|---|---|---|---|\n"
    for m, fc in flat:
        text += f"| {m} | {_fmt(fc.get('first'))} | {_fmt(fc.get('last'))} | {_fmt(fc.get('ratio_last_first'))} |\n"
    atomic_write(path, text)


def print_table(summary: dict, out: Path) -> None:
    forms = ("image_text", "text_only", "paraphrase")
    print(f"\nstream results ({out}):")
    print(f"  {'method':<8} {'retain':>7} " + " ".join(f"{'leak ' + f:>16}" for f in forms) + f" {'s/request':>10}")
    for m, s in summary["methods"].items():
        fin = s["final"]
        leaks = " ".join(f"{_fmt(fin['max_forget_leak'].get(f)):>16}" for f in forms)
        print(f"  {m:<8} {_fmt(fin['retain_ratio']):>7} {leaks} {_fmt(s.get('mean_seconds_per_request')):>10}")
    fails = sum(len(s.get("failures", [])) for s in summary["methods"].values())
    if fails:
        print(f"  {fails} request(s) failed: see report.md")
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
