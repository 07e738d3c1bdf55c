"""The synthetic MLUBench: the embedded default benchmark, written in MLUBench's own format.

Fictitious entities (generated pronounceable names) in MLUBench's 9 classes, 5 question kinds per class (kind 0 =
"what is the name of this <noun>?", kinds 1-4 = entity-specific facts), several phrasing families per kind, procedural
images (``images.py``), text-only forms that name the entity, and tasks A-D with forget and retain sets. Because
the entities do not exist, a base model knows them only after being taught on them.

Per entity and kind there are ``phrasings_per_kind`` phrasing families, each with an image+text wording ("What is
this person's profession?") and a text-only wording ("What is Vorla Quintessa's profession?"). The LAST family is
held out (``heldout_phrasing=True``): it is never used for teaching or training, only to test generalisation to
unseen wordings. Each entity has ``teach_images`` image variations plus ``fresh_images`` fresh ones
(``fresh_image=True``, never used for teaching). Every (kind, family, image) triple is one image+text record;
every (kind >= 1, family) pair is one text-only record (kind 0 has no text-only form: naming the entity would answer
it).

Answers are short (1-3 words), the fact itself; ``keys`` = (the fact,), for kind 0 (the entity name,). Facts are
unique within a class for every kind, so a fact identifies its entity.

Tasks: ``forget_per_task`` entities per task, classes taken round robin (seeded class order), each class keeping at
least one entity that no task forgets. Per class, of the never-forgotten entities, ``max(1, n // 3)`` (when n >= 2)
are *never requested*: they appear in no task file (the "never-requested" retain metric); the others form the retain
set of every task that forgets an entity of their class.

World v2 (``world="v2"``: the ``default``, ``tiny-v2``, ``medium`` and ``large`` presets; ``v1`` and ``tiny`` keep
world v1):

- pictures are scenes (``scenes.py``): the entity's object placed anew on a background of a pool every entity
  shares, with distractors and partial occlusion; the ``fresh_images`` held-out pictures are new scenes;
- 8 wording families per kind from different sentence shapes, the last ``heldout_families`` = 3 held out;
- each entity has one alias (``lists/aliases.json``), taught alone in ``ALIAS_TAUGHT_FAMILIES`` taught families and
  once as "X (also known as Y)" (``variant="alias"``), and tested alone in the other taught families
  (``heldout_variant``); its name is tested as people type it (``variant`` "lower", "no_article" for the classes
  written with "the", "typo": one edit, ``typo_of``), in two taught families each, never taught verbatim;
- general utility (``Entities/_general.json``, entity ``records.GENERAL_ENTITY``): entity-free questions about
  pictures of plain shapes (colour, shape, count, position; ``general="scene"``) and text-only facts of the world
  (next day or month, sums, opposites; ``general="world"``), the last wording of each held out.

Output (``write_synthetic``): Entities/, Tasks/, lists/classes, lists/tasks, lists/never_requested.txt,
downloaded_images/<Class>/<Entity>/img_<v>.png, synthetic.json (config, format version, counts). Every JSON record
carries a ``meta`` dict (entity, class, kind, phrasing, form, keys, heldout_phrasing, fresh_image, image_variant), so
``mlubench.load_benchmark`` reads it exactly. Same config -> byte-identical files.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

from lumoe_engine.data.images import identity_for, render
from lumoe_engine.data.scenes import background_pool, pick_background, render_scene
from lumoe_engine.seeding import stable_seed

FORMAT_VERSION = 2  # bump when the generated content changes: cached benchmarks are then rewritten
N_KINDS = 5
SPLITS = ("forget", "retain")
GENERAL_FILE = "_general"  # Entities/_general.json: world v2's general-utility records
TASK_NAMES = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class SyntheticConfig:
    """What to generate. Presets: ``SyntheticConfig.preset("tiny" | "default" | "medium" | "large")``.

    entities_per_class: entities in each of the 9 classes (36 for the default)
    phrasings_per_kind: phrasing families per kind, 2..9; the last one is held out (never taught)
    teach_images / fresh_images: image variations per entity used for teaching / held out
    forget_per_task, n_tasks: forget entities per task (classes round robin), number of tasks (A, B, ...)
    image_size: side of the PNG images in pixels
    text_only: also write the text-only forms (questions naming the entity)
    seed: names, facts, images, task assignment
    """

    name: str = "default"
    entities_per_class: int = 4
    n_classes: int = 9
    phrasings_per_kind: int = 5
    teach_images: int = 6
    fresh_images: int = 2
    image_size: int = 64
    n_tasks: int = 4
    forget_per_task: int = 5
    text_only: bool = True
    seed: int = 0
    # world v2 (``world="v2"``, the default preset): pictures are scenes (``scenes.py``), the last
    # ``heldout_families`` wording families are held out, each entity has an alias and name-variant test queries,
    # and entity-free general-utility records are written. ``world="v1"`` is the earlier world (icons, one held-out
    # family, no variants, no general set), kept as a preset for comparison.
    world: str = "v1"
    heldout_families: int = 1
    general_pictures: int = 24            # v2: pictures per general scene-question kind

    @staticmethod
    def preset(name: str) -> "SyntheticConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown synthetic preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name]

    @property
    def n_entities(self) -> int:
        return self.entities_per_class * self.n_classes

    def validate(self) -> None:
        def bad(field, want):
            raise ValueError(f"SyntheticConfig {self.name!r}: {field} = {getattr(self, field)!r}; expected {want}")

        if not 1 <= self.n_classes <= len(CLASSES):
            bad("n_classes", f"1..{len(CLASSES)}")
        if not 2 <= self.entities_per_class <= 40:
            bad("entities_per_class", "2..40 (each class keeps at least one entity no task forgets)")
        if self.world not in WORLDS:
            bad("world", f"one of {WORLDS}")
        if self.world == "v1" and not 2 <= self.phrasings_per_kind <= 2 + len(_GENERIC) + 1:
            bad("phrasings_per_kind", f"2..{2 + len(_GENERIC) + 1} (the last family is held out)")
        if self.world == "v1" and self.heldout_families != 1:
            bad("heldout_families", "1 in world v1")
        if self.world == "v2" and (self.phrasings_per_kind != len(_V2_FACT) or self.heldout_families != _V2_HELD):
            bad("phrasings_per_kind", f"{len(_V2_FACT)} families with heldout_families = {_V2_HELD} in world v2")
        if self.world == "v2" and not 4 <= self.general_pictures <= 200:
            bad("general_pictures", "4..200")
        if self.teach_images < 1 or self.fresh_images < 0 or self.teach_images + self.fresh_images > 18:
            bad("teach_images", "teach_images >= 1, fresh_images >= 0, together <= 18")
        if self.image_size < 16:
            bad("image_size", ">= 16 pixels")
        if not 1 <= self.n_tasks <= len(TASK_NAMES) or self.forget_per_task < 1:
            bad("n_tasks", "1..26 tasks with forget_per_task >= 1")
        cap = self.n_classes * (self.entities_per_class - 1)
        if self.n_tasks * self.forget_per_task > cap:
            bad("forget_per_task", f"n_tasks * forget_per_task <= {cap} (every class keeps one entity)")

    def to_dict(self) -> dict:
        return asdict(self)

    def digest(self) -> str:
        """Hash of the config and the generator's format version (names the cache folder)."""
        blob = json.dumps({"format_version": FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


WORLDS = ("v1", "v2")
_V2 = dict(world="v2", phrasings_per_kind=8, heldout_families=3, teach_images=12, fresh_images=4)
PRESETS: dict[str, SyntheticConfig] = {
    # world v1 (icons): the unit tests' small world and the earlier default, kept for comparison
    "tiny": SyntheticConfig(name="tiny", entities_per_class=2, forget_per_task=2, teach_images=4),
    "v1": SyntheticConfig(name="v1"),
    # world v2 (scenes, 8 wording families of which 3 held out, aliases, name variants, general utility)
    "default": SyntheticConfig(name="default", **_V2),
    "tiny-v2": SyntheticConfig(name="tiny-v2", entities_per_class=2, forget_per_task=2, general_pictures=8,
                               **{**_V2, "teach_images": 4, "fresh_images": 2}),
    "medium": SyntheticConfig(name="medium", entities_per_class=8, forget_per_task=10, **_V2),
    "large": SyntheticConfig(name="large", entities_per_class=12, forget_per_task=15, **_V2),
}

# ---------------------------------------------------------------------------------------------------- vocabulary
_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "k", "kr", "l", "m", "n", "p", "pr", "r", "s", "st", "t", "tr",
           "th", "v", "z", "qu", "sh", "h", "c", "j")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ae", "io", "ei", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "x", "th", "nd", "rk")


class _Words:
    """Unique pronounceable words (2-3 syllables, 4-9 letters), never repeated within one benchmark."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def word(self, syllables: Optional[int] = None, suffix: str = "") -> str:
        for _ in range(10000):
            n = syllables or self.rng.choice((2, 2, 3))
            w = "".join(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) for _ in range(n))
            w += self.rng.choice(_CODAS) + suffix
            if 4 <= len(w) <= 9 and w not in self.used:
                self.used.add(w)
                return w.capitalize()
        raise RuntimeError("name generator exhausted; lower entities_per_class")

    def person(self) -> str:
        return f"{self.word(2)} {self.word()}"


def _pool(items: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in items.split(",") if s.strip())


_POOLS = {
    "profession": _pool("lantern maker, glassblower, cartographer, beekeeper, clockmaker, violinist, shipwright, "
                        "botanist, puppeteer, stonemason, perfumer, falconer, bookbinder, weaver, chemist, "
                        "locksmith, potter, engraver, tailor"),
    "work": _pool("Codex, Atlas, Symphony, Theorem, Engine, Chronicle, Sonata, Lantern, Almanac, Canticle, Machine, "
                  "Garden, Ballad, Compass, Tapestry"),
    "food": _pool("river clams, moss, beetles, figs, reed shoots, snails, sea grass, acorns, crickets, mushrooms, "
                  "berries, minnows, lichen, roots, seeds, krill, nectar"),
    "region": _pool("Marshes, Highlands, Coast, Valley, Steppe, Islands, Forest, Delta, Plateau, Fjords, Dunes, "
                    "Lowlands, Canyons, Savanna"),
    "body_type": _pool("gas giant, ice giant, dwarf planet, rocky planet, lava world, ocean world, ringed giant, "
                       "moonlet, comet, brown dwarf, ice moon, desert world, iron planet, carbon planet, twin planet"),
    "purpose": _pool("grain store, observatory, royal mint, lighthouse, monastery, court house, palace, fortress, "
                     "library, bathhouse, market hall, prison, chapel, shipyard, school, barracks"),
    "setting": _pool("floating bakery, moon base, undersea school, cloud city, haunted zoo, desert train, jungle "
                     "library, toy factory, pirate island, snowy village, robot farm, candy volcano, sky harbor, "
                     "tiny planet"),
    "product": _pool("solar kettles, paper drones, glass bicycles, smart looms, rain sensors, wind clocks, sand "
                     "batteries, cloud maps, moss bricks, river turbines, ink printers, salt lamps, tidal pumps, "
                     "silk cables, frost locks"),
    "plot": _pool("stolen comet, haunted lighthouse, lost submarine, time loop heist, robot uprising, desert rescue, "
                  "frozen city, sunken crown, last train, silent planet, mirror duel, clockwork war, burning library, "
                  "island prison"),
    "growth": _pool("climbing vine, creeping mat, tall tree, low shrub, tufted grass, floating rosette, hanging "
                    "epiphyte, spiny cushion, tall reed, trailing runner, bulbous herb, woody liana, tree fern, "
                    "dwarf bush"),
    "colour": _pool("crimson, teal, amber, violet, ivory, indigo, coral, gold, lilac, scarlet, ochre, azure, jade, "
                    "magenta, silver"),
    "animal": _pool("Hare, Finch, Newt, Otter, Lynx, Heron, Beetle, Crane, Toad, Vole, Ibis, Moth, Marten, Gecko"),
    "plant": _pool("Fern, Lily, Moss, Vine, Thistle, Orchid, Palm, Reed, Clover, Sage, Poppy, Ivy, Laurel, Briar"),
    "building": _pool("Tower, Hall, Gate, Bridge, Temple, Palace, Citadel, Abbey, Arena, Lighthouse, Pavilion, "
                      "Fortress, Basilica, Observatory"),
    "cartoon": _pool("Club, Squad, Academy, Island, Express, Patrol, Circus, Quest, Tales, Gang, Rangers, Kingdom"),
    "company": _pool("Corp, Systems, Labs, Industries, Works, Dynamics, Holdings, Group, Foundry, Motors, Networks, "
                     "Robotics"),
    "movie": _pool("Rising, Protocol, Horizon, Requiem, Descent, Signal, Odyssey, Legacy, Paradox, Frontier, "
                   "Eclipse, Reckoning"),
    "series": _pool("Files, Station, Diaries, Street, Chronicles, Heights, Bay, Manor, Precinct, Harbor, Falls, "
                    "County"),
}


# Value makers: (words, rng, used values of this kind in this class) -> fact string.
def _from_pool(pool):
    def make(w: _Words, rng: random.Random, used: set) -> str:
        free = [p for p in _POOLS[pool] if p not in used]
        if not free:
            return f"{w.word(2)} {rng.choice(_POOLS[pool])}"
        return rng.choice(free)
    return make


def _gen(kind):
    def make(w: _Words, rng: random.Random, used: set) -> str:
        if kind == "person":
            return w.person()
        if kind == "word":
            return w.word()
        if kind == "family_animal":
            return w.word(2, suffix="idae")
        if kind == "family_plant":
            return w.word(2, suffix="aceae")
        if kind == "region":
            return f"{w.word()} {rng.choice(_POOLS['region'])}"
        if kind == "work":
            return f"{w.word(2)} {rng.choice(_POOLS['work'])}"
        raise ValueError(kind)
    return make


def _number(lo, hi, unit="", unit1=None):
    def make(w: _Words, rng: random.Random, used: set) -> str:
        for _ in range(1000):
            n = rng.randint(lo, hi)
            s = f"{n} {unit1 if n == 1 and unit1 else unit}".strip()
            if s not in used:
                return s
        raise RuntimeError("number pool exhausted")
    return make


@dataclass(frozen=True)
class _Kind:
    attr: str  # noun phrase of the fact, for the generic phrasing families
    specific: tuple[tuple[str, str], ...]  # two (image wording, text wording) families; {ref}/{ref_pos} = name
    make: object


@dataclass(frozen=True)
class _Class:
    name: str
    noun: str
    ref: str  # how a text-only question names the entity: "{name}" or "the {name}"
    make_name: object
    kinds: tuple[_Kind, ...]  # kinds 1..4


def _names(suffix_pool=None, person=False, one_word=False):
    def make(w: _Words, rng: random.Random) -> str:
        if person:
            return w.person()
        if one_word:
            return w.word()
        return f"{w.word()} {rng.choice(_POOLS[suffix_pool])}"
    return make


def _K(attr, s1, s2, make):
    return _Kind(attr, (s1, s2), make)


CLASSES: tuple[_Class, ...] = (
    _Class("Animals", "animal", "the {name}", _names("animal"), (
        _K("diet", ("What does this animal eat?", "What does {ref} eat?"),
           ("What is the main food of this animal?", "What is the main food of {ref}?"), _from_pool("food")),
        _K("native region", ("Where is this animal found in the wild?", "Where is {ref} found in the wild?"),
           ("Which region is this animal native to?", "Which region is {ref} native to?"), _gen("region")),
        _K("family", ("What family does this animal belong to?", "What family does {ref} belong to?"),
           ("Which biological family includes this animal?", "Which biological family includes {ref}?"),
           _gen("family_animal")),
        _K("lifespan", ("How long does this animal live?", "How long does {ref} live?"),
           ("What is the typical lifespan of this animal?", "What is the typical lifespan of {ref}?"),
           _number(3, 80, "years", "year")),
    )),
    _Class("Astronomy", "celestial body", "{name}", _names(one_word=True), (
        _K("host star", ("Which star does this celestial body orbit?", "Which star does {ref} orbit?"),
           ("Around which star does this celestial body travel?", "Around which star does {ref} travel?"),
           _gen("word")),
        _K("classification", ("What type of celestial body is this?", "What type of celestial body is {ref}?"),
           ("How is this celestial body classified?", "How is {ref} classified?"), _from_pool("body_type")),
        _K("orbital period", ("How long does this celestial body take to orbit its star?",
                              "How long does {ref} take to orbit its star?"),
           ("How many days does one orbit of this celestial body last?", "How many days does one orbit of {ref} last?"),
           _number(20, 999, "days")),
        _K("number of moons", ("How many moons does this celestial body have?", "How many moons does {ref} have?"),
           ("How many natural satellites circle this celestial body?", "How many natural satellites circle {ref}?"),
           _number(1, 60, "moons", "moon")),
    )),
    _Class("Buildings", "building", "{name}", _names("building"), (
        _K("location", ("Where is this building located?", "Where is {ref} located?"),
           ("In which city does this building stand?", "In which city does {ref} stand?"), _gen("word")),
        _K("architect", ("Who designed this building?", "Who designed {ref}?"),
           ("Which architect built this building?", "Which architect built {ref}?"), _gen("person")),
        _K("year of completion", ("When was this building completed?", "When was {ref} completed?"),
           ("In what year was this building finished?", "In what year was {ref} finished?"), _number(1100, 1990)),
        _K("original purpose", ("What was the original purpose of this building?", "What was the original purpose "
                                "of {ref}?"),
           ("What was this building first used for?", "What was {ref} first used for?"), _from_pool("purpose")),
    )),
    _Class("Cartoon", "cartoon", "{name}", _names("cartoon"), (
        _K("creator", ("Who created this cartoon?", "Who created {ref}?"),
           ("Which artist drew this cartoon?", "Which artist drew {ref}?"), _gen("person")),
        _K("main character", ("Who is the main character of this cartoon?", "Who is the main character of {ref}?"),
           ("Which character leads this cartoon?", "Which character leads {ref}?"), _gen("word")),
        _K("premiere year", ("When was this cartoon first aired?", "When was {ref} first aired?"),
           ("In what year did this cartoon premiere?", "In what year did {ref} premiere?"), _number(1930, 2020)),
        _K("setting", ("Where is this cartoon set?", "Where is {ref} set?"),
           ("In which place does this cartoon take place?", "In which place does {ref} take place?"),
           _from_pool("setting")),
    )),
    _Class("Corporation", "company", "{name}", _names("company"), (
        _K("founder", ("Who founded this company?", "Who founded {ref}?"),
           ("Who started this company?", "Who started {ref}?"), _gen("person")),
        _K("headquarters", ("Where is this company headquartered?", "Where is {ref} headquartered?"),
           ("In which city is this company based?", "In which city is {ref} based?"), _gen("word")),
        _K("main product", ("What does this company make?", "What does {ref} make?"),
           ("What is the best-known product of this company?", "What is the best-known product of {ref}?"),
           _from_pool("product")),
        _K("founding year", ("When was this company founded?", "When was {ref} founded?"),
           ("In what year was this company established?", "In what year was {ref} established?"),
           _number(1850, 2015)),
    )),
    _Class("Movies", "movie", "{name}", _names("movie"), (
        _K("director", ("Who directed this movie?", "Who directed {ref}?"),
           ("Which filmmaker made this movie?", "Which filmmaker made {ref}?"), _gen("person")),
        _K("release year", ("When was this movie released?", "When was {ref} released?"),
           ("In what year did this movie come out?", "In what year did {ref} come out?"), _number(1920, 2023)),
        _K("lead actor", ("Who stars in this movie?", "Who stars in {ref}?"),
           ("Who plays the lead role in this movie?", "Who plays the lead role in {ref}?"), _gen("person")),
        _K("plot", ("What is this movie about?", "What is {ref} about?"),
           ("What story does this movie tell?", "What story does {ref} tell?"), _from_pool("plot")),
    )),
    _Class("Personage", "person", "{name}", _names(person=True), (
        _K("profession", ("What is this person's profession?", "What is {ref_pos} profession?"),
           ("What does this person do for a living?", "What does {ref} do for a living?"), _from_pool("profession")),
        _K("birthplace", ("Where was this person born?", "Where was {ref} born?"),
           ("In which town was this person born?", "In which town was {ref} born?"), _gen("word")),
        _K("most famous work", ("What is this person's most famous work?", "What is {ref_pos} most famous work?"),
           ("Which work made this person famous?", "Which work made {ref} famous?"), _gen("work")),
        _K("birth year", ("When was this person born?", "When was {ref} born?"),
           ("In what year was this person born?", "In what year was {ref} born?"), _number(1700, 1990)),
    )),
    _Class("Plants", "plant", "the {name}", _names("plant"), (
        _K("family", ("What family does this plant belong to?", "What family does {ref} belong to?"),
           ("Which botanical family includes this plant?", "Which botanical family includes {ref}?"),
           _gen("family_plant")),
        _K("native region", ("Where does this plant grow wild?", "Where does {ref} grow wild?"),
           ("Which region is this plant native to?", "Which region is {ref} native to?"), _gen("region")),
        _K("growth form", ("How does this plant grow?", "How does {ref} grow?"),
           ("What form does this plant grow in?", "What form does {ref} grow in?"), _from_pool("growth")),
        _K("flower colour", ("What colour are the flowers of this plant?", "What colour are the flowers of {ref}?"),
           ("Which colour does this plant bloom in?", "Which colour does {ref} bloom in?"), _from_pool("colour")),
    )),
    _Class("TV series", "TV series", "{name}", _names("series"), (
        _K("creator", ("Who created this TV series?", "Who created {ref}?"),
           ("Who came up with this TV series?", "Who came up with {ref}?"), _gen("person")),
        _K("premiere year", ("When did this TV series premiere?", "When did {ref} premiere?"),
           ("In what year did this TV series first air?", "In what year did {ref} first air?"), _number(1950, 2023)),
        _K("lead actor", ("Who stars in this TV series?", "Who stars in {ref}?"),
           ("Who plays the main role in this TV series?", "Who plays the main role in {ref}?"), _gen("person")),
        _K("number of seasons", ("How many seasons does this TV series have?", "How many seasons does {ref} have?"),
           ("How many seasons were made of this TV series?", "How many seasons were made of {ref}?"),
           _number(1, 25, "seasons", "season")),
    )),
)

# Generic families for kinds 1-4 (image wording, text wording), used after the two specific ones.
_GENERIC = (
    ("What is the {attr} of this {noun}?", "What is the {attr} of {ref}?"),
    ("Tell me the {attr} of this {noun}.", "Tell me the {attr} of {ref}."),
    ("Do you know the {attr} of this {noun}?", "Do you know the {attr} of {ref}?"),
    ("Name the {attr} of this {noun}.", "Name the {attr} of {ref}."),
    ("Please state the {attr} of this {noun}.", "Please state the {attr} of {ref}."),
    ("What would you say is the {attr} of this {noun}?", "What would you say is the {attr} of {ref}?"),
)
_HELDOUT = ("Could you tell me the {attr} of the {noun} in the picture?", "Could you tell me the {attr} of {ref}?")
# Kind 0 (the name): image wordings only.
_NAME_FAMILIES = ("What is the name of this {noun}?", "What is this {noun} called?", "Which {noun} is this?",
                  "Tell me the name of this {noun}.", "Can you name this {noun}?", "Do you know the name of this {noun}?",
                  "Please identify this {noun}.", "How is this {noun} known?")
_NAME_HELDOUT = "Could you tell me the name of the {noun} in the picture?"


def _possessive(s: str) -> str:
    return s + ("'" if s.endswith("s") else "'s")


def _ref(cls: _Class, name: str) -> dict:
    ref = cls.ref.format(name=name)
    return {"ref": ref, "ref_pos": _possessive(ref)}


def name_families(cls: _Class, p: int) -> list[str]:
    """The p image wordings of kind 0 for a class; the last is the held-out family."""
    fam = list(_NAME_FAMILIES)
    if cls.name == "Personage":
        fam[:2] = ["What is this person's name?", "Who is this person?"]
    return [f.format(noun=cls.noun) for f in fam[: p - 1]] + [_NAME_HELDOUT.format(noun=cls.noun)]


def fact_families(cls: _Class, kind: _Kind, p: int) -> list[tuple[str, str]]:
    """The p (image, text) wording templates of a fact kind; the last is the held-out family. {ref}/{ref_pos} left."""
    fam = list(kind.specific) + [(a.replace("{attr}", kind.attr).replace("{noun}", cls.noun),
                                  b.replace("{attr}", kind.attr)) for a, b in _GENERIC]
    held = (_HELDOUT[0].replace("{attr}", kind.attr).replace("{noun}", cls.noun), _HELDOUT[1].replace("{attr}",
                                                                                                   kind.attr))
    return fam[: p - 1] + [held]


# World v2 wordings: 8 families per kind from different sentence shapes (questions, imperatives, "I'd like to
# know ...", embedded clauses); the last _V2_HELD are held out (never taught, never in a request).
_V2_HELD = 3
_V2_FACT = (
    None, None,  # the kind's two specific questions
    ("Tell me the {attr} of this {noun}.", "Tell me the {attr} of {ref}."),
    ("I'd like to know the {attr} of this {noun}.", "I'd like to know the {attr} of {ref}."),
    ("Do you know what the {attr} of this {noun} is?", "Do you know what the {attr} of {ref} is?"),
    # held out
    ("Could you tell me the {attr} of the {noun} in the picture?", "Could you tell me the {attr} of {ref}?"),
    ("Name the {attr} of the {noun} shown here.", "Name the {attr} of {ref}, please."),
    ("I wonder what the {attr} of this {noun} is.", "I wonder what the {attr} of {ref} is."),
)
_V2_NAME = ("What is the name of this {noun}?", "What is this {noun} called?", "Tell me the name of this {noun}.",
            "I'd like to know the name of this {noun}.", "Do you know which {noun} this is?",
            # held out
            "Could you tell me the name of the {noun} in the picture?", "Name the {noun} shown here.",
            "I wonder which {noun} this is.")
ALIAS_TAUGHT_FAMILIES = 2  # v2: taught families in which the alias alone names the entity (the rest: its test)


def v2_name_families(cls: _Class) -> list[str]:
    fam = list(_V2_NAME)
    if cls.name == "Personage":
        fam[:2] = ["What is this person's name?", "Who is this person?"]
    return [f.format(noun=cls.noun) for f in fam]


def v2_fact_families(cls: _Class, kind: _Kind) -> list[tuple[str, str]]:
    return [kind.specific[i] if f is None else (f[0].replace("{attr}", kind.attr).replace("{noun}", cls.noun),
                                                 f[1].replace("{attr}", kind.attr)) for i, f in enumerate(_V2_FACT)]


def typo_of(name: str, seed: int) -> str:
    """``name`` with one typo in its longest word: two adjacent inner letters swapped (a letter dropped where the
    swap would change nothing); deterministic in ``seed``."""
    words = name.split(" ")
    i = max(range(len(words)), key=lambda j: (len(words[j]), -j))
    w = words[i]
    if len(w) < 4:
        return name[:-1] if len(name) > 3 else name + name[-1]
    rng = random.Random(seed)
    for _ in range(20):
        k = rng.randint(1, len(w) - 3)
        t = w[:k] + w[k + 1] + w[k] + w[k + 2:]
        if t != w:
            break
    else:
        t = w[:1] + w[2:]
    words[i] = t
    return " ".join(words)


def name_variant_refs(cls: _Class, name: str, seed: int) -> dict[str, str]:
    """How a text-only question may write the entity (world v2 test forms): {"lower", "no_article" (classes written
    with an article only), "typo"} -> the reference that replaces ``{ref}``."""
    ref = cls.ref.format(name=name)
    out = {"lower": ref.lower(), "typo": cls.ref.format(name=typo_of(name, seed))}
    if cls.ref.startswith("the "):
        out["no_article"] = name
    return out


# General utility (world v2): entity-free questions the base is taught, measured after every request.
# scene kinds ask about a general picture (general.png files), world kinds are text-only facts.
_GENERAL_SCENE = (
    ("colour", ("What colour is the shape in this picture?", "Which colour does the shape in this picture have?",
                "Tell me the colour of the shape in this picture.", "I'd like to know the colour of the shape here.")),
    ("shape", ("What shape is in this picture?", "Which shape does this picture show?",
               "Tell me the shape in this picture.", "I'd like to know which shape is shown here.")),
    ("count", ("How many shapes are in this picture?", "How many shapes does this picture show?",
               "Tell me how many shapes are in this picture.", "I'd like to know how many shapes are shown here.")),
    ("position", ("Is the shape on the left or on the right?", "On which side of the picture is the shape?",
                  "Tell me on which side the shape is.", "I'd like to know whether the shape is left or right.")),
)
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")
_OPPOSITES = (("hot", "Cold"), ("up", "Down"), ("day", "Night"), ("big", "Small"), ("fast", "Slow"),
              ("wet", "Dry"), ("open", "Closed"), ("light", "Dark"), ("early", "Late"), ("full", "Empty"),
              ("loud", "Quiet"), ("old", "Young"))
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                 "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen")
_GENERAL_WORLD = (
    ("next day", ("What day comes after {x}?", "Which day follows {x}?", "Tell me the day after {x}.")),
    ("next month", ("What month comes after {x}?", "Which month follows {x}?", "Tell me the month after {x}.")),
    ("sum", ("What is {x} plus {y}?", "How much is {x} plus {y}?", "Tell me the sum of {x} and {y}.")),
    ("opposite", ("What is the opposite of {x}?", "Which word means the opposite of {x}?",
                  "Tell me the opposite of {x}.")),
)


# ------------------------------------------------------------------------------------------------------ generation
@dataclass
class _Entity:
    index: int
    name: str
    cls: _Class
    class_index: int
    facts: tuple[str, ...]  # kinds 1..4
    alias: Optional[str] = None  # world v2: the entity's other name

    @property
    def stem(self) -> str:
        return self.name.replace(" ", "_")


def _entities(config: SyntheticConfig) -> list[_Entity]:
    rng = random.Random(stable_seed("synthetic-names", config.seed))
    words = _Words(rng)
    out: list[_Entity] = []
    for ci, cls in enumerate(CLASSES[: config.n_classes]):
        used = [set() for _ in cls.kinds]
        names: set[str] = set()
        for _ in range(config.entities_per_class):
            name = cls.make_name(words, rng)
            while name in names:
                name = cls.make_name(words, rng)
            names.add(name)
            facts = []
            for k, kind in enumerate(cls.kinds):
                v = kind.make(words, rng, used[k])
                used[k].add(v)
                facts.append(v)
            out.append(_Entity(len(out), name, cls, ci, tuple(facts)))
    if config.world == "v2":  # after every name and fact, so the v1 draws are the same
        words.rng = random.Random(stable_seed("synthetic-aliases", config.seed))
        for e in out:
            e.alias = words.word()
    return out


def _assign_tasks(config: SyntheticConfig, ents: list[_Entity]):
    """forget[t], retain[t] (entity lists) and the never-requested entities."""
    rng = random.Random(stable_seed("synthetic-tasks", config.seed))
    by_cls: dict[int, list[_Entity]] = {}
    for e in ents:
        by_cls.setdefault(e.class_index, []).append(e)
    order = list(by_cls)
    rng.shuffle(order)
    taken = {c: 0 for c in by_cls}
    forget: list[list[_Entity]] = []
    p = 0
    for _ in range(config.n_tasks):
        picks: list[_Entity] = []
        while len(picks) < config.forget_per_task:
            c = order[p % len(order)]
            p += 1
            if taken[c] < len(by_cls[c]) - 1:
                picks.append(by_cls[c][taken[c]])
                taken[c] += 1
        forget.append(picks)
    retain_pool, never = {}, []
    for c, lst in by_cls.items():
        left = lst[taken[c]:]
        n_never = max(1, len(left) // 3) if len(left) >= 2 else 0
        retain_pool[c] = left[: len(left) - n_never]
        never.extend(left[len(left) - n_never:])
    retain = []
    for picks in forget:
        classes = sorted({e.class_index for e in picks})
        retain.append([e for c in classes for e in retain_pool[c]])
    never.sort(key=lambda e: e.index)
    return forget, retain, never


def _answers(e: _Entity):
    """kind -> (answer, keys) of entity ``e``: its name for kind 0, else the fact, first letter capitalised."""
    def answer_of(kind):
        v = e.name if kind == 0 else e.facts[kind - 1]
        return v[0].upper() + v[1:], (v,)
    return answer_of


def _image_text_records(config: SyntheticConfig, e: _Entity, names, facts, meta, rid) -> list[dict]:
    """Every (family, picture, kind) image+text record of ``e``; ``meta`` and ``rid(phrasing, picture, kind)``
    (the record id) are the world's own."""
    answer_of = _answers(e)
    out = []
    for phr in range(config.phrasings_per_kind):
        for v in range(config.teach_images + config.fresh_images):
            image = f"downloaded_images/{e.cls.name}/{e.stem}/img_{v:02d}.png"
            for kind in range(N_KINDS):
                q = names[phr] if kind == 0 else facts[kind - 1][phr][0]
                ans, keys = answer_of(kind)
                out.append({"id": rid(phr, v, kind), "image": image,
                            "conversations": [{"from": "human", "value": "<image>\n" + q},
                                              {"from": "gpt", "value": ans}],
                            "meta": meta(kind, phr, "image_text", keys, v >= config.teach_images, v)})
    return out


def _entity_records(config: SyntheticConfig, e: _Entity) -> list[dict]:
    P = config.phrasings_per_kind
    recs: list[dict] = []
    names = name_families(e.cls, P)
    facts = [fact_families(e.cls, k, P) for k in e.cls.kinds]
    ref = _ref(e.cls, e.name)

    def meta(kind, phr, form, keys, fresh, variant):
        return {"entity": e.name, "class": e.cls.name, "kind": kind, "phrasing": phr, "form": form,
                "keys": list(keys), "heldout_phrasing": phr == P - 1, "fresh_image": fresh, "image_variant": variant}

    answer_of = _answers(e)
    recs += _image_text_records(config, e, names, facts, meta,
                                lambda phr, v, kind: str(phr * 100000 + e.index * 100 + v * N_KINDS + kind))
    if config.text_only:
        for phr in range(P):
            for kind in range(1, N_KINDS):
                q = facts[kind - 1][phr][1].format(**ref)
                q = q[0].upper() + q[1:]
                ans, keys = answer_of(kind)
                recs.append({"id": str(phr * 100000 + e.index * 100 + 90 + kind),
                             "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": ans}],
                             "meta": meta(kind, phr, "text_only", keys, False, None)})
    return recs


