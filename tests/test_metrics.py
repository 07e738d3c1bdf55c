"""Stream metrics under the protocol: request data vs test data per form, hand-computed leak / judge / retain /
general utility / relapse / gate values, refusal and empty rates, sampling, files."""
import json
import os
import re
from dataclasses import replace

import pytest

from lumoe_engine.data.mlubench import load_benchmark
from lumoe_engine.data.protocol import REQUEST_FORMS, TEST_FORMS, Split
from lumoe_engine.data.records import GENERAL_ENTITY, Benchmark, QARecord
from lumoe_engine.data.streams import build_stream
from lumoe_engine.data.synthetic import SyntheticConfig, write_synthetic
from lumoe_engine.eval.metrics import FORGET_SETS, MetricsWriter, StreamEvaluator, read_rows, stratified_sample
from lumoe_engine.unlearn.refusal import DEFAULT_REFUSAL


# --------------------------------------------------------------------------------------------- hand-made benchmark
def _rec(entity, kind, fam, pic=None, form="image_text", held=False, fresh=False, variant=None, hv=False):
    key = f"{entity.lower()}fact{kind}"
    answer = key + (" river" if kind == 1 else "")  # kind 1: ROUGE-L can leak without the key
    tag = f"k{kind}f{fam}" + (f"p{pic}" if pic is not None else "t") + (variant or "")
    q = f"Question {fam} of fact {kind}?" if form == "image_text" else f"Question {fam} of fact {kind} of {entity}?"
    if variant:
        q = q.replace(entity, entity.lower() if variant == "lower" else f"{entity}-alias")
    return QARecord(uid=f"{entity}#{tag}", entity=entity, cls="Animals", kind=kind, phrasing=fam, question=q,
                    answer=answer, form=form, image=f"/img/{entity}/{pic}.png" if form == "image_text" else None,
                    keys=(key,), heldout_phrasing=held, fresh_image=fresh, image_missing=form == "image_text",
                    variant=variant, heldout_variant=hv)


def _entity(e):
    """2 kinds x taught families 0, 1 (+ held-out 2) x taught pictures 0, 1 (+ new scene 2); text-only kind 1;
    a lower-case and an alias variant (never taught)."""
    out = [_rec(e, k, f, p) for k in (0, 1) for f in (0, 1) for p in (0, 1)]
    out += [_rec(e, 1, f, form="text_only") for f in (0, 1)]
    out += [_rec(e, k, 2, p, held=True) for k in (0, 1) for p in (0, 1)] + [_rec(e, 1, 2, form="text_only",
                                                                               held=True)]
    out += [_rec(e, k, f, 2, fresh=True) for k in (0, 1) for f in (0, 1)]
    out += [_rec(e, 1, 0, form="text_only", variant=v, hv=True) for v in ("lower", "alias")]
    return out


def _general():
    return [QARecord(uid=f"gen#{i}", entity=GENERAL_ENTITY, cls=GENERAL_ENTITY, kind=0, phrasing=i % 3,
                     question=f"General question {i}?", answer=f"answer{i}", form="text_only", keys=(f"answer{i}",),
                     heldout_phrasing=i >= 6, general="world") for i in range(8)]


@pytest.fixture(scope="module")
def hand():
    """E1 (task A forget), E2 (task B forget), R1 (retain of A and B), N1 (in no task file), 8 general queries."""
    recs = {e: _entity(e) for e in ("E1", "E2", "R1", "N1")}
    teach = lambda e: [r for r in recs[e] if r.taught]  # noqa: E731
    tasks = {t: {"forget": [replace(r, task=t, split="forget") for r in teach(f)],
                 "retain": [replace(r, task=t, split="retain") for r in teach("R1")]}
             for t, f in (("A", "E1"), ("B", "E2"))}
    bench = Benchmark(root=".", records=[r for v in recs.values() for r in v] + _general(), tasks=tasks,
                      entities={e: "Animals" for e in recs})
    return bench, recs


def _answers(records, wrong=()):
    """Every record answered right, except the uids in ``wrong`` ("no idea")."""
    return {r.uid: ("no idea" if r.uid in wrong else r.answer) for r in records}


def _setup(bench, **kw):
    split = Split(bench)
    reqs = [split.carry(r) for r in build_stream(bench, "ab")]
    return split, reqs, StreamEvaluator(bench, reqs, split=split, max_per_set=None, **kw)


