"""The stream driver end to end on a tiny setting (micro LLaVA, tiny synthetic benchmark, a short teaching budget, a
few steps per request): every output with the keys the report and the lead rely on, bad requests skipped with a
recorded error and nothing of them in the bank or the gate, ``--compare`` filling one table for all methods.

The micro model barely learns the facts in 20 teaching steps, so leaks here are mostly unmeasured (None); the numbers
that matter come from the default run (``python lumoe_engine/run.py --compare``), reported in report.md.
"""
import dataclasses
import json

import pytest

from faults import nan_for
from lumoe_engine import pipeline
from lumoe_engine import run as run_mod
from lumoe_engine import stream as stream_mod
from lumoe_engine.stream import base as stream_base
from lumoe_engine.data.streams import Request
from lumoe_engine.data.protocol import TEST_FORMS, ProtocolError, Split
from lumoe_engine.eval.metrics import FORGET_SETS, read_rows
from lumoe_engine.model.bank import ExpertBank
from lumoe_engine.gate.gate import Gate
from lumoe_engine.ledger import Ledger

TEACH = {"max_steps": 20, "eval_max_records": 40, "check_every": 1000}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _cfg(out, cache, **kw):
    base = dict(synthetic="tiny", preset="micro", cache=str(cache), out=str(out), steps=2, batch_size=8,
                max_per_set=6, progress=False, teach_overrides=dict(TEACH))
    base.update(kw)
    return stream_mod.StreamConfig(**base)


def _bad_requests(requests, bench, broken_png):
    """The stream "ab" with four bad requests woven in: empty forget set, unknown entity, unreadable image, nan."""
    a, b = requests
    empty = Request(id="bad-empty", forget=[], retain=a.retain, entities=a.entities[:1], task=None,
                    metadata={"injected": True})
    ghost = Request(id="bad-unknown", forget=[dataclasses.replace(r, entity="Nobody Atall") for r in a.forget[:4]],
                    retain=a.retain, entities=("Nobody Atall",))
    img = next(r for r in b.forget if r.form == "image_text")
    badimg = Request(id="bad-image", forget=[dataclasses.replace(img, image=str(broken_png), image_missing=False)],
                     retain=b.retain, entities=b.entities[:1])
    nan = dataclasses.replace(b, id="bad-nan", forget=b.forget[1:])  # other content than b: another request
    return [a, empty, ghost, badimg, nan, b]


def test_stream_writes_every_output_and_skips_bad_requests(tmp_path, cache, monkeypatch):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG but not really")
    monkeypatch.setattr(pipeline, "train_expert", nan_for("bad-nan"))
    out = tmp_path / "run"
    summary = stream_mod.run_stream(_cfg(out, cache, stream="ab"),
                                    edit_stream=lambda reqs, bench: _bad_requests(reqs, bench, broken))

    for name in ("metrics.jsonl", "summary.json", "report.md", "config.json", "retain_curve.png",
                 "forget_curves.png", "bank/manifest.json", "gate/gate.json"):
        assert (out / name).is_file(), name
    doc = json.loads((out / "summary.json").read_text())
    assert doc == summary
    s = doc["methods"]["lumoe"]
    assert set(s["final"]["test"]["leak"]) == set(TEST_FORMS)
    assert "retain_ratio_test" in s["final"] and len(s["seconds_per_request"]) == 6
    assert s["flat_cost"]["n"] == 2 and len(s["train_seconds_per_request"]) == 2

    # the four bad requests failed, each with its own clear error; the two good ones were learned
    fails = {f["request"]: f for f in doc["failures"]["lumoe"]}
    assert set(fails) == {"bad-empty", "bad-unknown", "bad-image", "bad-nan"}
    assert "forget set is empty" in fails["bad-empty"]["error"]
    assert "'Nobody Atall' is not in the benchmark" in fails["bad-unknown"]["error"]
    assert "does not open as an image" in fails["bad-image"]["error"] and "broken.png" in fails["bad-image"]["error"]
    assert fails["bad-nan"]["error_type"] == "NonFiniteLossError" and "nan at step 0" in fails["bad-nan"]["error"]
    rows = read_rows(out / "metrics.jsonl")
    assert sorted(r["request"] for r in rows if r["set"] == "failure") == sorted(fails)
    report = (out / "report.md").read_text()
    assert "## Failed requests" in report and all(f"`{k}`" in report for k in fails)

    # nothing of them in the bank or the gate: exactly the good requests, in order
    bank = ExpertBank.open(out / "bank")
    assert list(bank.ids) == ["taskA", "taskB"]
    gate = Gate.load(out / "gate")
    assert gate.expert_ids == ["taskA", "taskB"]
    # every step was measured (the failed ones too: their queries were not forgotten), routing recorded
    steps = sorted({r["step"] for r in rows if r["set"] != "failure"})
    assert steps == list(range(6))
    forget_rows = [r for r in rows if r["set"] == "forget"]
    assert {(r["data"], r["form"]) for r in forget_rows} == set(FORGET_SETS)
    assert all(r["route_acc"] is not None or r["n"] == 0 for r in forget_rows)
    conf = json.loads((out / "config.json").read_text())
    assert conf["config"]["stream"] == "ab" and conf["seeds"] == [0]
    assert conf["config"]["requests"] == ["taskA", "bad-empty", "bad-unknown", "bad-image", "bad-nan", "taskB"]
    # the ledger: every request the intake accepts, with its state; the two it refuses never entered it
    with Ledger(out / "ledger", readonly=True) as led:
        assert led.requests() == ["taskA", "bad-unknown", "bad-nan", "taskB"]
        assert led.requests("evaluated") == ["taskA", "taskB"]
        assert led.status("bad-nan").state == "failed" and "NonFiniteLossError" in led.status("bad-nan").reason
        assert "not in the benchmark" in led.status("bad-unknown").reason
        assert [st for st, _, _ in led.status("taskA").history] == ["received", "training", "expert_saved",
                                                                    "gate_updated", "evaluated"]
        spec = led.spec("taskB")  # the stored request re-reads (images from the ledger's own copies)
        assert len(spec.forget) == len(_task_b_forget(out)) and spec.entity is None
    assert sorted(p.name for p in (out / "steps" / "lumoe").iterdir()) == [f"{i:04d}.json" for i in range(6)]


