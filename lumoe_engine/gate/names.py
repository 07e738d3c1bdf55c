"""Names matched as text: does a prompt (or the base model's answer to an identity question) mention a forgotten
entity — by its name as people type it, or by an alias?

Normalisation (``normalize_name``): Unicode NFKD with accents removed, case folded, every character that is not a
letter or a digit a word break (so "\\n", quotes, brackets, possessives and hyphens separate words: "Moon's" -> "moon
s"), a name's leading article dropped ("The Silent Planet" -> "silent planet"). Matching is on whole words: a name of
n words matches n consecutive words of the text, so "moon" is found in "the moon tonight" (a mention) but not in
"moonlight" or "honeymoon".

Fuzzy: a name of at least ``min_fuzzy_chars`` letters (its words joined) also matches a run of words within
``max_edits`` edits of it (``rapidfuzz``'s optimal string alignment distance: one insertion, deletion, substitution
or transposition of neighbours); a shorter name — a common word like "Cat" or "Moon" — matches exactly only. The
candidates come from a deletion index (every string one character shorter than a name, SymSpell's idea), so a text
is checked against any number of names in time linear in its length; rapidfuzz confirms each candidate.

A name inside a longer matched name is the longer one's ("Moon" in "Moon Base": the expert of "Moon Base" only).
``NameIndex.add(names)``; ``NameIndex.find(text)`` -> the experts mentioned, in order of first mention.
``NameIndex.exact_only(expert, name)`` turns fuzzy matching off for one name (calibration does it when a fuzzy
variant of the name fires on a negative text).
"""
from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Optional

from rapidfuzz.distance import OSA

ARTICLES = ("the", "a", "an")
_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def normalize_text(text: str) -> list[str]:
    """The words of ``text``: NFKD, accents removed, case folded, split at every non-letter/digit character."""
    t = text or ""
    if not t.isascii():  # (ASCII text has nothing to decompose and no accents)
        t = unicodedata.normalize("NFKD", t)
        t = "".join(ch for ch in t if not unicodedata.combining(ch))
    t = t.casefold()
    return [w for w in _NON_WORD.split(t) if w]


def normalize_name(name: str) -> tuple[str, ...]:
    """The words of a name as matched: ``normalize_text`` without a leading article ("The Hague" -> ("hague",));
    a name that is only an article keeps it."""
    words = normalize_text(name)
    while len(words) > 1 and words[0] in ARTICLES:
        words = words[1:]
    return tuple(words)


def _deletions(s: str) -> set[str]:
    return {s[:i] + s[i + 1:] for i in range(len(s))}


@dataclass
class NameMatch:
    """One mention: the expert, the name it matched, the words of the text, and the edit distance (0 = exact)."""

    expert: int
    name: str
    start: int
    words: tuple[str, ...]
    distance: int


