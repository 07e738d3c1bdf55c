"""Stream metrics: after each request t, every request i <= t is measured, one row per (step, request, data, form)
and method, by the protocol's split (``data.protocol``: what a request carried vs. what the world asks later).

The evaluator is decoupled from how answers are produced: it says which queries it needs (``queries``), takes the
answers as ``{uid: text}`` (and, for a gated method, the experts each query was routed to), and scores them with
``eval.scoring`` (fact correctness, leak) and ``eval.judge`` (MLUBench's 0/1/2 judge; refusal / empty / degenerate).

Evaluation sets (each capped by a seeded sample stratified over entity x form x kind):

- per request, forget: ``request`` data (``REQUEST_FORMS``: the records the request carried, image+text and
  text-only) and ``test`` data (``TEST_FORMS``: image_text and text_only = the entity's other taught questions,
  reworded = held-out wording families, name_variants, alias, fresh_scene = held-out pictures);
- per request, retain: ``retain`` (the test records of its retain entities);
- once per stream: ``unrequested`` (test records of entities no request names) and ``general`` (the general-utility
  test queries: entity-free scene and world questions).

Forget leak and the forget judge count only *known* queries: those the taught base answered fact-correctly
(``set_base``); what the base never knew proves no forgetting; ``n_known`` stands beside every leak. Refusal, empty
and degenerate rates count every answer.

Row fields (every row; None where a field does not apply or has no data):
  step, method, request (None for the shared sets), request_index, set ("forget" | "retain"), data ("request" |
  "test"), form, current, n, n_known, n_experts, judge (mean 0-2), refusal_rate, empty_rate, degenerate_rate,
  forget rows: leak, key_leak, rougeL_recall (means over known queries), leak_all (over all n), relapse (leak now -
               leak at the step the request was learned), route_acc (routed to the request's own expert), fnr;
  retain rows: retain_acc (fact-correct rate), base_acc (the base, same queries), retain_ratio, fpr (routed to any
               expert);
  every row:   utility_retention (retain_ratio_test so far), seconds, bytes_per_expert, tokens_per_s and any other
               cost keys given.

Gate: expert ids are request ids (``Request.id``); ``routing[uid]`` lists the experts a query was routed to
([] = none).
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
from collections import defaultdict
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

from lumoe_engine.data.protocol import REQUEST_FORMS, TEST_FORMS, Split
from lumoe_engine.data.records import GENERAL_ENTITY, Benchmark, QARecord
from lumoe_engine.data.streams import Request
from lumoe_engine.eval.judge import answer_kind, judge_forget, judge_retain
from lumoe_engine.eval.scoring import fact_correct, leak
from lumoe_engine.fileio import atomic_write
from lumoe_engine.seeding import stable_seed
from lumoe_engine.unlearn.refusal import DEFAULT_REFUSAL

log = logging.getLogger(__name__)

RETAIN_SETS = ("retain", "unrequested", "general")
SHARED_SETS = ("unrequested", "general")   # sampled once per stream, one row per step
FORGET_SETS = tuple(("request", f) for f in REQUEST_FORMS) + tuple(("test", f) for f in TEST_FORMS)
DEFAULT_MAX_PER_SET = 40  # queries per set per request: ~11 sets x 40 keeps a CPU evaluation step in seconds
COST_KEYS = ("seconds", "bytes_per_expert", "tokens_per_s", "n_experts")
SCHEMA_VERSION = 2

_ROW_FIELDS = ("step", "method", "request", "request_index", "set", "data", "form", "current", "n", "n_known",
               "n_experts", "judge", "refusal_rate", "empty_rate", "degenerate_rate", "leak", "key_leak",
               "rougeL_recall", "leak_all", "relapse", "route_acc", "fnr", "retain_acc", "base_acc", "retain_ratio",
               "fpr", "utility_retention", "seconds", "bytes_per_expert", "tokens_per_s")


def _mean(values) -> Optional[float]:
    values = list(values)
    return sum(values) / len(values) if values else None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def _max(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return max(values) if values else None


def _one_minus(v: Optional[float]) -> Optional[float]:
    return None if v is None else 1.0 - v


def stratified_sample(records: list[QARecord], cap: Optional[int], seed: int) -> list[QARecord]:
    """At most ``cap`` records, spread evenly over the strata (entity, form, kind); seeded, order-independent.

    Strata are visited round robin in a seeded order, each stratum shuffled by the seed; ``cap`` None keeps all.
    The result is in the records' original order.
    """
    if cap is None or len(records) <= cap:
        return list(records)
    rng = random.Random(seed)
    strata: dict[tuple, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        strata[(r.entity, r.form, r.kind)].append(i)
    keys = sorted(strata)
    rng.shuffle(keys)
    for k in keys:
        rng.shuffle(strata[k])
    picked: list[int] = []
    depth = 0
    while len(picked) < cap:
        for k in keys:
            if depth < len(strata[k]) and len(picked) < cap:
                picked.append(strata[k][depth])
        depth += 1
    return [records[i] for i in sorted(picked)]


class StreamEvaluator:
    """Measures a stream of requests step by step, for any number of methods (see the module docstring).

    benchmark:        the Benchmark the requests were built from
    requests:         the stream in learning order (ids unique), each carrying its request data (``Split.carry``)
    split:            the protocol's split of ``benchmark`` (default ``Split(benchmark)``); must be the one that
                      carried the requests
    base_predictions: the taught base model's answers {uid: text}, or None (then call ``set_base`` before
                      ``evaluate_step``)
    max_per_set:      cap of every evaluation set (None = no cap); seed: seeds the stratified samples
    refusal:          the refusal text the judge recognises (besides the common phrasings); vocab: the tokenizer's
                      words, for the judge's degenerate rule (``judge.vocab_words``; None = not used)
    audit:            bounded evaluation (long streams): after request t, the new request in full plus a seeded
                      sample of at most ``audit`` earlier requests (a fresh sample each step); None = every earlier
                      request at every step
    sweep_every:      with ``audit``, every request so far is measured after every ``sweep_every``-th request and
                      after the last one (0 = only after the last one)
    """

    def __init__(self, benchmark: Benchmark, requests: list[Request], split: Optional[Split] = None,
                 base_predictions: Optional[Mapping[str, str]] = None,
                 max_per_set: Optional[int] = DEFAULT_MAX_PER_SET, seed: int = 0, refusal: str = DEFAULT_REFUSAL,
                 vocab: Optional[set] = None, audit: Optional[int] = None, sweep_every: int = 0):
        if not isinstance(benchmark, Benchmark):
            raise TypeError(f"StreamEvaluator: benchmark must be a Benchmark, got {type(benchmark).__name__}")
        requests = list(requests)
        if not requests or not all(isinstance(r, Request) for r in requests):
            raise ValueError("StreamEvaluator: requests must be a non-empty list of streams.Request "
                             "(streams.build_stream(benchmark, spec))")
        ids = [r.id for r in requests]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"StreamEvaluator: request id {dup[0]!r} occurs more than once; ids must be unique")
        if max_per_set is not None and (not isinstance(max_per_set, int) or isinstance(max_per_set, bool)
                                        or max_per_set < 1):
            raise ValueError(f"max_per_set must be a positive int or None; got {max_per_set!r}")
        if audit is not None and (isinstance(audit, bool) or not isinstance(audit, int) or audit < 0):
            raise ValueError(f"audit={audit!r}: expected an int >= 0 (earlier requests sampled per step) or None")
        if isinstance(sweep_every, bool) or not isinstance(sweep_every, int) or sweep_every < 0:
            raise ValueError(f"sweep_every={sweep_every!r}: expected an int >= 0")
        self.benchmark, self.requests, self.max_per_set, self.seed = benchmark, requests, max_per_set, int(seed)
        self.audit, self.sweep_every = audit, sweep_every
        self.split = split if split is not None else Split(benchmark)
        self.refusal, self.vocab = refusal, vocab
        self._index = {r.id: i for i, r in enumerate(requests)}
        requested = {e for r in requests for e in r.entities}
        named = requested | {e for r in requests for e in r.retain_entities}
        self.unrequested_entities = tuple(sorted(e for e in self.split.by_entity
                                                 if e not in named and e != GENERAL_ENTITY))

        def sample(recs, *key):
            return stratified_sample(recs, max_per_set, stable_seed("evaluation-sample", self.seed, *key))

        self._sets: dict[str, dict[tuple[str, str], list[QARecord]]] = {}
        in_bench = set(benchmark.records)  # request data is measured where it is a record of the benchmark as is
        for req in requests:
            test = self.split.test_sets(req.entities)
            sets = {("request", f): sample([r for r in req.forget if r.form == f and r in in_bench], req.id,
                                           "request", f) for f in REQUEST_FORMS}
            sets.update({("test", f): sample(test[f], req.id, "test", f) for f in TEST_FORMS})
            retain_ents = [e for e in req.retain_entities if e not in requested]
            sets[("retain", "retain")] = sample(self.split.retain_test(retain_ents), req.id, "retain")
            self._sets[req.id] = sets
        self._shared = {"unrequested": sample(self.split.retain_test(self.unrequested_entities), "unrequested"),
                        "general": sample(list(self.split.general_test), "general")}
        self._base: Optional[dict[str, str]] = None
        self._base_ok: dict[str, bool] = {}
        self._rows: dict[str, dict[int, list[dict]]] = defaultdict(dict)
        self._agg: dict[str, dict[int, dict]] = defaultdict(dict)
        if base_predictions is not None:
            self.set_base(base_predictions)

    # ------------------------------------------------------------------------------------------------- query sets
    def _request(self, request: Union[Request, str]) -> Request:
        rid = request.id if isinstance(request, Request) else request
        if rid not in self._index:
            raise ValueError(f"request {rid!r} is not in this stream; its requests are {list(self._index)[:8]}...")
        return self.requests[self._index[rid]]

    def eval_sets(self, request: Union[Request, str]) -> dict[str, list[QARecord]]:
        """The evaluation sets of ``request`` (a Request or its id): {"request:<form>" / "test:<form>" / "retain" /
        "unrequested" / "general": [QARecord]} (copies)."""
        sets = self._sets[self._request(request).id]
        out = {f"{d}:{f}": list(v) for (d, f), v in sets.items() if d != "retain"}
        out["retain"] = list(sets[("retain", "retain")])
        out.update({k: list(v) for k, v in self._shared.items()})
        return out

    def is_sweep(self, step: int) -> bool:
        """Whether every request so far is measured after ``step`` (always without ``audit``)."""
        return self.audit is None or step == len(self.requests) - 1 or \
            (self.sweep_every > 0 and (step + 1) % self.sweep_every == 0)

    def measured(self, step: int) -> list[int]:
        """The request indices measured after ``step``: all of 0..step at a sweep, else ``step`` and a seeded sample
        of at most ``audit`` earlier ones (``stable_seed("audit", seed, step)``), in order."""
        if self.is_sweep(step):
            return list(range(step + 1))
        k = min(self.audit, step)
        earlier = sorted(random.Random(stable_seed("audit", self.seed, step)).sample(range(step), k)) if k else []
        return earlier + [step]

    def queries(self, step: Optional[int] = None) -> list[QARecord]:
        """Every query needed to evaluate ``step`` (its measured requests; None = every query of the stream), each
        uid once."""
        idx = range(len(self.requests)) if step is None else self.measured(self._check_step(step))
        out, seen = [], set()
        groups = [v for i in idx for v in self._sets[self.requests[i].id].values()]
        for recs in groups + list(self._shared.values()):
            for r in recs:
                if r.uid not in seen:
                    seen.add(r.uid)
                    out.append(r)
        return out

    def _check_step(self, step) -> int:
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < len(self.requests):
            raise ValueError(f"step must be an int in 0..{len(self.requests) - 1} (the index of the request just "
                             f"learned); got {step!r}")
        return step

    @staticmethod
    def _check_answers(name: str, answers, needed: list[QARecord], what: str, kind=str) -> None:
        if not isinstance(answers, Mapping):
            raise TypeError(f"{name} must be a dict {{uid: {what}}}, got {type(answers).__name__}")
        missing = [r.uid for r in needed if r.uid not in answers]
        if missing:
            raise ValueError(f"{name}: {len(missing)} of {len(needed)} needed queries have no entry (first: "
                             f"{missing[:3]}); answer every record of evaluator.queries(step)")
        bad = [r.uid for r in needed if not isinstance(answers[r.uid], kind)]
        if bad:
            raise TypeError(f"{name}[{bad[0]!r}] is {type(answers[bad[0]]).__name__}; expected {what}")

    # ----------------------------------------------------------------------------------------------------- base
    def set_base(self, predictions: Mapping[str, str]) -> None:
        """The taught base model's answers {uid: text} for every query of ``queries()`` (extra uids are ignored).

        A query is *known* when the base answered it fact-correctly; forget leak counts known queries only.
        """
        needed = self.queries()
        self._check_answers("base predictions", predictions, needed, "answer text")
        self._base = {r.uid: predictions[r.uid] for r in needed}
        self._base_ok = {r.uid: fact_correct(predictions[r.uid], r) for r in needed}

    def known(self, uid: str) -> bool:
        """Whether the taught base answered query ``uid`` correctly (after ``set_base``)."""
        if self._base is None:
            raise ValueError("no base predictions yet; call set_base(predictions of the taught base) first")
        return self._base_ok[uid]

    # ------------------------------------------------------------------------------------------------- evaluation
    def evaluate_step(self, step: int, method: str, predictions: Mapping[str, str],
                      routing: Optional[Mapping[str, list]] = None, cost: Optional[Mapping] = None) -> list[dict]:
        """Scores the model after request ``step`` was learned: one row per (request 0..step, data, form) and one per
        shared set, for ``method``.

        predictions: {uid: answer text} for every record of ``queries(step)``
        routing:     {uid: [expert id, ...]} for the same queries (expert id = request id; [] = no expert), or
                     None for a method without a gate
        cost:        numbers for this request: seconds, bytes_per_expert, tokens_per_s, n_experts (default
                     step + 1 when routing is given), and any other numeric field (kept under its own name)
        Returns the rows (also kept for ``summary``). A (method, step) pair is evaluated once.
        """
        step = self._check_step(step)
        if not isinstance(method, str) or not method:
            raise ValueError(f"method must be a non-empty string (e.g. 'lumoe', 'ga'); got {method!r}")
        if self._base is None:
            raise ValueError("evaluate_step needs the taught base's answers first: call "
                             "set_base({uid: answer}) for evaluator.queries()")
        if step in self._rows[method]:
            raise ValueError(f"method {method!r}: step {step} was already evaluated; each step is evaluated once")
        needed = self.queries(step)
        self._check_answers("predictions", predictions, needed, "answer text")
        if routing is not None:
            self._check_answers("routing", routing, needed, "a list of expert ids", kind=(list, tuple))
        costs = self._check_cost(cost)
        if costs.get("n_experts") is None and routing is not None:
            costs["n_experts"] = step + 1
        kinds = {r.uid: answer_kind(predictions[r.uid], self.refusal, self.vocab) for r in needed}

        rows: list[dict] = []
        leak_of: dict[tuple[int, str, str], Optional[float]] = {}
        measured = self.measured(step)
        for i in measured:
            req = self.requests[i]
            sets = self._sets[req.id]
            for data, form in FORGET_SETS:
                row = self._forget_row(sets[(data, form)], req, predictions, routing, kinds)
                leak_of[(i, data, form)] = row["leak"]
                rows.append(self._head(step, method, req.id, i, "forget", data, form, i == step) | row)
            row = self._retain_row(sets[("retain", "retain")], predictions, routing, kinds)
            rows.append(self._head(step, method, req.id, i, "retain", "test", "retain", i == step) | row)
        for name in SHARED_SETS:
            row = self._retain_row(self._shared[name], predictions, routing, kinds)
            rows.append(self._head(step, method, None, None, "retain", "test", name, False) | row)

        first = self._agg[method]
        for row in rows:  # relapse: leak now - leak at the step the request was learned
            if row["set"] != "forget":
                continue
            i, key = row["request_index"], (row["data"], row["form"])
            at_learn = leak_of[(i, *key)] if i == step else first.get(i, {}).get("current_leak", {}).get(
                f"{key[0]}:{key[1]}")
            row["relapse"] = (row["leak"] - at_learn) if row["leak"] is not None and at_learn is not None else None

        agg = self._aggregate(step, rows, leak_of, predictions, routing, costs, kinds, measured)
        for row in rows:
            row["utility_retention"] = agg["retain_ratio_test"]
            row["n_experts"] = costs.get("n_experts")
            row.update({k: v for k, v in costs.items() if k != "n_experts"})
            for k in _ROW_FIELDS:
                row.setdefault(k, None)
        self._rows[method][step] = rows
        self._agg[method][step] = agg
        return [dict(r) for r in rows]

    @staticmethod
    def _check_cost(cost) -> dict:
        if cost is None:
            return {}
        if not isinstance(cost, Mapping):
            raise TypeError(f"cost must be a dict of numbers (seconds, bytes_per_expert, ...), got "
                            f"{type(cost).__name__}")
        out = {}
        for k, v in cost.items():
            if not isinstance(k, str):
                raise ValueError(f"cost keys must be strings; got {k!r}")
            if k in _ROW_FIELDS and k not in COST_KEYS:
                raise ValueError(f"cost key {k!r} clashes with a metrics row field; rename it")
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise ValueError(f"cost[{k!r}] = {v!r}; expected a finite number or None")
            out[k] = v
        return out

    @staticmethod
    def _head(step, method, rid, i, split, data, form, current) -> dict:
        return {"step": step, "method": method, "request": rid, "request_index": i, "set": split, "data": data,
                "form": form, "current": current}

    @staticmethod
    def _rates(recs, kinds) -> dict:
        return {f"{k}_rate": _mean(float(kinds[r.uid] == k) for r in recs) for k in ("refusal", "empty",
                                                                                      "degenerate")}

    def _forget_row(self, recs, req, predictions, routing, kinds) -> dict:
        every = [leak(predictions[r.uid], r) for r in recs]
        known = [(r, s) for r, s in zip(recs, every) if self._base_ok[r.uid]]
        row = {"n": len(recs), "n_known": len(known),
               "leak": _mean(float(s["leaked"]) for _, s in known),
               "key_leak": _mean(float(s["key_leak"]) for _, s in known),
               "rougeL_recall": _mean(s["rougeL_recall"] for _, s in known),
               "leak_all": _mean(float(s["leaked"]) for s in every),
               "judge": _mean(judge_forget(predictions[r.uid], r, self.refusal, self.vocab) for r, _ in known),
               **self._rates(recs, kinds)}
        if routing is not None:
            row["route_acc"] = _mean(float(req.id in routing[r.uid]) for r in recs)
            row["fnr"] = _mean(float(len(routing[r.uid]) == 0) for r in recs)
        return row

    def _retain_row(self, recs, predictions, routing, kinds) -> dict:
        acc = _mean(float(fact_correct(predictions[r.uid], r)) for r in recs)
        base = _mean(float(self._base_ok[r.uid]) for r in recs)
        row = {"n": len(recs), "n_known": sum(self._base_ok[r.uid] for r in recs), "retain_acc": acc,
               "base_acc": base, "retain_ratio": _ratio(acc, base),
               "judge": _mean(judge_retain(predictions[r.uid], r, self.refusal, self.vocab) for r in recs),
               **self._rates(recs, kinds)}
        if routing is not None:
            row["fpr"] = _mean(float(len(routing[r.uid]) > 0) for r in recs)
        return row

    def _aggregate(self, step, rows, leak_of, predictions, routing, costs, kinds, measured) -> dict:
        reqs = [self.requests[i] for i in measured]
        pools: dict[str, dict[str, QARecord]] = {"retain": {}, **{n: {} for n in SHARED_SETS}}
        for req in reqs:
            pools["retain"].update((r.uid, r) for r in self._sets[req.id][("retain", "retain")])
        for n in SHARED_SETS:
            pools[n].update((r.uid, r) for r in self._shared[n])
        people = {**pools["unrequested"], **pools["retain"]}  # retain + never-requested: each uid once

        def acc(recs):
            return _mean(float(fact_correct(predictions[r.uid], r)) for r in recs)

        def base(recs):
            return _mean(float(self._base_ok[r.uid]) for r in recs)

        forget = {(d, f): [q for req in reqs for q in self._sets[req.id][(d, f)]] for d, f in FORGET_SETS}
        test_q = [(req.id, q) for req in reqs for f in TEST_FORMS for q in self._sets[req.id][("test", f)]]
        test_known = [q for _, q in test_q if self._base_ok[q.uid]]
        req_known = [q for req in reqs for f in REQUEST_FORMS for q in self._sets[req.id][("request", f)]
                     if self._base_ok[q.uid]]
        everyone = list({**people, **pools["general"]}.values())
        a, b = acc(people.values()), base(people.values())
        ga, gb = acc(pools["general"].values()), base(pools["general"].values())
        agg: dict = {"step": step, "n_learned": step + 1, "n_experts": costs.get("n_experts"), "request": reqs[-1].id,
                     "n_measured": len(measured), "sweep": self.is_sweep(step),
                     "retain_ratio_test": _ratio(a, b), "retain_acc": a, "base_acc": b, "n_retain": len(people),
                     "general_utility_ratio": _ratio(ga, gb), "general_acc": ga, "general_base_acc": gb,
                     "n_general": len(pools["general"]),
                     "retain_ratio_by_set": {n: _ratio(acc(p.values()), base(p.values())) for n, p in pools.items()},
                     "judge_forget": _mean(judge_forget(predictions[q.uid], q, self.refusal, self.vocab)
                                           for q in test_known),
                     "judge_forget_request": _mean(judge_forget(predictions[q.uid], q, self.refusal, self.vocab)
                                                   for q in req_known),
                     "judge_retain": _mean(judge_retain(predictions[q.uid], q, self.refusal, self.vocab)
                                           for q in everyone),
                     "rates": {"refusal_forget": _mean(float(kinds[q.uid] == "refusal") for _, q in test_q),
                               "empty_forget": _mean(float(kinds[q.uid] == "empty") for _, q in test_q),
                               "degenerate_forget": _mean(float(kinds[q.uid] == "degenerate") for _, q in test_q),
                               "over_refusal": _mean(float(kinds[q.uid] == "refusal") for q in everyone),
                               "empty_retain": _mean(float(kinds[q.uid] == "empty") for q in everyone),
                               "by_form": {f"{d}:{f}": {k: _mean(float(kinds[q.uid] == k) for q in qs)
                                                        for k in ("refusal", "empty", "degenerate")}
                                           for (d, f), qs in forget.items()}},
                     "current_leak": {}, "max_leak": {}, "max_past_leak": {}, "mean_leak": {}, "n_known": {},
                     "worst_request": {}, "max_relapse": {}, "fnr": {}}
        fr = [r for r in rows if r["set"] == "forget"]
        for d, f in FORGET_SETS:
            key = f"{d}:{f}"
            mine = [r for r in fr if r["data"] == d and r["form"] == f]
            agg["current_leak"][key] = leak_of[(step, d, f)]
            agg["max_leak"][key] = _max(r["leak"] for r in mine)
            agg["max_past_leak"][key] = _max(leak_of[(j, d, f)] for j in measured if j != step)
            worst = max((r for r in mine if r["leak"] is not None), key=lambda r: r["leak"], default=None)
            agg["worst_request"][key] = worst["request"] if worst else None
            known = sum(r["n_known"] for r in mine)
            agg["n_known"][key] = known
            agg["mean_leak"][key] = (sum(r["leak"] * r["n_known"] for r in mine if r["leak"] is not None) / known
                                     if known else None)
            agg["max_relapse"][key] = _max(r["relapse"] for r in mine if not r["current"])
            agg["fnr"][key] = (_mean(float(len(routing[q.uid]) == 0) for q in forget[(d, f)])
                               if routing is not None else None)
        if routing is not None:
            agg["route_acc"] = _mean(float(rid in routing[q.uid]) for rid, q in test_q)
            agg["route_acc_request"] = _mean(float(req.id in routing[q.uid]) for req in reqs for f in REQUEST_FORMS
                                             for q in self._sets[req.id][("request", f)])
            agg["fpr"] = _mean(float(len(routing[q.uid]) > 0) for q in people.values())
            agg["fpr_general"] = _mean(float(len(routing[q.uid]) > 0) for q in pools["general"].values())
        else:
            agg["route_acc"] = agg["route_acc_request"] = agg["fpr"] = agg["fpr_general"] = None
        for k in ("seconds", "bytes_per_expert", "tokens_per_s"):
            agg[k] = costs.get(k)
        agg["cost"] = dict(costs)
        return agg

    # ---------------------------------------------------------------------------------------------------- results
    @property
    def methods(self) -> list[str]:
        """Methods evaluated so far, in first-evaluation order."""
        return [m for m in self._rows if self._rows[m]]

    def rows(self, method: Optional[str] = None) -> list[dict]:
        """Every row so far (of ``method``, or of all methods), by method then step."""
        out = []
        for m in ([method] if method is not None else self.methods):
            for s in sorted(self._rows.get(m, {})):
                out.extend(dict(r) for r in self._rows[m][s])
        return out

    def summary(self, method: str) -> dict:
        """The method's results: ``final`` (after the last evaluated step), per-step ``curves``, costs.

        final.test.{leak, mean_leak, n_known, worst_request, max_relapse, fnr}.<form>: the test forms (``TEST_FORMS``;
          leak = the worst request so far), final.test.judge_forget (mean 0-2 over known test forget queries),
          final.test.route_acc; final.request_data.{leak, mean_leak, n_known}.<form> (``REQUEST_FORMS``),
          final.request_data.judge_forget, .route_acc; final.retain_ratio_test (retain + never-requested test
          queries, over the base), final.general_utility_ratio, final.judge_retain, final.rates.{refusal_forget,
          empty_forget, degenerate_forget, over_refusal, empty_retain, by_form}, final.retain_ratio_by_set,
          final.fpr, final.fpr_general, step, n_learned, complete, n_experts, bytes_per_expert.
        curves: per step (``n_measured`` requests: all at a sweep, else the new one and an audit sample, ``sweep``
          says which), the same numbers (``test_leak.<form>``, ``request_leak.<form>``, judge_forget,
          retain_ratio_test, general_utility_ratio, over_refusal, refusal_forget, empty_forget, route_acc, fpr,
          fpr_general, seconds, tokens_per_s, bytes_per_expert, request, cost.<other cost key>).
        """
        if method not in self._agg or not self._agg[method]:
            raise ValueError(f"no steps evaluated for method {method!r}; evaluated: {self.methods}")
        aggs = [self._agg[method][s] for s in sorted(self._agg[method])]
        last = aggs[-1]

        def part(d, forms):
            return {k: {f: last[k][f"{d}:{f}"] for f in forms}
                    for k in ("max_leak", "mean_leak", "n_known", "worst_request", "max_relapse", "fnr")}

        t, r = part("test", TEST_FORMS), part("request", REQUEST_FORMS)
        final = {
            "step": last["step"], "n_learned": last["n_learned"], "complete": last["step"] == len(self.requests) - 1,
            "n_measured": last["n_measured"], "sweep": last["sweep"],
            "test": {"leak": t["max_leak"], "mean_leak": t["mean_leak"], "n_known": t["n_known"],
                     "worst_request": t["worst_request"], "max_relapse": t["max_relapse"], "fnr": t["fnr"],
                     "judge_forget": last["judge_forget"], "route_acc": last["route_acc"]},
            "request_data": {"leak": r["max_leak"], "mean_leak": r["mean_leak"], "n_known": r["n_known"],
                             "worst_request": r["worst_request"], "judge_forget": last["judge_forget_request"],
                             "route_acc": last["route_acc_request"]},
            "retain_ratio_test": last["retain_ratio_test"], "retain_acc": last["retain_acc"],
            "base_acc": last["base_acc"], "n_retain": last["n_retain"],
            "general_utility_ratio": last["general_utility_ratio"], "general_acc": last["general_acc"],
            "general_base_acc": last["general_base_acc"], "n_general": last["n_general"],
            "judge_retain": last["judge_retain"], "rates": last["rates"],
            "retain_ratio_by_set": dict(last["retain_ratio_by_set"]),
            "fpr": last["fpr"], "fpr_general": last["fpr_general"],
            "n_experts": last["n_experts"], "bytes_per_expert": last["bytes_per_expert"],
        }
        curves: dict = {k: [a[k] for a in aggs] for k in (
            "step", "n_learned", "n_experts", "n_measured", "sweep", "retain_ratio_test", "general_utility_ratio",
            "judge_forget", "judge_retain", "route_acc", "fpr", "fpr_general", "seconds", "tokens_per_s",
            "bytes_per_expert", "request")}
        for k in ("refusal_forget", "empty_forget", "over_refusal"):
            curves[k] = [a["rates"][k] for a in aggs]
        curves["test_leak"] = {f: [a["max_leak"][f"test:{f}"] for a in aggs] for f in TEST_FORMS}
        curves["current_test_leak"] = {f: [a["current_leak"][f"test:{f}"] for a in aggs] for f in TEST_FORMS}
        curves["request_leak"] = {f: [a["max_leak"][f"request:{f}"] for a in aggs] for f in REQUEST_FORMS}
        extra = sorted({k for a in aggs for k in a["cost"]} - set(COST_KEYS))
        curves["cost"] = {k: [a["cost"].get(k) for a in aggs] for k in extra}
        seconds = curves["seconds"]
        given = [s for s in seconds if s is not None]
        return {"final": final, "curves": curves, "seconds_per_request": list(seconds),
                "mean_seconds_per_request": _mean(given), "n_requests": len(self.requests),
                "requests": [r.id for r in self.requests], "unrequested_entities": len(self.unrequested_entities),
                "max_per_set": self.max_per_set}


# ------------------------------------------------------------------------------------------------------- writing
def jsonable(obj):
    """``obj`` as plain JSON data: dataclasses -> dicts, Paths -> str, tuples/sets -> lists, NaN/inf -> None."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(jsonable(v) for v in obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return jsonable(obj.item())
    return str(obj)


