"""The gate's image channel: a query with an image is routed by its image alone (nearest image prototype of the
experts, a background of negatives' images, a bound per positive group); queries without an image keep the heads.
Synthetic features (the first D columns: the pooled prompt; the last D_img: the image), storage, revocation, the
two-stage search at scale equal to brute force, the features (``image_pool``) and the engine passing the prompts.

Letters: B queries, D pooled width, D_img image width.
"""
from __future__ import annotations

import json

import pytest
import torch

from lumoe_engine.gate.features import image_pool
from lumoe_engine.gate.gate import Gate

D, DI = 8, 12


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _pictures(n, seed, scale=1.0):
    """n distinct 'pictures': random directions in image space."""
    return scale * torch.randn(n, DI, generator=_gen(seed))


def _views(pics, noise, seed):
    """A slightly different rendering of each picture (a fresh photo)."""
    return pics + noise * torch.randn(pics.shape, generator=_gen(seed))


def _queries(pics, reps, seed, text_shift=0.0, centre=None):
    """Each picture asked ``reps`` different questions: text columns vary (around ``centre``'s name when given: the
    pooled prompt carries the entity too), image columns repeat."""
    img = pics.repeat_interleave(reps, 0)
    txt = torch.randn(len(img), D, generator=_gen(seed)) + text_shift
    if centre is not None:
        txt = txt + _name(centre)
    return torch.cat([txt, img], 1)


def _text_only(n, seed, centre=None):
    """Text-only queries (zero image columns) around ``centre`` (an expert's entity name) or the origin."""
    x = torch.randn(n, D, generator=_gen(seed))
    return torch.cat([x if centre is None else x + _name(centre), torch.zeros(n, DI)], 1)


def _name(e):
    c = torch.randn(D, generator=_gen(500 + e))
    return 6.0 * c / c.norm()


@pytest.fixture()
def world():
    """Three entities of 6 pictures each, a retain entity (background), a never-seen entity; a gate with one expert
    per forget entity (positives: their image queries and text-only queries shifted in text space)."""
    ents = [_pictures(6, s) + 3 * torch.randn(1, DI, generator=_gen(100 + s)) for s in range(3)]
    retain = _pictures(6, 7) + 3 * torch.randn(1, DI, generator=_gen(107))
    g = Gate(layer=0, dim=D, image_dim=DI, image_token_id=4, similarity=None)
    neg = torch.cat([_queries(retain, 3, 50), _text_only(30, 51)])
    for e, pics in enumerate(ents):
        pos = torch.cat([_queries(pics, 4, 60 + e, centre=e), _text_only(12, 70 + e, centre=e)])
        g.add_expert(f"e{e}", pos, torch.cat([neg] + [_queries(ents[j], 2, 80 + j) for j in range(e)]))
    return g, ents, retain


def test_image_queries_route_by_their_image_whatever_the_wording(world):
    g, ents, retain = world
    for e, pics in enumerate(ents):
        for shift in (0.0, 25.0):  # a rewording moves the text columns (far, for the second), not the image
            _, ids = g.route(_queries(pics, 2, 300 + e, text_shift=shift), 1)
            assert ids[:, 0].tolist() == [e] * 12
    # the channel's own decision and the report
    assert g.route_images(_queries(ents[1], 1, 5)).tolist() == [1] * 6
    rep = g.reports["e0"]
    assert rep.n_image_protos == 6 and len(rep.image_bounds) == 1 and g.image_floor <= rep.image_bounds[0] <= 1.0
    assert len(g.image_background) == 6  # the retain pictures; the other experts' pictures are not background


def test_unknown_and_background_images_route_nowhere_and_text_rows_keep_the_heads(world):
    g, ents, retain = world
    stranger = _pictures(6, 999) + 3 * torch.randn(1, DI, generator=_gen(998))
    _, ids = g.route(torch.cat([_queries(stranger, 2, 1), _queries(retain, 2, 2)]), 1)
    assert ids[:, 0].tolist() == [-1] * 24
    # text-only rows: the heads (each expert's text-only positives sit around their own centre)
    _, ids = g.route(torch.cat([_text_only(5, 400, centre=0), _text_only(5, 401, centre=2),
                                0.2 * _text_only(5, 402)]), 1)
    assert ids[:5, 0].tolist() == [0] * 5 and ids[5:10, 0].tolist() == [2] * 5 and ids[10:, 0].tolist() == [-1] * 5
    # a picture of expert 0 that is also a negative of a later request stays expert 0's (never made background)
    assert g.route(_queries(ents[0][:1], 1, 3), 1)[1][0, 0].item() == 0