class NameIndex:
    """Names of every expert (by routing index), matched in texts (module docstring).

    min_fuzzy_chars: letters (words joined) a name needs before a typo of it still matches; max_edits: at most this
    many edits (0 or 1: the deletion index finds candidates within one edit).
    """

    def __init__(self, min_fuzzy_chars: int = 6, max_edits: int = 1):
        if isinstance(min_fuzzy_chars, bool) or not isinstance(min_fuzzy_chars, int) or min_fuzzy_chars < 1:
            raise ValueError(f"min_fuzzy_chars={min_fuzzy_chars!r}: expected an int >= 1")
        if max_edits not in (0, 1):
            raise ValueError(f"max_edits={max_edits!r}: expected 0 (exact names only) or 1 (one typo)")
        self.min_fuzzy_chars, self.max_edits = min_fuzzy_chars, max_edits
        self.names: list[list[tuple[str, ...]]] = []         # per expert: its normalised names
        self._exact_only: list[set[tuple[str, ...]]] = []    # per expert: names matched exactly only
        self._rebuild()

    # ------------------------------------------------------------------------------------------------ state
    def __len__(self) -> int:
        return len(self.names)

    def _rebuild(self) -> None:
        self._exact: dict[tuple[str, ...], list[int]] = defaultdict(list)  # words -> experts
        self._lengths: set[int] = set()
        self._fuzzy: dict[tuple[int, str], list[tuple[str, int, tuple[str, ...]]]] = defaultdict(list)
        self._fuzzy_len: dict[int, set[int]] = defaultdict(set)  # words -> lengths (joined) of fuzzy names
        for e, names in enumerate(self.names):
            for words in names:
                self._index(e, words)

    def _index(self, e: int, words: tuple[str, ...]) -> None:
        if e not in self._exact[words]:
            self._exact[words].append(e)
        self._lengths.add(len(words))
        joined = " ".join(words)
        if self.max_edits and self.fuzzy(words) and words not in self._exact_only[e]:
            for key in _deletions(joined) | {joined}:
                self._fuzzy[(len(words), key)].append((joined, e, words))
            self._fuzzy_len[len(words)].update(range(len(joined) - self.max_edits, len(joined) + self.max_edits + 1))

    def fuzzy(self, words: tuple[str, ...]) -> bool:
        """Whether a name of these words is long enough to be matched within one edit."""
        return sum(len(w) for w in words) >= self.min_fuzzy_chars

    def add(self, names: Iterable[str]) -> int:
        """A new expert's names (its entities' names and aliases); returns its routing index. Names that normalise
        to nothing are ValueError; repeats are kept once."""
        words = [normalize_name(n) for n in check_names(list(names))]  # validated, repeats dropped
        self.names.append(words)
        self._exact_only.append(set())
        e = len(self.names) - 1
        for w in words:
            self._index(e, w)
        return e

    def remove(self, e: int) -> None:
        """Remove expert ``e`` (later experts move down by one, as in the gate and the bank)."""
        del self.names[e]
        del self._exact_only[e]
        self._rebuild()

    def exact_only(self, e: int, words: tuple[str, ...]) -> None:
        """Match name ``words`` of expert ``e`` exactly only (no typo)."""
        self._exact_only[e].add(tuple(words))
        self._rebuild()

    # ------------------------------------------------------------------------------------------------ match
    def matches(self, text: str, exclude: Optional[set] = None) -> list[NameMatch]:
        """Every mention of an expert's name in ``text`` (exact first, then within one edit), in text order."""
        words = normalize_text(text)
        out: list[NameMatch] = []
        for n in sorted(self._lengths):
            for i in range(len(words) - n + 1):
                window = tuple(words[i:i + n])
                hit = self._exact.get(window)
                if hit:
                    out += [NameMatch(e, " ".join(window), i, window, 0) for e in hit]
                    continue
                joined = " ".join(window)
                if len(joined) not in self._fuzzy_len.get(n, ()):
                    continue  # no fuzzy name within max_edits of this length (the edit distance is >= the gap)
                seen = set()
                for key in _deletions(joined) | {joined}:
                    for name, e, nw in self._fuzzy.get((n, key), ()):
                        if (name, e) in seen:
                            continue
                        seen.add((name, e))
                        d = OSA.distance(joined, name, score_cutoff=self.max_edits)
                        if d <= self.max_edits:
                            out.append(NameMatch(e, name, i, window, int(d)))
        if exclude:
            out = [m for m in out if m.expert not in exclude]
        # a name inside a longer one that matched the same words is the longer one's ("Moon" in "Moon Base")
        spans = [(m.start, m.start + len(m.words)) for m in out]
        out = [m for m, (a, b) in zip(out, spans)
               if not any(a2 <= a and b <= b2 and (b2 - a2) > (b - a) for a2, b2 in spans)]
        return sorted(out, key=lambda m: (m.start, m.distance))

    def find(self, text: str) -> list[int]:
        """The experts whose names ``text`` mentions, in order of first mention (each once)."""
        return list(dict.fromkeys(m.expert for m in self.matches(text)))

    def to_json(self) -> dict:
        return {"min_fuzzy_chars": self.min_fuzzy_chars, "max_edits": self.max_edits,
                "names": [[list(w) for w in ns] for ns in self.names],
                "exact_only": [[list(w) for w in sorted(x)] for x in self._exact_only]}

    @classmethod
    def from_json(cls, doc: dict) -> "NameIndex":
        idx = cls(int(doc["min_fuzzy_chars"]), int(doc["max_edits"]))
        idx.names = [[tuple(w) for w in ns] for ns in doc["names"]]
        idx._exact_only = [{tuple(w) for w in x} for x in doc.get("exact_only", [[] for _ in idx.names])]
        if len(idx._exact_only) != len(idx.names):
            raise ValueError("name index: 'exact_only' must have one list per expert")
        idx._rebuild()
        return idx



def check_names(names, what: str = "names") -> list[str]:
    """``names`` (an expert's names as text: its entities' names and aliases) as a list of stripped strings,
    repeats (after ``names.normalize_name``) dropped in order; ValueError naming the bad entry otherwise."""
    if names is None:
        return []
    if isinstance(names, (str, bytes)) or not isinstance(names, (list, tuple)):
        raise ValueError(f"{what}: expected a list of names (strings), got {type(names).__name__}; pass e.g. "
                         f"[\"Vorla Quintessa\", \"The Glass Widow\"]")
    out: list[str] = []
    seen: set = set()
    for j, n in enumerate(names):
        if not isinstance(n, str):
            raise ValueError(f"{what}[{j}]: expected a name (a string), got {type(n).__name__} {n!r:.40}")
        words = normalize_name(n)
        if not words:
            raise ValueError(f"{what}[{j}]: name {n!r} has no letter or digit; give the name as people write it")
        if words not in seen:
            seen.add(words)
            out.append(n.strip())
    return out

__all__ = ["check_names", "NameIndex", "NameMatch", "normalize_text", "normalize_name", "ARTICLES"]