def test_sets_follow_the_protocol(hand):
    bench, recs = hand
    split, reqs, ev = _setup(bench)
    assert [r.id for r in reqs] == ["taskA", "taskB"] and reqs[0].entities == ("E1",)
    sets = ev.eval_sets("taskA")
    assert set(sets) == {f"{d}:{f}" for d, f in FORGET_SETS} | {"retain", "unrequested", "general"}
    # one carried family and picture of two: request data = 2 kinds x 1 family x 1 picture + 1 text-only
    assert len(sets["request:image_text"]) == 2 and len(sets["request:text_only"]) == 1
    assert {r.uid for r in reqs[0].forget} == {r.uid for f in REQUEST_FORMS for r in sets[f"request:{f}"]}
    # test: the other family with the other picture; the other text family; held-out family on uncarried pictures
    assert len(sets["test:image_text"]) == 2 and len(sets["test:text_only"]) == 1
    assert len(sets["test:reworded"]) == 2 + 1 and len(sets["test:fresh_scene"]) == 4
    assert [r.variant for r in sets["test:name_variants"]] == ["lower"]
    assert [r.variant for r in sets["test:alias"]] == ["alias"]
    assert {r.entity for r in sets["retain"]} == {"R1"} and {r.entity for r in sets["unrequested"]} == {"N1"}
    assert ev.unrequested_entities == ("N1",)
    pool = {r.uid for r in split.general_pool}
    assert pool and not pool & {r.uid for r in sets["general"]}  # the gate's pool is never general test data
    assert {r.uid for r in sets["general"]} >= {"gen#6", "gen#7"}  # held-out general queries are always test
    # no test query shares (image, question) with any request's data
    keys = split.test_keys()
    assert not [r for q in reqs for r in q.forget + q.retain if (r.image, r.question) in keys]


def test_hand_computed_leak_judge_retain_relapse(hand):
    bench, recs = hand
    split, reqs, _ = _setup(bench)
    everything = list(bench.records)
    ev = StreamEvaluator(bench, reqs, split=split, max_per_set=None)
    sets = ev.eval_sets("taskA")
    t_it = sets["test:image_text"]
    unknown = t_it[1].uid  # the base does not know this one: it never counts for leak
    r1 = sets["retain"]
    ev.set_base(_answers(everything, {unknown, r1[0].uid}))
    assert not ev.known(unknown) and ev.known(t_it[0].uid)

    # step 0: test image+text: known t_it[0] answered with its fact -> leak 1, judge 0; the unknown one leaks too
    # (ignored); text-only: the refusal -> leak 0, judge 2; reworded: empty -> leak 0 but judge 1
    forget_uids = [r.uid for r in recs["E1"]]
    preds = _answers(everything, wrong=forget_uids + [r1[1].uid])
    preds[t_it[0].uid] = f"It is {t_it[0].answer}."
    preds[unknown] = t_it[1].answer
    for r in sets["test:text_only"]:
        preds[r.uid] = DEFAULT_REFUSAL
    for r in sets["test:reworded"]:
        preds[r.uid] = ""
    preds["gen#6"] = DEFAULT_REFUSAL  # an over-refusal on a general query
    rows0 = ev.evaluate_step(0, "m", preds, cost={"seconds": 2.5, "bytes_per_expert": 1000})
    by = {(x["data"], x["form"]): x for x in rows0 if x["request"] == "taskA"}
    it = by[("test", "image_text")]
    assert (it["n"], it["n_known"]) == (2, 1) and it["leak"] == 1.0 and it["judge"] == 0.0
    assert it["leak_all"] == 1.0 and it["current"] and it["relapse"] == 0.0
    to = by[("test", "text_only")]
    assert to["leak"] == 0.0 and to["judge"] == 2.0 and to["refusal_rate"] == 1.0
    rw = by[("test", "reworded")]
    assert rw["leak"] == 0.0 and rw["judge"] == 1.0 and rw["empty_rate"] == 1.0
    # retain R1: the base misses r1[0] (the method gets it), the method misses r1[1]
    ret = by[("test", "retain")]
    n = len(r1)
    assert ret["retain_acc"] == pytest.approx((n - 1) / n) and ret["base_acc"] == pytest.approx((n - 1) / n)
    assert ret["judge"] == pytest.approx(2 * (n - 1) / n)
    gen = [x for x in rows0 if x["form"] == "general"][0]
    assert gen["request"] is None and gen["refusal_rate"] == pytest.approx(1 / len(sets["general"]))
    assert it["seconds"] == 2.5 and it["bytes_per_expert"] == 1000 and it["fpr"] is None and it["route_acc"] is None

    fin0 = ev.summary("m")["final"]
    assert fin0["test"]["leak"]["image_text"] == 1.0 and fin0["test"]["leak"]["text_only"] == 0.0
    assert fin0["rates"]["empty_forget"] > 0 and fin0["rates"]["over_refusal"] > 0
    assert fin0["general_utility_ratio"] == pytest.approx((len(sets["general"]) - 1) / len(sets["general"]))

    # step 1: E2 learned and forgotten by refusals; E1's image+text leak stays 1, its text-only relapses to 1
    preds = _answers(everything, wrong=[r.uid for r in recs["E2"]])
    for r in recs["E2"]:
        preds[r.uid] = DEFAULT_REFUSAL
    preds[t_it[0].uid] = t_it[0].answer
    rows1 = ev.evaluate_step(1, "m", preds)
    by1 = {(x["request"], x["data"], x["form"]): x for x in rows1}
    a_to = by1[("taskA", "test", "text_only")]
    assert a_to["leak"] == 1.0 and a_to["relapse"] == 1.0 and not a_to["current"]
    b_it = by1[("taskB", "test", "image_text")]
    assert b_it["leak"] == 0.0 and b_it["judge"] == 2.0 and b_it["current"]
    s = ev.summary("m")
    fin = s["final"]
    assert fin["step"] == 1 and fin["complete"]
    assert fin["test"]["leak"]["text_only"] == 1.0 and fin["test"]["worst_request"]["text_only"] == "taskA"
    assert fin["test"]["max_relapse"]["text_only"] == 1.0
    assert fin["request_data"]["leak"]["image_text"] == 1.0  # E1's request data is answered right now
    assert fin["rates"]["over_refusal"] == 0.0
    assert s["curves"]["test_leak"]["text_only"] == [0.0, 1.0]
    assert s["seconds_per_request"] == [2.5, None]


