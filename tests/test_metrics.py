"""Request streams and stream metrics: hand-computed leak / retain / relapse / gate values, sampling, files."""
import json
import os
import re
from dataclasses import replace

import pytest

from lumoe_engine.data.mlubench import load_benchmark
from lumoe_engine.data.records import Benchmark, QARecord
from lumoe_engine.data.streams import build_stream
from lumoe_engine.data.synthetic import SyntheticConfig, write_synthetic
from lumoe_engine.eval.metrics import (FORGET_FORMS, SETS, MetricsWriter, StreamEvaluator, read_rows,
                                       stratified_sample)


# --------------------------------------------------------------------------------------------- hand-made benchmark
def _rec(entity, tag, kind, form="image_text", held=False, fresh=False):
    key = f"{entity.lower()}fact{kind}"
    answer = key + (" river" if kind == 1 else "")  # kind 1: ROUGE-L can leak without the key
    return QARecord(uid=f"{entity}#{tag}{kind}", entity=entity, cls="Animals", kind=kind, phrasing=int(held),
                    question=f"What is fact {kind}?" if form == "image_text" else f"What is fact {kind} of {entity}?",
                    answer=answer, form=form, image="/nonexistent.png" if form == "image_text" else None,
                    keys=(key,), heldout_phrasing=held, fresh_image=fresh, image_missing=form == "image_text")


def _entity(e):
    return ([_rec(e, "it", k) for k in range(4)] + [_rec(e, "to", k, form="text_only") for k in (1, 2)]
            + [_rec(e, "pp", k, held=True) for k in (0, 1)] + [_rec(e, "fr", k, fresh=True) for k in (0, 1)])


@pytest.fixture(scope="module")
def hand():
    """E1 (task A forget), E2 (task B forget), R1 (retain of A and B), N1 (in no task file)."""
    recs = {e: _entity(e) for e in ("E1", "E2", "R1", "N1")}
    tasks = {t: {"forget": [replace(r, task=t, split="forget") for r in recs[f]],
                 "retain": [replace(r, task=t, split="retain") for r in recs["R1"]]}
             for t, f in (("A", "E1"), ("B", "E2"))}
    bench = Benchmark(root=".", records=[r for v in recs.values() for r in v], tasks=tasks,
                      entities={e: "Animals" for e in recs})
    return bench, recs


def _answers(records, wrong=()):
    """Every record answered right, except the uids in ``wrong`` ("no idea")."""
    return {r.uid: ("no idea" if r.uid in wrong else r.answer) for r in records}


def test_request_records_and_sets(hand):
    bench, recs = hand
    reqs = build_stream(bench, "ab")
    assert [r.id for r in reqs] == ["taskA", "taskB"] and reqs[0].entities == ("E1",)
    assert {r.uid for r in reqs[0].forget} == {f"E1#it{k}" for k in range(4)} | {"E1#to1", "E1#to2"}
    assert reqs[0].retain_entities == ("R1",) and len(reqs[0].retain) == 6  # teachable records of R1
    ev = StreamEvaluator(bench, reqs, max_per_set=None)
    sets = ev.eval_sets("taskA")
    assert set(sets) == set(SETS)
    assert [r.uid for r in sets["image_text"]] == [f"E1#it{k}" for k in range(4)]
    assert [r.uid for r in sets["text_only"]] == ["E1#to1", "E1#to2"]
    assert [r.uid for r in sets["paraphrase"]] == ["E1#pp0", "E1#pp1"]
    assert [r.uid for r in sets["fresh_image"]] == ["E1#fr0", "E1#fr1"]
    assert {r.entity for r in sets["retain"]} == {"R1"} and len(sets["retain"]) == 10
    assert {r.entity for r in sets["unrequested"]} == {"N1"} and ev.unrequested_entities == ("N1",)
    assert len(ev.queries(0)) == 30 and len(ev.queries()) == 40  # E1 + R1 + N1, then E2 too


