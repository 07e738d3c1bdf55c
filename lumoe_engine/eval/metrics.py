"""Stream metrics: after each request t, every request i <= t is measured, one row per (step, request, set, method).

The evaluator is decoupled from how answers are produced: it says which queries it needs (``queries``), takes the
answers as ``{uid: text}`` (and, for a gated method, the experts each query was routed to), and scores them with
``eval.scoring`` (the one scorer of the project).

Evaluation sets of a request (``eval_sets``; each capped by a seeded sample stratified over entity x form x kind):

- forget forms, over the request's entities: ``image_text`` (teachable phrasings, teaching images: the trained
  queries), ``text_only`` (teachable phrasings, the question names the entity), ``paraphrase`` (held-out phrasing
  family, both forms, teaching images), ``fresh_image`` (teachable phrasings on image variations never taught);
- retain sets: ``retain`` (the request's retain entities, every record kind) and ``unrequested`` (entities that no
  request of the stream names, neither to forget nor as retain; a different seeded sample per request).

Forget leak is counted only over *known* queries: those the taught base answered fact-correctly (``set_base``);
what the base never knew proves no forgetting. ``n_known`` stands beside every leak. A set with no known query has
leak None. Real MLUBench has no text-only, held-out-phrasing or fresh-image records: those rows have n = 0.

Row fields (every row; None where a field does not apply or has no data):
  step, method, request, request_index, set ("forget" | "retain"), form (one of SETS), current (request_index ==
  step), n, n_known, n_experts,
  forget rows: leak, key_leak, rougeL_recall (means over known queries), leak_all (over all n queries, informative),
               relapse (leak now - leak at the step the request was learned), forget_efficacy (1 - leak of the
               request learned at this step, this form), historical_preservation (1 - max leak over earlier
               requests, this form), route_acc (routed to the request's own expert), fnr (routed to no expert);
  retain rows: retain_acc (fact-correct rate), base_acc (the base, same queries), retain_ratio (retain_acc /
               base_acc), fpr (routed to any expert);
  every row:   utility_retention (U_t / U_0: retain accuracy over the retain + unrequested queries of requests
               <= t, over the base's on the same queries), seconds, bytes_per_expert, tokens_per_s, and any other
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

from lumoe_engine.data.records import Benchmark, QARecord
from lumoe_engine.data.streams import Request
from lumoe_engine.eval.scoring import fact_correct, leak
from lumoe_engine.fileio import atomic_write
from lumoe_engine.seeding import stable_seed

log = logging.getLogger(__name__)

FORGET_FORMS = ("image_text", "text_only", "paraphrase", "fresh_image")
RETAIN_SETS = ("retain", "unrequested")
SETS = FORGET_FORMS + RETAIN_SETS
DEFAULT_MAX_PER_SET = 60  # queries per set per request: ~6 x 60 per request keeps a CPU evaluation in seconds
COST_KEYS = ("seconds", "bytes_per_expert", "tokens_per_s", "n_experts")
SCHEMA_VERSION = 1

_ROW_FIELDS = ("step", "method", "request", "request_index", "set", "form", "current", "n", "n_known", "n_experts",
               "leak", "key_leak", "rougeL_recall", "leak_all", "relapse", "forget_efficacy",
               "historical_preservation", "route_acc", "fnr", "retain_acc", "base_acc", "retain_ratio", "fpr",
               "utility_retention", "seconds", "bytes_per_expert", "tokens_per_s")


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
    requests:         the stream (``streams.build_stream``), in learning order; ids unique
    base_predictions: the taught base model's answers {uid: text}, or None (then call ``set_base`` before
                      ``evaluate_step``)
    max_per_set:      cap of every evaluation set per request (None = no cap)
    seed:             seeds the stratified samples
    """

    def __init__(self, benchmark: Benchmark, requests: list[Request],
                 base_predictions: Optional[Mapping[str, str]] = None,
                 max_per_set: Optional[int] = DEFAULT_MAX_PER_SET, seed: int = 0):
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
        self.benchmark = benchmark
        self.requests = requests
        self.max_per_set = max_per_set
        self.seed = int(seed)
        self._index = {r.id: i for i, r in enumerate(requests)}
        by_entity: dict[str, list[QARecord]] = defaultdict(list)
        for r in benchmark.records:
            by_entity[r.entity].append(r)
        requested = {e for r in requests for e in r.entities}
        named = requested | {e for r in requests for e in r.retain_entities}
        unrequested = [r for r in benchmark.records if r.entity not in named]
        self.unrequested_entities = tuple(sorted({r.entity for r in unrequested}))
        self._sets: dict[str, dict[str, list[QARecord]]] = {}
        for req in requests:
            own = [r for e in req.entities for r in by_entity.get(e, ())]
            forms = {
                "image_text": [r for r in own if r.form == "image_text" and not r.heldout_phrasing
                               and not r.fresh_image],
                "text_only": [r for r in own if r.form == "text_only" and not r.heldout_phrasing],
                "paraphrase": [r for r in own if r.heldout_phrasing and not r.fresh_image],
                "fresh_image": [r for r in own if r.fresh_image and not r.heldout_phrasing],
                "retain": [r for e in req.retain_entities if e not in requested for r in by_entity.get(e, ())],
                "unrequested": unrequested,
            }
            self._sets[req.id] = {
                k: stratified_sample(v, max_per_set, stable_seed("evaluation-sample", self.seed, req.id, k))
                for k, v in forms.items()}
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
        """The evaluation sets of ``request`` (a Request or its id): {set name in SETS: [QARecord]} (copies)."""
        return {k: list(v) for k, v in self._sets[self._request(request).id].items()}

    def queries(self, step: Optional[int] = None) -> list[QARecord]:
        """Every query needed to evaluate ``step`` (requests 0..step; None = the whole stream), each uid once."""
        last = len(self.requests) - 1 if step is None else self._check_step(step)
        out, seen = [], set()
        for req in self.requests[: last + 1]:
            for name in SETS:
                for r in self._sets[req.id][name]:
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
        """Scores the model after request ``step`` was learned: one row per (request 0..step, set), for ``method``.

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

        rows: list[dict] = []
        leak_of: dict[tuple[int, str], Optional[float]] = {}
        for i, req in enumerate(self.requests[: step + 1]):
            sets = self._sets[req.id]
            for form in FORGET_FORMS:
                row = self._forget_row(sets[form], req, predictions, routing)
                leak_of[(i, form)] = row["leak"]
                rows.append(self._head(step, method, req, i, "forget", form) | row)
            for name in RETAIN_SETS:
                row = self._retain_row(sets[name], predictions, routing)
                rows.append(self._head(step, method, req, i, "retain", name) | row)

        # continual: efficacy of the request just learned, preservation of the earlier ones, relapse
        first = self._agg[method]
        for row in rows:
            if row["set"] != "forget":
                continue
            i, form = row["request_index"], row["form"]
            at_learn = leak_of[(i, form)] if i == step else first.get(i, {}).get("current_leak", {}).get(form)
            row["relapse"] = (row["leak"] - at_learn) if row["leak"] is not None and at_learn is not None else None
            row["forget_efficacy"] = _one_minus(leak_of[(step, form)])
            row["historical_preservation"] = _one_minus(_max(leak_of[(j, form)] for j in range(step)))

        agg = self._aggregate(step, rows, leak_of, predictions, routing, costs)
        for row in rows:
            row["utility_retention"] = agg["retain_ratio"]
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
    def _head(step, method, req, i, split, form) -> dict:
        return {"step": step, "method": method, "request": req.id, "request_index": i, "set": split, "form": form,
                "current": i == step}

    def _forget_row(self, recs, req, predictions, routing) -> dict:
        every = [leak(predictions[r.uid], r) for r in recs]
        scores = [s for r, s in zip(recs, every) if self._base_ok[r.uid]]
        row = {"n": len(recs), "n_known": len(scores),
               "leak": _mean(float(s["leaked"]) for s in scores),
               "key_leak": _mean(float(s["key_leak"]) for s in scores),
               "rougeL_recall": _mean(s["rougeL_recall"] for s in scores),
               "leak_all": _mean(float(s["leaked"]) for s in every)}
        if routing is not None:
            row["route_acc"] = _mean(float(req.id in routing[r.uid]) for r in recs)
            row["fnr"] = _mean(float(len(routing[r.uid]) == 0) for r in recs)
        return row

    def _retain_row(self, recs, predictions, routing) -> dict:
        acc = _mean(float(fact_correct(predictions[r.uid], r)) for r in recs)
        base = _mean(float(self._base_ok[r.uid]) for r in recs)
        row = {"n": len(recs), "n_known": sum(self._base_ok[r.uid] for r in recs), "retain_acc": acc,
               "base_acc": base, "retain_ratio": _ratio(acc, base)}
        if routing is not None:
            row["fpr"] = _mean(float(len(routing[r.uid]) > 0) for r in recs)
        return row

    def _aggregate(self, step, rows, leak_of, predictions, routing, costs) -> dict:
        reqs = self.requests[: step + 1]
        # pooled retain (each uid once) over the retain + unrequested sets of the requests learned so far
        pools: dict[str, dict[str, QARecord]] = {name: {} for name in RETAIN_SETS}
        for req in reqs:
            for name in RETAIN_SETS:
                pools[name].update((r.uid, r) for r in self._sets[req.id][name])
        both = {**pools["unrequested"], **pools["retain"]}

        def acc(recs):
            return _mean(float(fact_correct(predictions[r.uid], r)) for r in recs)

        def base(recs):
            return _mean(float(self._base_ok[r.uid]) for r in recs)

        a, b = acc(both.values()), base(both.values())
        agg = {"step": step, "n_learned": step + 1, "n_experts": costs.get("n_experts"), "request": reqs[-1].id,
               "retain_ratio": _ratio(a, b), "retain_acc": a, "base_acc": b, "n_retain": len(both),
               "retain_ratio_by_set": {n: _ratio(acc(p.values()), base(p.values())) for n, p in pools.items()},
               "current_leak": {}, "max_leak": {}, "max_past_leak": {}, "mean_leak": {}, "n_known": {},
               "worst_request": {}, "forget_efficacy": {}, "historical_preservation": {}, "max_relapse": {},
               "fnr": {}}
        fr = [r for r in rows if r["set"] == "forget"]
        for form in FORGET_FORMS:
            mine = [r for r in fr if r["form"] == form]
            agg["current_leak"][form] = leak_of[(step, form)]
            agg["max_leak"][form] = _max(r["leak"] for r in mine)
            past = _max(leak_of[(j, form)] for j in range(step))
            agg["max_past_leak"][form] = past
            worst = max((r for r in mine if r["leak"] is not None), key=lambda r: r["leak"], default=None)
            agg["worst_request"][form] = worst["request"] if worst else None
            known = sum(r["n_known"] for r in mine)
            agg["n_known"][form] = known
            agg["mean_leak"][form] = (sum(r["leak"] * r["n_known"] for r in mine if r["leak"] is not None) / known
                                      if known else None)
            agg["forget_efficacy"][form] = _one_minus(leak_of[(step, form)])
            agg["historical_preservation"][form] = _one_minus(past)
            agg["max_relapse"][form] = _max(r["relapse"] for r in mine if not r["current"])
            agg["fnr"][form] = (_mean(float(len(routing[q.uid]) == 0) for req in reqs
                                      for q in self._sets[req.id][form]) if routing is not None else None)
        if routing is not None:
            fq = [(req.id, q) for req in reqs for f in FORGET_FORMS for q in self._sets[req.id][f]]
            agg["route_acc"] = _mean(float(rid in routing[q.uid]) for rid, q in fq)
            agg["fpr"] = _mean(float(len(routing[q.uid]) > 0) for q in both.values())
        else:
            agg["route_acc"] = agg["fpr"] = None
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

        final: step, n_learned, complete (the last request of the stream was evaluated), retain_ratio (retain
          accuracy over the retain + unrequested queries / the taught base's on them), retain_acc, base_acc,
          n_retain, retain_ratio_by_set.{retain,unrequested}, max_forget_leak.<form> (worst request, any i <= last
          step), worst_request.<form>, mean_forget_leak.<form> (pooled over known queries), n_known.<form> (known
          queries summed over requests), max_relapse.<form>, forget_efficacy.<form>, historical_preservation.<form>,
          route_acc, fpr, fnr.<form>, bytes_per_expert
        curves: step, n_learned, n_experts, retain_ratio (= utility retention U_t/U_0), retain_acc, base_acc,
          retain_ratio_by_set.<set>, current_leak / max_leak / max_past_leak / mean_leak / forget_efficacy /
          historical_preservation / max_relapse / fnr / n_known .<form>, route_acc, fpr, seconds, tokens_per_s,
          bytes_per_expert, request (id learned at each step), cost.<other cost key> (e.g. memory growth)
        seconds_per_request: seconds of every evaluated step, in step order (None where not given)
        """
        if method not in self._agg or not self._agg[method]:
            raise ValueError(f"no steps evaluated for method {method!r}; evaluated: {self.methods}")
        steps = sorted(self._agg[method])
        aggs = [self._agg[method][s] for s in steps]
        last = aggs[-1]
        final = {
            "step": last["step"], "n_learned": last["n_learned"], "complete": last["step"] == len(self.requests) - 1,
            "retain_ratio": last["retain_ratio"], "retain_acc": last["retain_acc"], "base_acc": last["base_acc"],
            "n_retain": last["n_retain"], "retain_ratio_by_set": dict(last["retain_ratio_by_set"]),
            "max_forget_leak": dict(last["max_leak"]), "worst_request": dict(last["worst_request"]),
            "mean_forget_leak": dict(last["mean_leak"]), "n_known": dict(last["n_known"]),
            "max_relapse": dict(last["max_relapse"]), "forget_efficacy": dict(last["forget_efficacy"]),
            "historical_preservation": dict(last["historical_preservation"]),
            "route_acc": last["route_acc"], "fpr": last["fpr"], "fnr": dict(last["fnr"]),
            "n_experts": last["n_experts"], "bytes_per_expert": last["bytes_per_expert"],
        }
        curves: dict = {k: [a[k] for a in aggs] for k in ("step", "n_learned", "n_experts", "retain_ratio",
                                                          "retain_acc", "base_acc", "route_acc", "fpr", "seconds",
                                                          "tokens_per_s", "bytes_per_expert", "request")}
        curves["retain_ratio_by_set"] = {n: [a["retain_ratio_by_set"][n] for a in aggs] for n in RETAIN_SETS}
        for k in ("current_leak", "max_leak", "max_past_leak", "mean_leak", "forget_efficacy",
                  "historical_preservation", "max_relapse", "fnr", "n_known"):
            curves[k] = {f: [a[k][f] for a in aggs] for f in FORGET_FORMS}
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
                      seeds: Optional[Mapping] = None, **extra) -> Path:
        """Writes summary.json atomically: {schema_version, methods: {m: StreamEvaluator.summary(m)}, config, seeds,
        **extra}. ``methods`` must hold, per method, final.retain_ratio and final.max_forget_leak."""
        for m, s in methods.items():
            if not isinstance(s, Mapping) or "final" not in s or "retain_ratio" not in s["final"]:
                raise ValueError(f"write_summary: methods[{m!r}] is not a StreamEvaluator.summary(...) dict "
                                 f"(no final.retain_ratio)")
        doc = {"schema_version": SCHEMA_VERSION, "methods": dict(methods), "config": dict(config or {}),
               "seeds": dict(seeds or {}), **extra}
        return atomic_write(self.summary_path,
                                 json.dumps(jsonable(doc), ensure_ascii=False, indent=1, allow_nan=False) + "\n")

    def write_evaluator(self, evaluator: StreamEvaluator, config: Optional[Mapping] = None,
                        seeds: Optional[Mapping] = None, **extra) -> Path:
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


__all__ = ["StreamEvaluator", "MetricsWriter", "stratified_sample", "read_rows", "jsonable",
           "FORGET_FORMS", "RETAIN_SETS", "SETS", "DEFAULT_MAX_PER_SET", "SCHEMA_VERSION"]
