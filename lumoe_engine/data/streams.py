"""Request streams: the order in which unlearning requests reach the engine.

A stream is a list of ``Request``s, learned one after the other. Specs (``build_stream``):

- ``"abcd"``, ``"cabd"`` (or any order of the benchmark's task letters, each at most once): one request per task,
  forgetting all of the task's forget entities; retain = the task's retain entities.
- ``"entity"``: one request per forget entity of tasks A-D, tasks in order, entities in task-file order; retain = the
  retain entities of the entity's task.
- ``"synthetic:N"``: N requests of one entity each: first the entities some task forgets (tasks in order), then the
  other entities of the task files (classes round robin), then — only when N needs them — entities of no task file
  (classes round robin), always leaving ``NEVER_REQUESTED_KEEP`` of those never requested: the never-requested
  retain set shrinks by one entity per such request (a warning says so; ``metadata["untasked"]`` marks them). An
  entity is never requested twice; N above the number of entities available raises ValueError naming the largest N
  (use a larger synthetic preset). Retain of a request: its task's retain entities; for an entity no task forgets,
  the task-retain entities of its class; when none of them is left, any task-retain entity; when the stream requests
  every task-retain entity, the never-requested entities of its class, else all never-requested entities (which
  then count as retain, so the evaluator's never-requested set may become empty: ``retain_source`` says which).

Records. Forget records of a request = its entities' *teachable* records (``heldout_phrasing`` and ``fresh_image``
False, both forms); the evaluation additionally uses the held-out phrasings and fresh images of the same entities.
Retain records = the teachable records of the retain entities. A retain entity that the stream itself requests (at
any step) is left out of every retain set, so that retain sets mean the same thing at every step; a request whose
retain set ends up empty says so in ``metadata["retain_empty"]`` (trainers needing retain data must handle it).

Request ids are safe as file names (``[A-Za-z0-9_.-]``) and unique within a stream: ``taskA``; ``e007-soquour_otter``;
``s0042-keprae``.
"""
from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

from lumoe_engine.data.records import GENERAL_ENTITY, Benchmark, QARecord

STREAM_SPECS = ("abcd", "cabd", "entity", "synthetic:N")
ENTITY_TASKS = ("A", "B", "C", "D")  # the tasks an "entity" stream walks, in order
_SAFE_ID = re.compile(r"^[A-Za-z0-9_.-]+$")
# entities of no task file that a synthetic:N stream never requests: the never-requested retain set keeps at least
# this many (one request per entity; N beyond the task files takes the others, classes round robin)
NEVER_REQUESTED_KEEP = 4
logger = logging.getLogger("lumoe_engine.data.streams")


@dataclass
class Request:
    """One unlearning request of a stream.

    id:       unique within the stream, safe as a file name; the expert trained for it carries the same id
    forget:   teachable records (both forms) of the entities to forget
    retain:   teachable records of the retain entities (may be empty: see ``metadata["retain_empty"]``)
    entities: the entities to forget, in stream order
    task:     the task the request comes from ("A".."D"), None when no task forgets its entity
    metadata: spec, index, kind ("task" | "entity" | "synthetic"), retain_entities, retain_source, retain_empty,
              aliases (the entities' other names, from the benchmark)
    """

    id: str
    forget: list[QARecord]
    retain: list[QARecord]
    entities: tuple[str, ...]
    task: Optional[str] = None
    metadata: dict = field(default_factory=dict)

    @property
    def retain_entities(self) -> tuple[str, ...]:
        """The retain entities, in first-appearance order."""
        return tuple(self.metadata.get("retain_entities", ()))


def slug(name: str) -> str:
    """A file-name-safe lower-case form of ``name`` ("Vorla Quintessa" -> "vorla_quintessa"; non-Latin -> hash)."""
    ascii_ = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    s = re.sub(r"[^A-Za-z0-9]+", "_", ascii_).strip("_").lower()[:40]
    return s or "x" + hashlib.sha1(name.encode("utf-8")).hexdigest()[:8]


def _teachable(recs) -> list[QARecord]:
    return [r for r in recs if not r.heldout_phrasing and not r.fresh_image]


def ordered_unique(names) -> list[str]:
    """``names`` without repeats, in first-seen order."""
    out, seen = [], set()
    for n in names:
        if n not in seen:
            seen.add(n)
            out.append(n)
    return out


