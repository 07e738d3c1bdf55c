"""World v2 of the synthetic MLUBench (the default preset): scenes, eight wording families of which three are held
out, aliases, names as people type them, general utility; the loader's v2 fields; teaching's name variants."""
import hashlib
import json
import random
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lumoe_engine.data.mlubench import MLUBenchFormatError, load_benchmark
from lumoe_engine.data.protocol import Split, check_disjoint
from lumoe_engine.data.records import GENERAL_ENTITY
from lumoe_engine.data.synthetic import PRESETS, SyntheticConfig, typo_of, write_synthetic
from lumoe_engine.model.teach import split_records, vary_name


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("syn") / "default", PRESETS["default"])


@pytest.fixture(scope="module")
def bench(root):
    return load_benchmark(root)


def _by_entity(bench):
    out = defaultdict(list)
    for r in bench.records:
        out[r.entity].append(r)
    return out


def test_families_eight_per_kind_three_held_out_of_different_shapes(bench):
    recs = _by_entity(bench)["Basefo Poppy" if "Basefo Poppy" in bench.entities else sorted(bench.entities)[0]]
    for kind in range(5):
        img = {r.phrasing: (r.question, r.heldout_phrasing) for r in recs if r.form == "image_text" and r.kind == kind}
        assert sorted(img) == list(range(8))
        assert [h for _, (q, h) in sorted(img.items())] == [False] * 5 + [True] * 3
        assert len({q for q, _ in img.values()}) == 8
        firsts = {q.split()[0] for q, _ in img.values()}
        assert len(firsts) >= 5, firsts  # questions, imperatives, "I'd like ...", embedded clauses
    # a held-out wording is never a teaching record
    assert not any(r.heldout_phrasing for r in split_records(bench.records)["teach"])


def test_aliases_and_name_variants(bench):
    assert set(bench.aliases) == set(bench.entities) - {GENERAL_ENTITY}
    assert all(len(a) == 1 for a in bench.aliases.values())
    names = {e.lower() for e in bench.entities}
    assert not any(a[0].lower() in names for a in bench.aliases.values())
    for e, recs in _by_entity(bench).items():
        if e == GENERAL_ENTITY:
            continue
        alias = bench.aliases[e][0]
        taught = [r for r in recs if r.variant == "alias" and not r.heldout_variant]
        test = [r for r in recs if r.variant == "alias" and r.heldout_variant]
        assert taught and test and all(r.form == "text_only" for r in taught + test)
        assert any(f"{e} (also known as {alias})" in r.question for r in taught)  # "X, also known as Y"
        assert all(alias in r.question and e not in r.question for r in test)
        # the alias test's wordings were never taught with the alias
        assert not ({(r.kind, r.phrasing) for r in taught} & {(r.kind, r.phrasing) for r in test})
        var = Counter(r.variant for r in recs if r.heldout_variant and r.variant != "alias")
        assert var["lower"] == 8 and var["typo"] == 8
        assert var["no_article"] == (8 if bench.entities[e] in ("Animals", "Plants") else 0)
        for r in recs:
            if r.variant == "lower":
                assert e.lower() in r.question and e not in r.question
            if r.variant == "typo":
                assert typo_of(e, 0) != e and e not in r.question


def test_typo_is_one_edit():
    for name, seed in (("Vorla Quintessa", 1), ("Zarn", 2), ("Kel Tower", 3), ("Oxa", 4)):
        t = typo_of(name, seed)
        assert t != name and abs(len(t) - len(name)) <= 1
        assert sorted(t.replace(" ", "")) == sorted(name.replace(" ", "")) or len(t) != len(name)


def test_general_utility_records(bench, root):
    gen = [r for r in bench.records if r.entity == GENERAL_ENTITY]
    kinds = Counter(r.general for r in gen)
    assert kinds["scene"] > 0 and kinds["world"] > 0 and set(kinds) == {"scene", "world"}
    assert all(r.form == "image_text" and Path(r.image).is_file() for r in gen if r.general == "scene")
    assert all(r.form == "text_only" for r in gen if r.general == "world")
    assert not any(r.task for r in gen)
    # no entity's name or alias appears in a general question
    words = {w.lower() for e in bench.entities for w in e.split()} | {a[0].lower() for a in bench.aliases.values()}
    assert not any(w.strip("?.").lower() in words for r in gen for w in r.question.split())
    split = Split(bench)
    assert split.general_pool and split.general_test
    assert not {r.uid for r in split.general_pool} & {r.uid for r in split.general_test}


def test_scenes_share_backgrounds_and_differ_per_picture(bench):
    """Every picture of an entity is a new scene; a nearest-centroid lookup in pixel space (what matching a stored
    picture would do) identifies few held-out scenes (v1's icons: 0.97), while the class layout and colours stay."""
    recs = _by_entity(bench)
    cents, tests = {}, []
    for e, rs in recs.items():
        if e == GENERAL_ENTITY:
            continue
        pics = sorted({(r.image, r.fresh_image) for r in rs if r.form == "image_text"})
        assert len(pics) == 16 and sum(f for _, f in pics) == 4
        arr = {p: np.asarray(Image.open(p).convert("RGB").resize((32, 32)), np.float32) for p, _ in pics}
        assert len({a.tobytes() for a in arr.values()}) == 16
        cents[e] = np.mean([arr[p] for p, f in pics if not f], 0)
        tests += [(e, arr[p]) for p, f in pics if f]
    names = sorted(cents)
    C = np.stack([cents[e] for e in names]).reshape(len(names), -1)
    hits = [names[int(np.argmin(((C - a.reshape(1, -1)) ** 2).sum(1)))] == e for e, a in tests]
    acc = sum(hits) / len(hits)
    print(f"pixel nearest-centroid on held-out scenes: {acc:.3f} ({sum(hits)}/{len(hits)}), chance {1/36:.3f}")
    assert acc <= 0.5


