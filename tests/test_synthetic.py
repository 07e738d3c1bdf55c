"""The synthetic MLUBench, world v1 (the ``v1`` preset, the earlier default): counts, identities, held-out phrasings,
tasks, determinism, cache. World v2 (the default): tests/test_world_v2.py."""
import hashlib
import os
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lumoe_engine.data.mlubench import load_benchmark, load_image, records_for
from lumoe_engine.data.synthetic import PRESETS, SyntheticConfig, ensure_synthetic, write_synthetic
from lumoe_engine.eval.scoring import contains_key, fact_correct

# Pixel nearest-centroid accuracy on fresh images, default preset: measured 0.972 (70/72; chance 1/36 = 0.028).
MIN_PIXEL_CENTROID_ACC = 0.85


@pytest.fixture(scope="module")
def default_root(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("syn") / "v1", SyntheticConfig.preset("v1"))


@pytest.fixture(scope="module")
def bench(default_root):
    return load_benchmark(default_root)


def test_default_counts(bench):
    cfg = PRESETS["v1"]
    assert cfg.n_entities == 36 and len(bench.entities) == 36
    assert Counter(bench.entities.values()) == {c: 4 for c in set(bench.entities.values())}
    assert len(set(bench.entities.values())) == 9
    assert bench.surrogate_images == 0  # every image file was written
    per = defaultdict(list)
    for r in bench.records:
        per[r.entity].append(r)
    for e, recs in per.items():
        img = [r for r in recs if r.form == "image_text"]
        txt = [r for r in recs if r.form == "text_only"]
        assert len(img) == 5 * 5 * 8 and len(txt) == 4 * 5, e  # kinds x phrasings x images; kinds 1-4 x phrasings
        assert {r.kind for r in img} == set(range(5)) and {r.kind for r in txt} == {1, 2, 3, 4}
        paths = {r.image for r in img}
        fresh = {r.image for r in img if r.fresh_image}
        assert len(paths) == 8 and len(fresh) == 2
        for kind in range(5):
            fams = {r.phrasing: r.heldout_phrasing for r in img if r.kind == kind}
            assert fams == {0: False, 1: False, 2: False, 3: False, 4: True}
    assert len(bench.records) == 36 * 220


def test_images_are_64px_rgb(bench):
    rec = next(r for r in bench.records if r.form == "image_text")
    with Image.open(rec.image) as im:
        assert im.size == (64, 64) and im.mode == "RGB"
    assert load_image(rec, size=32).size == (32, 32)


def test_answers_keys_and_unique_facts(bench):
    for r in bench.records:
        assert 1 <= len(r.answer.split()) <= 4, r.answer
        assert r.keys and r.keys[0].lower() == r.answer.lower()
        assert fact_correct(r.answer, r)
        if r.kind == 0:
            assert r.keys == (r.entity,)
    # within a class, every kind's fact differs between entities (a fact identifies its entity)
    facts = defaultdict(set)
    for r in bench.records:
        facts[(r.cls, r.kind)].add((r.entity, r.answer))
    for (cls, kind), pairs in facts.items():
        assert len({a for _, a in pairs}) == len({e for e, _ in pairs}) == 4, (cls, kind, pairs)
    # another entity's answer is never fact-correct for this record (token-boundary matching)
    by_ck = defaultdict(dict)
    for r in bench.records:
        if r.form == "text_only" and r.phrasing == 0:
            by_ck[(r.cls, r.kind)][r.entity] = r
    for recs in by_ck.values():
        for e, r in recs.items():
            assert not any(fact_correct(o.answer, r) for f, o in recs.items() if f != e)


def test_heldout_family_never_overlaps_teaching(bench):
    teach = {r.question for r in bench.records if not r.heldout_phrasing}
    held = {r.question for r in bench.records if r.heldout_phrasing}
    assert held and teach and not (teach & held)
    # the held-out family is one family: one phrasing index per (entity, kind, form)
    idx = {(r.entity, r.kind, r.form, r.phrasing) for r in bench.records if r.heldout_phrasing}
    assert Counter((e, k, f) for e, k, f, _ in idx) == Counter(
        {(e, k, f): 1 for e, k, f, _ in idx})
    # fresh images are never among the teaching images of any entity
    teach_imgs = {r.image for r in bench.records if r.form == "image_text" and not r.fresh_image}
    assert not teach_imgs & {r.image for r in bench.records if r.fresh_image}


def test_text_only_forms_name_the_entity(bench):
    txt = records_for(bench, forms="text_only")
    assert len(txt) == 36 * 20
    assert all(r.image is None and contains_key(r.question, r.entity) for r in txt)
    img = records_for(bench, forms="image_text")
    assert not any(contains_key(r.question, r.entity) for r in img)


