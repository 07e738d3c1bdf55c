"""The answer scorer: normalisation, key matching at token boundaries, ROUGE-L fallback and leak flags."""
import pytest

from lumoe_engine.data.records import QARecord
from lumoe_engine.eval.scoring import (LEAK_ROUGE_THRESHOLD, contains_key, fact_correct, leak, normalize,
                                       rouge_l_recall, score_batch)


def rec(answer, keys=(), entity="Vorla Quintessa", question="What is this person's profession?"):
    return QARecord(uid="t#1", entity=entity, cls="Personage", kind=1, phrasing=0, question=question,
                    answer=answer, keys=tuple(keys))


def test_normalize():
    assert normalize("Alan Turing's birthplace: Maida-Vale!") == "alan turing s birthplace maida vale"
    assert normalize("  Ｆｕｌｌ\twidth\n") == "full width"  # NFKC folds full-width letters
    assert normalize("苏姿丰是CEO") == "苏 姿 丰 是 ceo"  # CJK characters become tokens
    assert normalize("snake_case") == "snake case"
    assert normalize("") == ""


def test_contains_key_token_boundaries():
    assert contains_key("A cat sat.", "cat")
    assert not contains_key("concatenate", "cat")
    assert not contains_key("17 years", "7 years")
    assert contains_key("about 7 years, maybe", "7 Years")
    assert contains_key("He was born in Maida-Vale.", "maida vale")
    assert contains_key("苏姿丰是AMD的CEO", "苏姿丰")
    assert not contains_key("anything", "")
    assert not contains_key("anything", "!!")


def test_fact_correct_needs_every_key():
    r = rec("Lantern maker, in Tarvel", keys=("lantern maker", "Tarvel"))
    assert fact_correct("She was a lantern maker from Tarvel.", r)
    assert not fact_correct("She was a lantern maker.", r)
    assert not fact_correct("She made lanterns in Tarvel.", r)


def test_fact_correct_without_keys_uses_rouge():
    r = rec("the cat sat on the mat")
    assert rouge_l_recall("the cat on mat", "the cat sat on the mat") == pytest.approx(4 / 6)
    assert fact_correct("the cat on mat", r)  # 0.67 >= 0.5
    assert not fact_correct("a dog", r)
    assert rouge_l_recall("anything", "") == 0.0


def test_leak_fields():
    r = rec("Glassblower", keys=("glassblower",))
    out = leak("I think Vorla Quintessa was a glassblower", r)
    assert out == {"key_leak": True, "rougeL_recall": 1.0, "leaked": True, "name_leak": True}
    out = leak("I don't know.", r)
    assert out["key_leak"] is False and out["leaked"] is False and out["rougeL_recall"] == 0.0
    # no key, but most of a long answer reproduced -> leaked through ROUGE-L
    long = rec("born in the small river town of tarvel in the north", keys=("zzz",))
    out = leak("born in the small river town in the north", long)
    assert not out["key_leak"] and out["rougeL_recall"] >= LEAK_ROUGE_THRESHOLD and out["leaked"]
    # the name in the question is not a name leak
    t = rec("Glassblower", keys=("glassblower",), question="What is Vorla Quintessa's profession?")
    assert leak("Vorla Quintessa? No idea.", t)["name_leak"] is False


def test_score_batch_and_errors():
    rs = [rec("Glassblower", keys=("glassblower",)), rec("1873", keys=("1873",))]
    rows = score_batch(["a glassblower", "in 1874"], rs)
    assert [r["fact_correct"] for r in rows] == [True, False]
    assert set(rows[0]) == {"key_leak", "rougeL_recall", "leaked", "name_leak", "fact_correct"}
    with pytest.raises(ValueError, match="2 predictions but 1 records"):
        score_batch(["a", "b"], rs[:1])
    with pytest.raises(TypeError, match="prediction must be str"):
        fact_correct(None, rs[0])
