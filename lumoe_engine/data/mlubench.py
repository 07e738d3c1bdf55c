"""MLUBench loader: Entities/, Tasks/ and lists/ in LLaVA conversation JSON -> typed ``QARecord``s.

One loader reads both the real MLUBench and the synthetic one (which adds a ``meta`` dict to every JSON record).

Layout under ``root``::

    Entities/<Entity>.json          every QA pair of one entity (file stem = entity name, "_" for spaces)
    Tasks/task{A..D}_{forget,retain}.json   the sequential unlearning tasks (records also found in Entities/)
    lists/classes/<Class>.txt, lists/tasks/*.txt   entity lists (optional)
    downloaded_images/<Class>/<Entity>/<file>   images (optional: a missing file gets a per-entity surrogate)

A JSON record: ``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n<question>"},
{"from": "gpt", "value": "<answer>"}], "meta"?}``. A record without "image" and without the "<image>" token is a
text-only question (it names the entity).

How fields are derived when a record has no ``meta`` (the real MLUBench):

- entity: the Entities file stem with "_" -> " " (records of a task file: the matching Entities record; else the
  image folder ``downloaded_images/<Class>/<Entity>/``);
- class: the image folder ``downloaded_images/<Class>/...``; for text-only records, lists/classes/<Class>.txt;
- phrasing and kind: MLUBench numbers records ``id = phrasing * 100000 + base``: phrasings 1.. of a question repeat
  the base record's image and answer with a reworded question. The kind is the class's question kind of the
  *phrasing-0* question of the same base id (``MLUBENCH_KINDS``: kind 0 is always the name/title question; the
  other kinds follow the benchmark's own question order). Grouping by answer text would be wrong here: several
  entities answer two kinds with one text (e.g. Moon), and some entities lack kinds. A phrasing-0 question not in
  the table is looked up among known wordings, then by its answer (a record of the same entity with the identical
  answer and a known kind, e.g. a text-only question), else it opens the next free kind of its class (first
  appearance, entities in sorted order). Ids that are not numbers, or whose base record is absent, get the
  phrasing from the question's order of first appearance within (entity, kind);
- keys: kind 0 -> the entity name (or the shorter alias the answer uses, e.g. "Google" for "Google Logo");
  otherwise the name when the answer contains it and the question does not, plus the 2 most distinctive answer
  tokens (ranked by inverse document frequency over all distinct answers of the benchmark; stop words, name and
  question tokens excluded; numbers of 3+ digits (years) first, then other numbers and words capitalised inside a
  sentence (proper nouns), then the rest; rarity decides within a rank); an answer of at most 4 tokens is its own
  key;
- heldout_phrasing / fresh_image: False (the real held-out phrasing set is not in this data).

Questions and answers are kept verbatim (only the "<image>" token and the whitespace around it are removed; some
MLUBench questions carry "**" markdown residue, kept as the benchmark has it).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional, Union

from PIL import Image

from lumoe_engine.data.images import surrogate_image
from lumoe_engine.data.records import FORMS, GENERAL_ENTITY, GENERAL_KINDS, VARIANTS, Benchmark, QARecord
from lumoe_engine.eval.scoring import normalize

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
SPLITS = ("forget", "retain")
SURROGATE_SIZE = 64  # side of a surrogate image when load_image gets no size
PHRASING_STRIDE = 100000  # MLUBench record ids: phrasing * PHRASING_STRIDE + base id

# The question kinds of each MLUBench class, phrasing 0, in the benchmark's order; kind 0 = the name/title question.
MLUBENCH_KINDS: dict[str, tuple[str, ...]] = {
    "Personage": ("What is this person's name?", "When and where was this person born?",
                  "What is this person's profession?", "What are the famous works or achievements of this person?",
                  "What contributions has this person made to society or industry?"),
    "Animals": ("What is the common name of this animal?", "What family or order does it belong to?",
                "What does this animal eat (herbivore, carnivore, omnivore)?",
                "Is it native to a specific region or found globally?",
                "How does this animal reproduce (mating habits, gestation period)?"),
    "Plants": ("What is the common name of this plant?", "To which family or genus does it belong?",
               "How does it reproduce (seeds, cuttings, runners)?",
               "Is it native to a specific region or found globally?", "How does it grow (e.g., tree, shrub, herb)?"),
    "Astronomy": ("What is the name of this planet?", "What is its position in the solar system?",
                  "What is the planet's classification?", "Does it have a ring system?",
                  "How long does it take for this planet to orbit the Sun?"),
    "Buildings": ("What is the name of this building?", "Where is it located?",
                  "What was the original purpose of the building?", "Is the building open to the public?"),
    "Cartoon": ("What is the title of this cartoon?", "Who created or produced this cartoon?",
                "When was this cartoon first released or aired?", "Who are the main characters in this cartoon?",
                "What is the central storyline or premise of this cartoon?"),
    "Corporation": ("What is the name of this corporation?", "When was this corporation founded, and by whom?",
                    "Where is this corporation's headquarters located?",
                    "What are this corporation's primary products or services?",
                    "What industry does this corporation operate in?"),
    "Movies": ("What is the title of this movie?", "Who directed this film?", "When was this film released?",
               "Who are the main actors or actresses in this movie?",
               "What is the central plot or storyline of this movie?"),
    "TV series": ("What is the title of this TV series?", "Who created or produced this TV series?",
                  "When did this TV series first premiere?",
                  "Who are the main actors and actresses in this TV series?",
                  "What is the central storyline or premise of this TV series?"),
}

# Words never chosen as distinctive key tokens.
_STOP = frozenset("""
a an the and or but if of to in on at by for with from as into onto over under about after before during between
through is are was were be been being has have had do does did it its it's this that these those he she they them
his her their our your my we you i me him who whom which what when where why how also known best most more many
much such other some any all each both one two first second new well very can could would should may might will
just not no yes only than then there here so up out off down again further once same own too s t born made make
often including include includes included several various well-known famous notable major main primary key large
small great high low part role work works become became because while like time years year world people including
""".split())

_WORD = re.compile(r"\w[\w'.-]*")
_ALIAS_DROP = ("corporation logo", "logo", "tv show", "tv series", "statues")


class MLUBenchFormatError(ValueError):
    """A benchmark file is malformed; the message names the file, the record and what to fix."""


@dataclass
class _Raw:
    file: Path
    index: int
    rid: str
    question: str
    answer: str
    image_rel: Optional[str]
    meta: Optional[dict]
    entity: Optional[str] = None
    cls: Optional[str] = None


# ----------------------------------------------------------------------------------------------------------- parsing
def _read_json_list(path: Path) -> list:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found; expected an MLUBench JSON file (a list of LLaVA records)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MLUBenchFormatError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise MLUBenchFormatError(f"{path}: not UTF-8 text ({e})") from None
    if not isinstance(data, list):
        raise MLUBenchFormatError(f"{path}: top level is {type(data).__name__}; expected a JSON list of records")
    return data


_META_TYPES = {"entity": str, "class": str, "kind": int, "phrasing": int, "form": str, "keys": list,
               "heldout_phrasing": bool, "fresh_image": bool}


_META_OPTIONAL = {"variant": VARIANTS, "heldout_variant": (True, False), "general": GENERAL_KINDS}


def parse_record(path: Path, index: int, rec) -> _Raw:
    where = f"{path}: record {index}"
    if not isinstance(rec, dict):
        raise MLUBenchFormatError(f"{where}: is {type(rec).__name__}; expected an object with id and conversations")
    if "id" not in rec:
        raise MLUBenchFormatError(f"{where}: has no 'id'; every record needs an id unique within its file")
    rid = str(rec["id"])
    where = f"{path}: record {index} (id {rid})"
    conv = rec.get("conversations")
    if not isinstance(conv, list) or len(conv) != 2:
        raise MLUBenchFormatError(f"{where}: 'conversations' must be a list of exactly 2 turns "
                                  f"(human question, gpt answer); got {conv!r:.120}")
    for turn, who in zip(conv, ("human", "gpt")):
        if not isinstance(turn, dict) or turn.get("from") != who or not isinstance(turn.get("value"), str):
            raise MLUBenchFormatError(f"{where}: turn {turn!r:.120} should be {{'from': '{who}', 'value': <str>}}")
    qraw, answer = conv[0]["value"], conv[1]["value"]
    image = rec.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise MLUBenchFormatError(f"{where}: 'image' must be a relative path string; got {image!r}")
    has_token = IMAGE_TOKEN in qraw
    if has_token and image is None:
        raise MLUBenchFormatError(f"{where}: question has the {IMAGE_TOKEN} token but the record has no 'image'; "
                                  f"add the image path or remove the token (text-only form)")
    question = qraw.replace(IMAGE_TOKEN, "").strip()
    if not question:
        raise MLUBenchFormatError(f"{where}: empty question")
    if not answer.strip():
        raise MLUBenchFormatError(f"{where}: empty answer")
    meta = rec.get("meta")
    if meta is not None:
        if not isinstance(meta, dict):
            raise MLUBenchFormatError(f"{where}: 'meta' must be an object; got {type(meta).__name__}")
        for k, t in _META_TYPES.items():
            if k not in meta:
                raise MLUBenchFormatError(f"{where}: meta has no '{k}' (expected {t.__name__})")
            if not isinstance(meta[k], t) or (t is int and isinstance(meta[k], bool)):
                raise MLUBenchFormatError(f"{where}: meta '{k}' = {meta[k]!r} is not {t.__name__}")
        if meta["form"] not in FORMS:
            raise MLUBenchFormatError(f"{where}: meta form {meta['form']!r} not in {FORMS}")
        if (meta["form"] == "image_text") != (image is not None):
            raise MLUBenchFormatError(f"{where}: meta form {meta['form']!r} disagrees with the record "
                                      f"({'has' if image else 'has no'} image)")
        if not all(isinstance(k, str) and k for k in meta["keys"]):
            raise MLUBenchFormatError(f"{where}: meta keys must be non-empty strings; got {meta['keys']!r}")
        for k, allowed in _META_OPTIONAL.items():  # world v2 fields: absent or null in v1 files
            if meta.get(k) is not None and meta[k] not in allowed:
                raise MLUBenchFormatError(f"{where}: meta '{k}' = {meta[k]!r}; expected one of {allowed} or null")
    return _Raw(path, index, rid, question, answer, image, meta)


def _image_parts(raw: _Raw) -> Optional[tuple[str, str]]:
    """(class, entity folder) of ``downloaded_images/<Class>/<Entity>/<file>``, else None."""
    if raw.image_rel is None:
        return None
    parts = Path(raw.image_rel).parts
    if len(parts) >= 4 and parts[0] == "downloaded_images":
        return parts[1], parts[2]
    return None


def _read_lists(root: Path) -> dict[str, str]:
    """entity -> class from lists/classes/<Class>.txt (empty when absent)."""
    out: dict[str, str] = {}
    d = root / "lists" / "classes"
    if d.is_dir():
        for f in sorted(d.glob("*.txt")):
            for line in f.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    out.setdefault(line.strip(), f.stem)
    return out


# ------------------------------------------------------------------------------------------------------------- kinds
def question_key(question: str) -> str:
    """The key a question (or answer) is matched by: its normalised text."""
    return normalize(question)


class _KindTable:
    """Question kinds per class: the built-in MLUBench table, extended by first appearance."""

    def __init__(self):
        self.tables: dict[str, dict[str, int]] = {c: {question_key(q): i for i, q in enumerate(qs)}
                                                  for c, qs in MLUBENCH_KINDS.items()}
        self.next_free: dict[str, int] = {c: len(qs) for c, qs in MLUBENCH_KINDS.items()}
        self.any_phrasing: dict[str, dict[str, int]] = defaultdict(dict)  # class -> any known wording -> kind

    def kind_of_base(self, cls: str, question: str) -> int:
        t = self.tables.setdefault(cls, {})
        k = question_key(question)
        if k not in t:
            t[k] = self.next_free.get(cls, 0)
            self.next_free[cls] = t[k] + 1
        return t[k]

    def lookup_base(self, cls: str, question: str) -> Optional[int]:
        return self.tables.get(cls, {}).get(question_key(question))

    def lookup(self, cls: str, question: str) -> Optional[int]:
        k = question_key(question)
        return self.tables.get(cls, {}).get(k, self.any_phrasing[cls].get(k))


# -------------------------------------------------------------------------------------------------------------- keys
def _aliases(entity: str) -> list[str]:
    out = [entity]
    low = entity.lower()
    for suffix in _ALIAS_DROP:
        if low.endswith(" " + suffix):
            out.append(entity[: -len(suffix) - 1])
            break
    return out


def _has(text_norm: str, key: str) -> bool:
    k = normalize(key)
    return bool(k) and f" {k} " in f" {text_norm} "


class KeyMaker:
    """Key facts of real MLUBench answers (see the module docstring)."""

    def __init__(self, answers: Iterable[str]):
        docs = {normalize(a) for a in answers}
        self.n = max(1, len(docs))
        self.df: Counter = Counter()
        for d in docs:
            self.df.update(set(d.split()))

    def keys(self, entity: str, kind: int, question: str, answer: str) -> tuple[str, ...]:
        a = normalize(answer)
        q = normalize(question)
        name = next((al for al in _aliases(entity) if _has(a, al) and not _has(q, al)), None)
        toks = a.split()
        if kind == 0 and name is not None:
            return (name,)
        if name is not None and normalize(name) == a:
            return (name,)
        if 0 < len(toks) <= 4:
            return (answer.strip(),)
        exclude = set(_STOP) | set(q.split())
        for al in _aliases(entity):
            exclude |= set(normalize(al).split())
        proper = set()
        for m in _WORD.finditer(answer):  # capitalised words not at a sentence start
            before = answer[: m.start()].rstrip()
            if m.group()[:1].isupper() and before and before[-1] not in ".!?:;-*\"(":
                proper.add(normalize(m.group()))
        cands: dict[str, tuple[int, float, int]] = {}
        for pos, t in enumerate(toks):
            if t in exclude or t in cands or (len(t) < 3 and not t.isdigit()):
                continue
            # numbers (years, dates, quantities) first, then proper-noun tokens, then rarity
            digits = sum(ch.isdigit() for ch in t)
            prio = 2 if digits >= 3 else 1 if (digits or t in proper) else 0
            cands[t] = (prio, math.log(self.n / max(1, self.df[t])), -pos)
        best = sorted(cands, key=lambda t: cands[t], reverse=True)[:2]
        best.sort(key=lambda t: -cands[t][2])  # keep answer order
        out = ([name] if name else []) + best
        return tuple(out) if out else (answer.strip(),)


# ------------------------------------------------------------------------------------------------------------ loader
def _display_name(stem: str) -> str:
    return stem.replace("_", " ")


def load_benchmark(root: Union[str, Path], subset: Optional[int] = None) -> Benchmark:
    """Loads an MLUBench-format benchmark (real or synthetic) from ``root``.

    subset: keep N entities of every task split (and N never-requested entities), chosen deterministically (classes
    in sorted order, round robin, entities sorted within a class), and only their records. None = everything.
    Returns a Benchmark: records (Entities/, in sorted file order), tasks[task][split] (task-file order),
    entities (name -> class), surrogate_images (records whose image file is missing).
    """
    root = Path(root).expanduser().resolve()
    ent_dir = root / "Entities"
    if not ent_dir.is_dir():
        raise FileNotFoundError(f"{root}: no Entities/ folder; expected an MLUBench layout (Entities/<Entity>.json, "
                                f"Tasks/task<X>_<forget|retain>.json, lists/). Pass the benchmark root as root")
    if subset is not None and (not isinstance(subset, int) or isinstance(subset, bool) or subset < 1):
        raise ValueError(f"subset must be a positive int (entities per task split) or None; got {subset!r}")
    listed = _read_lists(root)
    files = sorted(ent_dir.glob("*.json"), key=lambda p: p.name)
    if not files:
        raise FileNotFoundError(f"{ent_dir}: no <Entity>.json files")

    # Pass 1: parse everything.
    ent_raws: list[tuple[Path, list[_Raw]]] = []
    for f in files:
        raws = [parse_record(f, i, r) for i, r in enumerate(_read_json_list(f))]
        ids = Counter(r.rid for r in raws)
        dup = [i for i, n in ids.items() if n > 1]
        if dup:
            raise MLUBenchFormatError(f"{f}: record id {dup[0]!r} occurs {ids[dup[0]]} times; ids must be unique "
                                      f"within a file")
        for r in raws:
            r.entity = r.meta["entity"] if r.meta else _display_name(f.stem)
            r.cls = r.meta["class"] if r.meta else _class_of(r, listed)
        ent_raws.append((f, raws))
    task_raws = _read_tasks(root, listed)

    # Pass 2: kinds and phrasings (real data), keys.
    kinds = _KindTable()
    all_answers = [r.answer for _, raws in ent_raws for r in raws]
    all_answers += [r.answer for d in task_raws.values() for raws in d.values() for r in raws]
    keymaker = KeyMaker(all_answers)
    images: dict[str, tuple[str, bool]] = {}  # relative path -> (absolute path, file exists)

    def build(r: _Raw, uid: str, kind: int, phrasing: int, task=None, split=None) -> QARecord:
        image = missing = None
        if r.image_rel is not None:
            if r.image_rel not in images:
                path = os.path.normpath(os.path.join(root, r.image_rel))
                images[r.image_rel] = (path, os.path.isfile(path))
            image, found = images[r.image_rel]
            missing = not found
        if r.meta:
            keys, held, fresh = tuple(r.meta["keys"]), r.meta["heldout_phrasing"], r.meta["fresh_image"]
        else:
            keys, held, fresh = keymaker.keys(r.entity, kind, r.question, r.answer), False, False
        m = r.meta or {}
        return QARecord(uid=uid, entity=r.entity, cls=r.cls, kind=kind, phrasing=phrasing, question=r.question,
                        answer=r.answer, form="image_text" if image else "text_only", image=image, keys=keys,
                        task=task, split=split, heldout_phrasing=held, fresh_image=fresh,
                        image_missing=bool(missing), variant=m.get("variant"),
                        heldout_variant=bool(m.get("heldout_variant")), general=m.get("general"))

    def uid_of(stem: str, r: _Raw) -> str:
        return f"{stem}#{r.rid}" + ("#text" if r.image_rel is None else "")

    records: list[QARecord] = []
    by_triple: dict[tuple, QARecord] = {}
    for f, raws in ent_raws:
        kp = _kinds_and_phrasings(raws, kinds)
        for r, (kind, phr) in zip(raws, kp):
            rec = build(r, uid_of(f.stem, r), kind, phr)
            records.append(rec)
            by_triple.setdefault((r.image_rel, r.question, r.answer), rec)

    tasks: dict[str, dict[str, list[QARecord]]] = {}
    for t in sorted(task_raws):
        tasks[t] = {}
        for split in SPLITS:
            out = []
            raws = task_raws[t][split]
            unmatched = [r for r in raws if (r.image_rel, r.question, r.answer) not in by_triple]
            kp = dict(zip(map(id, unmatched), _kinds_and_phrasings(unmatched, kinds))) if unmatched else {}
            for r in raws:
                hit = by_triple.get((r.image_rel, r.question, r.answer))
                if hit is not None:
                    out.append(replace(hit, task=t, split=split))
                else:
                    kind, phr = kp[id(r)]
                    out.append(build(r, uid_of(r.file.stem, r), kind, phr, task=t, split=split))
            tasks[t][split] = out

    entities = {}
    for rec in records:
        entities.setdefault(rec.entity, rec.cls)
    bench = Benchmark(root=root, records=records, tasks=tasks, entities=entities, aliases=_read_aliases(root))
    if subset is not None:
        bench = _subset(bench, subset)
    bench.surrogate_images = sum(r.image_missing for r in bench.records)
    n_img = sum(r.form == "image_text" for r in bench.records)
    if bench.surrogate_images:
        log.warning("%s: %d of %d image records have no image file; a deterministic surrogate per entity stands in",
                    root, bench.surrogate_images, n_img)
    return bench


def _read_aliases(root: Path) -> dict[str, tuple[str, ...]]:
    """entity -> its aliases from lists/aliases.json ({"<entity>": ["<alias>", ...]}; empty when absent)."""
    f = root / "lists" / "aliases.json"
    if not f.is_file():
        return {}
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MLUBenchFormatError(f"{f}: not a JSON object ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, list) and
                                             all(isinstance(a, str) and a.strip() for a in v)
                                             for k, v in data.items()):
        raise MLUBenchFormatError(f"{f}: expected {{\"<entity>\": [\"<alias>\", ...]}}")
    return {k: tuple(v) for k, v in data.items()}


def _class_of(r: _Raw, listed: dict[str, str]) -> str:
    parts = _image_parts(r)
    if parts is not None:
        return parts[0]
    if r.entity in listed:
        return listed[r.entity]
    raise MLUBenchFormatError(f"{r.file}: record {r.index} (id {r.rid}): cannot tell the class of entity "
                              f"{r.entity!r}: no image path downloaded_images/<Class>/<Entity>/..., no 'meta', and "
                              f"not listed in lists/classes/<Class>.txt; add one of these")


def _read_tasks(root: Path, listed: dict[str, str]) -> dict[str, dict[str, list[_Raw]]]:
    tdir = root / "Tasks"
    out: dict[str, dict[str, list[_Raw]]] = {}
    if not tdir.is_dir():
        return out
    pat = re.compile(r"^task(\w+?)_(forget|retain)\.json$")
    names = {}
    for f in sorted(tdir.glob("task*_*.json")):
        m = pat.match(f.name)
        if m:
            names.setdefault(m.group(1), {})[m.group(2)] = f
    for t, d in sorted(names.items()):
        for split in SPLITS:
            if split not in d:
                raise FileNotFoundError(f"{tdir / f'task{t}_{split}.json'}: file not found; task {t} has a "
                                        f"{'forget' if split == 'retain' else 'retain'} file, so it needs both")
        out[t] = {}
        for split in SPLITS:
            f = d[split]
            raws = [parse_record(f, i, r) for i, r in enumerate(_read_json_list(f))]
            for r in raws:
                if r.meta:
                    r.entity, r.cls = r.meta["entity"], r.meta["class"]
                else:
                    parts = _image_parts(r)
                    if parts is None:
                        raise MLUBenchFormatError(
                            f"{f}: record {r.index} (id {r.rid}): cannot tell the entity: no 'meta' and no image "
                            f"path downloaded_images/<Class>/<Entity>/...")
                    r.entity = _display_name(parts[1])
                    r.cls = parts[0]
            out[t][split] = raws
    return out


def _kinds_and_phrasings(raws: list[_Raw], kinds: _KindTable) -> list[tuple[int, int]]:
    """(kind, phrasing) of every record of one file (see the module docstring).

    Kind, in order of preference: meta; the phrasing-0 question of the same base id, if the class table knows it;
    a known wording of the question itself; the kind of a record of the same entity with the identical answer;
    else a new kind of the class (the base question, first appearance).
    """
    out: list[Optional[tuple[int, int]]] = [None] * len(raws)
    by_id = {(r.entity, r.rid): r for r in raws}  # task files mix entities whose ids may coincide
    by_answer: dict[tuple[str, str], int] = {}
    pending = []
    for i, r in enumerate(raws):
        if r.meta:
            out[i] = (r.meta["kind"], r.meta["phrasing"])
            continue
        base = _base_of(r, by_id)
        kind = kinds.lookup_base(r.cls, base[1].question) if base else None
        if kind is None:
            pending.append(i)
            continue
        kinds.any_phrasing[r.cls].setdefault(question_key(r.question), kind)
        by_answer.setdefault((r.entity, r.answer), kind)
        out[i] = (kind, base[0])
    seen: dict[tuple[str, int], list[str]] = defaultdict(list)
    for i in pending:
        r = raws[i]
        base = _base_of(r, by_id)
        kind = kinds.lookup(r.cls, r.question)
        if kind is None:
            kind = by_answer.get((r.entity, r.answer))
        if kind is None:
            kind = kinds.kind_of_base(r.cls, base[1].question if base else r.question)
        by_answer.setdefault((r.entity, r.answer), kind)
        if base is not None:
            out[i] = (kind, base[0])
            continue
        lst = seen[(r.entity, kind)]
        q = question_key(r.question)
        if q not in lst:
            lst.append(q)
        out[i] = (kind, lst.index(q))
    return out  # type: ignore[return-value]


def _base_of(r: _Raw, by_id: dict) -> Optional[tuple[int, _Raw]]:
    """(phrasing, base record) from an MLUBench id ``phrasing * 100000 + base``, when the base record exists."""
    if not r.rid.isdigit():
        return None
    phr, base = divmod(int(r.rid), PHRASING_STRIDE)
    b = by_id.get((r.entity, str(base)))
    return (phr, b) if b is not None else None


def _subset(bench: Benchmark, n: int) -> Benchmark:
    def pick(names: Iterable[str]) -> list[str]:
        by_cls: dict[str, list[str]] = defaultdict(list)
        for e in sorted(set(names)):
            by_cls[bench.entities.get(e, "")].append(e)
        order, i = [], 0
        while len(order) < n and any(i < len(v) for v in by_cls.values()):
            for c in sorted(by_cls):
                if i < len(by_cls[c]) and len(order) < n:
                    order.append(by_cls[c][i])
            i += 1
        return order

    keep: set[str] = set()
    requested: set[str] = set()
    for t in bench.tasks:
        for split in SPLITS:
            names = [r.entity for r in bench.tasks[t][split]]
            requested |= set(names)
            keep |= set(pick(names))
    keep |= set(pick(e for e in bench.entities if e not in requested and e != GENERAL_ENTITY))
    keep.add(GENERAL_ENTITY)  # the general-utility records are about no entity: always kept
    tasks = {t: {s: [r for r in recs if r.entity in keep] for s, recs in d.items()} for t, d in bench.tasks.items()}
    return Benchmark(root=bench.root, records=[r for r in bench.records if r.entity in keep], tasks=tasks,
                     entities={e: c for e, c in bench.entities.items() if e in keep},
                     aliases={e: a for e, a in bench.aliases.items() if e in keep})


# ------------------------------------------------------------------------------------------------------------ access
def records_for(benchmark: Benchmark, entities=None, forms=None, heldout_phrasing: Optional[bool] = None,
                fresh_image: Optional[bool] = None, split: Optional[str] = None,
                task: Optional[str] = None) -> list[QARecord]:
    """The benchmark's records that pass every given filter (None = no filter), in benchmark order.

    With ``task`` and/or ``split`` the records come from the task files (``tasks[task][split]``, all tasks or both
    splits when one of them is None); otherwise from all records. ``entities``/``forms``: a name or an iterable.
    """
    if task is not None and task not in benchmark.tasks:
        raise ValueError(f"task {task!r} not in this benchmark; it has tasks {sorted(benchmark.tasks)}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None; got {split!r}")
    if task is None and split is None:
        source: list[QARecord] = benchmark.records
    else:
        source = []
        for t in ([task] if task is not None else sorted(benchmark.tasks)):
            for s in ([split] if split is not None else SPLITS):
                source.extend(benchmark.tasks[t][s])
    ents = {entities} if isinstance(entities, str) else (set(entities) if entities is not None else None)
    fms = {forms} if isinstance(forms, str) else (set(forms) if forms is not None else None)
    if fms is not None and not fms <= set(FORMS):
        raise ValueError(f"forms must be drawn from {FORMS}; got {sorted(fms)}")
    return [r for r in source
            if (ents is None or r.entity in ents) and (fms is None or r.form in fms)
            and (heldout_phrasing is None or r.heldout_phrasing == heldout_phrasing)
            and (fresh_image is None or r.fresh_image == fresh_image)]


def load_image(record: QARecord, size: Union[int, tuple[int, int], None] = None) -> Image.Image:
    """The record's image as RGB (resized to ``size`` x ``size`` or ``(w, h)`` when given).

    A missing file gives the entity's deterministic surrogate (``images.surrogate_image``, 64 px unless ``size``).
    Text-only records have no image: ValueError. Decoded images are cached (keyed by path, file mtime and size);
    the caller gets its own copy.
    """
    if record.image is None:
        raise ValueError(f"record {record.uid!r} is text-only (form {record.form!r}): it has no image")
    wh = (size, size) if isinstance(size, int) else tuple(size) if size is not None else None
    if wh is not None and (len(wh) != 2 or min(wh) < 1):
        raise ValueError(f"size must be a positive int or (width, height); got {size!r}")
    try:
        mtime = None if record.image_missing else os.stat(record.image).st_mtime_ns
    except OSError:
        mtime = None
    if mtime is None:
        return _surrogate(record.entity, wh).copy()
    return _decoded(record.image, mtime, wh).copy()


@lru_cache(maxsize=1024)
def _surrogate(entity: str, wh: Optional[tuple[int, int]]) -> Image.Image:
    img = surrogate_image(entity, wh[0] if wh else SURROGATE_SIZE)
    return img.resize(wh, Image.BILINEAR) if wh and wh[0] != wh[1] else img


@lru_cache(maxsize=8192)
def _decoded(path: str, mtime_ns: int, wh: Optional[tuple[int, int]]) -> Image.Image:
    with Image.open(path) as im:
        img = im.convert("RGB")
    if wh is not None and img.size != wh:
        img = img.resize(wh, Image.BICUBIC)
    return img


def ensure_synthetic(cache_dir=None, config=None) -> Path:
    """Root of the synthetic benchmark for ``config``, written first if absent (see ``synthetic.ensure_synthetic``)."""
    from lumoe_engine.data.synthetic import ensure_synthetic as _ensure

    return _ensure(cache_dir=cache_dir, config=config)