def _v2_entity_records(config: SyntheticConfig, e: _Entity) -> list[dict]:
    """World v2 records of one entity (module docstring of ``scenes.py`` for the pictures): image+text in every
    family x picture x kind, text-only in every family x fact kind, the alias (taught alone in
    ``ALIAS_TAUGHT_FAMILIES`` taught families and once as "X (also known as Y)", tested alone in the other taught
    families) and the name variants (lower case, no article, one typo; tested in two taught families each)."""
    P = config.phrasings_per_kind
    taught = list(range(P - config.heldout_families))
    names = v2_name_families(e.cls)
    facts = [v2_fact_families(e.cls, k) for k in e.cls.kinds]
    recs: list[dict] = []

    def meta(kind, phr, form, keys, fresh, v, variant=None, held_variant=False):
        return {"entity": e.name, "class": e.cls.name, "kind": kind, "phrasing": phr, "form": form, "keys": list(keys),
                "heldout_phrasing": phr >= len(taught), "fresh_image": fresh, "image_variant": v,
                "variant": variant, "heldout_variant": held_variant, "general": None}

    answer_of = _answers(e)
    recs += _image_text_records(config, e, names, facts, meta, lambda phr, v, kind: f"it-{phr}-{v}-{kind}")

    def text(tag, phr, kind, ref, variant=None, held_variant=False):
        q = facts[kind - 1][phr][1].format(ref=ref, ref_pos=_possessive(ref))
        ans, keys = answer_of(kind)
        recs.append({"id": f"{tag}-{phr}-{kind}", "conversations": [{"from": "human", "value": q[0].upper() + q[1:]},
                                                                    {"from": "gpt", "value": ans}],
                     "meta": meta(kind, phr, "text_only", keys, False, None, variant, held_variant)})

    ref = e.cls.ref.format(name=e.name)
    for phr in range(P):
        for kind in range(1, N_KINDS):
            text("to", phr, kind, ref)
    rng = random.Random(stable_seed("synthetic-variants", config.seed, e.name))
    fams = taught[:]
    rng.shuffle(fams)
    k = ALIAS_TAUGHT_FAMILIES
    for kind in range(1, N_KINDS):
        for phr in fams[:k]:
            text("alias", phr, kind, e.alias, "alias")
        text("aka", fams[k], kind, f"{ref} (also known as {e.alias})", "alias")
        for phr in fams[k + 1:]:
            text("alias", phr, kind, e.alias, "alias", True)
    for variant, vref in name_variant_refs(e.cls, e.name, stable_seed("synthetic-typo", config.seed, e.name)).items():
        for phr in sorted(rng.sample(taught, 2)):
            for kind in range(1, N_KINDS):
                text(variant, phr, kind, vref, variant, True)
    return recs