def _task_b_forget(out):
    """The forget records of request taskB of the stream "ab" run in ``out`` (its saved config)."""
    from lumoe_engine.model.teach import load_data

    cfg = stream_mod.saved_config(out)
    _, _, _, requests, _ = stream_base.stream_setup(cfg, load_data(cfg.teach_config(), cfg.cache), None,
                                                    evaluate=False)
    return requests[1].forget


def test_no_test_query_reaches_trainer_gate_or_calibration(tmp_path, cache, monkeypatch):
    """Every record the expert trainer trains on and every record whose gate features are computed (the gate's
    positives, negatives and calibration rows) is request data or a general-pool query: no test query's (image,
    question) pair. A test query slipped into a request makes that request fail (ProtocolError) with nothing of it
    in the bank or the gate. The answer channel's calibration (the base's answers to the negatives) reads request
    data only, and each expert's facts are keys of its own request data."""
    from lumoe_engine.gate.recognition import Recognizer

    trained, featured, answered = [], [], []
    real_train = pipeline.train_expert
    real_call = pipeline.FeatureCache.__call__
    real_answer = Recognizer.answer_records

    def spy_answer(self, records, *a, **kw):
        answered.extend(records)
        return real_answer(self, records, *a, **kw)

    def spy_train(model, processor, ctx, request, *a, **kw):
        trained.extend(request.forget + request.retain)
        return real_train(model, processor, ctx, request, *a, **kw)

    def spy_features(self, records):
        featured.extend(records)
        return real_call(self, records)

    monkeypatch.setattr(pipeline, "train_expert", spy_train)
    monkeypatch.setattr(pipeline.FeatureCache, "__call__", spy_features)
    monkeypatch.setattr(Recognizer, "answer_records", spy_answer)
    out = tmp_path / "run"
    stream_mod.run_stream(_cfg(out, cache, stream="ab", steps=1))
    cfg = stream_mod.saved_config(out)
    from lumoe_engine.model.teach import load_data

    bench = load_data(cfg.teach_config(), cfg.cache)
    eval_bench, _ = stream_base.evaluation_benchmark(bench, [])
    keys = Split(eval_bench, cfg.protocol()).test_keys()
    key = lambda r: (r.image if r.form == "image_text" else None, r.question)  # noqa: E731
    assert trained and featured
    assert not [r.uid for r in trained if key(r) in keys]
    assert not [r.uid for r in featured if key(r) in keys]
    assert answered and not [r.uid for r in answered if key(r) in keys]
    gate = Gate.load(out / "gate")
    assert gate.recognition and all(gate.facts)
    carried = {k for r in trained for k in (r.keys or (r.answer,))}
    assert set().union(*map(set, gate.facts)) <= carried

    # slip one of taskA's test queries into its forget data: the request fails, nothing of it is kept
    def slip(requests, b):
        split = Split(stream_base.evaluation_benchmark(b, [])[0], cfg.protocol())
        test = split.test_sets(requests[0].entities)["reworded"][0]
        return [dataclasses.replace(requests[0], forget=requests[0].forget + [test]), requests[1]]

    out2 = tmp_path / "slipped"
    summary = stream_mod.run_stream(_cfg(out2, cache, stream="ab", steps=1), edit_stream=slip)
    fails = summary["failures"]["lumoe"]
    assert [f["request"] for f in fails] == ["taskA"] and fails[0]["error_type"] == ProtocolError.__name__
    assert "test queries" in fails[0]["error"]
    assert list(ExpertBank.open(out2 / "bank").ids) == ["taskB"]
    assert Gate.load(out2 / "gate").expert_ids == ["taskB"]