def _options() -> str:
    return ('"abcd", "cabd" (or another order of the task letters), "entity", "synthetic:N" (N a positive int)')


def build_stream(benchmark: Benchmark, spec: str) -> list[Request]:
    """The requests of stream ``spec`` over ``benchmark``, in the order they are learned (see the module docstring).

    Raises ValueError for an unknown spec (listing the options), a task the benchmark lacks, an N that is not a
    positive int or larger than the entities available, and TypeError when ``benchmark`` is not a Benchmark.
    """
    if not isinstance(benchmark, Benchmark):
        raise TypeError(f"build_stream: benchmark must be a lumoe_engine.data.records.Benchmark "
                        f"(mlubench.load_benchmark), got {type(benchmark).__name__}")
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"stream spec must be a non-empty string, one of {_options()}; got {spec!r}")
    s = spec.strip().lower()
    by_entity: dict[str, list[QARecord]] = defaultdict(list)
    for r in benchmark.records:
        by_entity[r.entity].append(r)

    if s == "entity":
        plan = []
        for t in ENTITY_TASKS:
            _need_task(benchmark, t, spec)
            for e in ordered_unique(r.entity for r in benchmark.tasks[t]["forget"]):
                plan.append(((e,), t))
        kind = "entity"
    elif s.startswith("synthetic:"):
        plan = _synthetic_plan(benchmark, spec, s[len("synthetic:"):])
        kind = "synthetic"
    elif s.isalpha() and len(set(s)) == len(s):
        plan = []
        for letter in s.upper():
            _need_task(benchmark, letter, spec)
            plan.append((tuple(ordered_unique(r.entity for r in benchmark.tasks[letter]["forget"])), letter))
        kind = "task"
    else:
        raise ValueError(f"unknown stream spec {spec!r}; choose one of {_options()}")

    requested = {e for ents, _ in plan for e in ents}
    task_files = {r.entity for t in benchmark.tasks.values() for split in t.values() for r in split}
    retain_pool = _retain_pool(benchmark, requested)
    width = max(3 if kind == "entity" else 4, len(str(len(plan) - 1)))
    out: list[Request] = []
    for i, (ents, task) in enumerate(plan):
        if not ents:
            raise ValueError(f"stream {spec!r}: task {task} has no forget entities; the task file "
                             f"Tasks/task{task}_forget.json is empty")
        missing = [e for e in ents if not by_entity.get(e)]
        if missing:
            raise ValueError(f"stream {spec!r}: entity {missing[0]!r} has no records in Entities/; "
                             f"the benchmark at {benchmark.root} is inconsistent")
        if kind == "task":
            rid = f"task{task}"
        else:
            rid = f"{'e' if kind == 'entity' else 's'}{i:0{width}d}-{slug(ents[0])}"
        retain_ents, source = _retain_for(benchmark, ents, task, requested, retain_pool)
        forget = [r for e in ents for r in _teachable(by_entity[e])]
        retain = [r for e in retain_ents for r in _teachable(by_entity.get(e, ()))]
        assert _SAFE_ID.match(rid), rid
        out.append(Request(id=rid, forget=forget, retain=retain, entities=tuple(ents), task=task,
                           metadata={"spec": spec, "index": i, "kind": kind, "retain_entities": list(retain_ents),
                                     "aliases": [a for e in ents for a in benchmark.aliases.get(e, ())],
                                     "retain_source": source, "retain_empty": not retain,
                                     **({"untasked": True} if kind == "synthetic" and task is None
                                        and ents[0] not in task_files else {})}))
    return out


def _need_task(benchmark: Benchmark, task: str, spec: str) -> None:
    if task not in benchmark.tasks:
        raise ValueError(f"stream {spec!r} needs task {task}, but the benchmark at {benchmark.root} has tasks "
                         f"{sorted(benchmark.tasks) or 'none'} (Tasks/task<X>_forget.json); choose one of {_options()}")


def _task_entities(benchmark: Benchmark, split: str) -> list[str]:
    return ordered_unique(r.entity for t in sorted(benchmark.tasks) for r in benchmark.tasks[t][split])


def _retain_pool(benchmark: Benchmark, requested: set) -> dict[str, list[str]]:
    """class -> task-retain entities the stream never requests (first-appearance order)."""
    pool: dict[str, list[str]] = defaultdict(list)
    for e in _task_entities(benchmark, "retain"):
        if e not in requested:
            pool[benchmark.entities.get(e, "")].append(e)
    return pool


