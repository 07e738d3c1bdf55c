"""Teach: fine-tune a LLaVA on every entity of a benchmark (image+text and text-only questions) until greedy
generation states at least ``target_accuracy`` of the facts, so that forgetting them later means something.

Letters: B batch rows, S image side.

What is taught: the *teaching records*, every record that is neither ``heldout_phrasing`` nor ``fresh_image``. What is
measured afterwards (greedy generation, ``eval.scoring.fact_correct``; each set capped at ``eval_max_records``
records, a seeded sample, its size reported):

- fact_accuracy_image_text / fact_accuracy_text_only: teaching records of each form;
- fact_accuracy_heldout_phrasing: wordings never taught (with teaching images for the image+text ones);
- fact_accuracy_fresh_images: image variations never taught (taught wordings);
- fact_accuracy_noise_image: image+text teaching questions with the image replaced by uniform noise;
- noise_chance_level: the accuracy of a model that ignores the image but knows the benchmark's answer priors: for
  each of those questions, the share of the entities asked that exact question whose answer has the most common key
  set (1/4 for a name question asked of the 4 entities of a class; higher where entities share a fact), averaged over
  the questions. Computed from the data; a noise accuracy near it means the image, not the wording, carries identity.
  (With one entity per class, e.g. a small real-MLUBench subset, the question alone fixes the answer: level ~1.)
- refusal_unknown_taught / refusal_unknown_heldout / refusal_rate_known_facts: the share of answers that are refusals
  (``unlearn.refusal.is_refusal``) to text-only questions about made-up names, taught and never taught, and to the
  fact sets above (the base's own over-refusal); ``REFUSAL_CHECK`` records each.

World v2 (the embedded default) adds to the summary: ``fact_accuracy_name_variants`` / ``_alias`` (never-taught
name variants and alias wordings), ``_alias_taught``, ``_general_scene`` / ``_general_world`` / ``_general_heldout``
(general utility), ``_fresh_images_name`` / ``_facts`` (held-out scenes by question kind), and the two picture checks
(``scene_checks``): held-out scenes recognised (``scene_recognition`` >= ``SCENE_TARGET``) while a nearest-picture
lookup over the requests' own pictures identifies few of them (``lookup_pixel`` / ``lookup_features`` <=
``LOOKUP_CEILING``). It teaches a subword BPE (``tokenizer_kind="auto"``), varies the names of taught text-only
questions as people type them (``name_variant_prob``; never into a test query), and first trains the vision tower
alone on the taught pictures (``pretrain_vision``, ``vision_pretrain_steps``). Measured on the development seed 0
(1 thread, another process on the other core): without stage 1 the check's name questions were right on 0.46 of the
taught pictures after 600 steps (0.65 after 750); with 400 unshifted stage-1 steps 0.92 after 600, the target
reached after 1,050 steps (619 s), held-out scenes 0.904 (but 0.853 and 0.872 on seeds 1 and 2, which is why stage
1 now shifts its pictures and runs longer: ``pretrain_vision``).

Refusal teaching (the tiny base, ``unknown_names`` > 0): the taught text-only questions are also asked about
``unknown_names`` made-up names (no word of the world) and answered ``refusal``, and the refusal's words (and the
baselines' varied refusals) are in the tokenizer's training text: the base says it does not know what it does not
know, so an expert can make a forgotten entity one of those (``unlearn.refusal``). A given checkpoint is not taught
this (a real LLaVA refuses in its own words).

Stopping: every ``check_every`` steps a teacher-forced check on a fixed stratified sample of teaching records counts
the records whose every answer token (and the eos) is the argmax: exactly the records greedy generation reproduces
verbatim, a lower bound of fact accuracy. When that reaches the target, greedy generation on the image+text and
text-only teaching sets decides; teaching stops at the target or when ``max_steps`` run out (a step budget, so that
the result does not depend on the machine's load), or when the optional wall-clock ``time_budget_s`` (0 = none) runs
out; a run cut by the clock is never cached (its result depends on the machine's speed).

Learning rate (tiny preset, embedded default, BPE, no augmentation, AdamW, 30 warm-up steps, then constant;
exact-match check after 300 steps with cell sampling): 5e-4 0.95, 7e-4 0.95, 1e-3 0.97, 1.5e-3 0.86, 2e-3 0.48,
3e-3 0.09.

Sampling: ``balance="cell"`` draws rows evenly over (entity, kind, form) cells, so the few text-only records (12% of
the embedded default) and every fact get the same share of steps (measured at lr 2e-3: exact-match check 0.48 vs 0.28
with shuffled epochs, after 300 steps).

Generalisation levers (``TeachConfig``), measured on the embedded default (tiny preset, lr 1e-3, up to 3 seeds):

- word tokenizer + word dropout to ``<unk>`` (``tokenizer_kind="word"``, ``word_dropout=0.1``, ``unk_share=1.0``,
  the default): an unseen word becomes ``<unk>``, which dropout taught the model to read past; held-out phrasing
  0.60 -> 0.78 on average (image+text part 0.56 -> 0.76), at ~20% more steps;
- filler words from the taught questions (``filler_prob``): with the above, no further gain, more steps; alone (BPE)
  0.17 -> 0.55 on the worst seed;
- synonym swaps from a generic table (``synonym_prob``), image augmentation (``image_augment``: random crop, colour
  jitter): no measurable gain on held-out phrasing (one seed); fresh images are already >= 0.92 without them.

A given checkpoint (``model``): taught only through one LoRA (rank ``model_lora_rank`` on every LM linear, fp32 master
weights, the base frozen) merged into its weights at the end (``model_teaching="lora"``, ``run.py teach --model``);
never fully fine-tuned. ``model_teaching="none"`` (what the stream uses: a real checkpoint is used as it is) or a
4-bit base only measures it. ``--data`` with missing image files is an error naming them unless
``allow_surrogate_images`` (``check_images``).

Cache: the taught model, processor and summary are stored under ``cache_dir/taught/<hash>/`` (hash of the config and
of the data: every record's fields and image file sizes), written to a temporary folder and renamed into place; a
second ``teach`` with the same config and data loads them (``summary["cached"] = True``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance
from tqdm.auto import tqdm

from lumoe_engine.data.records import Benchmark, QARecord
from lumoe_engine.fileio import atomic_write
from lumoe_engine.unlearn.losses import REFUSALS
from lumoe_engine.unlearn.refusal import DEFAULT_REFUSAL, is_refusal, made_up_names, unknown_entity_records
from lumoe_engine.model.collate import (IGNORE, collate, generate_answers, image_side, image_token_count,
                                        pixel_values_for)

logger = logging.getLogger("lumoe_engine.model")

REFUSAL_CHECK = 240  # records per set of the teach summary's refusal check
TEACH_VERSION = 3  # bump when teaching changes what a cached model means
SUMMARY_FILE = "teach_summary.json"
MODEL_TEACHING = ("lora", "none")  # how a given checkpoint (--model) is taught: one merged LoRA, or not at all
SURROGATE_NAMED = 5  # missing image files named in the error

# Generic English question-word synonyms (a language prior a pretrained LM would bring); single words, lower case.
SYNONYMS: tuple[tuple[str, ...], ...] = (
    ("what", "which"), ("name", "title"), ("called", "named", "titled"), ("shown", "depicted", "pictured",
                                                                         "displayed", "seen"),
    ("image", "picture", "photo", "photograph"), ("tell", "say", "state"), ("kind", "type", "sort"),
    ("color", "colour"), ("found", "located", "situated"), ("famous", "known", "renowned", "notable"),
    ("company", "corporation", "firm"), ("country", "nation"), ("city", "town"), ("made", "created", "produced"),
    ("built", "constructed", "erected"), ("first", "originally", "initially"), ("main", "primary", "principal"),
    ("eat", "consume"), ("live", "reside", "dwell"), ("start", "begin"), ("started", "began", "founded"),
    ("year", "date"), ("place", "location", "spot"), ("origin", "source"), ("belong", "pertain"),
    ("give", "provide"), ("describe", "explain"), ("this", "the"), ("does", "do"), ("is", "was"),
)
_SYN = {w: g for g in SYNONYMS for w in g}


@dataclass
class TeachConfig:
    """How to teach. Saved with every result; everything here (and the data) goes into the cache hash."""

    data: Optional[str] = None            # MLUBench-format root; None = the embedded synthetic benchmark
    subset: Optional[int] = None          # load_benchmark(subset=N): N entities per task split (+ N unrequested)
    synthetic: str = "default"            # SyntheticConfig preset of the embedded default ...
    synthetic_overrides: dict = field(default_factory=dict)  # ... and field overrides (e.g. teach_images=8)
    model: Optional[str] = None           # start from this HF LLaVA directory instead of a fresh tiny LLaVA
    load_in_4bit: bool = False            # 4-bit base (with --model): frozen, so it is measured, not taught
    # with ``model``: "lora" teaches through one LoRA (rank model_lora_rank) on every LM linear, merged into the
    # weights at the end (a real checkpoint is never fully fine-tuned); "none": measured as it is
    model_teaching: str = "lora"
    model_lora_rank: int = 64
    allow_surrogate_images: bool = False  # --data: a missing image file is an error unless this is set
    preset: str = "tiny"
    # "word" (unseen words -> <unk>, see word_dropout) | "bpe" | "auto": a subword BPE for world v2 (a name written
    # in lower case or with a typo shares pieces with the name), "word" for world v1 and --data
    tokenizer_kind: str = "auto"
    vocab_size: int = 2000                # word / v1; world v2's BPE: bpe_vocab_size
    bpe_vocab_size: int = 1200
    # world v2: share of taught text-only questions whose entity name is written as people type it (lower case,
    # without its article, one random typo), so that the base answers name variants it was never shown verbatim
    name_variant_prob: float = 0.3
    # world v2, a tiny base built from scratch: stage 1 trains the vision tower alone to tell the entities apart on
    # the taught pictures (a linear head on the max over its patch states, then dropped), as a real LLaVA's vision
    # tower comes pretrained; the held-out scenes are never shown (0 = no stage 1)
    vision_pretrain_steps: int = 1500
    vision_pretrain_lr: float = 1e-3
    vision_pretrain_shift: float = 0.25   # each batch shifted by up to this share of the side (edges replicated)
    seed: int = 0
    lr: float = 1e-3                      # NOTE: tiny preset, embedded default: see "Learning rate" above
    weight_decay: float = 0.0
    warmup_steps: int = 30
    batch_size: int = 32
    balance: str = "cell"                 # "cell": rows drawn evenly over (entity, kind, form) cells; "record": epochs
    max_steps: int = 2000                 # NOTE: the embedded default reaches the target in ~500 steps
    check_every: int = 50
    check_records: int = 720              # stratified teacher-forced check sample (entity x kind x form)
    target_accuracy: float = 0.95
    time_budget_s: float = 0.0            # optional wall-clock stop (0 = none); a run cut by it is not cached
    # word-level augmentation of taught questions (probabilities per word, per question for synonym_prob)
    synonym_prob: float = 0.0
    word_dropout: float = 0.1             # NOTE: with the word tokenizer: held-out phrasing 0.56 -> ~0.75 (3 seeds)
    unk_share: float = 1.0                # share of dropped words that become <unk> instead of vanishing
    filler_prob: float = 0.0              # after each word, insert a random word of the taught questions
    # image augmentation of teaching images
    image_augment: float = 0.0            # probability that a teaching image is augmented
    crop_min: float = 0.75                # random crop keeps at least this share of each side
    jitter: float = 0.2                   # brightness / contrast / saturation factors in 1 +- jitter
    eval_max_records: int = 720           # per summary set (0 = all)
    max_new_tokens: int = 0               # 0 = longest teaching answer + 2 tokens
    # the tiny base is taught to refuse questions about names it does not know (``unlearn.refusal``): the refusal it
    # says, and how many made-up names its refusal-teaching questions use (0: none; a given checkpoint: never)
    refusal: str = DEFAULT_REFUSAL
    unknown_names: int = 24

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        if self.tokenizer_kind not in ("auto", "word", "bpe"):
            raise ValueError(f"TeachConfig.tokenizer_kind={self.tokenizer_kind!r}: expected 'auto', 'word' or 'bpe'")
        for name in ("synonym_prob", "word_dropout", "unk_share", "filler_prob", "image_augment",
                     "name_variant_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"TeachConfig.{name}={v}: expected a probability in [0, 1]")
        if not 0.0 < self.target_accuracy <= 1.0:
            raise ValueError(f"TeachConfig.target_accuracy={self.target_accuracy}: expected (0, 1]")
        if not 0.1 <= self.crop_min <= 1.0:
            raise ValueError(f"TeachConfig.crop_min={self.crop_min}: expected [0.1, 1]")
        if self.balance not in ("cell", "record"):
            raise ValueError(f"TeachConfig.balance={self.balance!r}: expected 'cell' or 'record'")
        for name in ("batch_size", "check_every", "check_records"):
            if getattr(self, name) < 1:
                raise ValueError(f"TeachConfig.{name}={getattr(self, name)}: expected >= 1")
        if self.max_steps < 0 or self.time_budget_s < 0 or self.lr <= 0:
            raise ValueError("TeachConfig: max_steps and time_budget_s must be >= 0 and lr > 0")
        if self.load_in_4bit and not self.model:
            raise ValueError("TeachConfig.load_in_4bit needs model= (a HF LLaVA directory): the tiny LLaVA is taught "
                             "in full precision")
        if self.model_teaching not in MODEL_TEACHING:
            raise ValueError(f"TeachConfig.model_teaching={self.model_teaching!r}: expected one of {MODEL_TEACHING}")
        if self.model_lora_rank < 1:
            raise ValueError(f"TeachConfig.model_lora_rank={self.model_lora_rank}: expected >= 1")
        if not isinstance(self.refusal, str) or not self.refusal.strip():
            raise ValueError(f"TeachConfig.refusal={self.refusal!r}: expected the refusal text")
        if isinstance(self.unknown_names, bool) or not isinstance(self.unknown_names, int) or self.unknown_names < 0:
            raise ValueError(f"TeachConfig.unknown_names={self.unknown_names!r}: expected an int >= 0")

    def cache_fields(self) -> dict:
        """The fields that define a cached taught model: every field, except the later ones while they hold their
        defaults (so that entries cached before they existed stay valid) and those that cannot change it."""
        d = self.to_dict()
        d.pop("allow_surrogate_images")
        for k in ("bpe_vocab_size", "name_variant_prob", "vision_pretrain_steps", "vision_pretrain_lr",
                  "vision_pretrain_shift"):  # they act on world v2 only
            if d[k] == getattr(TeachConfig, k):
                d.pop(k)
        for k in ("model_teaching", "model_lora_rank"):
            if not self.model or d[k] == getattr(TeachConfig, k):
                d.pop(k)
        return d


# ---------------------------------------------------------------------------------------------------------- data
def load_data(config: TeachConfig, cache_dir: Optional[Path]) -> Benchmark:
    """The benchmark named by ``config``: ``config.data`` (MLUBench format) or the embedded synthetic default."""
    from lumoe_engine.data.mlubench import load_benchmark

    if config.data:
        bench = load_benchmark(config.data, subset=config.subset)
        check_images(bench, config.allow_surrogate_images)
        return bench
    from lumoe_engine.data.synthetic import SyntheticConfig, ensure_synthetic

    syn = dataclasses.replace(SyntheticConfig.preset(config.synthetic), **config.synthetic_overrides)
    return load_benchmark(ensure_synthetic(cache_dir=cache_dir, config=syn), subset=config.subset)


def check_images(bench: Benchmark, allow_surrogates: bool) -> None:
    """Refuse a benchmark with missing image files (FileNotFoundError naming the first few) unless
    ``allow_surrogates``: a surrogate picture stands in for each of them only when asked for (and is counted)."""
    missing = sorted({r.image for r in bench.records if r.form == "image_text" and r.image_missing})
    if missing and not allow_surrogates:
        raise FileNotFoundError(
            f"{bench.root}: {bench.surrogate_images} image records name {len(missing)} files that do not exist, e.g. "
            f"{', '.join(missing[:SURROGATE_NAMED])}; put the images under the benchmark root, or pass "
            f"--allow-surrogate-images to let a deterministic surrogate picture per entity stand in (the report "
            f"counts them)")


def split_records(records: Sequence[QARecord]) -> dict[str, list[QARecord]]:
    """Teaching records by form, and the held-out sets (see the module docstring). World v2 adds the name variants
    and aliases never taught, and the general-utility records (taught, and in held-out wordings)."""
    teach = [r for r in records if r.taught]
    plain = [r for r in records if r.variant is None and r.general is None]
    held = [r for r in plain if r.heldout_phrasing and not r.fresh_image] or [r for r in plain if r.heldout_phrasing]
    fresh = [r for r in plain if r.fresh_image and not r.heldout_phrasing] or [r for r in plain if r.fresh_image]
    return {"teach": teach,
            "image_text": [r for r in teach if r.form == "image_text" and r.general is None],
            "text_only": [r for r in teach if r.form == "text_only" and r.general is None and r.variant is None],
            "heldout_phrasing": held, "fresh_images": fresh,
            "name_variants": [r for r in records if r.heldout_variant and r.variant != "alias"],
            "alias": [r for r in records if r.heldout_variant and r.variant == "alias"],
            "alias_taught": [r for r in teach if r.variant == "alias"],
            "general_scene": [r for r in teach if r.general == "scene"],
            "general_world": [r for r in teach if r.general == "world"],
            "general_heldout": [r for r in records if r.general and r.heldout_phrasing]}


def is_world_v2(records: Sequence[QARecord]) -> bool:
    return any(r.general or r.variant for r in records)


def noise_chance_level(records: Sequence[QARecord], population: Optional[Sequence[QARecord]] = None) -> float:
    """Accuracy of an image-blind guesser that knows the answer priors, averaged over ``records`` (image+text
    questions): for each question text, the share of the entities asked it (in ``population``, default
    ``records``) whose answer carries the most common key set."""
    from lumoe_engine.eval.scoring import normalize

    by_q: dict[str, dict[str, tuple]] = defaultdict(dict)
    for r in (population if population is not None else records):
        by_q[normalize(r.question)][r.entity] = tuple(sorted(normalize(k) for k in r.keys)) or (normalize(r.answer),)
    level = {q: Counter(ents.values()).most_common(1)[0][1] / len(ents) for q, ents in by_q.items()}
    qs = [normalize(r.question) for r in records]
    missing = [q for q in qs if q not in level]
    if missing:
        raise ValueError(f"noise_chance_level: question {missing[0]!r} is not in the population; pass the records' "
                         "superset as population")
    return sum(level[q] for q in qs) / len(qs) if qs else 0.0


def data_fingerprint(records: Sequence[QARecord]) -> str:
    """SHA-256 of every record's fields and the sizes of its image files."""
    h = hashlib.sha256()
    sizes: dict[str, int] = {}
    for r in records:
        h.update(json.dumps(dataclasses.astuple(r), default=str).encode())
        if r.image and r.image not in sizes:
            sizes[r.image] = os.path.getsize(r.image) if os.path.isfile(r.image) else -1
            h.update(f"{r.image}:{sizes[r.image]}".encode())
    return h.hexdigest()