def _general_records(config: SyntheticConfig, pool) -> tuple[list[dict], dict[str, object]]:
    """World v2's general-utility records (entity ``GENERAL_ENTITY``) and their pictures {relative path: image}."""
    from lumoe_engine.data.records import GENERAL_ENTITY
    from lumoe_engine.data.scenes import GENERAL_COLOURS, GENERAL_SHAPES, GeneralObject, render_general

    rng = random.Random(stable_seed("synthetic-general", config.seed))
    colours = sorted(GENERAL_COLOURS)
    recs, images = [], {}

    def add(kind, phr, n_phr, question, answer, image=None, general="scene"):
        m = {"entity": GENERAL_ENTITY, "class": "General", "kind": kind, "phrasing": phr,
             "form": "image_text" if image else "text_only", "keys": [answer], "heldout_phrasing": phr == n_phr - 1,
             "fresh_image": False, "image_variant": None, "variant": None, "heldout_variant": False,
             "general": general}
        rec = {"id": f"g{kind}-{len(recs)}", "conversations": [{"from": "human", "value": (
            "<image>\n" if image else "") + question}, {"from": "gpt", "value": answer}], "meta": m}
        if image:
            rec["image"] = image
        recs.append(rec)

    for kind, (what, wordings) in enumerate(_GENERAL_SCENE):
        for i in range(config.general_pictures):
            col, shape = rng.choice(colours), rng.choice(GENERAL_SHAPES)
            if what in ("colour", "shape"):
                objs = [GeneralObject(shape, col, rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65),
                                      rng.uniform(0.20, 0.28))]
                ans = (col if what == "colour" else shape).capitalize()
            elif what == "count":
                n = 1 + i % 3
                slots = rng.sample([(x, y) for x in (0.22, 0.5, 0.78) for y in (0.25, 0.75)], n)
                objs = [GeneralObject(shape, col, x, y, rng.uniform(0.10, 0.13)) for x, y in slots]
                ans = _NUMBER_WORDS[n].capitalize()
            else:
                left = i % 2 == 0
                objs = [GeneralObject(shape, col, rng.uniform(0.2, 0.3) if left else rng.uniform(0.7, 0.8),
                                      rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.2))]
                ans = "Left" if left else "Right"
            path = f"downloaded_images/General/{what}_{i:03d}.png"
            images[path] = render_general(objs, pool[rng.randrange(len(pool))],
                                          stable_seed("general-image", config.seed, what, i), size=config.image_size)
            for phr, q in enumerate(wordings):
                add(kind, phr, len(wordings), q, ans, path)
    base = len(_GENERAL_SCENE)
    for j, (what, wordings) in enumerate(_GENERAL_WORLD):
        if what == "next day":
            facts = [((d,), _DAYS[(i + 1) % 7]) for i, d in enumerate(_DAYS)]
        elif what == "next month":
            facts = [((m,), _MONTHS[(i + 1) % 12]) for i, m in enumerate(_MONTHS)]
        elif what == "sum":
            pairs = sorted(rng.sample([(x, y) for x in range(1, 10) for y in range(1, 10)], 16))
            facts = [((str(x), str(y)), str(x + y)) for x, y in pairs]
        else:
            facts = [((a,), b) for a, b in _OPPOSITES]
        for args, ans in facts:
            for phr, w in enumerate(wordings):
                q = w.format(x=args[0], y=args[-1])
                add(base + j, phr, len(wordings), q, ans, None, "world")
    return recs, images