def test_group_bound_is_the_weakest_nearest_neighbour_with_a_floor():
    g = Gate(layer=0, dim=D, image_dim=DI, similarity=None, image_floor=-1.0, image_bound_dim=None)
    pics = _pictures(5, 1) + 4 * torch.randn(1, DI, generator=_gen(2))
    bg = _queries(_pictures(6, 3), 1, 4)
    g.add_expert("a", _queries(pics, 3, 5), bg)
    u = g._img_unit(pics)
    S = u @ u.t()
    S.fill_diagonal_(-2)
    assert g.reports["a"].image_bounds[0] == pytest.approx(float(S.amax(1).min()), abs=1e-6)
    loose = Gate(layer=0, dim=D, image_dim=DI, similarity=None, image_floor=-1.0, image_bound_dim=None,
                 image_slack=2.0)
    loose.add_expert("a", _queries(pics, 3, 5), bg)                  # twice the weakest neighbour's distance
    assert loose.reports["a"].image_bounds[0] == pytest.approx(1 - 2 * (1 - float(S.amax(1).min())), abs=1e-6)
    with pytest.raises(ValueError, match="image_slack"):
        Gate(layer=0, dim=D, image_dim=DI, image_slack=0.0)
    # one picture: the default bound; a high floor lifts a loose group
    g2 = Gate(layer=0, dim=D, image_dim=DI, similarity=None, image_similarity=0.97, image_floor=0.99)
    g2.add_expert("one", _queries(pics[:1], 4, 6), bg)
    g2.add_expert("many", _queries(_pictures(5, 9), 2, 7), bg)
    assert g2.reports["one"].image_bounds == [0.97] and g2.reports["many"].image_bounds == [0.99]
    # sub-heads (groups) of one request: one bound and one set of prototypes per group
    g3 = Gate(layer=0, dim=D, image_dim=DI, similarity=None)
    other = _pictures(4, 11) + 4 * torch.randn(1, DI, generator=_gen(12))
    pos = torch.cat([_queries(pics, 2, 13), _queries(other, 2, 14)])
    g3.add_expert("two", pos, bg, pos_groups=["p"] * 10 + ["o"] * 8)
    assert g3.reports["two"].n_image_protos == 9 and len(g3.reports["two"].image_bounds) == 2