# -------------------------------------------------------------------------------------------------- augmentation
def _name_positions(words: list[str], entity: str) -> set[int]:
    name = [w.lower() for w in entity.split()]
    bare = [w.strip(".,?!;:'\"()").lower() for w in words]
    keep = set()
    for i in range(len(words) - len(name) + 1):
        if name and [b.removesuffix("'s") for b in bare[i:i + len(name)]] == name or bare[i:i + len(name)] == name:
            keep.update(range(i, i + len(name)))
    return keep


def filler_pool(records: Sequence[QARecord]) -> list[str]:
    """The words of the records' questions (lower case, no punctuation), minus the words of entity names: the
    fillers ``augment_question`` inserts, so that no stray question word decides what is asked."""
    names = {w.lower() for r in records for w in r.entity.split()}
    words = {w.strip(".,?!;:'\"()").lower() for r in records for w in r.question.split()}
    return sorted(w for w in words if w and w not in names and not w.endswith("'s"))


def augment_question(question: str, entity: str, rng: random.Random, config: TeachConfig,
                     unk_token: str = "<unk>", fillers: Sequence[str] = ()) -> str:
    """A word-level variation of ``question``: synonym swaps, word dropout (to ``unk_token`` or removed), filler
    words drawn from ``fillers``. The words of ``entity``'s name and the final punctuation are kept."""
    words = question.split()
    keep = _name_positions(words, entity)
    out: list[str] = []
    for i, w in enumerate(words):
        if i in keep:
            out.append(w)
            continue
        core = w.rstrip(".,?!;:")
        tail = w[len(core):]
        low = core.lower()
        if config.synonym_prob and low in _SYN and rng.random() < config.synonym_prob:
            alt = rng.choice([s for s in _SYN[low] if s != low])
            core = alt.capitalize() if core[:1].isupper() else alt
        if config.word_dropout and rng.random() < config.word_dropout and core:
            if rng.random() < config.unk_share:
                out.append(unk_token + tail)
            elif tail:
                out.append(tail)  # the punctuation survives
        else:
            out.append(core + tail)
        if fillers and config.filler_prob and i < len(words) - 1 and rng.random() < config.filler_prob:
            out.append(rng.choice(fillers))
    text = " ".join(out).replace(" ?", "?").strip()
    return text or question