def test_synthetic_streams_beyond_the_task_files():
    """synthetic:20 and synthetic:32 on the embedded default (36 entities); 33 leaves fewer than
    NEVER_REQUESTED_KEEP entities never requested: a clear error naming the largest N."""
    from lumoe_engine.data.streams import NEVER_REQUESTED_KEEP, build_stream
    from lumoe_engine.model.teach import load_data

    bench = load_data(stream_mod.StreamConfig(synthetic="default").teach_config(), None)
    in_files = {r.entity for t in bench.tasks.values() for split in t.values() for r in split}
    for n in (20, 32):
        reqs = build_stream(bench, f"synthetic:{n}")
        ents = [r.entities[0] for r in reqs]
        assert len(reqs) == n and len(set(ents)) == n
        assert all(r.retain for r in reqs)  # every request has retain data (gate negatives, retain metrics)
        untasked = [r for r in reqs if r.metadata.get("untasked")]
        assert all(r.entities[0] not in in_files for r in untasked)
        assert len(untasked) == max(0, n - len(in_files))
        assert len(set(bench.entities) - set(ents)) >= NEVER_REQUESTED_KEEP
    with pytest.raises(ValueError, match=r"largest N is 32.*--synthetic medium"):
        build_stream(bench, "synthetic:33")


def test_compare_puts_every_method_in_one_summary(tmp_path, cache, monkeypatch):
    out = tmp_path / "cmp"
    summary = stream_mod.run_stream(_cfg(out, cache, stream="a", steps=1, compare=True))
    assert list(summary["methods"]) == list(stream_mod.METHODS)
    for m, s in summary["methods"].items():
        fin = s["final"]
        assert fin["complete"] and "retain_ratio_test" in fin and "general_utility_ratio" in fin, m
        assert set(fin["test"]["leak"]) == set(TEST_FORMS), m
        assert len(s["seconds_per_request"]) == 1 and s["failures"] == [], m
        assert (fin["test"]["route_acc"] is None) == (m != "lumoe"), m  # only LUMoE routes
    report = (out / "report.md").read_text()
    assert all(f"| {m} |" in report for m in stream_mod.METHODS)


def test_bounded_evaluation_measures_the_new_request_and_an_audit_sample(tmp_path, cache):
    """--audit 1: after each request the stream measures it and one earlier request, every request after the last;
    the rows, the curves and the report say so, and the final step equals a full sweep of the same run."""
    out = tmp_path / "audit"
    summary = stream_mod.run_stream(_cfg(out, cache, stream="abcd", steps=1, audit=1))
    c = summary["methods"]["lumoe"]["curves"]
    assert c["n_learned"] == [1, 2, 3, 4] and c["n_measured"] == [1, 2, 2, 4]
    assert c["sweep"] == [False, False, False, True]
    rows = read_rows(out / "metrics.jsonl")
    per_step = {s: {r["request"] for r in rows if r["step"] == s and r["request"] not in (None, "")} for s in range(4)}
    assert [len(v) for v in per_step.values()] == [1, 2, 2, 4]
    assert all(summary["config"]["requests"][s] in per_step[s] for s in range(4))  # the new request, always
    report = (out / "report.md").read_text()
    assert "Bounded evaluation" in report and "(2 of 3 measured)" in report
    assert summary["methods"]["lumoe"]["final"]["complete"]


