"""Revoking a request of a stream run: ``revoke(out_dir, request_id)``.

The ledger records the revocation first, then the expert leaves the bank and its entry the gate (saved), then every
request learned so far is evaluated again: the rows are labelled ``after revoking <id>``, and summary.json / report.md
gain ``methods.lumoe.revocations`` (the revoked request's leak per form before and after). Idempotent.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from lumoe_engine.eval.metrics import MetricsWriter, StreamEvaluator
from lumoe_engine.stream.base import load_run
from lumoe_engine.stream.config import StreamConfig
from lumoe_engine.stream.lumoe import answer_queries
from lumoe_engine.stream.outputs import numeric, rewrite_outputs
from lumoe_engine.stream.steps import StepLog, saved_config


def revoke(out_dir, request_id: str, reason: Optional[str] = None) -> dict:
    """Withdraw request ``request_id`` of the stream run in ``out_dir``: the ledger records it as revoked first,
    then its expert leaves the bank and its entry the gate (saved), then every request learned so far is evaluated
    again (rows appended to metrics.jsonl with ``"revocation": <id>`` and ``"step_label": "after revoking <id>"``;
    their relapse is None: the revoked request's leak comes back by design) and summary.json / report.md are
    rewritten (``methods.lumoe.revocations``: one entry per revocation with the revoked request's leak per form
    before and after, and the aggregate after).

    Idempotent: revoking again changes nothing and returns the recorded result with ``"changed": False``. Refused
    (``LedgerLockedError``) while a stream process writes the run. Returns {request, reason, changed, removed_expert,
    removed_gate_entry, after_step, leak_before, leak_after, final}."""
    from lumoe_engine.gate.gate import Gate
    from lumoe_engine.ledger import Ledger
    from lumoe_engine.model.bank import ExpertBank

    out = Path(out_dir)
    saved = saved_config(out)
    log = StepLog(out, "lumoe")
    with Ledger(out / "ledger") as ledger:
        changed = ledger.revoke(request_id, reason=reason)  # UnknownRequestError for an id it does not hold
        removed_gate = removed_expert = False
        if (out / "gate" / "gate.json").is_file():
            gate = Gate.load(out / "gate")
            if request_id in gate:
                gate.remove_expert(request_id)
                gate.save(out / "gate")
                removed_gate = True
        if (out / "bank" / "manifest.json").is_file():
            bank = ExpertBank.open(out / "bank")
            if request_id in bank:
                bank.remove(request_id)
                removed_expert = True
        done = next((r for r in log.revocations() if r["request"] == request_id), None)
        if done is not None:
            return {**{k: v for k, v in done.items() if k != "rows"}, "changed": changed or removed_gate
                    or removed_expert}
        doc = evaluate_after_revocation(out, saved, request_id, reason)
        doc.update(removed_expert=removed_expert, removed_gate_entry=removed_gate)
        if doc.get("rows") is not None:
            log.save_revocation(doc)
            MetricsWriter(out, resume=True).append(doc["rows"])
            rewrite_outputs(out, saved)
        return {**{k: v for k, v in doc.items() if k != "rows"}, "changed": True}


def evaluate_after_revocation(out: Path, cfg: StreamConfig, request_id: str, reason) -> dict:
    from lumoe_engine.engine import LUMoEEngine
    from lumoe_engine.gate.gate import Gate
    from lumoe_engine.model.bank import ExpertBank

    log = StepLog(out, "lumoe")
    doc = {"request": request_id, "reason": reason, "time": round(time.time(), 3), "after_step": None,
           "leak_before": None, "leak_after": None, "final": None, "rows": None}
    model, processor, _, _, requests, evaluator, max_new, base_preds = load_run(cfg)
    recs = log.prefix(len(requests))
    if not recs:
        return doc  # nothing evaluated yet: the next step of the stream evaluates without the expert
    last = len(recs) - 1
    for rec in recs[:-1]:  # the history (relapse is measured against it)
        evaluator.evaluate_step(rec["step"], "lumoe", rec["predictions"], rec["routing"], cost=rec["cost"])
    before = StreamEvaluator(evaluator.benchmark, requests, split=evaluator.split, vocab=evaluator.vocab,
                             **cfg.evaluation_options())
    before.set_base(base_preds)
    prev_rows = before.evaluate_step(last, "lumoe", recs[-1]["predictions"], recs[-1]["routing"])
    bank = ExpertBank.open(out / "bank", create=True)
    gate = Gate.load(out / "gate") if (out / "gate" / "gate.json").is_file() else Gate.from_config(cfg.gate_config(), model)
    engine = LUMoEEngine(model, processor, bank, gate, top_k=1)
    t0 = time.perf_counter()
    preds, routing, tps = answer_queries(engine, evaluator.queries(last), max_new, cfg.eval_batch_size)
    engine.close()
    cost = numeric({"eval_seconds": round(time.perf_counter() - t0, 3), "tokens_per_s": tps,
                     "n_experts": len(gate), "resident_bytes": bank.resident_bytes})
    rows = evaluator.evaluate_step(last, "lumoe", preds, routing, cost=cost)
    label = f"after revoking {request_id}"
    for r in rows:
        r.update(revocation=request_id, step_label=label, relapse=None)

    def leak_of(rs):
        return {f"{r['data']}:{r['form']}": r["leak"] for r in rs
                if r["set"] == "forget" and r["request"] == request_id}

    doc.update(after_step=last, leak_before=leak_of(prev_rows), leak_after=leak_of(rows),
               final=evaluator.summary("lumoe")["final"], rows=rows)
    return doc


__all__ = ["revoke", "evaluate_after_revocation"]