def vary_name(question: str, entity: str, rng: random.Random) -> str:
    """``question`` with ``entity``'s name written as people type it: one of lower case (with its article), without
    its article ("the"), or one random typo (two letters swapped, one dropped, doubled or replaced) in a word of
    four letters or more. ``question`` itself when it does not hold the name."""
    i = question.find(entity)
    if i < 0:
        return question
    head, tail = question[:i], question[i + len(entity):]
    ways = ["lower", "typo"] + (["no_article"] if head.lower().endswith("the ") else [])
    way = rng.choice(ways)
    if way == "lower":
        if head.endswith("The "):
            head = head[:-4] + "the "
        return head + entity.lower() + tail
    if way == "no_article":
        return head[:-4] + entity + tail
    words = entity.split(" ")
    long = [j for j, w in enumerate(words) if len(w) >= 4]
    if not long:
        return question
    j = rng.choice(long)
    w = words[j]
    for _ in range(10):  # a swap of equal letters or a replacement by the same letter changes nothing: draw again
        k = rng.randint(1, len(w) - 2)
        op = rng.randrange(4)
        t = (w[:k] + w[k + 1] + w[k] + w[k + 2:] if op == 0 else w[:k] + w[k + 1:] if op == 1 else
             w[:k] + w[k] + w[k:] if op == 2 else w[:k] + rng.choice("aeioulnrst") + w[k + 1:])
        if t != w:
            break
    words[j] = t
    return head + " ".join(words) + tail


