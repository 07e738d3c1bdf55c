"""The protocol: what a removal request carries (*request data*) and what measures forgetting (*test data*), one
definition for the stream, ``--compare``, ``gate-eval`` and a store's evaluation.

A data owner sends some pictures and some wordings of an entity's facts; the world later asks in ways the request
never showed. Per entity (seeded by the protocol's seed and the entity's name, independent of the stream):

- the taught wording families of each question kind are split: a request *carries* ``carry_families`` of them
  (at least one, at least one left), and of its taught pictures ``carry_pictures`` (at least one, one left);
- request data (``Request.forget`` / ``.retain`` after ``carry``): the entity's taught records in a carried family,
  with a carried picture for the image+text form; the records written with the entity's name as taught
  (``variant`` None);
- test data of the entity, every form disjoint from its request data by construction:
  ``image_text`` its other taught image+text questions (a family *and* a picture the request did not carry),
  ``text_only`` its other taught text-only questions (a family not carried), ``reworded`` the held-out wording
  families (both forms, taught pictures the request did not carry), ``fresh_scene`` the held-out pictures (new
  scenes; taught wordings), ``name_variants`` its name in lower case, without its article, with one typo
  (text-only, never taught), ``alias`` its alias in wordings never taught with it;
- retain: the test data of retain entities and of never-requested entities (every form), never their request data;
- general utility: entity-free questions (``general`` "scene" / "world"); a fixed seeded ``general_pool`` of the
  taught ones may serve as gate negatives, the rest (and every held-out one) is the general test set.

Gate negatives come only from what exists when a request arrives: its own retain data, the general pool, the request
data of requests learned before — never later requests, never test data (``check_disjoint`` is the guard; the
stream runs it before each request reaches the trainer or the gate).

Letters: F wording families of a kind, P pictures of an entity.
"""
from __future__ import annotations

import dataclasses
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from lumoe_engine.data.records import GENERAL_ENTITY, Benchmark, QARecord
from lumoe_engine.data.streams import Request
from lumoe_engine.errors import RequestError
from lumoe_engine.seeding import stable_seed

# the forms of forgetting: what the request carried, and what the world asks later
REQUEST_FORMS = ("image_text", "text_only")
TEST_FORMS = ("image_text", "text_only", "reworded", "name_variants", "alias", "fresh_scene")
RETAIN_SETS = ("retain", "unrequested", "general")
NAME_VARIANTS = ("lower", "no_article", "typo")


class ProtocolError(RequestError):
    """A test query reached a request's data, a gate training set or calibration: the measurement would be void."""


@dataclass(frozen=True)
class Protocol:
    """The split of request data and test data (module docstring).

    carry_families: share of an entity's taught wording families (per kind) a request carries
    carry_pictures: share of an entity's taught pictures a request carries
    general_pool: taught general-utility queries the gate may use as negatives (the rest is test data)
    seed: the split's seed (the run's seed: world, teaching, stream and protocol all follow one seed)
    """

    carry_families: float = 0.5
    carry_pictures: float = 0.5
    general_pool: int = 64
    seed: int = 0

    def validate(self) -> "Protocol":
        for name in ("carry_families", "carry_pictures"):
            v = getattr(self, name)
            if not 0.0 < float(v) < 1.0:
                raise ValueError(f"Protocol.{name}={v!r}: expected a share in (0, 1): a request carries some and "
                                 f"leaves some for the test")
        if isinstance(self.general_pool, bool) or not isinstance(self.general_pool, int) or self.general_pool < 0:
            raise ValueError(f"Protocol.general_pool={self.general_pool!r}: expected an int >= 0")
        return self


def _picture(r: QARecord) -> Optional[str]:
    return r.image if r.form == "image_text" else None


def _pick(items: Sequence, share: float, seed: int) -> set:
    """A seeded subset of ``items`` of about ``share`` of them: at least one, at least one left (when >= 2)."""
    items = sorted(set(items))
    if len(items) <= 1:
        return set(items)
    k = min(len(items) - 1, max(1, round(share * len(items))))
    return set(random.Random(seed).sample(items, k))