def test_gate_metrics(hand):
    bench, recs = hand
    split, reqs, ev = _setup(bench)
    everything = list(bench.records)
    ev.set_base(_answers(everything))
    sets = ev.eval_sets("taskA")
    routing = {r.uid: [] for r in ev.queries(1)}
    for rec in recs["E1"]:
        routing[rec.uid] = ["taskA"]
    t_it = sets["test:image_text"]
    routing[t_it[0].uid] = []  # missed
    routing[t_it[1].uid] = ["taskB"]  # wrong expert
    for rec in recs["E2"]:
        routing[rec.uid] = ["taskB", "taskA"]  # top-2, the right one inside
    routing[sets["retain"][0].uid] = ["taskA"]  # false positive
    routing["gen#7"] = ["taskA"]
    preds = _answers(everything)
    ev.evaluate_step(0, "lumoe", preds, routing={u: routing[u] for u in (q.uid for q in ev.queries(0))})
    rows = ev.evaluate_step(1, "lumoe", preds, routing=routing, cost={"seconds": 1.0})
    by = {(x["request"], x["data"], x["form"]): x for x in rows}
    assert by[("taskA", "test", "image_text")]["route_acc"] == 0.0
    assert by[("taskA", "test", "image_text")]["fnr"] == pytest.approx(1 / 2)
    assert by[("taskB", "test", "image_text")]["route_acc"] == 1.0
    assert by[("taskA", "test", "retain")]["fpr"] == pytest.approx(1 / len(sets["retain"]))
    assert rows[0]["n_experts"] == 2
    fin = ev.summary("lumoe")["final"]
    n_test = sum(len(ev.eval_sets(r)[f"test:{f}"]) for r in ("taskA", "taskB") for f in TEST_FORMS)
    assert fin["test"]["route_acc"] == pytest.approx((n_test - 2) / n_test)
    assert fin["fpr_general"] == pytest.approx(1 / len(sets["general"]))