def test_protocol_forms_and_disjointness_on_v2(bench):
    split = Split(bench)
    keys = split.test_keys()
    forms = Counter(split.test_form(r) for r in bench.records)
    for f in ("image_text", "text_only", "reworded", "name_variants", "alias", "fresh_scene"):
        assert forms[f] > 0, f
    for e in bench.entities:
        if e != GENERAL_ENTITY:
            check_disjoint(split.request_data(e), keys, e)
    check_disjoint(split.general_pool, keys, "general pool")
    # the alias-teaching records are neither request data nor test data
    aka = [r for r in bench.records if r.variant == "alias" and not r.heldout_variant]
    assert not any(split.carried(r) or split.test_form(r) for r in aka)


def test_byte_identical_and_seeded(root, tmp_path):
    small = SyntheticConfig(**{**PRESETS["tiny-v2"].to_dict(), "name": "t"})
    a = write_synthetic(tmp_path / "a", small)
    b = write_synthetic(tmp_path / "b", small)

    def tree(p):
        return {str(f.relative_to(p)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(p.rglob("*"))
                if f.is_file()}

    assert tree(a) == tree(b)
    c = load_benchmark(write_synthetic(tmp_path / "c", SyntheticConfig(**{**small.to_dict(), "seed": 1})))
    assert set(c.entities) != set(load_benchmark(a).entities)


def test_v1_preset_is_kept_and_validation():
    assert PRESETS["v1"].world == "v1" and PRESETS["default"].world == "v2"
    with pytest.raises(ValueError, match="world"):
        SyntheticConfig(world="v3").validate()
    with pytest.raises(ValueError, match="phrasings_per_kind"):
        SyntheticConfig(**{**PRESETS["default"].to_dict(), "phrasings_per_kind": 6}).validate()


def test_loader_refuses_bad_v2_fields(tmp_path):
    root = write_synthetic(tmp_path / "w", PRESETS["tiny-v2"])
    f = sorted((root / "Entities").glob("*.json"))[0]
    good = f.read_text()
    recs = json.loads(good)
    recs[0]["meta"]["variant"] = "shouting"
    f.write_text(json.dumps(recs))
    with pytest.raises(MLUBenchFormatError, match="variant"):
        load_benchmark(root)
    f.write_text(good)
    (root / "lists" / "aliases.json").write_text(json.dumps({"X": "not a list"}))
    with pytest.raises(MLUBenchFormatError, match="aliases"):
        load_benchmark(root)


def test_vary_name_writes_names_as_people_type_them():
    rng = random.Random(0)
    seen = Counter()
    for _ in range(200):
        q = vary_name("What does the Vorla Hare eat?", "Vorla Hare", rng)
        assert q != "What does the Vorla Hare eat?"
        if q == "What does the vorla hare eat?":
            seen["lower"] += 1
        elif q == "What does Vorla Hare eat?":
            seen["no_article"] += 1
        else:
            assert q.startswith("What does the ") and q.endswith(" eat?")
            mid = q[len("What does the "):-len(" eat?")]
            assert mid != "Vorla Hare" and abs(len(mid) - len("Vorla Hare")) <= 1
            seen["typo"] += 1
    assert min(seen.values()) > 30 and len(seen) == 3
    assert vary_name("What is Zel Corp known for?", "Other Name", rng) == "What is Zel Corp known for?"


def test_teach_summary_has_the_v2_sets_and_both_picture_checks(tmp_path):
    """A short teach of a micro model on tiny-v2: the summary measures name variants, aliases, general utility and
    held-out scenes, and the two picture checks (recognition vs a nearest-picture lookup in pixel and feature
    space), each a share in [0, 1]."""
    from lumoe_engine.model.teach import LOOKUP_CEILING, SCENE_TARGET, TeachConfig, teach

    cfg = TeachConfig(synthetic="tiny-v2", preset="micro", batch_size=16, max_steps=20, check_every=10,
                      eval_max_records=48, unknown_names=4, vision_pretrain_steps=50, seed=0)
    _, processor, s = teach(cfg, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    for k in ("fact_accuracy_name_variants", "fact_accuracy_alias", "fact_accuracy_alias_taught",
              "fact_accuracy_general_scene", "fact_accuracy_general_world", "fact_accuracy_fresh_images_name",
              "fact_accuracy_fresh_images_facts", "scene_recognition", "lookup_pixel", "lookup_features"):
        assert s[k] is not None and 0.0 <= s[k] <= 1.0, k
    assert s["scene_target"] == SCENE_TARGET and s["lookup_ceiling"] == LOOKUP_CEILING
    assert s["lookup_pictures"]["heldout"] == 18 * 2 and s["lookup_pictures"]["stored"] == 18 * 2
    assert isinstance(s["scene_checks_pass"], bool)
    assert s["n_entities"] == 18
    # world v2 teaches a subword tokenizer: a lower-case name shares pieces with the name and never becomes <unk>
    tok = processor.tokenizer
    assert tok.unk_token_id not in tok(" vorla quintessa", add_special_tokens=False)["input_ids"]
    assert len(tok(" Zqxvortle", add_special_tokens=False)["input_ids"]) > 1