def test_cli_options_map_onto_the_config(tmp_path):
    import argparse

    p = run_mod.add_stream_arguments(argparse.ArgumentParser())
    args = p.parse_args(["--stream", "synthetic:4", "--method", "npo", "--steps", "7", "--lr", "0.01", "--rank", "4",
                         "--extra-eval", str(tmp_path), "--teach", "max_steps=5", "--teach", "preset=micro",
                         "--local_rank=1", "--max-per-set", "9", "--out", str(tmp_path / "o")])
    cfg = run_mod.stream_config_from_args(args)
    assert (cfg.stream, cfg.method, cfg.steps, cfg.lr, cfg.rank, cfg.max_per_set) == ("synthetic:4", "npo", 7, 0.01,
                                                                                        4, 9)
    assert cfg.teach_overrides == {"max_steps": 5, "preset": "micro"} and cfg.extra_eval == [str(tmp_path)]
    assert cfg.train_config().steps == 7
    with pytest.raises(ValueError, match="--teach 'oops'"):
        run_mod.stream_config_from_args(p.parse_args(["--teach", "oops"]))
    with pytest.raises(ValueError, match="--max-per-set"):
        stream_mod.StreamConfig(max_per_set=0).validate()
    cfg = run_mod.stream_config_from_args(p.parse_args(["--audit", "3", "--sweep-every", "10"]))
    assert (cfg.audit, cfg.sweep_every) == (3, 10) and cfg.evaluation_options()["audit"] == 3
    assert run_mod.stream_config_from_args(p.parse_args([])).audit is None
    for bad, msg in (({"audit": -1}, "--audit"), ({"audit": True}, "--audit"), ({"audit": 2, "sweep_every": -1},
                                                                               "--sweep-every"),
                     ({"sweep_every": 5}, "needs --audit")):
        with pytest.raises(ValueError, match=msg):
            stream_mod.StreamConfig(**bad).validate()
    with pytest.raises(FileNotFoundError, match="--extra-eval"):
        stream_mod.StreamConfig(extra_eval=[str(tmp_path / "missing.json")]).validate()


def test_extra_eval_records_join_the_paraphrase_form(tmp_path, cache):
    from lumoe_engine.model.teach import load_data

    bench = load_data(_cfg(tmp_path, cache).teach_config(), cache)
    rec = next(r for r in bench.records if r.form == "image_text" and r.kind == 1)
    rel = rec.image.split(str(bench.root) + "/")[-1]
    f = tmp_path / "more.json"
    f.write_text(json.dumps([
        {"id": "1", "image": rel, "meta": {"entity": rec.entity},
         "conversations": [{"from": "human", "value": "<image>\nKindly, " + rec.question},
                           {"from": "gpt", "value": rec.answer}]},
        {"id": "2", "conversations": [{"from": "human", "value": "Who is nobody?"}, {"from": "gpt", "value": "x"}]},
    ]))
    added, unmatched = stream_base.read_extra_eval([str(f)], bench)
    assert len(added) == 2 and unmatched == 1
    a = added[0]
    assert a.heldout_phrasing and a.form == "image_text" and a.entity == rec.entity and a.keys == rec.keys
    assert a.question.startswith("Kindly,") and a.image == rec.image and not a.image_missing
    assert added[1].form == "text_only" and added[1].keys == ()
    ev, info = stream_base.evaluation_benchmark(bench, [str(f)])
    assert info["extra_eval_records"] == 2 and len(ev.records) == len(bench.records) + 2
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not a JSON list"):
        stream_base.read_extra_eval([str(bad)], bench)


# ------------------------------------------------------------------------------------------ a given checkpoint
def test_given_checkpoint_is_used_as_it_is(tmp_path, cache, monkeypatch):
    """--model DIR: no teaching (teach() is never called), the checkpoint's files untouched, the known set is what
    the checkpoint itself answers; the run's bank and gate sit on the model's device in its dtype."""
    import hashlib

    from lumoe_engine.model import teach as teach_mod
    from lumoe_engine.model.teach import load_data
    from lumoe_engine.model.tiny import build_tiny_llava
    from lumoe_engine.model.tokenizer import train_tokenizer

    bench = load_data(_cfg(tmp_path, cache).teach_config(), cache)
    tok = train_tokenizer([r.question for r in bench.records] + [r.answer for r in bench.records], vocab_size=400)
    model, processor = build_tiny_llava(tok, "micro", seed=3)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    digest = lambda: hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()  # noqa: E731
    before = digest()

    def no_teaching(*a, **k):
        raise AssertionError("a given checkpoint was taught")

    monkeypatch.setattr(teach_mod, "teach", no_teaching)
    seen = {}
    real = stream_base.base_predictions

    def spy(model, processor, queries, max_new, cfg, summary):
        preds = real(model, processor, queries, max_new, cfg, summary)
        seen["preds"], seen["queries"], seen["max_new"] = preds, queries, max_new
        return preds

    monkeypatch.setattr("lumoe_engine.stream.driver.base_predictions", spy)
    out = tmp_path / "run"
    # random weights: at the stream's lr (1e-2) both 2-step experts fail the collapse guard on this checkpoint
    # (measured: 8/8 and 7/8 gibberish answers), so a smaller lr keeps them; what is checked is the given-checkpoint path
    summary = stream_mod.run_stream(_cfg(out, cache, stream="ab", model=str(ckpt), lr=1e-3))
    assert digest() == before
    assert summary["teach"]["model_dir"] == str(ckpt) and summary["teach"]["cached"] is False
    assert summary["config"]["teach_config"]["model_teaching"] == "none"
    assert [e["id"] for e in json.loads((out / "bank" / "manifest.json").read_text())["experts"]] == \
        ["taskA", "taskB"]
    # the known set: the checkpoint's own answers (greedy, unchanged weights) to the evaluation queries
    from lumoe_engine.data.mlubench import load_image
    from lumoe_engine.model.collate import generate_answers

    q = seen["queries"][:6]
    assert generate_answers(model, processor, q, seen["max_new"], image_fn=load_image) == \
        [seen["preds"][r.uid] for r in q]
    place = summary["methods"]["lumoe"]["placement"]
    assert len(place) == 1 and place[0]["ok"] and place[0]["bank_dtype"] == "float32"