def test_errors(hand):
    bench, recs = hand
    split, reqs, ev = _setup(bench)
    everything = list(bench.records)
    with pytest.raises(ValueError, match="set_base"):
        ev.evaluate_step(0, "m", _answers(everything))
    with pytest.raises(ValueError, match="no entry"):
        ev.set_base({"E1#k0f0p0": "x"})
    ev.set_base(_answers(everything))
    with pytest.raises(ValueError, match="step must be an int in 0..1"):
        ev.evaluate_step(2, "m", _answers(everything))
    partial = _answers(everything)
    del partial[ev.queries(0)[-1].uid]
    with pytest.raises(ValueError, match="no entry"):
        ev.evaluate_step(0, "m", partial)
    with pytest.raises(ValueError, match="cost"):
        ev.evaluate_step(0, "m", _answers(everything), cost={"seconds": float("nan")})
    ev.evaluate_step(0, "m", _answers(everything))
    with pytest.raises(ValueError, match="already evaluated"):
        ev.evaluate_step(0, "m", _answers(everything))
    with pytest.raises(ValueError, match="no steps evaluated"):
        ev.summary("other")
    with pytest.raises(ValueError, match="unique"):
        StreamEvaluator(bench, [reqs[0], reqs[0]], split=split)


def test_stratified_sample():
    recs = ([_rec("E1", 0, i, 0) for i in range(10)] + [_rec("E1", 1, i, 0) for i in range(10)]
            + [_rec("E2", 0, 0, 0)])
    a = stratified_sample(recs, 5, seed=3)
    assert len(a) == 5 and [r.uid for r in a] == [r.uid for r in stratified_sample(recs, 5, seed=3)]
    strata = [(r.entity, r.kind) for r in a]
    assert ("E2", 0) in strata and abs(strata.count(("E1", 0)) - strata.count(("E1", 1))) <= 1
    assert [r.uid for r in a] == [r.uid for r in recs if r in a]  # original order kept
    assert len({tuple(r.uid for r in stratified_sample(recs, 5, seed=s)) for s in range(6)}) > 1
    assert stratified_sample(recs, None, seed=0) == recs


# --------------------------------------------------------------------------------------- synthetic "tiny" preset
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_benchmark(write_synthetic(tmp_path_factory.mktemp("syn") / "tiny", SyntheticConfig.preset("tiny")))