class Split:
    """The protocol applied to one benchmark: per entity, the carried families and pictures; per record, whether it
    is request data, and the test sets (module docstring)."""

    def __init__(self, benchmark: Benchmark, protocol: Optional[Protocol] = None):
        self.benchmark, self.protocol = benchmark, (protocol or Protocol()).validate()
        by_entity: dict[str, list[QARecord]] = defaultdict(list)
        for r in benchmark.records:
            by_entity[r.entity].append(r)
        self.by_entity = dict(by_entity)
        self._families: dict[tuple[str, int], set] = {}
        self._pictures: dict[str, set] = {}
        seed = self.protocol.seed
        for e, recs in self.by_entity.items():
            if e == GENERAL_ENTITY:
                continue
            fams: dict[int, set] = defaultdict(set)
            pics = set()
            for r in recs:
                if r.taught and r.variant is None and r.general is None:
                    fams[r.kind].add(r.phrasing)
                    if _picture(r):
                        pics.add(_picture(r))
            for k, fs in fams.items():
                self._families[(e, k)] = _pick(fs, self.protocol.carry_families,
                                               stable_seed("protocol-families", seed, e, k))
            self._pictures[e] = _pick(pics, self.protocol.carry_pictures, stable_seed("protocol-pictures", seed, e))
        general = sorted((r for r in by_entity.get(GENERAL_ENTITY, ()) if r.taught), key=lambda r: r.uid)
        n = min(self.protocol.general_pool, len(general))
        self.general_pool = sorted(random.Random(stable_seed("protocol-general", seed)).sample(general, n),
                                   key=lambda r: r.uid) if n else []
        pool = {r.uid for r in self.general_pool}
        self.general_test = [r for r in by_entity.get(GENERAL_ENTITY, ()) if r.uid not in pool]

    # ------------------------------------------------------------------------------------------------ records
    def carried(self, r: QARecord) -> bool:
        """Whether record ``r`` is request data: taught, the name as taught, a carried family, a carried picture."""
        if not r.taught or r.variant is not None or r.general is not None or r.entity == GENERAL_ENTITY:
            return False
        if r.phrasing not in self._families.get((r.entity, r.kind), ()):
            return False
        pic = _picture(r)
        return pic is None or pic in self._pictures.get(r.entity, ())

    def carried_pictures(self, entity: str) -> set:
        """The image paths of ``entity``'s pictures a request about it carries."""
        return set(self._pictures.get(entity, ()))

    def request_data(self, entity: str) -> list[QARecord]:
        """The records a request about ``entity`` carries."""
        return [r for r in self.by_entity.get(entity, ()) if self.carried(r)]

    def test_form(self, r: QARecord) -> Optional[str]:
        """The test form of record ``r`` (one of ``TEST_FORMS``), or None when it is request data or in none (a
        taught record that shares a carried family or picture, an alias record that teaches the alias)."""
        if r.entity == GENERAL_ENTITY or r.general is not None:
            return None
        if r.heldout_variant:
            return "alias" if r.variant == "alias" else "name_variants" if r.variant in NAME_VARIANTS else None
        if r.variant is not None:
            return None  # an alias record that teaches the alias
        fam_new = r.phrasing not in self._families.get((r.entity, r.kind), ())
        pic = _picture(r)
        pic_new = pic is None or pic not in self._pictures.get(r.entity, ())
        if r.fresh_image:
            return "fresh_scene" if not r.heldout_phrasing else None
        if r.heldout_phrasing:
            return "reworded" if pic_new else None
        if fam_new and pic_new:
            return r.form
        return None

    def test_sets(self, entities: Iterable[str]) -> dict[str, list[QARecord]]:
        """{test form: records} of ``entities`` (every form of ``TEST_FORMS``, maybe empty)."""
        out: dict[str, list[QARecord]] = {f: [] for f in TEST_FORMS}
        for e in entities:
            for r in self.by_entity.get(e, ()):
                f = self.test_form(r)
                if f is not None:
                    out[f].append(r)
        return out

    def retain_test(self, entities: Iterable[str]) -> list[QARecord]:
        """Every test record of ``entities`` (all forms): how retain and never-requested entities are measured."""
        return [r for f in self.test_sets(entities).values() for r in f]

    # ---------------------------------------------------------------------------------------------- requests
    def carry(self, request: Request) -> Request:
        """``request`` with its forget and retain records reduced to what a data owner sends (request data)."""
        forget = [r for r in request.forget if self.carried(r)]
        if not forget and request.forget:
            forget = [r for e in request.entities for r in self.request_data(e)]
        retain = [r for r in request.retain if self.carried(r)]
        meta = dict(request.metadata, protocol=dataclasses.asdict(self.protocol),
                    request_data={"forget": len(forget), "retain": len(retain)})
        return dataclasses.replace(request, forget=forget, retain=retain, metadata=meta)

    def test_keys(self) -> set:
        """(image, question) of every test record of the benchmark (any entity's, retain or not) and every general
        test query: what must never reach a trainer, a gate or calibration."""
        keys = {(_picture(r), r.question) for recs in self.by_entity.values() for r in recs
                if self.test_form(r) is not None}
        keys |= {(_picture(r), r.question) for r in self.general_test}
        return keys


def without_test_queries(records: Sequence[QARecord], test_keys: set) -> list[QARecord]:
    """``records`` without those that have the (image, question) of a test query. For data a component *generates*
    from request data (the gate's rewordings and recombinations): a generated query can coincide with a test query
    ("Who started this company?" about a company, written with its name, is a held-out text-only query), and
    training on it would make that test query seen. Data a request *carries* is checked instead (``check_disjoint``:
    an error)."""
    return [r for r in records if (_picture(r), r.question) not in test_keys]


def check_disjoint(records: Iterable[QARecord], test_keys: set, what: str) -> None:
    """ProtocolError when any of ``records`` has the (image, question) of a test query (``Split.test_keys``)."""
    hits = [r for r in records if (_picture(r), r.question) in test_keys]
    if hits:
        r = hits[0]
        raise ProtocolError(f"{what}: {len(hits)} record(s) are test queries (e.g. {r.uid!r}: {r.question!r}); test "
                            f"data must never reach a trainer, a gate or calibration (lumoe_engine/data/protocol.py)")


__all__ = ["Protocol", "Split", "ProtocolError", "check_disjoint", "without_test_queries", "REQUEST_FORMS", "TEST_FORMS", "RETAIN_SETS",
           "NAME_VARIANTS"]