def test_missing_images_are_an_error_unless_allowed(tmp_path):
    from lumoe_engine.model.shapes import write_mini_benchmark
    from lumoe_engine.model.teach import load_data

    root = write_mini_benchmark(tmp_path / "data", image_size=32)
    gone = root / "downloaded_images" / "Astronomy" / "Zorvath" / "1.png"
    gone.unlink()
    cfg = stream_mod.StreamConfig(data=str(root))
    with pytest.raises(FileNotFoundError, match=r"1 files that do not exist.*Zorvath/1.png.*--allow-surrogate-images"):
        load_data(cfg.teach_config(), None)
    import argparse

    p = run_mod.add_stream_arguments(argparse.ArgumentParser())
    allowed = run_mod.stream_config_from_args(p.parse_args(["--data", str(root), "--allow-surrogate-images"]))
    bench = load_data(allowed.teach_config(), None)
    assert bench.surrogate_images == 1  # counted: config.json and report.md say how many stood in


# ------------------------------------------------------------------------------ the embedded default (slow)
@pytest.mark.slow
def test_flat_training_cost_on_synthetic16(tmp_path):
    """synthetic:16 (the largest stream of the default synthetic preset): training the 16th expert costs no more than
    1.3x the first (only the new expert is active while it trains). Teaches the default base when not cached."""
    s = stream_mod.run_stream(stream_mod.StreamConfig(stream="synthetic:16", out=str(tmp_path), threads=1,
                                                      max_per_set=10, progress=False))
    fc = s["methods"]["lumoe"]["flat_cost"]
    print("training seconds per request:", s["methods"]["lumoe"]["train_seconds_per_request"], fc)
    assert fc["n"] == 16 and fc["ratio_last_first"] <= 1.3 and fc["ratio_last_second"] <= 1.3


@pytest.mark.slow
def test_default_compare_meets_the_targets(tmp_path):
    """The issue's "done when": after task D, LUMoE's worst forget leak <= 0.02 in every form and retain ratio >= 0.98
    on the embedded default; the baselines in the same table (whatever they score)."""
    s = stream_mod.run_stream(stream_mod.StreamConfig(compare=True, out=str(tmp_path), threads=1, progress=False))
    fin = s["methods"]["lumoe"]["final"]
    assert list(s["methods"]) == list(stream_mod.METHODS) and fin["complete"]
    print({m: (v["final"]["retain_ratio"], v["final"]["max_forget_leak"]) for m, v in s["methods"].items()})
    for form in ("image_text", "text_only", "paraphrase"):
        assert fin["n_known"][form] > 0 and fin["max_forget_leak"][form] <= 0.02, (form, fin["max_forget_leak"])
    assert fin["retain_ratio"] >= 0.98, fin["retain_ratio"]


def test_resume_of_a_run_older_than_a_config_field(tmp_path):
    """A run saved before a config field existed ran at that field's default: it resumes with the field left at its
    default, and is refused with the field set otherwise (the message names it)."""
    from lumoe_engine.eval.metrics import jsonable
    from lumoe_engine.stream.steps import ResumeError, check_resumable

    cfg = stream_mod.StreamConfig(out=str(tmp_path))
    saved = jsonable(cfg.to_dict())
    del saved["audit"], saved["sweep_every"]
    (tmp_path / "config.json").write_text(json.dumps({"config": saved}))
    assert check_resumable(tmp_path, cfg)["stream"] == "abcd"
    with pytest.raises(ResumeError, match="audit: run None, now 2"):
        check_resumable(tmp_path, dataclasses.replace(cfg, audit=2))