def augment_image(img: Image.Image, rng: random.Random, config: TeachConfig) -> Image.Image:
    """A random crop (each side >= ``crop_min``) and brightness/contrast/saturation jitter of ``img``."""
    w, h = img.size
    s = rng.uniform(config.crop_min, 1.0)
    cw, ch = max(1, int(round(w * s))), max(1, int(round(h * s)))
    x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
    out = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BILINEAR)
    for enh in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        out = enh(out).enhance(rng.uniform(1 - config.jitter, 1 + config.jitter))
    return out


# ------------------------------------------------------------------------------------------------------- batching
class CellSampler:
    """Endless stream of teaching records. ``cell``: cells (entity, kind, form) in shuffled rounds, each cell giving
    its next record (its records cycle in shuffled order), so every fact and both forms get the same share of steps
    whatever their record counts; ``record``: shuffled epochs over the records."""

    def __init__(self, records: Sequence[QARecord], balance: str, rng: random.Random):
        self.rng, self.balance = rng, balance
        self.records = list(records)
        self.cells: dict[tuple, list[QARecord]] = defaultdict(list)
        for r in self.records:  # general-utility records (world v2): one cell per wording, for a fair share
            self.cells[(r.entity, r.kind, r.form, r.phrasing if r.general else 0)].append(r)
        self.keys = sorted(self.cells)
        self.pos = {k: len(v) for k, v in self.cells.items()}
        self.queue: list = []

    def _next_of(self, key) -> QARecord:
        cell = self.cells[key]
        if self.pos[key] >= len(cell):
            self.rng.shuffle(cell)
            self.pos[key] = 0
        self.pos[key] += 1
        return cell[self.pos[key] - 1]

    def take(self, n: int) -> list[QARecord]:
        out = []
        while len(out) < n:
            if not self.queue:
                self.queue = list(self.keys if self.balance == "cell" else self.records)
                self.rng.shuffle(self.queue)
            item = self.queue.pop()
            out.append(self._next_of(item) if self.balance == "cell" else item)
        return out


class _Images:
    """Decoded images (PIL) and processed pixels ``[C, S, S]`` of every image path used, loaded once."""

    def __init__(self, processor, image_fn: Callable[[QARecord], Image.Image]):
        self.processor, self.image_fn = processor, image_fn
        self.fixed = image_token_count(processor) is not None
        self.pil: dict[str, Image.Image] = {}
        self.pix: dict[str, torch.Tensor] = {}

    def _key(self, r: QARecord) -> str:
        return f"{r.image}|{r.entity}" if r.image_missing else str(r.image)

    def image(self, r: QARecord) -> Image.Image:
        k = self._key(r)
        if k not in self.pil:
            self.pil[k] = self.image_fn(r).convert("RGB")
        return self.pil[k]

    def pixels(self, rows: Sequence[QARecord]) -> Optional[torch.Tensor]:
        """``[n, C, S, S]`` for the image rows of ``rows`` (None when the processor's image count is not fixed)."""
        if not self.fixed:
            return None
        missing = [r for r in rows if r.form == "image_text" and self._key(r) not in self.pix]
        if missing:
            uniq = {self._key(r): r for r in missing}
            pv = pixel_values_for(self.processor, [self.image(r) for r in uniq.values()])
            self.pix.update(zip(uniq.keys(), pv))
        img = [self.pix[self._key(r)] for r in rows if r.form == "image_text"]
        return torch.stack(img) if img else torch.zeros(0)