def _dump(path: Path, obj) -> None:
    """JSON; a list of records is written one record per line (compact, still readable and diffable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(obj, list):
        text = "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in obj) + "\n]\n"
    else:
        text = json.dumps(obj, ensure_ascii=False, indent=1) + "\n"
    path.write_text(text, encoding="utf-8")


def write_synthetic(out_dir: Union[str, Path], config: Optional[SyntheticConfig] = None) -> Path:
    """Writes the synthetic benchmark for ``config`` into ``out_dir`` (created; must be empty or absent).

    Returns ``out_dir``. Deterministic: the same config writes byte-identical files.
    """
    config = _as_config(config)
    config.validate()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: not empty; write_synthetic needs an empty or absent folder")
    out.mkdir(parents=True, exist_ok=True)
    ents = _entities(config)
    forget, retain, never = _assign_tasks(config, ents)
    per_entity = {}
    v2 = config.world == "v2"
    pool = background_pool(config.seed) if v2 else None
    for e in ents:
        recs = _v2_entity_records(config, e) if v2 else _entity_records(config, e)
        per_entity[e.name] = recs
        _dump(out / "Entities" / f"{e.stem}.json", recs)
        d = out / "downloaded_images" / e.cls.name / e.stem
        d.mkdir(parents=True, exist_ok=True)
        ident = identity_for(e.index, layout=e.class_index, seed=config.seed)
        for v in range(config.teach_images + config.fresh_images):
            seed = stable_seed("synthetic-image", config.seed, e.name, v)
            if v2:  # a scene: a background of the shared pool, the object placed anew, distractors
                img = render_scene(ident, pick_background(pool, stable_seed("scene-bg", config.seed, e.name, v)),
                                   seed, size=config.image_size)
            else:
                img = render(ident, seed, size=config.image_size)
            img.save(d / f"img_{v:02d}.png", format="PNG", optimize=False, compress_level=6)
    n_general = 0
    if v2:
        general, images = _general_records(config, pool)
        n_general = len(general)
        _dump(out / "Entities" / f"{GENERAL_FILE}.json", general)
        for rel, img in images.items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            img.save(out / rel, format="PNG", optimize=False, compress_level=6)
        (out / "lists").mkdir(parents=True, exist_ok=True)
        _dump(out / "lists" / "aliases.json", {e.name: [e.alias] for e in ents})
    task_counts = {}
    for t in range(config.n_tasks):
        tn = TASK_NAMES[t]
        for split, group in (("forget", forget[t]), ("retain", retain[t])):
            recs = [r for e in group for r in per_entity[e.name]]
            _dump(out / "Tasks" / f"task{tn}_{split}.json", recs)
            (out / "lists" / "tasks").mkdir(parents=True, exist_ok=True)
            (out / "lists" / "tasks" / f"task{tn}_{split}.txt").write_text(
                "".join(e.name + "\n" for e in group), encoding="utf-8")
            task_counts[f"{tn}_{split}"] = len(recs)
    (out / "lists" / "classes").mkdir(parents=True, exist_ok=True)
    for cls in CLASSES[: config.n_classes]:
        (out / "lists" / "classes" / f"{cls.name}.txt").write_text(
            "".join(e.name + "\n" for e in ents if e.cls is cls), encoding="utf-8")
    (out / "lists" / "never_requested.txt").write_text("".join(e.name + "\n" for e in never), encoding="utf-8")
    _dump(out / "synthetic.json", {
        "format_version": FORMAT_VERSION, "config": config.to_dict(), "digest": config.digest(),
        "counts": {"entities": len(ents), "records": sum(len(v) for v in per_entity.values()), "tasks": task_counts,
                   "never_requested": len(never), "general": n_general}})
    return out


def _as_config(config) -> SyntheticConfig:
    if config is None:
        return PRESETS["default"]
    if isinstance(config, str):
        return SyntheticConfig.preset(config)
    if not isinstance(config, SyntheticConfig):
        raise TypeError(f"config must be a SyntheticConfig, a preset name or None; got {type(config).__name__}")
    return config


def default_cache_dir() -> Path:
    """$LUMOE_CACHE, else ~/.cache/lumoe-engine."""
    return Path(os.environ.get("LUMOE_CACHE") or Path.home() / ".cache" / "lumoe-engine").expanduser()


def ensure_synthetic(cache_dir: Union[str, Path, None] = None,
                     config: Union[SyntheticConfig, str, None] = None) -> Path:
    """Root of the synthetic benchmark for ``config`` (default preset when None), writing it first if absent.

    Folder: ``<cache_dir>/synthetic/<preset name>-<config digest>``; cache_dir defaults to ``default_cache_dir()``.
    Written atomically (a temporary sibling folder renamed into place), so a crash never leaves a half benchmark and
    concurrent writers agree.
    """
    config = _as_config(config)
    config.validate()
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root = base / "synthetic" / f"{config.name}-{config.digest()}"
    if (root / "synthetic.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        write_synthetic(tmp, config)
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / "synthetic.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


__all__ = ["SyntheticConfig", "PRESETS", "CLASSES", "N_KINDS", "FORMAT_VERSION", "write_synthetic", "ensure_synthetic",
           "default_cache_dir", "name_families", "fact_families"]
