"""The protocol's split (data.protocol): request data and test data disjoint by construction, seeded, the same for
every caller; the guard that refuses a test query in a request or a gate training set."""
import dataclasses

import pytest

from lumoe_engine.data.mlubench import load_benchmark
from lumoe_engine.data.protocol import TEST_FORMS, Protocol, ProtocolError, Split, check_disjoint
from lumoe_engine.data.streams import build_stream
from lumoe_engine.data.synthetic import SyntheticConfig, write_synthetic
from lumoe_engine.pipeline import gate_training_set
from lumoe_engine.gate.config import GateConfig


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_benchmark(write_synthetic(tmp_path_factory.mktemp("syn") / "tiny", SyntheticConfig.preset("tiny")))


def _key(r):
    return (r.image if r.form == "image_text" else None, r.question)


def test_request_data_and_test_data_are_disjoint(tiny):
    split = Split(tiny, Protocol(seed=3))
    reqs = [split.carry(r) for r in build_stream(tiny, "abcd")]
    keys = split.test_keys()
    for req in reqs:
        assert req.forget and all(split.carried(r) for r in req.forget + req.retain)
        assert not {_key(r) for r in req.forget + req.retain} & keys
        test = split.test_sets(req.entities)
        assert test["image_text"] and test["text_only"] and test["reworded"] and test["fresh_scene"]
        carried_pics = {r.image for r in req.forget if r.form == "image_text"}
        carried_fams = {(r.entity, r.kind, r.phrasing) for r in req.forget}
        for r in test["image_text"]:  # a family and a picture the request did not carry
            assert r.image not in carried_pics and (r.entity, r.kind, r.phrasing) not in carried_fams
        for r in test["reworded"]:
            assert r.heldout_phrasing and (r.form == "text_only" or r.image not in carried_pics)
        assert all(r.fresh_image for r in test["fresh_scene"])
        # every test form is disjoint from every request's data, not only its own
        for other in reqs:
            assert not {_key(r) for f in TEST_FORMS for r in test[f]} & {_key(r) for r in other.forget}


def test_split_is_seeded_and_carries_about_half(tiny):
    a, b, c = Split(tiny, Protocol(seed=1)), Split(tiny, Protocol(seed=1)), Split(tiny, Protocol(seed=2))
    rec = [r for r in tiny.records if r.taught and r.variant is None]
    assert [a.carried(r) for r in rec] == [b.carried(r) for r in rec]
    assert [a.carried(r) for r in rec] != [c.carried(r) for r in rec]
    share = sum(a.carried(r) for r in rec if r.form == "text_only") / sum(r.form == "text_only" for r in rec)
    assert 0.25 <= share <= 0.75
    with pytest.raises(ValueError, match="carry_families"):
        Protocol(carry_families=1.0).validate()


def test_a_test_query_slipped_into_a_request_is_refused(tiny):
    split = Split(tiny)
    req = split.carry(build_stream(tiny, "a")[0])
    keys = split.test_keys()
    check_disjoint(req.forget + req.retain, keys, "clean request")  # no error
    slipped = split.test_sets(req.entities)["reworded"][0]
    bad = dataclasses.replace(req, forget=req.forget + [slipped])
    with pytest.raises(ProtocolError, match="test queries"):
        check_disjoint(bad.forget, keys, "request")
    # and through a gate training set: a later request's retain records carrying a test query
    other = dataclasses.replace(req, id="x", retain=[split.test_sets(req.entities)["fresh_scene"][0]])
    data = gate_training_set(req, [], [req, other], GateConfig())
    with pytest.raises(ProtocolError):
        check_disjoint(data.positives + data.negatives, keys, "gate data")


def test_request_parallel_training_refuses_a_test_query_before_training(tiny, monkeypatch):
    """``RequestPipeline.train`` (what each rank runs for its request of a wave, without ``learn``) checks the
    request's data against the test keys first: a slipped test query raises ProtocolError and the trainer is never
    called; a clean request reaches it."""
    import types

    from lumoe_engine import pipeline
    from lumoe_engine.unlearn.losses import LossConfig
    from lumoe_engine.unlearn.trainer import TrainConfig

    split = Split(tiny)
    req = split.carry(build_stream(tiny, "a")[0])
    slipped = split.test_sets(req.entities)["reworded"][0]
    bad = dataclasses.replace(req, forget=req.forget + [slipped])
    calls = []
    monkeypatch.setattr(pipeline, "train_expert", lambda model, processor, ctx, request, *a, **kw: calls.append(
        request.id) or ("expert", {}))
    engine = types.SimpleNamespace(model=None, processor=None, ctx=None)
    pipe = pipeline.RequestPipeline(engine, None, None, None, GateConfig(), TrainConfig(), LossConfig(),
                                    writer=False, test_keys=split.test_keys())
    with pytest.raises(ProtocolError, match="test queries"):
        pipe.train(bad, use_deepspeed=False)
    assert calls == []
    assert pipe.train(req, use_deepspeed=False) == ("expert", {}) and calls == [req.id]


def test_a_generated_gate_query_that_is_a_test_query_is_left_out(tiny, monkeypatch):
    """The gate's own rewordings of request data can coincide with a test query (seen on seeds 1-3 of the embedded
    default: "Who started this company?" rewritten with the company's name is a held-out text-only query); the
    pipeline leaves such generated records out, so the request is learned and the test query stays unseen, while a
    test query the request itself carries is still an error."""
    from lumoe_engine.gate import features

    split = Split(tiny)
    req = split.carry(build_stream(tiny, "a")[0])
    keys = split.test_keys()
    test_q = split.test_sets(req.entities)["text_only"][0]
    made = dataclasses.replace(test_q, uid="aug0#" + test_q.uid)  # a "rewording" equal to a test query
    monkeypatch.setattr(features, "augmented_records", lambda recs, n, seed=0, **kw: [made])
    cfg = dataclasses.replace(GateConfig(), augment=1)
    unchecked = gate_training_set(req, [], [req], cfg)
    with pytest.raises(ProtocolError, match="test queries"):
        check_disjoint(unchecked.positives, keys, "gate data")
    data = gate_training_set(req, [], [req], cfg, test_keys=keys)
    assert made not in data.positives and list(req.forget) == data.positives
    check_disjoint(data.positives + data.negatives, keys, "gate data")  # no error