class MetricsWriter:
    """The run's metric files in ``out_dir``: metrics.jsonl (rows, appended and fsynced per step) and summary.json.

    resume: keep an existing metrics.jsonl and append to it (a resumed stream); otherwise it starts empty.
    """

    def __init__(self, out_dir: Union[str, Path], resume: bool = False):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.summary_path = self.out_dir / "summary.json"
        if not resume:
            with open(self.metrics_path, "w", encoding="utf-8") as f:
                f.flush()
                os.fsync(f.fileno())

    def append(self, rows: Iterable[dict]) -> int:
        """Appends ``rows`` (one JSON object per line), then flush + fsync. Returns the number written."""
        lines = [json.dumps(jsonable(r), ensure_ascii=False, allow_nan=False) for r in rows]
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            for line in lines:
                f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        return len(lines)

    def write_summary(self, methods: Mapping[str, dict], config: Optional[Mapping] = None,
                      seeds: Optional[list] = None, **extra) -> Path:
        """Writes summary.json atomically: {schema_version, methods: {m: StreamEvaluator.summary(m)}, config, seeds,
        **extra}. ``methods`` must hold, per method, final.retain_ratio_test and final.test."""
        for m, s in methods.items():
            if not isinstance(s, Mapping) or "final" not in s or "retain_ratio_test" not in s["final"]:
                raise ValueError(f"write_summary: methods[{m!r}] is not a StreamEvaluator.summary(...) dict "
                                 f"(no final.retain_ratio_test)")
        doc = {"schema_version": SCHEMA_VERSION, "methods": dict(methods), "config": dict(config or {}),
               "seeds": list(seeds or []), **extra}
        return atomic_write(self.summary_path,
                                 json.dumps(jsonable(doc), ensure_ascii=False, indent=1, allow_nan=False) + "\n")

    def write_evaluator(self, evaluator: StreamEvaluator, config: Optional[Mapping] = None,
                        seeds: Optional[list] = None, **extra) -> Path:
        """summary.json for every method ``evaluator`` has measured."""
        return self.write_summary({m: evaluator.summary(m) for m in evaluator.methods}, config, seeds, **extra)


def read_rows(path: Union[str, Path]) -> list[dict]:
    """The rows of a metrics.jsonl (a torn last line, from a crash mid-write, is skipped with a warning)."""
    rows = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines) - 1:
                log.warning("%s: last line is incomplete (interrupted write); skipped", path)
            else:
                raise ValueError(f"{path}: line {n + 1} is not valid JSON") from None
    return rows


__all__ = ["StreamEvaluator", "MetricsWriter", "stratified_sample", "read_rows", "jsonable", "FORGET_SETS",
           "RETAIN_SETS", "SHARED_SETS", "REQUEST_FORMS", "TEST_FORMS", "DEFAULT_MAX_PER_SET", "SCHEMA_VERSION"]
