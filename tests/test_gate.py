"""The gate: per-expert calibrated heads (synthetic separable features), routing, storage, bad input, features from a
real (micro) LLaVA, and the gate evaluation on the taught default (slow).

Letters: B queries, D feature width, E experts.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from lumoe_engine.gate.features import base_features, decoder_layers, layer_features, pool, pooled_dim
from lumoe_engine.gate.gate import Gate, calibrate_threshold, fit_logistic
from lumoe_engine.model.bank import UnknownExpertError


def _centers(E: int, D: int, seed: int = 0, radius: float = 4.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(E, D, generator=g)
    return radius * c / c.norm(dim=1, keepdim=True)


def _cloud(center: torch.Tensor, n: int, seed: int, noise: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return center + noise * torch.randn(n, center.shape[0], generator=g)


def _background(n: int, D: int, seed: int = 99) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def _state(g: Gate):
    return (list(g.expert_ids), g.weight.clone(), g.bias.clone(), g.thresholds.clone(), dict(g.reports))


def _same_state(a, b) -> bool:
    return (a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
            and a[4].keys() == b[4].keys())


def _small_gate(E: int = 3, D: int = 16) -> tuple[Gate, torch.Tensor]:
    C = _centers(E, D)
    g = Gate(layer=1, dim=D)
    bg = _background(400, D)
    for e in range(E):
        neg = torch.cat([bg] + [_cloud(C[j], 20, 100 + j) for j in range(e)])
        g.add_expert(f"e{e}", _cloud(C[e], 40, e), neg)
    return g, C


# ------------------------------------------------------------------------------------------------ add / remove
def test_add_route_remove_lifelong():
    g, C = _small_gate(3)
    assert g.expert_ids == ["e0", "e1", "e2"] and len(g) == 3
    q = torch.cat([_cloud(C[e], 10, 500 + e) for e in range(3)])
    _, ids = g.route(q)
    assert ids.dtype == torch.int32 and ids.shape == (30, 1)
    assert ids[:, 0].tolist() == [0] * 10 + [1] * 10 + [2] * 10

    # adding a head leaves every old head bit-identical (never retrained)
    before = g.weight.clone(), g.bias.clone()
    g.add_expert("e3", _cloud(-C[0], 40, 7), _background(400, 16))
    assert torch.equal(g.weight[:3], before[0]) and torch.equal(g.bias[:3], before[1])

    # revoke the middle one: later experts move down by one id, their heads unchanged
    g.remove_expert("e1")
    assert g.expert_ids == ["e0", "e2", "e3"] and "e1" not in g.reports
    assert torch.equal(g.weight[1], before[0][2]) and torch.equal(g.bias[1], before[1][2])
    _, ids = g.route(q)
    assert ids[:10, 0].tolist() == [0] * 10 and ids[20:, 0].tolist() == [1] * 10
    assert (ids[10:20, 0] == -1).all(), "queries of a revoked expert must go nowhere"
    assert g.route_ids(q[:1]) == ["e0"]


def test_route_minus_one_under_threshold():
    g, C = _small_gate(3)
    far = _background(200, 16, seed=5)                  # unrelated queries
    s = g.scores(far)
    w, ids = g.route(far, top_k=2)
    assert w.dtype == torch.float32 and w.shape == ids.shape == (200, 2)
    # an expert is chosen exactly where its calibrated logit is >= 0 and its similarity bound holds
    top2 = torch.topk(s, 2, dim=1)
    sim = g.similarity_to(far)
    bound_ok = sim.gather(1, top2.indices) >= g.sim_bounds[top2.indices]
    assert torch.equal(ids[:, 0] >= 0, (top2.values[:, 0] >= 0) & bound_ok[:, 0])
    assert torch.equal(ids[:, 1] >= 0, (top2.values[:, 1] >= 0) & bound_ok[:, 1])
    assert (w[ids < 0] == 0).all()
    assert float((ids[:, 0] >= 0).float().mean()) <= 0.02
    # a query at an expert's center fires with weight 1 (top-1 renormalised)
    w1, ids1 = g.route(C[1:2] + 0.0)
    assert ids1.tolist() == [[1]] and w1.tolist() == [[1.0]]
    # no experts at all: every query goes nowhere
    empty = Gate(layer=0, dim=16)
    w0, ids0 = empty.route(far[:4], top_k=2)
    assert (ids0 == -1).all() and (w0 == 0).all() and empty.scores(far[:4]).shape == (4, 0)


# -------------------------------------------------------------------------------------------------- calibration
def test_calibration_meets_target_fpr_on_held_out_negatives():
    D = 8
    u = torch.zeros(D)
    u[0] = 1.0
    g = Gate(layer=0, dim=D, target_fpr=0.005, calib_share=0.25)
    pos = _background(2000, D, seed=1) + 2.5 * u       # overlapping classes: the threshold is set by negatives
    neg = _background(8000, D, seed=2)
    rep = g.add_expert("x", pos, neg)
    assert rep.n_neg_cal == 2000 and rep.n_pos_cal == 500
    assert rep.fpr_cal <= 0.005, rep
    assert rep.tpr_cal is not None and 0.3 < rep.tpr_cal < 1.0, rep  # the classes overlap: recall pays
    # fresh negatives of the same distribution, never seen: the rate stays near the target
    fresh = _background(40000, D, seed=3)
    fpr = float((g.scores(fresh)[:, 0] >= 0).float().mean())
    print(f"fpr on 40000 fresh negatives: {fpr:.5f} (target 0.005), tpr_cal {rep.tpr_cal:.3f}")
    assert fpr <= 0.0075
    # the threshold folded into the bias is the reported one
    w, c = g.weight[0], g.bias[0] + rep.threshold
    assert torch.allclose(g.phi(fresh) @ w + c - rep.threshold, g.scores(fresh)[:, 0], atol=1e-4)


def test_calibrate_threshold_rules():
    neg = torch.arange(1000, dtype=torch.float32)       # 0..999
    t, nb, pm = calibrate_threshold(neg, None, 0.005)   # 5 of 1000 may reach t: t just above the 6th largest
    assert nb > 994.0 and t >= nb and int((neg >= t).sum()) == 5
    t, nb, pm = calibrate_threshold(neg, torch.tensor([2000.0, 3000.0]), 0.0)  # gap: middle of it
    assert pm == 2000.0 and abs(t - (999.0 + 2000.0) / 2) < 1e-3 and int((neg >= t).sum()) == 0
    t, nb, pm = calibrate_threshold(neg, torch.tensor([10.0, 3000.0]), 0.0)  # overlap: negatives decide
    assert int((neg >= t).sum()) == 0 and t <= 999.001


def test_fit_logistic_separates_and_is_deterministic():
    C = _centers(2, 12)
    pos, neg = _cloud(C[0], 50, 1), torch.cat([_cloud(C[1], 50, 2), _background(200, 12)])
    w1, c1 = fit_logistic(pos, neg)
    w2, c2 = fit_logistic(pos, neg)
    assert torch.equal(w1, w2) and torch.equal(c1, c2)
    assert ((pos @ w1 + c1) > 0).all() and ((neg @ w1 + c1) < 0).all()


# ----------------------------------------------------------------------------------------------------- storage
def test_save_load_round_trip(tmp_path):
    g, C = _small_gate(3)
    g.remove_expert("e0")
    g.save(tmp_path / "gate")
    h = Gate.load(tmp_path / "gate")
    assert h.expert_ids == g.expert_ids and h.config() == g.config()
    assert torch.equal(h.weight, g.weight) and torch.equal(h.bias, g.bias) and torch.equal(h.thresholds,
                                                                                            g.thresholds)
    assert h.reports == g.reports
    assert torch.equal(h.sim_bounds, g.sim_bounds) and all(torch.equal(a, b) for a, b in zip(h.prototypes,
                                                                                             g.prototypes))
    q = torch.cat([_cloud(C[e], 5, 900 + e) for e in range(3)])
    for a, b in zip(g.route(q, top_k=2), h.route(q, top_k=2)):
        assert torch.equal(a, b)
    # a loaded gate keeps learning; saving again replaces the tensor file
    h.add_expert("e9", _cloud(-C[1], 30, 3), _background(300, 16))
    h.save(tmp_path / "gate")
    assert len(list((tmp_path / "gate").glob("gate-*.safetensors"))) == 1
    assert Gate.load(tmp_path / "gate").expert_ids == ["e1", "e2", "e9"]
    # corruption is detected
    f = next((tmp_path / "gate").glob("gate-*.safetensors"))
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        Gate.load(tmp_path / "gate")
    with pytest.raises(FileNotFoundError):
        Gate.load(tmp_path / "nothing")


# --------------------------------------------------------------------------------------------------- bad input
def test_bad_input_leaves_state_unchanged():
    g, C = _small_gate(2)
    snap = _state(g)
    pos, neg = _cloud(C[0], 10, 1), _background(50, 16)
    cases = [
        (ValueError, "already in the gate", lambda: g.add_expert("e0", pos, neg)),
        (ValueError, r"\[n, 16\]", lambda: g.add_expert("new", pos[:, :8], neg)),
        (ValueError, r"\[n, 16\]", lambda: g.add_expert("new", pos, neg[:, :15])),
        (ValueError, "empty", lambda: g.add_expert("new", pos[:0], neg)),
        (ValueError, "empty", lambda: g.add_expert("new", pos, neg[:0])),
        (ValueError, "NaN", lambda: g.add_expert("new", pos.clone().fill_(float("nan")), neg)),
        (ValueError, "floating", lambda: g.add_expert("new", pos.long(), neg)),
        (ValueError, "not allowed", lambda: g.add_expert("../x", pos, neg)),
        (ValueError, "torch.Tensor", lambda: g.add_expert("new", pos.tolist(), neg)),
        (KeyError, "not in the gate", lambda: g.remove_expert("nope")),
        (ValueError, r"\[n, 16\]", lambda: g.scores(torch.zeros(3, 17))),
        (ValueError, "top_k", lambda: g.route(torch.zeros(3, 16), top_k=0)),
    ]
    for exc, msg, call in cases:
        with pytest.raises(exc, match=msg):
            call()
        assert _same_state(snap, _state(g)), msg
    assert isinstance(UnknownExpertError("x"), KeyError)
    with pytest.raises(ValueError, match="dim"):
        Gate(layer=0, dim=0)
    with pytest.raises(ValueError, match="pooling"):
        Gate(layer=0, dim=4, pooling="median")
    with pytest.raises(ValueError, match="target_fpr"):
        Gate(layer=0, dim=4, target_fpr=1.5)


# ------------------------------------------------------------------------------------------------ 1,000 experts
def test_thousand_experts_route_correctly():
    E, D = 1000, 32
    C = _centers(E, D, seed=3, radius=8.0)
    g = Gate(layer=2, dim=D)
    bg = _background(128, D)
    for e in range(E):
        # negatives: background and the previous expert's queries (what the bank holds when e arrives)
        neg = torch.cat([bg, _cloud(C[e - 1], 4, 10_000 + e)]) if e else bg
        g.add_expert(f"r{e}", _cloud(C[e], 6, e, noise=0.2), neg)
    q = torch.cat([_cloud(C[e], 1, 50_000 + e, noise=0.2) for e in range(E)])
    _, ids = g.route(q)
    acc = float((ids[:, 0].long() == torch.arange(E)).float().mean())
    nothing = _background(500, D, seed=7)
    fpr = float((g.route(nothing)[1][:, 0] >= 0).float().mean())
    print(f"1000 experts: route acc {acc:.4f}, fpr {fpr:.4f}")
    assert acc >= 0.99 and fpr <= 0.01
    # (its fit and decision times at 1,000 experts are measured by benchmarks/bench_engine.py, not here: speed
    # belongs in benchmarks)


# ------------------------------------------------------------------------------------------------------ pooling
def test_pool_modes_left_and_right_padding():
    h = torch.randn(2, 5, 4)
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    mean = pool(h, left, "mean")
    assert torch.allclose(mean[0], h[0, 2:].mean(0)) and torch.allclose(mean[1], h[1].mean(0))
    assert torch.equal(pool(h, left, "last"), h[:, -1])
    right = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    assert torch.equal(pool(h, right, "last")[0], h[0, 1])
    ml = pool(h, left, "mean_last")
    assert ml.shape == (2, 8) and torch.equal(ml[:, 4:], h[:, -1])
    mm = pool(h, right, "mean_max")
    assert torch.equal(mm[0, 4:], h[0, :2].amax(0)) and pooled_dim(4, "mean_max") == 8
    with pytest.raises(ValueError, match="no attended"):
        pool(h, torch.zeros(2, 5), "mean")
    with pytest.raises(ValueError, match="attention_mask"):
        pool(h, left[:, :4], "mean")
    with pytest.raises(ValueError, match="pooling"):
        pool(h, left, "sum")


# ------------------------------------------------------------------------------------- real features (micro LLaVA)
@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    from lumoe_engine.data.mlubench import load_benchmark
    from lumoe_engine.data.synthetic import SyntheticConfig, ensure_synthetic
    from lumoe_engine.model.tiny import build_tiny_llava
    from lumoe_engine.model.tokenizer import train_tokenizer

    root = ensure_synthetic(cache_dir=tmp_path_factory.mktemp("syn"), config=SyntheticConfig.preset("tiny"))
    bench = load_benchmark(root)
    tok = train_tokenizer([r.question for r in bench.records] + [r.answer for r in bench.records], vocab_size=400)
    model, processor = build_tiny_llava(tok, "micro", seed=0)
    return model, processor, bench


def test_base_features_equal_the_prefill_hook(micro):
    """What the gate is trained on equals what an engine hook on decoder layer ``layer`` pools during prefill, and a
    query's features do not depend on the batch it is in."""
    from lumoe_engine.model.collate import collate

    model, processor, bench = micro
    recs = [r for r in bench.records if r.form == "text_only"][:3] + \
        [r for r in bench.records if r.form == "image_text"][:5]
    gate = Gate(layer=1, dim=pooled_dim(model.config.text_config.hidden_size, "mean_last"), pooling="mean_last")
    feats = base_features(model, processor, recs, gate.layer, batch_size=3, pooling=gate.pooling)
    assert feats.shape == (8, gate.dim) and feats.dtype == torch.float32

    # the engine's way: a forward hook on the layer during an ordinary full forward of the prompt batch
    got = {}
    layer = decoder_layers(model)[gate.layer]
    handle = layer.register_forward_hook(lambda m, a, o: got.__setitem__("f", gate.pool(o, batch["attention_mask"])))
    try:
        batch = collate(recs, processor, with_answers=False)
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    print("max |hook - base_features|:", float((got["f"] - feats).abs().max()))
    assert torch.allclose(got["f"], feats, atol=1e-4, rtol=1e-4)

    # output_hidden_states agrees below the last layer (hidden_states[L + 1] is the output of decoder layer L; the
    # last entry is after the final norm, so layer 0 of the 2-layer micro model is compared)
    with torch.no_grad():
        hs = model(**batch, output_hidden_states=True).hidden_states[1]
    f0 = base_features(model, processor, recs, 0, batch_size=8, pooling="mean_last")
    assert torch.allclose(pool(hs, batch["attention_mask"], "mean_last"), f0, atol=1e-4, rtol=1e-4)

    alone = torch.cat([base_features(model, processor, [r], gate.layer, pooling=gate.pooling) for r in recs])
    assert torch.allclose(alone, feats, atol=1e-4, rtol=1e-4)
    multi = layer_features(model, processor, recs, [0, 1], ["mean", "last"], batch_size=8)
    assert torch.allclose(multi[(1, "last")], feats[:, gate.dim // 2:], atol=1e-5)
    with pytest.raises(ValueError, match="layer"):
        base_features(model, processor, recs, 7)


def test_gate_on_micro_features_routes_seen_entities(micro):
    """An untrained micro LLaVA's features still tell the entities apart well enough for a per-entity head on its
    training queries (a smoke test of the whole path; the accuracy targets are for the taught model, slow test)."""
    model, processor, bench = micro
    ents = sorted(bench.entities)[:4]
    recs = [r for r in bench.records if r.entity in ents and not r.heldout_phrasing and not r.fresh_image]
    f = base_features(model, processor, recs, 1, batch_size=64, pooling="mean")
    g = Gate(layer=1, dim=f.shape[1], pooling="mean")
    ent = [r.entity for r in recs]
    for i, e in enumerate(ents):
        pos = f[[j for j, x in enumerate(ent) if x == e]]
        neg = f[[j for j, x in enumerate(ent) if x != e]]
        rep = g.add_expert(f"ent{i}", pos, neg)
        assert rep.fpr_cal <= 0.005 + 1e-9
    ids = g.route(f)[1][:, 0].tolist()
    acc = sum(i >= 0 and g.expert_ids[i] == f"ent{ents.index(e)}" for i, e in zip(ids, ent)) / len(ent)
    print(f"micro untrained, 4 entities, seen queries: route acc {acc:.3f}")
    assert acc >= 0.6


# ------------------------------------------------------------------------------------------ taught default (slow)
@pytest.mark.slow
def test_gate_eval_on_taught_default(tmp_path):
    """The gate evaluation on the taught embedded default, development seed 0 (teaches on first use: about ten
    minutes): the summary has both settings, every ablation and the recognition channel's cost; the default gate
    (names + recognition) routes every text-only test query that names a forgotten entity as written to its expert,
    and beats the stored-picture lookup on held-out scenes. (The issue's targets are reported by ``meets_targets``,
    not asserted here: README and the closing note give the measured numbers.)"""
    from lumoe_engine.gate.evaluate import ABLATIONS, TARGETS, gate_eval

    s = gate_eval(tmp_path, sweep=False, progress=False)
    assert (tmp_path / "gate_summary.json").is_file()
    if not s["teach"]["reached_target"]:
        pytest.skip(f"the cached taught model did not reach its teaching target ({s['teach']}); the gate numbers "
                    "would measure an untaught model")
    assert {r["ablation"] for r in s["ablations"]} == {a for a, _ in ABLATIONS}
    for setting in ("per_task", "per_entity"):
        m = s[setting]
        print(setting, {k: m.get(k.replace("route_acc_", "route_acc_known_")) for k in TARGETS})
        assert m["route_acc_text_only"] == 1.0
        lookup = next(r for r in s["ablations"] if r["ablation"] == "lookup" and r["setting"] == setting)
        assert m["route_acc_known_fresh_scene"] > lookup["route_acc_known_fresh_scene"]
    assert s["recognition"]["pictures"] > 0 and s["recognition"]["known_test_queries"] > 0


@pytest.mark.parametrize("head", ["linear", "quadratic"])
def test_build_and_score_on_entity_clusters(micro, head):
    """The evaluation's bookkeeping (request streams, negatives, held-out shares, metrics) on features that make every
    entity its own cluster: every forget query must reach its request's expert, nothing else may fire."""
    from lumoe_engine.gate.config import gate_preset
    from lumoe_engine.data.protocol import TEST_FORMS
    from lumoe_engine.gate.evaluate import build_and_score, plain, record_sets, requests_for

    bounded = plain(gate_preset("strict", layer=1, pooling="mean", head=head, image=False))
    unbounded = dataclasses.replace(bounded, similarity=None)

    _, _, bench = micro
    sets = record_sets(bench)
    split = sets["split"]
    ents = sorted(split.by_entity)
    C = _centers(len(ents), 128, seed=11, radius=8.0)
    recs = list(bench.records)
    index = {r.uid: i for i, r in enumerate(recs)}
    g = torch.Generator().manual_seed(0)
    feats = torch.stack([C[ents.index(r.entity)] + 0.3 * torch.randn(128, generator=g) for r in recs])
    forgotten = {e for t in sets["tasks"] for e in sets["forget"][t]}
    assert sets["unrequested"] and not {r.entity for r in sets["unrequested"]} & forgotten
    train = {r.uid for t in sets["tasks"] for r in sets["retain_train"][t]} | {r.uid for v in sets["train"].values()
                                                                                for r in v}
    assert not {r.uid for r in sets["retain_eval"] + sets["unrequested"]} & train  # test data never trains
    measured = [f for f in TEST_FORMS if any(sets["test"][e][f] for e in forgotten)]
    assert {"image_text", "text_only", "reworded", "fresh_scene"} <= set(measured)
    for setting, n in (("per_task", len(sets["tasks"])), ("per_entity", len(forgotten))):
        assert len(requests_for(sets, setting)) == n
        gate, m = build_and_score(feats, index, sets, setting, unbounded)
        print(setting, {k: m[k] for k in ("route_acc_image_text", "route_acc_reworded", "fpr_retain",
                                          "fpr_unrequested")})
        assert m["n_experts"] == n == len(gate)
        for k in measured:
            assert m[f"route_acc_{k}"] == 1.0 and m["fnr"][k] == 0.0
        assert m["fpr_retain"] == 0.0 and m["fpr_unrequested"] == 0.0 and m["wrong_expert"] == 0
        # with the similarity bound (default): isotropic noise puts some fresh queries under the bound (its
        # prototypes cover the request data alone: about half an entity's taught records); nothing else may fire
        _, mb = build_and_score(feats, index, sets, setting, bounded)
        assert mb["route_acc_image_text"] >= 0.75 and mb["route_acc_reworded"] >= 0.75, mb
        assert mb["fpr_retain"] == 0.0 and mb["fpr_unrequested"] == 0.0 and mb["wrong_expert"] == 0
    # swapping two entities' features across requests must show up as misrouting
    swapped = feats.clone()
    a, b = sorted(sets["forget"][sets["tasks"][0]])[0], sets["forget"][sets["tasks"][1]][0]
    for r in sets["test"][a]["reworded"]:
        swapped[index[r.uid]] = C[ents.index(b)]
    _, m = build_and_score(swapped, index, sets, "per_task", unbounded)
    assert m["route_acc_reworded"] < 1.0 and m["wrong_expert"] > 0


def test_sub_heads_route_save_and_remove(tmp_path):
    """An expert with one sub-head per group fires on every group; removing it moves later experts' heads down."""
    D = 16
    C = _centers(5, D, seed=4, radius=6.0)
    bg = _background(300, D)
    g = Gate(layer=1, dim=D)
    g.add_expert("one", _cloud(C[0], 30, 1), bg)
    pos = torch.cat([_cloud(C[1], 30, 2), _cloud(C[2], 30, 3)])
    rep = g.add_expert("two", pos, torch.cat([bg, _cloud(C[0], 10, 9)]), pos_groups=["a"] * 30 + ["b"] * 30)
    g.add_expert("three", _cloud(C[3], 30, 4), torch.cat([bg, _cloud(C[1], 10, 8)]))
    assert rep.n_heads == 2 and len(rep.sub_heads) == 2 and g.num_heads == 4 and len(g) == 3
    assert g.owner.tolist() == [0, 1, 1, 2]
    q = torch.cat([_cloud(C[e], 5, 70 + e) for e in range(4)])
    assert g.scores(q).shape == (20, 3)
    assert g.route(q)[1][:, 0].tolist() == [0] * 5 + [1] * 10 + [2] * 5
    assert (g.route(_cloud(C[4], 5, 77))[1] == -1).all()
    g.save(tmp_path / "g")
    h = Gate.load(tmp_path / "g")
    assert torch.equal(h.scores(q), g.scores(q)) and h.owner.tolist() == [0, 1, 1, 2]
    g.remove_expert("two")
    assert g.expert_ids == ["one", "three"] and g.owner.tolist() == [0, 1] and g.num_heads == 2
    assert g.route(q)[1][:, 0].tolist() == [0] * 5 + [-1] * 10 + [1] * 5
    with pytest.raises(ValueError, match="pos_groups"):
        g.add_expert("four", pos, bg, pos_groups=["a"] * 3)
    assert g.expert_ids == ["one", "three"]


def test_gate_training_queries(micro):
    """Counterfactual negatives keep the request's identity (image / name) with other classes' wordings, or its
    wording with other classes' images; rewordings keep the entity's name."""
    from lumoe_engine.gate.features import augmented_records, counterfactual_records

    _, _, bench = micro
    ents = sorted(bench.entities)
    mine = [r for r in bench.records if r.entity == ents[0] and not r.heldout_phrasing and not r.fresh_image]
    pool = [r for r in bench.records if r.entity != ents[0]]
    cf = counterfactual_records(mine, pool, n_question=2, n_name=1, n_image=1, seed=3)
    assert cf == counterfactual_records(mine, pool, n_question=2, n_name=1, n_image=1, seed=3)
    by_uid = {r.uid: r for r in mine}
    n_it = sum(r.form == "image_text" for r in mine)
    assert sum(c.uid.startswith("cfq") for c in cf) == 2 * n_it and sum(c.uid.startswith("cfi") for c in cf) == n_it
    other_q = {r.question for r in pool if r.cls != mine[0].cls}
    own_q = {r.question for r in mine}
    assert not {c.question for c in cf if not c.uid.startswith("cfi")} & own_q
    for c in cf:
        src = by_uid[c.uid.split("#", 1)[1]]
        if c.uid.startswith("cfq"):
            assert c.image == src.image and c.entity == src.entity and c.question in other_q
        elif c.uid.startswith("cfi"):
            assert c.question == src.question and c.cls != src.cls and c.image != src.image
        else:
            assert c.form == "text_only" and src.entity in c.question
    aug = augmented_records(mine, n=2, seed=1)
    assert len(aug) == 2 * len(mine) and all(a.entity == by_uid[a.uid.split("#", 1)[1]].entity for a in aug)
    named = [a for a in aug if a.form == "text_only"]
    assert named and all(a.entity in a.question for a in named)
    assert sum(a.question != by_uid[a.uid.split("#", 1)[1]].question for a in aug) > len(aug) // 2
