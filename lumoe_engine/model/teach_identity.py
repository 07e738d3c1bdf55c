"""Teaching the identity question (world v2, a tiny base built from scratch): the base learns to answer
``gate.recognition.IDENTITY_PROBE`` ("What is the name of what this picture shows?") with the entity's name for
each taught picture, and with ``NO_ENTITY_ANSWER`` for pictures of no entity, as a real LLaVA answers "what is
this?" from its pretraining. The gate's recognition channel asks it about a query's picture (``gate.recognition``).

What it is taught on (never a test picture):

- every distinct taught picture of an entity (the request data's own pictures among them; the held-out scenes are
  never shown), answered with the entity's name as its name question (kind 0) answers it;
- ``n_none`` entity-free pictures drawn here (``scenes.render_general``: one to three plain shapes in named colours
  on a background of the world's pool), from their own seed stream: none of them is a general-utility picture of the
  benchmark, so the general test queries' pictures stay unseen by the probe. They live in memory under the keys
  ``NONE_PREFIX + index`` (``image_fn`` wraps the benchmark's loader to serve them).

The records have ``kind = IDENTITY_KIND`` (-1) and their own sampler cells (``phrasing``): ``IDENTITY_CELLS`` per
entity (its pictures dealt over them) and ``NONE_CELLS`` for the entity-free pictures, so the probe gets as large a
share of the teaching steps as it needs. Measured on the development seed 0 (and seed 1, 1 thread): with one cell per
entity, 8 for 96 entity-free pictures, and teaching stopped by the other questions' check alone, the base answered
the probe right on 0.79 / 0.72 of its taught pictures, 0.71 / 0.59 of the held-out scenes and 0.51 / 0.36 of the
general pictures, while its name questions on held-out scenes were right 0.96 / 0.98: too few steps of the probe.
Hence three cells per entity, 12 entity-free cells of 192 pictures, and teaching goes on until the probe's own check
reaches ``TeachConfig.identity_target``.
"""
from __future__ import annotations

import random
from typing import Callable, Optional, Sequence

from PIL import Image

from lumoe_engine.data.records import QARecord
from lumoe_engine.gate.recognition import IDENTITY_PROBE, NO_ENTITY_ANSWER
from lumoe_engine.seeding import stable_seed

IDENTITY_KIND = -1            # the identity question's kind (no fact kind of the world uses it)
NO_ENTITY = "(no entity)"     # the entity of the entity-free identity records
NONE_PREFIX = "identity-none://"
IDENTITY_CELLS = 3
NONE_CELLS = 12


def identity_name(records: Sequence[QARecord]) -> dict[str, str]:
    """entity -> its name as the name question (kind 0) answers it (else the entity's name)."""
    out = {}
    for r in records:
        if r.kind == 0 and r.general is None and r.form == "image_text":
            out.setdefault(r.entity, r.answer)
    return out


def entity_free_pictures(n: int, seed: int, size: int) -> dict[str, Image.Image]:
    """``n`` pictures of no entity (one to three plain shapes), keyed ``NONE_PREFIX + i``."""
    from lumoe_engine.data.scenes import (GENERAL_COLOURS, GENERAL_SHAPES, GeneralObject, background_pool,
                                          render_general)

    rng = random.Random(stable_seed("identity-none", seed))
    pool = background_pool(stable_seed("identity-none-backgrounds", seed))
    colours = sorted(GENERAL_COLOURS)
    out = {}
    for i in range(n):
        objs = []
        for _ in range(rng.randint(1, 3)):
            objs.append(GeneralObject(rng.choice(GENERAL_SHAPES), rng.choice(colours), rng.uniform(0.2, 0.8),
                                      rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.28)))
        out[f"{NONE_PREFIX}{i}"] = render_general(objs, pool[rng.randrange(len(pool))],
                                                  stable_seed("identity-none-image", seed, i), size=size)
    return out


def identity_records(teach_records: Sequence[QARecord], none_keys: Sequence[str]) -> list[QARecord]:
    """The identity-question teaching records: one per distinct taught picture of an entity, one per entity-free
    picture (module docstring)."""
    names = identity_name(teach_records)
    out, seen, count = [], set(), {}
    for r in teach_records:
        if r.form != "image_text" or r.general is not None or r.image is None or r.kind < 0:
            continue
        if r.fresh_image or r.heldout_phrasing or r.entity not in names:
            continue
        key = (r.entity, r.image)
        if key in seen:
            continue
        seen.add(key)
        count[r.entity] = count.get(r.entity, -1) + 1
        out.append(QARecord(uid=f"{r.uid}#identity", entity=r.entity, cls=r.cls, kind=IDENTITY_KIND,
                            phrasing=count[r.entity] % IDENTITY_CELLS,
                            question=IDENTITY_PROBE, answer=names[r.entity], form="image_text", image=r.image,
                            keys=(names[r.entity],), image_missing=r.image_missing))
    for i, k in enumerate(none_keys):
        out.append(QARecord(uid=f"identity-none#{i}", entity=NO_ENTITY, cls="General", kind=IDENTITY_KIND,
                            phrasing=i % NONE_CELLS, question=IDENTITY_PROBE, answer=NO_ENTITY_ANSWER,
                            form="image_text", image=k, keys=(NO_ENTITY_ANSWER,)))
    return out


def with_pictures(image_fn: Callable[[QARecord], Image.Image], pictures: dict[str, Image.Image]
                  ) -> Callable[[QARecord], Image.Image]:
    """``image_fn`` that serves the in-memory ``pictures`` by key first."""
    def fn(r: QARecord) -> Image.Image:
        im: Optional[Image.Image] = pictures.get(str(r.image)) if r.image is not None else None
        return im if im is not None else image_fn(r)
    return fn


__all__ = ["IDENTITY_KIND", "NO_ENTITY", "NONE_PREFIX", "identity_name", "entity_free_pictures", "identity_records",
           "with_pictures"]