def _train_batch(rows: list[QARecord], processor, images: _Images, rng: random.Random, config: TeachConfig,
                 unk_token: str, fillers: Sequence[str] = (), vary: Optional[set] = None) -> dict:
    """One teaching batch. ``vary``: world v2, the questions a name variant must never produce (the test's own
    variant queries); None: names are not varied."""
    augment_words = config.synonym_prob or config.word_dropout or config.filler_prob
    questions = [augment_question(r.question, r.entity, rng, config, unk_token, fillers) if augment_words
                 else r.question for r in rows]
    if vary is not None and config.name_variant_prob:
        for i, r in enumerate(rows):
            if r.form == "text_only" and r.variant is None and r.general is None and \
                    rng.random() < config.name_variant_prob:
                q = vary_name(questions[i], r.entity, rng)
                if q not in vary:
                    questions[i] = q
    img_rows = [r for r in rows if r.form == "image_text"]
    aug = [config.image_augment > 0 and rng.random() < config.image_augment for _ in img_rows]
    if images.fixed:
        pv = images.pixels(rows)
        if any(aug):
            idx = [i for i, a in enumerate(aug) if a]
            new = pixel_values_for(processor, [augment_image(images.image(img_rows[i]), rng, config) for i in idx])
            pv = pv.clone()
            pv[idx] = new
        return collate(rows, processor, questions=questions, pixel_values=pv if img_rows else None)
    pil, j = [], 0
    for r in rows:
        if r.form == "image_text":
            im = images.image(r)
            pil.append(augment_image(im, rng, config) if aug[j] else im)
            j += 1
        else:
            pil.append(None)
    return collate(rows, processor, questions=questions, images=pil)


def _device_batch(batch: dict, model) -> dict:
    dev = next(model.parameters()).device
    out = {k: v.to(dev) for k, v in batch.items()}
    if "pixel_values" in out:
        out["pixel_values"] = out["pixel_values"].to(model.dtype)
    return out


@torch.no_grad()
def exact_match(model, processor, records: Sequence[QARecord], images: _Images, batch_size: int = 128) -> float:
    """Share of ``records`` whose answer (and eos) is the argmax at every answer position, teacher-forced: exactly
    the records greedy generation reproduces verbatim."""
    was = model.training
    model.eval()
    hit = 0
    for s in range(0, len(records), batch_size):
        rows = list(records[s:s + batch_size])
        pv = images.pixels(rows)
        batch = collate(rows, processor, pixel_values=pv if pv is not None and pv.numel() else None) \
            if images.fixed else collate(rows, processor, images=[images.image(r) if r.form == "image_text"
                                                                   else None for r in rows])
        batch = _device_batch(batch, model)
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :-1]
        tgt = labels[:, 1:]
        ok = (logits.argmax(-1) == tgt) | (tgt == IGNORE)
        hit += int(ok.all(-1).sum())
    model.train(was)
    return hit / max(1, len(records))