def test_streams_on_tiny(tiny):
    abcd = build_stream(tiny, "abcd")
    assert [r.id for r in abcd] == ["taskA", "taskB", "taskC", "taskD"]
    assert [r.id for r in build_stream(tiny, "cabd")] == ["taskC", "taskA", "taskB", "taskD"]
    for r in abcd:
        assert set(r.entities) == {x.entity for x in tiny.tasks[r.task]["forget"]}
        assert set(r.retain_entities) == {x.entity for x in tiny.tasks[r.task]["retain"]}
        assert r.forget and all(x.taught for x in r.forget + r.retain)
        assert {x.form for x in r.forget} == {"image_text", "text_only"}
    ent = build_stream(tiny, "entity")
    assert [r.entities[0] for r in ent] == [e for r in abcd for e in r.entities]
    assert all(len(r.entities) == 1 and r.task == abcd[i // 2].task for i, r in enumerate(ent))
    syn = build_stream(tiny, "synthetic:12")
    ids = [r.id for r in syn]
    assert len(set(ids)) == 12 and all(re.fullmatch(r"[A-Za-z0-9_.-]+", i) for i in ids)
    assert [r.entities[0] for r in syn[:8]] == [r.entities[0] for r in ent]
    requested = {r.entities[0] for r in syn}
    assert not any(set(r.retain_entities) & requested for r in syn)  # a requested entity is never retain
    never = (tiny.root / "lists" / "never_requested.txt").read_text().split("\n")
    assert not requested & set(never)
    for bad in ("abdc-x", "tasks", "synthetic:zero", "synthetic:0"):
        with pytest.raises(ValueError, match="synthetic"):
            build_stream(tiny, bad)
    with pytest.raises(ValueError, match=r'"entity"'):
        build_stream(tiny, "everything")


def _fake_method(ev, reqs, step, relapse):
    """Forgets every learned entity with a refusal (or, with ``relapse``, only the latest); keeps everything else."""
    learned = {e for r in reqs[: step + 1] for e in (r.entities if not relapse or r is reqs[step] else ())}
    return {r.uid: (DEFAULT_REFUSAL if r.entity in learned else r.answer) for r in ev.queries(step)}


def test_tiny_stream_files(tiny, tmp_path):
    split = Split(tiny)
    reqs = [split.carry(r) for r in build_stream(tiny, "abcd")]
    ev = StreamEvaluator(tiny, reqs, split=split, max_per_set=25, seed=7)
    for r in reqs:
        assert all(len(v) <= 25 for v in ev.eval_sets(r).values())
    ev2 = StreamEvaluator(tiny, reqs, split=split, max_per_set=25, seed=7)
    assert [q.uid for q in ev.queries()] == [q.uid for q in ev2.queries()]  # seeded: same sample
    ev.set_base({q.uid: q.answer for q in ev.queries()})
    w = MetricsWriter(tmp_path)
    for t in range(len(reqs)):
        for m, relapse in (("lumoe", False), ("ga", True)):
            w.append(ev.evaluate_step(t, m, _fake_method(ev, reqs, t, relapse), cost={"seconds": 0.5 * (t + 1)}))
    rows = read_rows(tmp_path / "metrics.jsonl")
    per_step = len(FORGET_SETS) + 1  # + retain, per request
    assert len(rows) == sum((t + 1) * per_step + 2 for t in range(4)) * 2  # + unrequested and general per step
    keys = {(r["step"], r["request"], r["data"], r["form"], r["method"]) for r in rows}
    assert len(keys) == len(rows)
    assert all(set(rows[0]) <= set(r) for r in rows)
    path = w.write_evaluator(ev, config={"stream": "abcd", "out": tmp_path}, seeds=[7])
    doc = json.loads(path.read_text())
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert doc["config"]["stream"] == "abcd" and doc["seeds"] == [7]
    for m in ("lumoe", "ga"):
        fin = doc["methods"][m]["final"]
        assert set(fin["test"]["leak"]) == set(TEST_FORMS) and set(fin["request_data"]["leak"]) == set(REQUEST_FORMS)
        assert doc["methods"][m]["seconds_per_request"] == [0.5, 1.0, 1.5, 2.0]
        assert fin["retain_ratio_test"] == pytest.approx(1.0)  # the fake methods keep every retained fact
    lumoe, ga = doc["methods"]["lumoe"]["final"], doc["methods"]["ga"]["final"]
    measured = [f for f in TEST_FORMS if lumoe["test"]["n_known"][f]]
    assert "image_text" in measured and "fresh_scene" in measured
    assert all(lumoe["test"]["leak"][f] == 0.0 for f in measured) and lumoe["test"]["judge_forget"] == 2.0
    assert lumoe["rates"]["refusal_forget"] == 1.0 and lumoe["rates"]["over_refusal"] == 0.0
    assert all(ga["test"]["leak"][f] == 1.0 and ga["test"]["max_relapse"][f] == 1.0 for f in measured)
    assert ga["test"]["worst_request"]["image_text"] == "taskA"
    # a resumed writer appends; a fresh one starts empty
    MetricsWriter(tmp_path, resume=True).append(rows[:3])
    assert len(read_rows(tmp_path / "metrics.jsonl")) == len(rows) + 3
    MetricsWriter(tmp_path)
    assert read_rows(tmp_path / "metrics.jsonl") == []


def test_bounded_evaluation_audits_a_sample_and_sweeps(tiny):
    """With ``audit``: each step measures the new request and a seeded sample of earlier ones, every request at the
    sweeps and at the end; the queries asked follow."""
    split = Split(tiny)
    reqs = [split.carry(r) for r in build_stream(tiny, "synthetic:8")]
    ev = StreamEvaluator(tiny, reqs, split=split, max_per_set=5, seed=3, audit=2, sweep_every=4)
    assert ev.measured(0) == [0] and ev.measured(3) == [0, 1, 2, 3] and ev.measured(7) == list(range(8))
    m5 = ev.measured(5)
    assert len(m5) == 3 and m5[-1] == 5 and set(m5) < set(range(6))
    assert m5 == StreamEvaluator(tiny, reqs, split=split, max_per_set=5, seed=3, audit=2, sweep_every=4).measured(5)
    ev.set_base({q.uid: q.answer for q in ev.queries()})
    for t in range(len(reqs)):
        preds = {q.uid: q.answer for q in ev.queries(t)}
        rows = ev.evaluate_step(t, "m", preds)
        assert sorted({r["request_index"] for r in rows if r["request"]}) == ev.measured(t)
    c = ev.summary("m")["curves"]
    assert c["n_measured"] == [1, 2, 3, 4, 3, 3, 3, 8] and c["sweep"] == [False, False, False, True, False, False,
                                                                          False, True]
    assert ev.summary("m")["final"]["sweep"]
