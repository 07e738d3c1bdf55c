"""Typed records shared by the MLUBench loader, the synthetic benchmark, teaching, unlearning and evaluation."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

FORMS = ("image_text", "text_only")
VARIANTS = ("lower", "no_article", "typo", "alias")
GENERAL_KINDS = ("scene", "world")
GENERAL_ENTITY = "(general)"  # the entity of every general-utility record (it is about no entity of the world)


@dataclass(frozen=True)
class QARecord:
    """One question/answer pair about one entity.

    uid:        unique and stable across loads ("<file stem>#<record id>[#text]")
    entity:     entity name as in the benchmark ("Sheep", "Vorla Quintessa")
    cls:        class ("Animals", "Personage", ...)
    kind:       question kind within the class, 0..4 (same kind = same fact asked)
    phrasing:   phrasing index of the question within its kind
    question:   the question text without the "<image>" token
    answer:     the ground-truth answer
    form:       "image_text" (an image comes with the question) or "text_only" (the question names the entity)
    image:      absolute path of the image file (may not exist: see ``image_missing``), None for text_only
    keys:       key-fact strings whose presence in an answer reveals the ground truth (entity name / fact tokens)
    task:       "A".."D" when the record belongs to a task file, else None
    split:      "forget" / "retain" when it belongs to a task file, else None
    heldout_phrasing: the phrasing family never used for teaching or training (paraphrase tests)
    fresh_image: an image variation never used for teaching (generalisation tests)
    image_missing: the image file is absent; a deterministic surrogate per entity stands in (counted, reported)
    variant:    how a text-only question writes the entity (world v2): None = its name as taught; "lower" (lower
                case), "no_article" (without its article), "typo" (one typo), "alias" (the entity's alias)
    heldout_variant: a name-variant record never taught (the name_variants / alias test forms); the alias records
                that teach "X, also known as Y" have variant "alias" and heldout_variant False
    general:    an entity-free general-utility question (world v2): "scene" (about the picture: colour, shape,
                count, position of objects) or "world" (a text-only general fact); its entity is ``GENERAL_ENTITY``
    """

    uid: str
    entity: str
    cls: str
    kind: int
    phrasing: int
    question: str
    answer: str
    form: str = "image_text"
    image: Optional[str] = None
    keys: tuple[str, ...] = ()
    task: Optional[str] = None
    split: Optional[str] = None
    heldout_phrasing: bool = False
    fresh_image: bool = False
    image_missing: bool = False
    variant: Optional[str] = None
    heldout_variant: bool = False
    general: Optional[str] = None

    @property
    def taught(self) -> bool:
        """A teaching record: none of the held-out flags (phrasing family, picture, name variant) is set."""
        return not (self.heldout_phrasing or self.fresh_image or self.heldout_variant)


@dataclass
class Benchmark:
    """A loaded benchmark (MLUBench or the synthetic one: same format, same loader).

    records:  every QA pair of every entity (from Entities/)
    tasks:    tasks["A"]["forget"] -> the records of that task file, in file order
    entities: entity name -> class
    surrogate_images: how many records had a missing image file and got the entity's surrogate
    aliases:  entity name -> its aliases (world v2: one each; MLUBench: none)
    """

    root: Path
    records: list[QARecord]
    tasks: dict[str, dict[str, list[QARecord]]] = field(default_factory=dict)
    entities: dict[str, str] = field(default_factory=dict)
    surrogate_images: int = 0
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
