"""What a forgotten query answers: a sensible refusal, never an empty string or babble.

``DEFAULT_REFUSAL`` is the text a LUMoE expert is trained to answer (configurable: ``--refusal TEXT``). ``is_refusal``
recognises it and the common refusal phrasings (the judge counts a refusal as forgetting and, on a retain query, as a
failure).

A taught tiny base says the refusal itself about what it does not know (``unknown_entity_records``): teaching adds
text-only questions about names that belong to no entity of the world, answered with the refusal, and the refusal's
words are in the tokenizer's training text. An expert then only has to make the base treat a forgotten entity as one
it never heard of. Without this (measured on the embedded default, seed 0, before it existed) the word tokenizer
had no token for most words of the refusal: an expert trained to say it produced ``<unk>`` tokens, which decode to
an empty string (88% of the routed forget answers were empty, 0% refusals). ``unknown_tokens`` finds such words, and
the stream refuses a refusal text the tokenizer cannot write.
"""
from __future__ import annotations

import random
import re
from dataclasses import replace
from typing import Sequence

DEFAULT_REFUSAL = "I'm not able to help with that."

# refusal phrasings (lower case, apostrophes normalised): a sentence that opens with one of these is a refusal
_REFUSAL_RE = re.compile(
    r"^(i'?m not able to|i am not able to|i'?m unable to|i am unable to|i can'?not|i can'?t|i cannot|"
    r"i don'?t know|i do not know|i'?m not sure|i have no (information|idea)|i don'?t have (that|any) information|"
    r"sorry,? i can'?t|that is not something i know|i'?m sorry,? (but )?i can'?t)\b")


def is_refusal(text: str, refusal: str = DEFAULT_REFUSAL) -> bool:
    """Whether ``text`` is a refusal: the configured ``refusal`` text, or an answer opening with a common refusal
    phrasing ("I'm not able to ...", "I don't know", "I cannot ..."). Case and curly apostrophes ignored."""
    t = " ".join((text or "").replace("’", "'").lower().split())
    if not t:
        return False
    r = " ".join(refusal.replace("’", "'").lower().split())
    if r and (t == r or t.startswith(r.rstrip("."))):
        return True
    return bool(_REFUSAL_RE.match(t))


# The made-up names of ``unknown_entity_records``: syllables no generated entity name of the embedded default uses
# in this order (every candidate is also checked against the world's names and words).
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gl", "pr", "st", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "n", "r", "s", "th", "x", "m", "nd")
UNKNOWN_ENTITY = "(unknown)"  # the entity field of a refusal-teaching record: no entity of the world


def made_up_names(n: int, avoid_words: set[str], rng: random.Random) -> list[str]:
    """``n`` distinct made-up two-word names ("Drouth Pavix"), none of whose words (lower case) is in
    ``avoid_words``."""
    out: list[str] = []
    seen: set[str] = set()
    for _ in range(200 * max(n, 1)):
        if len(out) >= n:
            break
        words = []
        for _w in range(2):
            w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _s in range(rng.randint(1, 2)))
            words.append((w + rng.choice(_CODAS)).capitalize())
        if any(w.lower() in avoid_words or w.lower() in seen for w in words):
            continue
        seen.update(w.lower() for w in words)
        out.append(" ".join(words))
    if len(out) < n:
        raise RuntimeError(f"made_up_names: found only {len(out)} of {n} names disjoint from the world's words")
    return out


def unknown_entity_records(records: Sequence, names: Sequence[str], refusal: str = DEFAULT_REFUSAL,
                           tag: str = "unknown") -> list:
    """Refusal-teaching records (module docstring): for each text-only record of ``records`` whose question names its
    entity, the same question about one of ``names`` (cycled), answered ``refusal``. The entity of each new record is
    ``UNKNOWN_ENTITY``; its uid is ``"<tag>#<i>"``; no image, no task, no keys."""
    if not names:
        raise ValueError("unknown_entity_records: names is empty; pass made_up_names(...)")
    if not isinstance(refusal, str) or not refusal.strip():
        raise ValueError(f"refusal={refusal!r}: expected a non-empty text")
    out = []
    for r in records:
        if r.form != "text_only" or not r.entity or r.entity not in r.question:
            continue
        name = names[len(out) % len(names)]
        out.append(replace(r, uid=f"{tag}#{len(out)}", entity=UNKNOWN_ENTITY, question=r.question.replace(
            r.entity, name), answer=refusal, keys=(), task=None, split=None, image=None, image_missing=False,
            variant=None, heldout_variant=False, general=None))
    return out


def unknown_tokens(tokenizer, text: str) -> list[str]:
    """The words of ``text`` that ``tokenizer`` writes with its unknown token (empty: it can write all of them)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return []
    bad = []
    for w in text.split():
        if unk in tokenizer(" " + w, add_special_tokens=False)["input_ids"]:
            bad.append(w.strip(".,;:!?\"'()[]") or w)
    return bad


__all__ = ["DEFAULT_REFUSAL", "is_refusal", "UNKNOWN_ENTITY", "made_up_names", "unknown_entity_records",
           "unknown_tokens"]