def test_tasks_forget_retain_consistent(bench, default_root):
    assert sorted(bench.tasks) == ["A", "B", "C", "D"]
    forget_all, retain_all = set(), set()
    for t, d in bench.tasks.items():
        f = {r.entity for r in d["forget"]}
        rt = {r.entity for r in d["retain"]}
        assert len(f) == 5
        assert len({bench.entities[e] for e in f}) == 5  # spread over 5 classes
        assert not f & forget_all  # each entity is requested once
        assert rt and {bench.entities[e] for e in rt} <= {bench.entities[e] for e in f}  # same classes
        forget_all |= f
        retain_all |= rt
        # task records are exactly the entities' records, tagged
        want = {r.uid for r in bench.records if r.entity in f}
        assert {r.uid for r in d["forget"]} == want and all(r.task == t and r.split == "forget" for r in d["forget"])
        listed = (default_root / "lists" / "tasks" / f"task{t}_forget.txt").read_text().split("\n")
        assert set(filter(None, listed)) == f
    assert not forget_all & retain_all
    never = set(filter(None, (default_root / "lists" / "never_requested.txt").read_text().split("\n")))
    assert len(never) == 7 and not never & (forget_all | retain_all)
    assert never | forget_all | retain_all == set(bench.entities)


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((32, 32), Image.BILINEAR), np.float32).ravel() / 255


def test_every_entity_has_its_own_visual_identity(bench):
    """A nearest-centroid classifier on raw 32x32 pixels of the teaching images names fresh images' entities."""
    imgs = {r.image: (r.entity, r.fresh_image) for r in bench.records if r.form == "image_text"}
    ents = sorted(bench.entities)
    feats = defaultdict(list)
    for p, key in sorted(imgs.items()):
        feats[key].append(_pixels(p))
    centroids = np.stack([np.mean(feats[(e, False)], 0) for e in ents])
    hits = [int(np.argmin(((centroids - x) ** 2).sum(1)) == i) for i, e in enumerate(ents) for x in feats[(e, True)]]
    acc = sum(hits) / len(hits)
    print(f"pixel nearest-centroid accuracy on fresh images: {acc:.3f} ({sum(hits)}/{len(hits)}), "
          f"chance {1 / len(ents):.3f}")
    assert len(hits) == 72
    assert acc >= MIN_PIXEL_CENTROID_ACC


def _tree_hash(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_byte_identical_rewrite(default_root, tmp_path):
    again = write_synthetic(tmp_path / "again", SyntheticConfig.preset("v1"))
    a, b = _tree_hash(default_root), _tree_hash(again)
    assert len(a) > 36 * 8 and a == b


def test_seed_changes_content(tmp_path):
    a = load_benchmark(write_synthetic(tmp_path / "a", SyntheticConfig(name="t0", entities_per_class=2,
                                                                      forget_per_task=2, teach_images=2, seed=0)))
    b = load_benchmark(write_synthetic(tmp_path / "b", SyntheticConfig(name="t1", entities_per_class=2,
                                                                      forget_per_task=2, teach_images=2, seed=1)))
    assert set(a.entities) != set(b.entities)


def test_ensure_synthetic_caches_atomically(tmp_path, monkeypatch):
    root = ensure_synthetic(tmp_path, "tiny")
    assert root.parent == tmp_path / "synthetic" and root.name.startswith("tiny-")
    manifest = root / "synthetic.json"
    stamp = manifest.stat().st_mtime_ns
    assert ensure_synthetic(tmp_path, PRESETS["tiny"]) == root and manifest.stat().st_mtime_ns == stamp
    assert [p.name for p in root.parent.iterdir()] == [root.name]  # no temporary folder left behind
    b = load_benchmark(root)
    assert len(b.entities) == 18 and b.surrogate_images == 0
    monkeypatch.setenv("LUMOE_CACHE", str(tmp_path / "env"))
    assert ensure_synthetic(config="tiny").parent == tmp_path / "env" / "synthetic"
    # a different config is a different folder
    other = SyntheticConfig(name="tiny", entities_per_class=2, forget_per_task=2, teach_images=4, seed=3)
    assert ensure_synthetic(tmp_path, other) != root


def test_config_validation_and_presets(tmp_path):
    assert [PRESETS[n].n_entities for n in ("tiny", "default", "medium", "large")] == [18, 36, 72, 108]
    with pytest.raises(ValueError, match="phrasings_per_kind"):
        write_synthetic(tmp_path / "x", SyntheticConfig(phrasings_per_kind=12))
    with pytest.raises(ValueError, match="forget_per_task"):
        SyntheticConfig(entities_per_class=2, forget_per_task=5).validate()
    with pytest.raises(ValueError, match="unknown synthetic preset 'huge'"):
        SyntheticConfig.preset("huge")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        write_synthetic(tmp_path / "full", PRESETS["tiny"])
    assert not os.path.exists(tmp_path / "x" / "Entities")
