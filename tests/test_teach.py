"""Teaching: a short teach on a small synthetic benchmark learns its facts well above chance, writes the summary with
every key, and is cached; the full embedded default is ``slow``."""
import json
import random

import pytest
import torch

from lumoe_engine.data.records import QARecord
from lumoe_engine.model.teach import (SUMMARY_FILE, TeachConfig, CellSampler, augment_question, noise_chance_level,
                                      split_records, teach)

SUMMARY_KEYS = ("fact_accuracy_image_text", "fact_accuracy_text_only", "fact_accuracy_heldout_phrasing",
                "fact_accuracy_fresh_images", "fact_accuracy_noise_image", "noise_chance_level", "n_entities", "n_qa",
                "seconds", "steps", "final_loss", "cached", "reached_target")

SMALL = dict(name="test", world="v1", heldout_families=1, n_classes=1, entities_per_class=4, phrasings_per_kind=3, teach_images=3, fresh_images=1,
             n_tasks=1, forget_per_task=1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def taught(cache, tmp_path_factory):
    config = TeachConfig(synthetic="default", synthetic_overrides=SMALL, preset="micro", batch_size=16, lr=3e-3,
                         max_steps=250, check_every=50, eval_max_records=64, seed=0)
    out = tmp_path_factory.mktemp("out")
    model, processor, summary = teach(config, out, cache_dir=cache, progress=False)
    return config, out, model, processor, summary


def test_short_teach_learns_well_above_chance(taught):
    config, out, model, processor, summary = taught
    shown = {k: summary[k] for k in SUMMARY_KEYS}
    print(json.dumps(shown, indent=1))
    for k in SUMMARY_KEYS:
        assert k in summary, k
    assert summary["n_entities"] == 4 and summary["cached"] is False and summary["steps"] >= 1
    chance = summary["noise_chance_level"]
    assert chance == pytest.approx(0.25)  # 4 entities of one class, every fact unique within the class
    # taught questions: far above an image-blind guesser
    assert summary["fact_accuracy_image_text"] >= chance + 0.4
    assert summary["fact_accuracy_text_only"] >= 0.6
    # the image carries the identity: noise images fall well below the real ones
    assert summary["fact_accuracy_noise_image"] <= summary["fact_accuracy_image_text"] - 0.2
    written = json.loads((out / SUMMARY_FILE).read_text())
    assert written["fact_accuracy_image_text"] == summary["fact_accuracy_image_text"]


def test_teach_is_cached(taught, cache, tmp_path):
    config, _, model, _, summary = taught
    model2, processor2, again = teach(config, tmp_path, cache_dir=cache, progress=False)
    assert again["cached"] is True
    for k in SUMMARY_KEYS:
        if k not in ("cached", "seconds"):
            assert again[k] == summary[k], k
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert json.loads((tmp_path / SUMMARY_FILE).read_text())["cached"] is True


def test_run_cut_by_the_clock_is_not_cached(cache, tmp_path):
    """A wall-clock stop depends on the machine's speed: its model is returned but never cached as the config's."""
    config = TeachConfig(synthetic="default", synthetic_overrides=SMALL, preset="micro", batch_size=8, max_steps=50,
                         check_every=1000, time_budget_s=1e-6, eval_max_records=8, seed=1)
    _, _, first = teach(config, tmp_path / "a", cache_dir=cache, progress=False)
    assert first["stopped_by_clock"] is True and first["steps"] == 1 and first["model_dir"] is None
    assert not (cache / "taught" / first["cache_key"]).exists()
    _, _, second = teach(config, tmp_path / "b", cache_dir=cache, progress=False)
    assert second["cached"] is False and second["stopped_by_clock"] is True


def _rec(uid, entity, kind, form, question, answer, held=False, fresh=False):
    return QARecord(uid, entity, "Animals", kind, 0, question, answer, form=form,
                    image=None if form == "text_only" else f"/x/{uid}.png", keys=(answer,), heldout_phrasing=held,
                    fresh_image=fresh)


def test_split_and_chance_level():
    recs = [_rec("a1", "A", 0, "image_text", "What is this?", "A"),
            _rec("b1", "B", 0, "image_text", "What is this?", "B"),
            _rec("a2", "A", 1, "image_text", "What colour?", "red"),
            _rec("b2", "B", 1, "image_text", "What colour?", "red"),
            _rec("c2", "C", 1, "image_text", "What colour?", "blue"),
            _rec("a3", "A", 1, "text_only", "What colour is A?", "red"),
            _rec("a4", "A", 1, "image_text", "Colour, please?", "red", held=True),
            _rec("a5", "A", 1, "image_text", "What colour?", "red", fresh=True)]
    sets = split_records(recs)
    assert [r.uid for r in sets["teach"]] == ["a1", "b1", "a2", "b2", "c2", "a3"]
    assert [r.uid for r in sets["heldout_phrasing"]] == ["a4"] and [r.uid for r in sets["fresh_images"]] == ["a5"]
    # "What is this?": 2 entities, 2 answers -> 1/2; "What colour?": red for 2 of 3 -> 2/3
    assert noise_chance_level(sets["image_text"]) == pytest.approx((0.5 * 2 + 2 / 3 * 3) / 5)
    with pytest.raises(ValueError, match="population"):
        noise_chance_level(recs[:1], population=recs[2:3])


def test_cell_sampler_balances_forms():
    recs = [_rec(f"i{i}", "A", 1, "image_text", "Q?", "x") for i in range(30)] + \
        [_rec("t0", "A", 1, "text_only", "Q A?", "x")]
    s = CellSampler(recs, "cell", random.Random(0))
    rows = s.take(100)
    assert sum(r.form == "text_only" for r in rows) == 50
    assert len({r.uid for r in rows if r.form == "image_text"}) == 30  # every record of a cell is used in turn
    rows = CellSampler(recs, "record", random.Random(0)).take(31)
    assert sorted(r.uid for r in rows) == sorted(r.uid for r in recs)


def test_augment_question_keeps_the_entity_name():
    config = TeachConfig(synonym_prob=1.0, word_dropout=0.5, filler_prob=0.3)
    rng = random.Random(0)
    seen = set()
    for _ in range(50):
        q = augment_question("What does Brisk Hare eat in the picture?", "Brisk Hare", rng, config,
                             fillers=["where", "born"])
        assert "Brisk Hare" in q
        assert q.endswith("?")
        seen.add(q)
    assert len(seen) > 10 and any("<unk>" in q for q in seen) and any("born" in q for q in seen)
    assert any("Which" in q for q in seen)  # synonym swap of "What"
    plain = augment_question("What does Brisk Hare eat?", "Brisk Hare", rng, TeachConfig(word_dropout=0.0))
    assert plain == "What does Brisk Hare eat?"


def test_4bit_base_is_measured_not_taught(taught, cache, tmp_path):
    """--model DIR --load-in-4bit: the frozen NF4 base is measured (no step) and keeps most of what it was taught."""
    config, _, _, _, summary = taught
    frozen = TeachConfig(synthetic="default", synthetic_overrides=SMALL, model=summary["model_dir"],
                         load_in_4bit=True, eval_max_records=64)
    model, _, s4 = teach(frozen, tmp_path, cache_dir=cache, progress=False)
    print({k: s4[k] for k in SUMMARY_KEYS})
    assert s4["trained"] is False and s4["steps"] == 0 and s4["model_dir"] == summary["model_dir"]
    assert s4["fact_accuracy_text_only"] >= summary["fact_accuracy_text_only"] - 0.3
    assert s4["fact_accuracy_image_text"] >= summary["noise_chance_level"] + 0.3
    again = teach(frozen, tmp_path, cache_dir=cache, progress=False)[2]
    assert again["cached"] is True and again["fact_accuracy_text_only"] == s4["fact_accuracy_text_only"]


def test_teach_config_errors():
    with pytest.raises(ValueError, match="word_dropout"):
        TeachConfig(word_dropout=1.5).validate()
    with pytest.raises(ValueError, match="load_in_4bit"):
        TeachConfig(load_in_4bit=True).validate()
    with pytest.raises(ValueError, match="balance"):
        TeachConfig(balance="epochs").validate()


@pytest.mark.slow
def test_teach_embedded_default(tmp_path):
    """The embedded default: 36 entities taught to the target (run alone: several minutes on 2 cores)."""
    _, _, summary = teach(TeachConfig(), tmp_path, cache_dir=tmp_path / "cache", progress=False)
    print(json.dumps({k: summary[k] for k in SUMMARY_KEYS}, indent=1))
    assert summary["n_entities"] == 36
    assert summary["fact_accuracy_image_text"] >= 0.95 and summary["fact_accuracy_text_only"] >= 0.95
    assert summary["fact_accuracy_fresh_images"] >= 0.85
    assert summary["fact_accuracy_noise_image"] <= summary["noise_chance_level"] + 0.15


def test_the_tiny_base_is_taught_to_refuse_names_it_does_not_know(taught, cache):
    """The refusal's words are in the taught tokenizer (an expert taught to say it otherwise answers unknown tokens,
    which decode to an empty string), the refusal-teaching questions name no entity of the world and use no word of
    it as a name, and the summary measures the base's refusals on made-up names and on known facts."""
    from lumoe_engine.model.teach import load_data, refusal_teaching
    from lumoe_engine.unlearn.refusal import DEFAULT_REFUSAL, UNKNOWN_ENTITY, unknown_tokens

    config, _, _, processor, summary = taught
    assert unknown_tokens(processor.tokenizer, DEFAULT_REFUSAL) == []
    assert unknown_tokens(processor.tokenizer, "Zyxwvut qwertyuiop.") == ["Zyxwvut", "qwertyuiop"]
    bench = load_data(config, cache)  # the world the fixture taught
    sets = refusal_teaching(config, bench.records, split_records(bench.records)["teach"])
    assert sets["taught"] and sets["heldout"]
    world = {w.strip(".,?!").lower() for r in bench.records for w in (r.entity + " " + r.question).split()}
    names = {r.entity for r in bench.records}
    for rec in sets["taught"] + sets["heldout"]:
        assert rec.entity == UNKNOWN_ENTITY and rec.answer == DEFAULT_REFUSAL and rec.form == "text_only"
        assert not any(n in rec.question for n in names), rec.question
    taught_q = {r.question for r in sets["taught"]}
    assert not taught_q & {r.question for r in sets["heldout"]}  # the held-out names are never taught
    new_words = {w.strip(".,?!").lower() for r in sets["taught"] for w in r.question.split()} - world
    assert new_words, "the made-up names add words of their own"
    for k in ("refusal_unknown_taught", "refusal_unknown_heldout", "refusal_rate_known_facts"):
        assert 0.0 <= summary[k] <= 1.0, (k, summary[k])
    print({k: summary[k] for k in ("refusal_unknown_taught", "refusal_unknown_heldout", "refusal_rate_known_facts")})


def test_a_refusal_the_tokenizer_cannot_write_is_refused(taught):
    from lumoe_engine.stream.base import check_refusal
    from lumoe_engine.stream.config import StreamConfig

    _, _, _, processor, _ = taught
    check_refusal(StreamConfig(), processor)  # the default refusal: written with known words
    with pytest.raises(ValueError, match="no token for 'Zyxwvut'"):
        check_refusal(StreamConfig(refusal="Zyxwvut, I refuse."), processor)