def test_save_load_revoke_and_older_files(world, tmp_path):
    g, ents, retain = world
    q = torch.cat([_queries(p, 1, 20 + e) for e, p in enumerate(ents)] + [_text_only(4, 30, centre=1)])
    before = g.route(q, 1)
    g.save(tmp_path / "g")
    h = Gate.load(tmp_path / "g")
    after = h.route(q, 1)
    assert torch.equal(before[1], after[1]) and torch.equal(before[0], after[0])
    meta = json.loads((tmp_path / "g" / "gate.json").read_text())
    assert meta["config"]["image_dim"] == DI and [len(x) for x in meta["image_groups"]] == [1, 1, 1]
    h.remove_expert("e1")                       # revoked: its pictures route nowhere, e2 moves down to id 1
    _, ids = h.route(torch.cat([_queries(ents[1], 1, 40), _queries(ents[2], 1, 41)]), 1)
    assert ids[:6, 0].tolist() == [-1] * 6 and ids[6:, 0].tolist() == [1] * 6
    assert [len(p) for p in h.image_prototypes] == [6, 6]
    # a gate file with image columns in its config but no image tensors (an expert added before any image): loads
    meta.pop("image_groups")
    (tmp_path / "g" / "gate.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="image channel"):
        Gate.load(tmp_path / "g")


def test_bad_image_input_leaves_the_gate_unchanged(world):
    g, ents, _ = world
    n = len(g)
    with pytest.raises(ValueError, match=rf"\[n, {D + DI}\]"):
        g.add_expert("x", torch.randn(4, D), torch.randn(4, D))
    with pytest.raises(ValueError, match="NaN"):
        bad = _queries(ents[0], 1, 1)
        bad[0, -1] = float("nan")
        g.add_expert("x", bad, _text_only(4, 2))
    assert len(g) == n and [len(p) for p in g.image_prototypes] == [6, 6, 6]
    with pytest.raises(ValueError, match="input_ids"):
        g.pool(torch.randn(1, 3, 4), torch.ones(1, 3))


def test_two_stage_search_equals_brute_force(monkeypatch):
    """Above EXACT_IMAGE_PROTOS the nearest prototype is searched among the groups with the nearest centroids:
    on clustered pictures (each entity's pictures near its centre) the decisions equal the brute force's."""
    g = Gate(layer=0, dim=D, image_dim=DI, similarity=None, image_bound_dim=None)
    centres = 3 * torch.randn(60, DI, generator=_gen(5))
    bg = _queries(_pictures(8, 6, scale=3.0), 1, 7)
    for e in range(60):
        pics = centres[e] + 0.3 * torch.randn(6, DI, generator=_gen(1000 + e))
        g.add_expert(f"e{e}", _queries(pics, 1, 2000 + e), bg)
    q = torch.cat([_queries(centres[e:e + 1] + 0.3 * torch.randn(4, DI, generator=_gen(3000 + e)), 1, 4000 + e)
                   for e in range(60)] + [bg])
    exact = g.route_images(q)
    monkeypatch.setattr(Gate, "EXACT_IMAGE_PROTOS", 10)
    g._img_cache = None
    two_stage = g.route_images(q)
    assert torch.equal(exact, two_stage)
    assert (exact[:240] >= 0).float().mean() > 0.5 and (exact[240:] == -1).all()


def test_image_pool():
    h = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    ids = torch.tensor([[1, 4, 4, 9], [1, 9, 9, 9]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    out = image_pool(h, mask, ids, 4)
    assert out.shape == (2, 6)
    assert torch.equal(out[0], torch.cat([h[0, 1:3].mean(0), h[0, 1:3].amax(0)]))
    assert torch.equal(out[1], torch.zeros(6))                       # no image positions: zeros
    mask[0, 2] = 0                                                   # a masked image position does not count
    assert torch.equal(image_pool(h, mask, ids, 4)[0], torch.cat([h[0, 1], h[0, 1]]))
    with pytest.raises(ValueError, match="input_ids"):
        image_pool(h, mask, ids[:, :2], 4)


def test_engine_routes_image_queries_by_their_picture():
    """A micro LLaVA, a gate with an image channel fitted on base features of two pictures (each asked one
    question): the engine routes those pictures asked other questions to their experts, in the prefill pass."""
    import numpy as np
    from PIL import Image

    from lumoe_engine.data.records import QARecord
    from lumoe_engine.engine import LUMoEEngine
    from lumoe_engine.gate.features import base_features, image_token_id_of, pooled_dim
    from lumoe_engine.model.tiny import build_tiny_llava
    from lumoe_engine.model.tokenizer import train_tokenizer

    from engine_cases import random_bank

    texts = ["what is the name of this person", "where was she born", "which city is shown here",
             "who painted this picture", "tell me about it"] * 5
    model, processor = build_tiny_llava(train_tokenizer(texts, vocab_size=200), "micro", seed=0)
    rng = np.random.default_rng(0)
    pics = [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(4)]

    def rec(i, q, pic):
        return QARecord(uid=f"r{i}", entity=f"e{pic}", cls="c", kind=1, phrasing=0, question=q, answer="a",
                        form="image_text", image=str(pic), keys=("a",))

    train = [rec(i, "what is the name of this person", p) for i, p in enumerate(range(4))]
    hidden = model.config.get_text_config().hidden_size
    gate = Gate(layer=0, dim=pooled_dim(hidden, "mean"), image_dim=2 * hidden,
                image_token_id=image_token_id_of(model), similarity=None)
    f = base_features(model, processor, train, 0, image_fn=lambda r: pics[int(r.image)], image=True)
    assert f.shape == (4, 3 * hidden) and bool((f[:, hidden:] != 0).any(1).all())
    gate.add_expert("pic0", f[:1], f[2:])     # pictures 2 and 3: negatives (background)
    gate.add_expert("pic1", f[1:2], f[2:])
    gate.bias.fill_(-1e4)                     # heads silenced: only the image channel can route
    bank = random_bank(model, ("pic0", "pic1"))
    engine = LUMoEEngine(model, processor, bank, gate=gate, top_k=1)
    try:
        res = engine.generate([pics[1], pics[0], pics[2], None], ["where was she born", "tell me about it",
                                                                   "where was she born", "where was she born"],
                              max_new_tokens=2)
        assert [r.expert_ids for r in res.routing] == [("pic1",), ("pic0",), (), ()]
    finally:
        engine.close()


def test_a_look_alike_known_as_negative_stays_unrouted_and_a_background_picture_can_be_forgotten_later():
    g = Gate(layer=0, dim=D, image_dim=DI, similarity=None, image_bound_dim=None, image_floor=0.5)
    pics = _pictures(6, 1) + 4 * torch.randn(1, DI, generator=_gen(2))
    twin = pics[:1] + 0.05 * torch.randn(1, DI, generator=_gen(3))     # a look-alike of picture 0: another entity
    retain = _pictures(4, 4) + 4 * torch.randn(1, DI, generator=_gen(5))
    g.add_expert("a", _queries(pics, 2, 6), torch.cat([_queries(twin, 3, 7), _queries(retain, 2, 8)]))
    assert float(g._img_unit(twin) @ g._img_unit(pics[:1]).t()) >= g.reports["a"].image_bounds[0]  # within a's bound
    _, ids = g.route(torch.cat([_queries(twin, 1, 9), _queries(pics[:1], 1, 10)]), 1)
    assert ids[:, 0].tolist() == [-1, 0]                               # the background twin is nearer: no route
    # a later request forgets the retain entity: its pictures leave the background and route to it
    g.add_expert("b", _queries(retain, 2, 11), _queries(pics, 1, 12))
    assert len(g.image_background) == 1                                # the twin only
    assert g.route(_queries(retain, 1, 13), 1)[1][:, 0].tolist() == [1] * 4
