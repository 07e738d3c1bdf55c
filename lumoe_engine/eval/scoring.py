"""Answer scoring: the one scorer that teaching, unlearning and evaluation all use.

A prediction is *fact-correct* when every key-fact string of the record (entity name / fact tokens, see
``QARecord.keys``) occurs in the normalised prediction at token boundaries; a record without keys falls back to
ROUGE-L recall against the ground-truth answer. A prediction *leaks* when any key occurs, or when its ROUGE-L recall
against the true answer reaches ``LEAK_ROUGE_THRESHOLD``.

Normalisation: Unicode NFKC, lower case, every character that is not a letter or digit becomes a space, CJK
ideographs become single tokens (Chinese names have no spaces), whitespace collapsed. The same normalisation is the
ROUGE tokenizer, so ``rouge-score`` sees non-Latin text too (its default tokenizer drops it).
"""
from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from typing import Iterable, Sequence

from rouge_score import rouge_scorer, tokenizers

from lumoe_engine.data.records import QARecord

# ROUGE-L recall at or above this against the true answer counts as a leak (and as correct for key-less records).
LEAK_ROUGE_THRESHOLD = 0.5

_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)
# CJK Unified Ideographs (+ Ext. A), Hiragana, Katakana, Hangul syllables: one token per character.
_CJK = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af])")


@lru_cache(maxsize=65536)
def normalize(text: str) -> str:
    """Normalised form of ``text``: NFKC, lower case, letters/digits only, CJK characters spaced, single spaces.

    normalize("Alan Turing's birthplace: Maida-Vale!") == "alan turing s birthplace maida vale"
    """
    if not isinstance(text, str):
        raise TypeError(f"normalize: text must be str, got {type(text).__name__}")
    text = unicodedata.normalize("NFKC", text).lower()
    text = _CJK.sub(r" \1 ", text)
    return " ".join(_NON_WORD.sub(" ", text).split())


def tokens(text: str) -> list[str]:
    """Tokens of the normalised text (the unit of key matching and of ROUGE-L)."""
    return normalize(text).split()


class _NormTokenizer(tokenizers.Tokenizer):
    def tokenize(self, text):
        return tokens(text)


_SCORER = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_NormTokenizer())


def contains_key(prediction: str, key: str) -> bool:
    """True when the normalised ``key`` occurs in the normalised ``prediction`` as a whole token sequence.

    "cat" is found in "a cat sat" but not in "concatenate"; an empty key is never found.
    """
    k = normalize(key)
    if not k:
        return False
    return f" {k} " in f" {normalize(prediction)} "


def rouge_l_recall(prediction: str, answer: str) -> float:
    """ROUGE-L recall of ``prediction`` against the reference ``answer`` (LCS / reference tokens), in [0, 1]."""
    if not normalize(answer):
        return 0.0
    return float(_SCORER.score(answer, prediction)["rougeL"].recall)


def _check(prediction, record) -> None:
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be str, got {type(prediction).__name__}")
    if not isinstance(record, QARecord):
        raise TypeError(f"record must be a QARecord, got {type(record).__name__}")


def fact_correct(prediction: str, record: QARecord) -> bool:
    """True when the prediction states the record's fact: every key present (token-boundary match).

    A record without keys is correct when ROUGE-L recall against its answer is >= LEAK_ROUGE_THRESHOLD.
    """
    _check(prediction, record)
    if record.keys:
        return all(contains_key(prediction, k) for k in record.keys)
    return rouge_l_recall(prediction, record.answer) >= LEAK_ROUGE_THRESHOLD


def leak(prediction: str, record: QARecord) -> dict:
    """Whether the prediction reveals the record's ground truth.

    Returns {"key_leak": any key present, "rougeL_recall": ROUGE-L recall vs the answer,
             "leaked": key_leak or rougeL_recall >= LEAK_ROUGE_THRESHOLD,
             "name_leak": the entity name is present although the question does not contain it (informative only;
                          not part of "leaked": for answers that name the entity it is already a key)}.
    """
    _check(prediction, record)
    key_leak = any(contains_key(prediction, k) for k in record.keys)
    recall = rouge_l_recall(prediction, record.answer)
    name_leak = contains_key(prediction, record.entity) and not contains_key(record.question, record.entity)
    return {
        "key_leak": bool(key_leak),
        "rougeL_recall": recall,
        "leaked": bool(key_leak or recall >= LEAK_ROUGE_THRESHOLD),
        "name_leak": bool(name_leak),
    }


def score_batch(predictions: Sequence[str], records: Sequence[QARecord]) -> list[dict]:
    """Scores many predictions at once: one dict per pair, the fields of ``leak`` plus "fact_correct".

    predictions: [B] str, records: [B] QARecord (same order).
    """
    if len(predictions) != len(records):
        raise ValueError(
            f"score_batch: {len(predictions)} predictions but {len(records)} records; pass one record per prediction"
        )
    out = []
    for p, r in zip(predictions, records):
        row = leak(p, r)
        if r.keys:
            row["fact_correct"] = all(contains_key(p, k) for k in r.keys)
        else:
            row["fact_correct"] = row["rougeL_recall"] >= LEAK_ROUGE_THRESHOLD
        out.append(row)
    return out


def accuracy(predictions: Iterable[str], records: Iterable[QARecord]) -> float:
    """Fraction of fact-correct predictions (0.0 for no pairs)."""
    rows = score_batch(list(predictions), list(records))
    return sum(r["fact_correct"] for r in rows) / len(rows) if rows else 0.0
