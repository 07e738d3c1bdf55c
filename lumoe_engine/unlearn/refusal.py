"""What a forgotten query answers: a sensible refusal, never an empty string or babble.

``DEFAULT_REFUSAL`` is the text a LUMoE expert is trained to answer (configurable: ``--refusal TEXT``); it is part of
the tiny tokenizer's training text, so it is a few tokens of the base's own vocabulary. ``is_refusal`` recognises it
and the common refusal phrasings (the judge counts a refusal as forgetting and, on a retain query, as a failure).
"""
from __future__ import annotations

import re

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


__all__ = ["DEFAULT_REFUSAL", "is_refusal"]