def _retain_for(benchmark, ents, task, requested, pool) -> tuple[list[str], str]:
    if task is not None:
        own = [e for e in ordered_unique(r.entity for r in benchmark.tasks[task]["retain"]) if e not in requested]
        if own:
            return own, "task"
    classes = ordered_unique(benchmark.entities.get(e, "") for e in ents)
    same = [e for c in classes for e in pool.get(c, ())]
    if same:
        return same, "class"
    anyc = [e for c in sorted(pool) for e in pool[c]]
    if anyc:
        return anyc, "any"
    # no task-retain entity is left (a long synthetic stream requested them all): the entities of no task file that
    # the stream never requests stand in (those of the request's class, else all of them); they then count as
    # retain entities, not as never-requested ones
    in_files = {r.entity for t in benchmark.tasks.values() for split in t.values() for r in split}
    never = [e for e in sorted(benchmark.entities) if e not in in_files and e not in requested]
    same = [e for e in never if benchmark.entities.get(e, "") in classes]
    if same or never:
        return same or never, "never-requested"
    return [], "none"


def _synthetic_plan(benchmark: Benchmark, spec: str, n_text: str) -> list[tuple[tuple[str, ...], Optional[str]]]:
    try:
        n = int(n_text)
    except ValueError:
        n = 0
    if n < 1 or str(n) != n_text.strip().lstrip("+"):
        raise ValueError(f"stream spec {spec!r}: N must be a positive int (\"synthetic:20\"); got {n_text!r}")
    task_of: dict[str, str] = {}
    for t in sorted(benchmark.tasks):
        for r in benchmark.tasks[t]["forget"]:
            task_of.setdefault(r.entity, t)
    first = ordered_unique(task_of)  # tasks in order, file order within a task
    chosen = set(first)
    by_cls: dict[str, list[str]] = defaultdict(list)
    for e in sorted(_task_entities(benchmark, "retain")):
        if e not in chosen:
            by_cls[benchmark.entities.get(e, "")].append(e)
    others, i = [], 0
    while any(i < len(v) for v in by_cls.values()):
        others += [by_cls[c][i] for c in sorted(by_cls) if i < len(by_cls[c])]
        i += 1
    order = first + others
    in_files = set(order) | set(_task_entities(benchmark, "retain"))
    untasked = _round_robin(benchmark, [e for e in benchmark.entities if e not in in_files and e != GENERAL_ENTITY])
    extra = untasked[:max(0, len(untasked) - NEVER_REQUESTED_KEEP)]
    largest = len(order) + len(extra)
    if n > largest:
        raise ValueError(
            f"stream spec {spec!r}: N = {n} requests, but this benchmark has only {largest} entities that can be "
            f"requested (one request per entity, never twice: the {len(order)} entities of the task files, then "
            f"entities of no task file as long as {NEVER_REQUESTED_KEEP} of them stay never requested); the largest N "
            f"is {largest}. Use N <= {largest} or a larger synthetic preset (--synthetic medium | large, "
            f"SyntheticConfig.preset('medium' | 'large'))")
    if n > len(order):
        never_before, never_after = len(untasked), len(untasked) - (n - len(order))
        logger.warning("stream %r: %d requests exceed the %d entities of the task files; %d entities of no task file "
                       "are requested too, so the never-requested retain set shrinks from %d to %d entities",
                       spec, n, len(order), n - len(order), never_before, never_after)
    return [((e,), task_of.get(e)) for e in (order + extra)[:n]]


def _round_robin(benchmark: Benchmark, entities) -> list[str]:
    """``entities`` ordered class by class round robin (classes sorted, names sorted within a class)."""
    by_cls: dict[str, list[str]] = defaultdict(list)
    for e in sorted(entities):
        by_cls[benchmark.entities.get(e, "")].append(e)
    out, i = [], 0
    while any(i < len(v) for v in by_cls.values()):
        out += [by_cls[c][i] for c in sorted(by_cls) if i < len(by_cls[c])]
        i += 1
    return out


__all__ = ["Request", "build_stream", "slug", "STREAM_SPECS", "ENTITY_TASKS", "NEVER_REQUESTED_KEEP"]