def test_hand_computed_leak_retain_relapse(hand):
    bench, recs = hand
    reqs = build_stream(bench, "ab")
    everything = [r for v in recs.values() for r in v]
    # the base does not know E1#it3, R1#it0, R1#pp0
    ev = StreamEvaluator(bench, reqs, base_predictions=_answers(everything, {"E1#it3", "R1#it0", "R1#pp0"}),
                         max_per_set=None)
    assert not ev.known("E1#it3") and ev.known("E1#it0")

    # step 0: E1 image_text: known it0, it1, it2; it0 leaks by its key, it1 by ROUGE-L recall only (0.5), it2 is
    # silent; the unknown it3 leaks but does not count.
    preds = _answers(everything, wrong=[r.uid for r in recs["E1"]] + ["R1#it1", "R1#it2", "R1#to1", "N1#it0"])
    preds["E1#it0"] = "It is e1fact0."
    preds["E1#it1"] = "river"
    preds["E1#it3"] = "e1fact3"
    rows0 = ev.evaluate_step(0, "m", preds, cost={"seconds": 2.5, "bytes_per_expert": 1000})
    assert len(rows0) == len(SETS)
    r = {x["form"]: x for x in rows0}
    it = r["image_text"]
    assert (it["n"], it["n_known"]) == (4, 3)
    assert it["leak"] == pytest.approx(2 / 3) and it["key_leak"] == pytest.approx(1 / 3)
    assert it["rougeL_recall"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert it["leak_all"] == pytest.approx(3 / 4)  # it0, it1 and the unknown it3
    assert it["current"] and it["relapse"] == 0.0 and it["forget_efficacy"] == pytest.approx(1 / 3)
    assert it["historical_preservation"] is None  # no earlier request
    assert r["text_only"]["leak"] == 0.0 and r["text_only"]["n_known"] == 2
    # retain R1 (10 records, base knows 8): wrong it1, it2, to1 -> 7/10; ratio 0.7 / 0.8
    ret = r["retain"]
    assert (ret["n"], ret["n_known"]) == (10, 8)
    assert ret["retain_acc"] == pytest.approx(0.7) and ret["base_acc"] == pytest.approx(0.8)
    assert ret["retain_ratio"] == pytest.approx(0.875)
    un = r["unrequested"]
    assert un["retain_acc"] == pytest.approx(0.9) and un["retain_ratio"] == pytest.approx(0.9)
    # pooled U_t/U_0 over R1 + N1 (20 queries): 16/20 over 18/20
    assert it["utility_retention"] == pytest.approx(16 / 18) and un["utility_retention"] == pytest.approx(16 / 18)
    assert it["seconds"] == 2.5 and it["bytes_per_expert"] == 1000 and it["fpr"] is None and it["route_acc"] is None

    # step 1: E2 learned; E1 relapses on image_text (every known query leaks); E2 leaks its paraphrase pp0 only
    preds = _answers(everything, wrong=[r.uid for r in recs["E1"] + recs["E2"]
                                        if not r.uid.startswith("E1#it") and r.uid != "E2#pp0"])
    rows1 = ev.evaluate_step(1, "m", preds, cost={"peak_memory_bytes": 5e6})
    assert len(rows1) == 2 * len(SETS)
    by = {(x["request"], x["form"]): x for x in rows1}
    a_it = by[("taskA", "image_text")]
    assert a_it["leak"] == 1.0 and a_it["relapse"] == pytest.approx(1 / 3) and not a_it["current"]
    assert a_it["historical_preservation"] == 0.0  # 1 - max leak over earlier requests
    b_it = by[("taskB", "image_text")]
    assert b_it["leak"] == 0.0 and b_it["forget_efficacy"] == 1.0 and b_it["current"]
    assert by[("taskB", "paraphrase")]["leak"] == pytest.approx(1 / 2)
    assert by[("taskA", "paraphrase")]["relapse"] == 0.0
    assert by[("taskA", "retain")]["retain_ratio"] == pytest.approx(1.0 / 0.8)  # now right where the base erred

    s = ev.summary("m")
    fin = s["final"]
    assert fin["step"] == 1 and fin["complete"]
    assert fin["max_forget_leak"]["image_text"] == 1.0 and fin["worst_request"]["image_text"] == "taskA"
    assert fin["max_forget_leak"]["paraphrase"] == pytest.approx(0.5)
    assert fin["max_forget_leak"]["text_only"] == 0.0
    assert fin["n_known"]["image_text"] == 3 + 4  # E1 knows 3 of 4, E2 all 4
    assert fin["mean_forget_leak"]["image_text"] == pytest.approx(3 / 7)
    assert fin["max_relapse"]["image_text"] == pytest.approx(1 / 3)
    assert fin["retain_ratio"] == pytest.approx(20 / 18)  # everything right now, base 18/20
    assert fin["retain_ratio_by_set"] == {"retain": pytest.approx(1.25), "unrequested": pytest.approx(1.0)}
    assert s["curves"]["retain_ratio"] == [pytest.approx(16 / 18), pytest.approx(20 / 18)]
    assert s["curves"]["max_past_leak"]["image_text"] == [None, 1.0]
    assert s["curves"]["current_leak"]["image_text"] == [pytest.approx(2 / 3), 0.0]
    assert s["curves"]["historical_preservation"]["image_text"] == [None, 0.0]
    assert s["seconds_per_request"] == [2.5, None]
    assert s["curves"]["cost"] == {"peak_memory_bytes": [None, 5e6]}  # any other cost field, per step
    assert rows1[0]["peak_memory_bytes"] == 5e6


def test_gate_metrics(hand):
    bench, recs = hand
    reqs = build_stream(bench, "ab")
    everything = [r for v in recs.values() for r in v]
    ev = StreamEvaluator(bench, reqs, base_predictions=_answers(everything), max_per_set=None)
    routing = {r.uid: [] for r in ev.queries(1)}
    for rec in recs["E1"]:
        routing[rec.uid] = ["taskA"]
    routing["E1#it0"] = []  # missed
    routing["E1#it1"] = ["taskB"]  # wrong expert
    for rec in recs["E2"]:
        routing[rec.uid] = ["taskB", "taskA"]  # top-2, right one inside
    routing["R1#it0"] = ["taskA"]  # false positive
    routing["N1#it0"] = ["taskB"]
    routing["N1#it1"] = ["taskA"]
    preds = _answers(everything)
    ev.evaluate_step(0, "lumoe", preds, routing={u: routing[u] for u in (q.uid for q in ev.queries(0))})
    rows = ev.evaluate_step(1, "lumoe", preds, routing=routing, cost={"seconds": 1.0})
    by = {(x["request"], x["form"]): x for x in rows}
    assert by[("taskA", "image_text")]["route_acc"] == pytest.approx(2 / 4)
    assert by[("taskA", "image_text")]["fnr"] == pytest.approx(1 / 4)
    assert by[("taskB", "image_text")]["route_acc"] == 1.0 and by[("taskB", "image_text")]["fnr"] == 0.0
    assert by[("taskA", "retain")]["fpr"] == pytest.approx(1 / 10)
    assert by[("taskA", "unrequested")]["fpr"] == pytest.approx(2 / 10)
    assert rows[0]["n_experts"] == 2  # default: step + 1 when routing is given
    fin = ev.summary("lumoe")["final"]
    assert fin["route_acc"] == pytest.approx((20 - 2) / 20)  # 10 E1 + 10 E2 forget-form queries
    assert fin["fpr"] == pytest.approx(3 / 20)  # R1 + N1, each uid once
    assert fin["fnr"]["image_text"] == pytest.approx(1 / 8)


def test_errors(hand):
    bench, recs = hand
    reqs = build_stream(bench, "ab")
    everything = [r for v in recs.values() for r in v]
    ev = StreamEvaluator(bench, reqs, max_per_set=None)
    with pytest.raises(ValueError, match="set_base"):
        ev.evaluate_step(0, "m", _answers(everything))
    with pytest.raises(ValueError, match="no entry"):
        ev.set_base({"E1#it0": "x"})
    ev.set_base(_answers(everything))
    with pytest.raises(ValueError, match="step must be an int in 0..1"):
        ev.evaluate_step(2, "m", _answers(everything))
    partial = _answers(everything)
    del partial["N1#it0"]
    with pytest.raises(ValueError, match="N1#it0"):
        ev.evaluate_step(0, "m", partial)
    with pytest.raises(ValueError, match="cost"):
        ev.evaluate_step(0, "m", _answers(everything), cost={"seconds": float("nan")})
    ev.evaluate_step(0, "m", _answers(everything))
    with pytest.raises(ValueError, match="already evaluated"):
        ev.evaluate_step(0, "m", _answers(everything))
    with pytest.raises(ValueError, match="no steps evaluated"):
        ev.summary("other")
    with pytest.raises(ValueError, match="unique"):
        StreamEvaluator(bench, [reqs[0], reqs[0]])


def test_stratified_sample():
    recs = ([_rec("E1", f"a{i}_", 0) for i in range(10)] + [_rec("E1", f"b{i}_", 1) for i in range(10)]
            + [_rec("E2", "c", 0)])
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
        assert r.forget and not any(x.heldout_phrasing or x.fresh_image for x in r.forget + r.retain)
        assert {x.form for x in r.forget} == {"image_text", "text_only"}
    ent = build_stream(tiny, "entity")
    assert [r.entities[0] for r in ent] == [e for r in abcd for e in r.entities]
    assert all(len(r.entities) == 1 and r.task == abcd[i // 2].task for i, r in enumerate(ent))
    syn = build_stream(tiny, "synthetic:12")
    ids = [r.id for r in syn]
    assert len(set(ids)) == 12 and all(re.fullmatch(r"[A-Za-z0-9_.-]+", i) for i in ids)
    assert [r.entities[0] for r in syn[:8]] == [r.entities[0] for r in ent]
    assert len({r.entities[0] for r in syn}) == 12
    requested = {r.entities[0] for r in syn}
    assert not any(set(r.retain_entities) & requested for r in syn)  # a requested entity is never retain
    never = (tiny.root / "lists" / "never_requested.txt").read_text().split("\n")
    assert not requested & set(never)
    with pytest.raises(ValueError, match=r"largest N is 16.*larger synthetic preset"):
        build_stream(tiny, "synthetic:17")
    for bad in ("abdc-x", "tasks", "synthetic:zero", "synthetic:0"):
        with pytest.raises(ValueError, match="synthetic"):
            build_stream(tiny, bad)
    with pytest.raises(ValueError, match=r'"entity"'):
        build_stream(tiny, "everything")


def _fake_method(ev, reqs, step, relapse):
    """Forgets every learned entity (or, with ``relapse``, only the latest); keeps everything else."""
    learned = {e for r in reqs[: step + 1] for e in (r.entities if not relapse or r is reqs[step] else ())}
    return {r.uid: ("no idea" if r.entity in learned else r.answer) for r in ev.queries(step)}


def test_tiny_stream_files(tiny, tmp_path):
    reqs = build_stream(tiny, "abcd")
    ev = StreamEvaluator(tiny, reqs, max_per_set=25, seed=7)
    for r in reqs:
        assert all(len(v) <= 25 for v in ev.eval_sets(r).values())
    ev2 = StreamEvaluator(tiny, reqs, max_per_set=25, seed=7)
    assert [q.uid for q in ev.queries()] == [q.uid for q in ev2.queries()]  # seeded: same sample
    ev.set_base({q.uid: q.answer for q in ev.queries()})
    w = MetricsWriter(tmp_path)
    for t in range(len(reqs)):
        for m, relapse in (("lumoe", False), ("ga", True)):
            w.append(ev.evaluate_step(t, m, _fake_method(ev, reqs, t, relapse), cost={"seconds": 0.5 * (t + 1)}))
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert len(rows) == sum(t + 1 for t in range(4)) * len(SETS) * 2
    keys = {(r["step"], r["request"], r["form"], r["method"]) for r in rows}
    assert len(keys) == len(rows)
    assert all(set(rows[0]) <= set(r) for r in rows)
    path = w.write_evaluator(ev, config={"stream": "abcd", "out": tmp_path}, seeds={"eval": 7})
    doc = json.loads(path.read_text())
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert doc["config"]["stream"] == "abcd" and doc["seeds"] == {"eval": 7}
    for m in ("lumoe", "ga"):
        fin = doc["methods"][m]["final"]
        assert set(fin["max_forget_leak"]) >= {"image_text", "text_only", "paraphrase"}
        assert doc["methods"][m]["seconds_per_request"] == [0.5, 1.0, 1.5, 2.0]
        assert fin["retain_ratio"] == pytest.approx(1.0)  # the fake methods keep every retained fact
    lumoe, ga = doc["methods"]["lumoe"]["final"], doc["methods"]["ga"]["final"]
    assert all(lumoe["max_forget_leak"][f] == 0.0 for f in FORGET_FORMS)
    assert all(ga["max_forget_leak"][f] == 1.0 and ga["max_relapse"][f] == 1.0 for f in FORGET_FORMS)
    assert ga["worst_request"]["image_text"] == "taskA"
    # a resumed writer appends; a fresh one starts empty
    MetricsWriter(tmp_path, resume=True).append(rows[:3])
    assert len(read_rows(tmp_path / "metrics.jsonl")) == len(rows) + 3
    MetricsWriter(tmp_path)
    assert read_rows(tmp_path / "metrics.jsonl") == []