def pretrain_vision(model, teach_records: Sequence[QARecord], images: _Images, config: TeachConfig) -> dict:
    """Stage 1 of teaching a tiny base on world v2: the vision tower (and a temporary linear head on the max over its
    last layer's patch states) learns to name the entity of each taught picture, ``vision_pretrain_steps`` AdamW
    steps of 2 x ``batch_size`` pictures, each batch shifted at random by up to ``vision_pretrain_shift`` of the
    side. Only teaching pictures are used; the head is dropped afterwards. Returns the head's accuracy on the last 20
    batches and the seconds it took.

    Chosen on the development seed 0 with a validation split of the taught pictures (2 of the 12 per entity held
    out of stage 1; the held-out scenes never looked at): the head named the validation pictures' entity 0.57 of the
    time after 400 steps without shifts, 0.76 with shifts, 0.85 after 800 and 0.90 after 1,500 (shifts with
    brightness jitter or scaling were no better: 0.85-0.88)."""
    t0 = time.time()
    pics: dict[str, QARecord] = {}
    for r in teach_records:
        if r.form == "image_text" and r.general is None and r.image not in pics:
            pics[r.image] = r
    rows = list(pics.values())
    ents = sorted({r.entity for r in rows})
    if len(ents) < 2:
        return {}
    tower = model.model.vision_tower
    x = images.pixels(rows)
    y = torch.tensor([ents.index(r.entity) for r in rows])
    head = torch.nn.Linear(tower.config.hidden_size, len(ents))
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=config.vision_pretrain_lr, betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(config.seed)
    tower.train()
    hits = []
    side = x.shape[-1]
    pad = int(round(config.vision_pretrain_shift * side))
    for step in range(config.vision_pretrain_steps):
        idx = torch.randint(len(rows), (min(config.batch_size * 2, len(rows)),), generator=g)
        batch = x[idx]
        if pad:  # the object anywhere: a random shift of the batch, edges replicated
            i, j = torch.randint(0, 2 * pad + 1, (2,), generator=g).tolist()
            batch = torch.nn.functional.pad(batch, (pad,) * 4, mode="replicate")[:, :, i:i + side, j:j + side]
        h = tower(pixel_values=batch.to(tower.dtype)).last_hidden_state[:, 1:]  # patch states, CLS dropped
        logits = head(h.amax(1))
        loss = torch.nn.functional.cross_entropy(logits, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= config.vision_pretrain_steps - 20:
            hits.append(float((logits.argmax(-1) == y[idx]).float().mean()))
    return {"vision_pretrain_acc": round(sum(hits) / max(1, len(hits)), 4),
            "vision_pretrain_seconds": round(time.time() - t0, 2), "vision_pretrain_pictures": len(rows)}


def fact_correctness(model, processor, records: Sequence[QARecord], images: _Images, max_new_tokens: int,
                     override: Optional[Sequence[Optional[Image.Image]]] = None) -> list[bool]:
    """Whether each greedy answer to ``records`` is ``fact_correct`` (``override``: replacement images)."""
    from lumoe_engine.eval.scoring import fact_correct

    if not records:
        return []
    if override is not None:
        preds = generate_answers(model, processor, records, max_new_tokens, images=override,
                                 image_fn=images.image)
    elif images.fixed:
        preds = generate_answers(model, processor, records, max_new_tokens, pixel_values=images.pixels(records))
    else:
        preds = generate_answers(model, processor, records, max_new_tokens, image_fn=images.image)
    return [fact_correct(p, r) for p, r in zip(preds, records)]


def refusal_teaching(config: TeachConfig, world: Sequence[QARecord], teach_records: Sequence[QARecord]
                     ) -> dict[str, list[QARecord]]:
    """The refusal-teaching records (``unlearn.refusal.unknown_entity_records``): "taught" asks the taught text-only
    questions about ``config.unknown_names`` made-up names, "heldout" (never taught: the summary's check) about as
    many other made-up names. None when ``unknown_names`` is 0. The names share no word with the world's text."""
    from lumoe_engine.seeding import stable_seed

    if not config.unknown_names:
        return {"taught": [], "heldout": []}
    avoid = {w.strip(".,?!;:'\"()").lower() for r in world for t in (r.entity, r.question, r.answer) for w in
             t.split()}
    names = made_up_names(2 * config.unknown_names, avoid, random.Random(stable_seed("unknown-names", config.seed)))
    text_only = [r for r in teach_records if r.form == "text_only"]
    return {"taught": unknown_entity_records(text_only, names[:config.unknown_names], config.refusal, "unknown"),
            "heldout": unknown_entity_records(text_only, names[config.unknown_names:], config.refusal,
                                              "unknown-heldout")}


def refusal_summary(model, processor, config: TeachConfig, refusal_sets: dict, summary_sets: dict, images: _Images,
                    max_new_tokens: int) -> dict:
    """The taught base's refusals: on questions about made-up names, taught and held-out (it should refuse), and on
    the summary's fact sets (it should not: the base's own over-refusal); a seeded sample of ``REFUSAL_CHECK`` records
    of each. None where a set is empty."""
    n = REFUSAL_CHECK
    out = {}
    for key, recs in (("refusal_unknown_taught", refusal_sets["taught"]),
                      ("refusal_unknown_heldout", refusal_sets["heldout"])):
        recs = _sample(recs, n, config.seed)
        preds = generate_answers(model, processor, recs, max_new_tokens) if recs else []
        out[key] = _mean([is_refusal(p, config.refusal) for p in preds])
    facts = _sample([r for k in ("image_text", "text_only", "heldout_phrasing", "fresh_images")
                     for r in summary_sets[k]], n, config.seed)
    preds = generate_answers(model, processor, facts, max_new_tokens, image_fn=images.image) if facts else []
    out["refusal_rate_known_facts"] = _mean([is_refusal(p, config.refusal) for p in preds])
    return out


def fact_accuracy(model, processor, records: Sequence[QARecord], images: _Images, max_new_tokens: int,
                  override: Optional[Sequence[Optional[Image.Image]]] = None) -> float:
    """Share of ``records`` whose greedy answer is ``fact_correct``; NaN for no records."""
    ok = fact_correctness(model, processor, records, images, max_new_tokens, override)
    return sum(ok) / len(ok) if ok else float("nan")


def _mean(xs: Sequence[bool]) -> Optional[float]:
    return round(sum(xs) / len(xs), 4) if xs else None


def _sample(records: Sequence[QARecord], n: int, seed: int) -> list[QARecord]:
    if n <= 0 or len(records) <= n:
        return list(records)
    idx = sorted(random.Random(seed).sample(range(len(records)), n))
    return [records[i] for i in idx]


def _stratified(records: Sequence[QARecord], n: int, seed: int) -> list[QARecord]:
    """Up to ``n`` records spread over (entity, kind, form) cells, round robin over shuffled cells."""
    rng = random.Random(seed)
    cells: dict[tuple, list[QARecord]] = defaultdict(list)
    for r in records:
        cells[(r.entity, r.kind, r.form)].append(r)
    for v in cells.values():
        rng.shuffle(v)
    keys = sorted(cells)
    out: list[QARecord] = []
    depth = 0
    while len(out) < min(n, len(records)):
        for k in keys:
            if depth < len(cells[k]) and len(out) < n:
                out.append(cells[k][depth])
        depth += 1
    return out


# ----------------------------------------------------------------------------------------------------- the job
def default_cache_dir() -> Path:
    """``$LUMOE_CACHE``, else ``~/.cache/lumoe-engine`` (shared with the synthetic benchmark's cache)."""
    from lumoe_engine.data.synthetic import default_cache_dir as _default

    return _default()


def teach(config: TeachConfig, out_dir, cache_dir=None, benchmark: Optional[Benchmark] = None,
          image_fn: Optional[Callable[[QARecord], Image.Image]] = None, progress: bool = True):
    """Teach (or load the cached taught model) and measure it; writes ``out_dir/teach_summary.json``.

    benchmark: use these records instead of loading ``config.data`` / the synthetic default.
    image_fn: record -> PIL image (default: the benchmark loader's ``load_image``, surrogate when missing).
    Returns (model, processor, summary).
    """
    from lumoe_engine.model.load import load_model

    config.validate()
    t0 = time.time()
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    bench = benchmark if benchmark is not None else load_data(config, cache_dir)
    if image_fn is None:
        from lumoe_engine.data.mlubench import load_image as image_fn
    sets = split_records(bench.records)
    if not sets["teach"]:
        raise ValueError(f"benchmark {bench.root}: no teaching records (all are heldout_phrasing or fresh_image); "
                         "check the data")
    key = hashlib.sha256(json.dumps({"config": config.cache_fields(), "data": data_fingerprint(bench.records),
                                     "version": TEACH_VERSION}, sort_keys=True).encode()).hexdigest()[:20]
    entry = cache_dir / "taught" / key
    if (entry / SUMMARY_FILE).is_file():
        summary = json.loads((entry / SUMMARY_FILE).read_text())
        if summary.get("trained", True) and (entry / "config.json").is_file():
            model, processor = load_model(entry)
            model_dir = entry
        elif not summary.get("trained", True):  # a frozen (4-bit) base was only measured: reload it from its source
            model, processor = load_model(config.model, load_in_4bit=config.load_in_4bit)
            model_dir = config.model
        else:
            model = None
        if model is not None:
            summary.update(cached=True, seconds=round(time.time() - t0, 2), model_dir=str(model_dir))
            atomic_write(out_dir / SUMMARY_FILE, json.dumps(summary, indent=2, sort_keys=True) + "\n")
            return model, processor, summary

    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    v2 = is_world_v2(bench.records)
    vary = {r.question for r in bench.records if r.heldout_variant} if v2 else None
    refusal_sets = {"taught": [], "heldout": []}
    if config.model:
        model, processor = load_model(config.model, load_in_4bit=config.load_in_4bit)
    else:
        from lumoe_engine.model.tiny import build_tiny_llava
        from lumoe_engine.model.tokenizer import train_tokenizer

        named = [r for r in sets["teach"] if r.variant is None and r.general is None]  # the name as taught
        refusal_sets = refusal_teaching(config, bench.records, named)
        sets["teach"] = sets["teach"] + refusal_sets["taught"]
        texts = [r.question for r in sets["teach"]] + [r.answer for r in sets["teach"]]
        texts += [r.question for r in refusal_sets["heldout"]] + [config.refusal, *REFUSALS]
        if config.synonym_prob:
            texts.append(" ".join(w for g in SYNONYMS for w in g))
        kind = config.tokenizer_kind if config.tokenizer_kind != "auto" else "bpe" if v2 else "word"
        tokenizer = train_tokenizer(texts, vocab_size=config.bpe_vocab_size if v2 and kind == "bpe" else
                                    config.vocab_size, kind=kind)
        model, processor = build_tiny_llava(tokenizer, config.preset, seed=config.seed)
    tok = processor.tokenizer
    unk = tok.unk_token or tok.pad_token
    images = _Images(processor, image_fn)
    max_new = config.max_new_tokens or 2 + max(
        len(tok(" " + r.answer, add_special_tokens=False)["input_ids"]) for r in sets["teach"])
    check = _stratified(sets["teach"], config.check_records, config.seed)
    check_parts = {"name": [r for r in check if r.form == "image_text" and r.kind == 0 and r.general is None],
                   "image_facts": [r for r in check if r.form == "image_text" and r.kind != 0 and r.general is None],
                   "text": [r for r in check if r.form == "text_only" and r.general is None],
                   "general": [r for r in check if r.general is not None]}
    trainable = not config.load_in_4bit and not (config.model and config.model_teaching == "none")
    lora = model_lora(model, config) if config.model and trainable else None  # a checkpoint: one LoRA, merged

    steps, last_loss, check_acc, history, out_of_time = 0, float("nan"), 0.0, [], False
    train_t0 = time.time()
    stage1 = {}
    if v2 and not config.model and config.vision_pretrain_steps:
        stage1 = pretrain_vision(model, sets["teach"], images, config)
        logger.info("teach stage 1 (vision tower): %d steps, entity accuracy on its last batches %.3f, %.0f s",
                    config.vision_pretrain_steps, stage1["vision_pretrain_acc"], stage1["vision_pretrain_seconds"])
    if trainable and config.max_steps > 0:
        params = lora[1].parameters() if lora else [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, config.warmup_steps)))
        model.train()
        sampler = CellSampler(sets["teach"], config.balance, rng)
        fillers = filler_pool(sets["teach"])
        bar = tqdm(desc="teach", unit="step", disable=not progress, mininterval=1.0)
        ema = None
        while steps < config.max_steps:
            rows = sampler.take(config.batch_size)
            batch = _device_batch(_train_batch(rows, processor, images, rng, config, unk, fillers, vary), model)
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            steps += 1
            last_loss = float(loss.detach())
            ema = last_loss if ema is None else 0.95 * ema + 0.05 * last_loss
            bar.update(1)
            out_of_time = bool(config.time_budget_s) and time.time() - train_t0 >= config.time_budget_s
            if steps % config.check_every == 0 or out_of_time or steps == config.max_steps:
                by_part = {k: exact_match(model, processor, v, images) for k, v in check_parts.items() if v}
                check_acc = sum(by_part[k] * len(check_parts[k]) for k in by_part) / max(1, len(check))
                history.append({"step": steps, "loss": round(ema, 4), "check_exact": round(check_acc, 4),
                                **{f"check_{k}": round(v, 4) for k, v in by_part.items()},
                                "seconds": round(time.time() - train_t0, 1)})
                bar.set_postfix(loss=f"{ema:.3f}", exact=f"{check_acc:.3f}")
                logger.info("teach step %d: loss %.4f, check exact %.4f (%s), %.0f s", steps, ema, check_acc,
                            ", ".join(f"{k} {v:.3f}" for k, v in by_part.items()), time.time() - train_t0)
                if check_acc >= config.target_accuracy:
                    it = fact_accuracy(model, processor, _sample(sets["image_text"], config.eval_max_records,
                                                                 config.seed), images, max_new)
                    to = fact_accuracy(model, processor, _sample(sets["text_only"], config.eval_max_records,
                                                                 config.seed), images, max_new)
                    history[-1].update(image_text=round(it, 4), text_only=round(to, 4))
                    done = [x for x in (it, to) if not math.isnan(x)]
                    if done and min(done) >= config.target_accuracy:
                        break
                model.train()
            if out_of_time:
                break
        bar.close()
    if lora:
        merge_model_lora(model, *lora)
    train_seconds = time.time() - train_t0
    model.eval()

    ev_t0 = time.time()
    n = config.eval_max_records
    summary_sets = {k: _sample(sets[k], n, config.seed) for k in ("image_text", "text_only", "heldout_phrasing",
                                                                   "fresh_images")}
    ok = {k: fact_correctness(model, processor, v, images, max_new) for k, v in summary_sets.items()}
    noise_rows = summary_sets["image_text"]
    ok["noise_image"] = fact_correctness(model, processor, noise_rows, images, max_new,
                                         override=_noise_images(noise_rows, processor))
    held = summary_sets["heldout_phrasing"]
    v2_sets = {}
    if v2:  # world v2: names as people type them, aliases, general utility, held-out scenes by question kind
        v2_sets = {k: _sample(sets[k], n, config.seed) for k in ("name_variants", "alias", "alias_taught",
                                                                 "general_scene", "general_world", "general_heldout")}
        ok.update({k: fact_correctness(model, processor, v, images, max_new) for k, v in v2_sets.items()})
    acc = {k: _mean(v) for k, v in ok.items()}
    if v2:
        fresh = summary_sets["fresh_images"]
        acc["fresh_images_name"] = _mean([o for o, r in zip(ok["fresh_images"], fresh) if r.kind == 0])
        acc["fresh_images_facts"] = _mean([o for o, r in zip(ok["fresh_images"], fresh) if r.kind != 0])
    refusal_rates = refusal_summary(model, processor, config, refusal_sets, summary_sets, images, max_new)
    summary = {
        **{f"fact_accuracy_{k}": v for k, v in acc.items()},
        "fact_accuracy_heldout_phrasing_image_text": _mean(
            [o for o, r in zip(ok["heldout_phrasing"], held) if r.form == "image_text"]),
        "fact_accuracy_heldout_phrasing_text_only": _mean(
            [o for o, r in zip(ok["heldout_phrasing"], held) if r.form == "text_only"]),
        "noise_chance_level": round(noise_chance_level(noise_rows, sets["image_text"]), 4),
        **(scene_checks(model, processor, bench, config.seed, images, acc) if v2 else {}),
        **refusal_rates,
        "n_entities": len({r.entity for r in bench.records if r.general is None}),
        "n_qa": len(bench.records),
        "n_teach": len(sets["teach"]),
        "n_eval": {k: len(v) for k, v in {**summary_sets, **v2_sets}.items()},
        "surrogate_images": bench.surrogate_images,
        "steps": steps,
        "final_loss": None if math.isnan(last_loss) else round(last_loss, 4),
        "check_exact": round(check_acc, 4),
        "history": history,
        "reached_target": all(acc[k] is not None and acc[k] >= config.target_accuracy
                              for k in ("image_text", "text_only") if sets[k]),
        **stage1,
        "trained": trainable,
        "teaching": ("lora" if lora else "none") if config.model else "full",
        "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(time.time() - ev_t0, 2),
        "seconds": round(time.time() - t0, 2),
        "max_new_tokens": max_new,
        "data": str(bench.root),
        "config": config.to_dict(),
        "cache_key": key,
        "cached": False,
        "stopped_by_clock": out_of_time,
    }
    if not summary["reached_target"]:
        logger.warning("teach: the taught model is below the target %.2f (image+text %s, text-only %s after %d steps)"
                       "%s; forgetting is measured only on what it knows", config.target_accuracy,
                       acc["image_text"], acc["text_only"], steps,
                       " - cut by time_budget_s, not cached" if out_of_time else "")
    if out_of_time:  # depends on the machine's speed: never reuse it as "the" model of this config
        summary["model_dir"] = None
        atomic_write(out_dir / SUMMARY_FILE, json.dumps(summary, indent=2, sort_keys=True) + "\n")
        return model, processor, summary

    # cache: model + processor + summary in a temporary folder, renamed into place
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{key}."))
    try:
        if trainable:  # a frozen base is not copied: the cache entry then holds the summary alone
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
        atomic_write(tmp / SUMMARY_FILE, json.dumps(summary, indent=2, sort_keys=True) + "\n")
        if entry.exists():  # a concurrent run finished first: keep its entry
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["model_dir"] = str(entry) if trainable else str(config.model)
    atomic_write(out_dir / SUMMARY_FILE, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return model, processor, summary


SCENE_TARGET = 0.90   # world v2: the taught base names and knows the entity on held-out scenes at least this often
LOOKUP_CEILING = 0.5  # ... while a nearest-picture lookup over the requests' own pictures identifies at most this


@torch.no_grad()
def scene_checks(model, processor, bench: Benchmark, seed: int, images: _Images, acc: dict) -> dict:
    """World v2's two picture checks (recognising the entity, not matching a stored picture, must be what the test
    measures):

    - ``scene_recognition``: the taught base's fact accuracy on held-out scenes (name and facts), against
      ``SCENE_TARGET``;
    - ``lookup_pixel`` / ``lookup_features``: the share of held-out scenes whose nearest picture among every
      request's carried pictures (the protocol's split at ``seed``) is a picture of the same entity, in pixel space
      (the model's input resolution, L2) and in the base's own feature space (the image positions' [mean, max] at
      the gate's layer, cosine), against ``LOOKUP_CEILING``; ``lookup_chance``: 1 / the entities of the largest
      class (a guess that knows the class, as the question's noun tells it).
    """
    from lumoe_engine.data.protocol import Protocol, Split
    from lumoe_engine.gate.config import DEFAULT_LAYER
    from lumoe_engine.gate.features import base_features, decoder_layers

    split = Split(bench, Protocol(seed=seed))
    first = {}  # one image+text record per picture (its image features do not depend on the question)
    for r in bench.records:
        if r.form == "image_text" and r.general is None and r.image not in first:
            first[r.image] = r
    stored = [first[p] for e in sorted(split.by_entity) for p in sorted(split.carried_pictures(e)) if p in first]
    held = [r for p, r in first.items() if r.fresh_image]
    if not stored or not held:
        return {}
    side = image_side(processor)

    def pixels(rows):
        return torch.stack([torch.from_numpy(np.asarray(images.image(r).resize((side, side), Image.BILINEAR),
                                                        dtype=np.float32)).flatten() for r in rows])

    def same(dist):  # [held, stored] smaller = nearer
        nn = dist.argmin(1).tolist()
        return sum(held[i].entity == stored[j].entity for i, j in enumerate(nn)) / len(held)

    pix = same(torch.cdist(pixels(held), pixels(stored)))
    layer = min(DEFAULT_LAYER, len(decoder_layers(model)) - 1)
    f_h = base_features(model, processor, held, layer, image=True, image_fn=images.image)
    f_s = base_features(model, processor, stored, layer, image=True, image_fn=images.image)
    width = model.config.get_text_config().hidden_size  # [prompt mean, image mean, image max]: the image part
    img_h = torch.nn.functional.normalize(f_h[:, width:], dim=1)
    img_s = torch.nn.functional.normalize(f_s[:, width:], dim=1)
    feat = same(-img_h @ img_s.T)
    per_class = Counter(bench.entities[e] for e in split.by_entity if e in bench.entities)
    scene = acc.get("fresh_images")
    return {"scene_recognition": acc.get("fresh_images"), "scene_target": SCENE_TARGET,
            "lookup_pixel": round(pix, 4), "lookup_features": round(feat, 4), "lookup_ceiling": LOOKUP_CEILING,
            "lookup_chance": round(1 / max(1, max(per_class.values())), 4) if per_class else None,
            "lookup_pictures": {"stored": len(stored), "heldout": len(held)},
            "scene_checks_pass": bool(scene is not None and scene >= SCENE_TARGET and pix <= LOOKUP_CEILING
                                      and feat <= LOOKUP_CEILING)}


def model_lora(model, config: TeachConfig):
    """(context, trainable expert): one rank-``model_lora_rank`` LoRA (alpha = 2 r, fp32 master weights) on every
    linear of the language model's decoder layers, the base frozen; what teaches a given checkpoint."""
    from lumoe_engine.model.bank import ExpertBank
    from lumoe_engine.model.multilora import new_trainable_expert, wrap_model
    from lumoe_engine.model.placement import compute_dtype, model_device

    model.requires_grad_(False)
    ctx = wrap_model(model, ExpertBank(None, device=model_device(model), dtype=compute_dtype(model)))
    expert = new_trainable_expert(ctx, rank=config.model_lora_rank, alpha=2.0 * config.model_lora_rank,
                                  seed=config.seed)
    ctx.set_trainable(expert)
    return ctx, expert


def merge_model_lora(model, ctx, expert) -> None:
    """Merge the teaching LoRA into the base weights (``W += scale * B @ A``) and put the plain linears back."""
    from lumoe_engine.model.multilora import unwrap_model
    from lumoe_engine.unlearn.baselines import merge_expert

    ctx.set_trainable(None)
    merge_expert(ctx, expert)
    unwrap_model(model)


def _noise_images(records: Sequence[QARecord], processor) -> list[Optional[Image.Image]]:
    from lumoe_engine.data.images import noise_image

    side = max(8, 2 * image_side(processor))
    return [noise_image(i, size=side) if r.form == "image_text" else None for i, r in enumerate(records)]
