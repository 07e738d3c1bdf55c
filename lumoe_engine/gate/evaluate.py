"""Gate evaluation on the taught embedded default: does the gate send each forget query to its request's expert,
and nothing else anywhere?

``python lumoe_engine/run.py gate-eval --out DIR`` (or ``gate_eval(out_dir)``): teach (or load the cached) tiny LLaVA
with ``TeachConfig()``, extract the gate features of every record once (one prompt-only forward per batch, every
decoder layer hooked), then build the gate request after request, as the stream does, in two settings:

- ``per_task``: one expert per task A, B, C, D (positives: the queries of that task's forget entities);
- ``per_entity``: one expert per forget entity of tasks A-D (in task order).

The records follow the protocol (``data.protocol``, the same split as a stream): a request's positives are its
*request data* (some wordings, some pictures); negatives of a new head: the request data of the tasks' retain
entities (``retain_pool="all"``; ``"seen"``: only the tasks seen so far), the protocol's general pool, and the request
data of the requests already in the bank (``negatives="seen"``, the lifelong stream: old heads never see later
requests; ``"all"`` uses every other request, an offline upper bound). Test data never enters gate training or
calibration. The configuration's recipe (``GateConfig``) may add, per request, counterfactual negatives (its images
asked other classes' questions and the reverse: ``features.counterfactual_records``, off by default), reworded copies
of its queries as positives (``features.augmented_records``) and one sub-head per entity for a request that forgets
several. The gate's similarity bound (``Gate``) is on by default; ``GateConfig(similarity=None)`` / ``--similarity
-1`` turns it off (the sweep reports the default without it too).

Metrics per setting (top-1 routing; "right" = the expert of the query's request):
- route_acc_request_image_text / _text_only: the request data itself (what the gate was fitted on, bar calibration);
- route_acc_<form> for every test form (``TEST_FORMS``: image_text, text_only, reworded, name_variants, alias,
  fresh_scene): queries the gate never saw;
- route_acc_typed_<variant> (``TYPED_VARIANTS``: lower, no_article, typo, all): the text-only test queries of each
  forget entity that write its name, rewritten as people type it (``typed_name_records``: the name in lower case;
  without the article before it; one typo - two neighbouring letters swapped - in a name of at least
  ``TYPO_MIN_LETTERS`` letters; all three at once), built from the test queries only and measured only (nothing is
  chosen on them). The name channel routes the text-only queries of an expert with names, so these measure its
  text matching;
- fpr_retain / fpr_unrequested / fpr_general: test queries of retain entities, of never-requested entities, and
  general-utility queries routed to any expert;
- fnr: forget queries routed to no expert, per form; n_experts; per-head calibration (fpr_cal, tpr_cal).

Letters: N records, D feature width, E experts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from lumoe_engine.data.protocol import REQUEST_FORMS, TEST_FORMS, Protocol, Split
from lumoe_engine.data.records import GENERAL_ENTITY, QARecord
from lumoe_engine.fileio import atomic_write
from lumoe_engine.gate.config import DEFAULT_LAYER, GATE_PRESETS, HEADS, GateConfig, gate_preset
from lumoe_engine.gate.features import POOLINGS, decoder_layers, layer_features
from lumoe_engine.gate.gate import Gate
from lumoe_engine.gate.recognition import request_facts

logger = logging.getLogger("lumoe_engine.gate")

SUMMARY_FILE = "gate_summary.json"
# The gate configuration measured here is ``GateConfig`` (lumoe_engine/gate/config.py: the production defaults and
# the measurements behind them); gate-eval uses its "strict" preset (target_fpr 0.001).
SETTINGS = ("per_task", "per_entity")
# gate-eval's own test form: a forget entity's name as people type it in its text-only test queries
TYPED_VARIANTS = ("lower", "no_article", "typo", "all")
TYPO_MIN_LETTERS = 6  # a name this long (letters, words joined) gets a typo (as "long" as the name channel's fuzzy)
# the gate's targets on test data (the protocol's forms; fpr on retain / never-requested / general test queries)
TARGETS = {"route_acc_fresh_scene": 0.97, "route_acc_reworded": 0.97, "route_acc_name_variants": 0.95,
           "route_acc_alias": 0.95, "fpr_retain": 0.01, "fpr_unrequested": 0.01, "fpr_general": 0.005}


# ------------------------------------------------------------------------------------------------- record sets
def record_sets(bench, protocol: Optional[Protocol] = None) -> dict:
    """The records of the evaluation, by the protocol's split (``data.protocol``), from a loaded benchmark.

    returns {"tasks": [task names], "forget": {task: [entity, ...]}, "train": {entity: request data (the gate's
    positives)}, "test": {entity: {test form: records}}, "typed": {entity: {typed variant: records}} (built from
    its text-only test records, ``typed_name_records``), "aliases": {entity: its aliases}, "retain_train": {task: the request data of its retain
    entities (negatives)}, "retain_eval": test records of the retain entities, "unrequested": test records of the
    never-requested entities, "general_pool": taught general queries (negatives), "general": general test queries,
    "split": the Split}
    """
    tasks = sorted(bench.tasks)
    if not tasks:
        raise ValueError(f"benchmark {bench.root}: no tasks; the gate evaluation needs task forget/retain sets")
    split = Split(bench, protocol)
    forget = {t: sorted({r.entity for r in bench.tasks[t]["forget"]}) for t in tasks}
    forgotten = {e for t in tasks for e in forget[t]}
    retain_of = {t: sorted({r.entity for r in bench.tasks[t]["retain"]} - forgotten) for t in tasks}
    retain_ents = sorted({e for t in tasks for e in retain_of[t]})
    requested = forgotten | set(retain_ents)
    never = sorted(e for e in split.by_entity if e not in requested and e != GENERAL_ENTITY)
    test = {e: split.test_sets([e]) for e in forgotten}
    return {"tasks": tasks, "forget": forget, "split": split,
            "train": {e: split.request_data(e) for e in forgotten},
            "test": test,
            "typed": {e: typed_name_records(e, [r for f in TEST_FORMS for r in test[e][f] if r.form == "text_only"])
                      for e in forgotten},
            "aliases": {e: list(getattr(bench, "aliases", {}).get(e, ())) for e in forgotten},
            "retain_train": {t: [r for e in retain_of[t] for r in split.request_data(e)] for t in tasks},
            "retain_eval": split.retain_test(retain_ents), "unrequested": split.retain_test(never),
            "general_pool": list(split.general_pool), "general": list(split.general_test)}


def _typo(word: str, seed: int) -> str:
    """``word`` with two neighbouring, different letters swapped, at a seeded position (unchanged if none)."""
    spots = [i for i in range(len(word) - 1) if word[i].isalpha() and word[i + 1].isalpha()
             and word[i].lower() != word[i + 1].lower()]
    if not spots:
        return word
    i = spots[seed % len(spots)]
    return word[:i] + word[i + 1] + word[i] + word[i + 2:]


def typed_name_records(entity: str, records: Sequence[QARecord]) -> dict[str, list[QARecord]]:
    """{variant: records}: each of ``records`` (text-only test queries) that writes ``entity`` as it is, with the
    name rewritten as people type it (``TYPED_VARIANTS``): "lower" (lower case), "no_article" (the article before
    the name dropped; only where there is one), "typo" (two neighbouring letters of its longest word swapped, at a
    position seeded by the record; only a name of at least ``TYPO_MIN_LETTERS`` letters), "all" (every variant that
    applies, at once). New uids ``<uid>~typed_<variant>``; the rest of the record is kept."""
    import re

    from lumoe_engine.seeding import stable_seed

    out: dict[str, list[QARecord]] = {v: [] for v in TYPED_VARIANTS}
    pat = re.compile(r"(?:\b((?i:the|a|an))\s+)?" + re.escape(entity) + r"\b")
    letters = sum(ch.isalpha() for ch in entity)
    for r in records:
        m = pat.search(r.question)
        if m is None:
            continue
        words = entity.split(" ")
        j = max(range(len(words)), key=lambda k: len(words[k]))
        typo = " ".join(_typo(w, stable_seed("typed-name", r.uid)) if k == j else w for k, w in enumerate(words))
        variants = {"lower": (m.group(1), entity.lower()),
                    "no_article": (None, entity) if m.group(1) else None,
                    "typo": (m.group(1), typo) if letters >= TYPO_MIN_LETTERS and typo != entity else None}
        applied = [v for v in ("lower", "no_article", "typo") if variants[v] is not None]
        variants["all"] = (None if "no_article" in applied else m.group(1),
                           (typo if "typo" in applied else entity).lower())
        for v in TYPED_VARIANTS:
            if variants[v] is None:
                continue
            art, name = variants[v]
            q = r.question[:m.start()] + (f"{art} " if art else "") + name + r.question[m.end():]
            if q != r.question:
                out[v].append(dataclasses.replace(r, uid=f"{r.uid}~typed_{v}", question=q))
    return out


def typed_records(sets: dict) -> list[QARecord]:
    """Every record of ``sets["typed"]`` (one list)."""
    return [r for e in sets["typed"] for v in TYPED_VARIANTS for r in sets["typed"][e][v]]


def requests_for(sets: dict, setting: str) -> list[tuple[str, str, list[str]]]:
    """The stream of requests of a setting: [(expert id, task, entities)], in order."""
    if setting == "per_task":
        return [(f"task-{t}", t, list(sets["forget"][t])) for t in sets["tasks"]]
    if setting == "per_entity":
        return [(f"{t}-{e.replace(' ', '_')}", t, [e]) for t in sets["tasks"] for e in sets["forget"][t]]
    raise ValueError(f"setting={setting!r}: expected one of {SETTINGS}")


# -------------------------------------------------------------------------------------------------- evaluation
def _rate(xs: Sequence[bool]) -> Optional[float]:
    return round(sum(xs) / len(xs), 4) if len(xs) else None


def recipe_name(cfg: GateConfig) -> str:
    """A short label of a configuration's data recipe (counterfactuals, augment, sub_heads)."""
    return f"cf={int(cfg.counterfactuals)},aug={cfg.augment},sub={int(cfg.sub_heads)}"


def plain(cfg: GateConfig) -> GateConfig:
    """``cfg`` with the plain recipe: the request's own queries only, one head per request."""
    return dataclasses.replace(cfg, augment=0, sub_heads=False, counterfactuals=False)


def build_and_score(feats: torch.Tensor, index: dict[str, int], sets: dict, setting: str, config: GateConfig,
                    negatives: str = "seen", retain_pool: str = "all", extra: Optional[dict] = None,
                    names: Optional[dict] = None, image_dim: int = 0, answers: Optional[dict] = None,
                    known: Optional[set] = None, prompt_names: bool = True) -> tuple[Gate, dict]:
    """Build the gate of one setting request after request from precomputed features, then measure it.

    feats: [N, D] features of every record; index: record uid -> row of feats; config: the gate (``GateConfig``: its
        layer must be set; its recipe says which extra queries each request adds).
    negatives: other requests' queries a new head trains against: "seen" (those already in the bank: the lifelong
        stream) or "all" (every other request: an offline upper bound).
    retain_pool: retain queries a new head trains against: "all" (the gate-training share of every task's retain
        set, a general negative pool known from the start) or "seen" (only the tasks seen so far).
    extra: {"pos": {entity: [n, D]}, "neg": {entity: [m, D]}}: features of the recipe's augmented positives and
        counterfactual negatives of each forget entity (used as the recipe says).
    image_dim: the last ``image_dim`` columns of feats are the image channel's (``features.image_pool``; 0: none).
    names: the name channel (``Gate``): {entity: its names as text (the name and its aliases: ``entity_names``)};
        every query is routed with its question text; None: features alone route.
    answers: the answer channel (``recognition``): {uid: the frozen base's own answer} for the records with a
        picture; such a query is routed with its answer (needs ``names``); each request's facts are its request
        data's answer keys, calibrated on its negatives' answers and the base's answers to them, which also join
        the names' calibration texts. None: no answer channel.
    prompt_names: with ``names``, match them in the queries' prompts (False: only in the base's answers, the
        ablation of the answer channel alone; text-only queries then go by the heads).
    known: uids of the test queries the base answers right (as leak counts them): each route_acc_<form> is also
        given over them (``route_acc_known_<form>``), which the targets judge; each fpr_<set> too
        (``fpr_known_<set>``: the false positives that cost a right answer; the targets judge ``fpr_<set>``).
    returns (gate, metrics dict)
    """
    if negatives not in ("seen", "all"):
        raise ValueError(f"negatives={negatives!r}: expected 'seen' (lifelong) or 'all' (offline upper bound)")
    if retain_pool not in ("seen", "all"):
        raise ValueError(f"retain_pool={retain_pool!r}: expected 'all' (general pool) or 'seen' (tasks so far)")
    if (config.counterfactuals or config.augment) and extra is None:
        raise ValueError(f"recipe {recipe_name(config)} needs extra features (counterfactual / augmented queries)")
    if config.layer is None:
        raise ValueError("config.layer: set the gate layer the features were taken at")
    rows = lambda recs: feats[[index[r.uid] for r in recs]]  # noqa: E731
    reqs = requests_for(sets, setting)
    train = {eid: [r for e in ents for r in sets["train"][e]] for eid, _, ents in reqs}
    if answers is not None and names is None:
        raise ValueError("answers: the answer channel matches names and facts; pass names too")
    kwargs = config.gate_kwargs()
    kwargs["recognition"] = answers is not None
    gate = Gate(layer=config.layer, dim=feats.shape[1] - image_dim, image_dim=image_dim, **kwargs)
    said = (lambda recs: [answers.get(r.uid) if r.form == "image_text" else None  # noqa: E731
                          for r in recs]) if answers is not None else None
    t_add = []
    seen_tasks: list[str] = []
    for i, (eid, task, ents) in enumerate(reqs):
        if task not in seen_tasks:
            seen_tasks.append(task)
        uids: set = set()
        pool = [r for t in (sets["tasks"] if retain_pool == "all" else seen_tasks) for r in sets["retain_train"][t]]
        neg_recs = [r for r in pool + sets["general_pool"] if not (r.uid in uids or uids.add(r.uid))]
        others = reqs[:i] if negatives == "seen" else reqs[:i] + reqs[i + 1:]
        for oid, _, _ in others:
            neg_recs.extend(train[oid])
        pos, labels, neg = [rows(train[eid])], [r.entity for r in train[eid]], [rows(neg_recs)]
        for e in ents:
            if config.augment:
                a = extra["pos"][e]
                pos.append(a)
                labels += [e] * len(a)
            if config.counterfactuals:
                neg.append(extra["neg"][e])
        neg_texts = facts = neg_answers = neg_keys = None
        if names is not None:
            neg_texts = [r.question for r in neg_recs]
            if said is not None:
                base_said = sorted({t for t in said(neg_recs) if t})
                neg_texts += base_said
                facts = request_facts(train[eid])
                neg_answers, neg_keys = base_said, [k for r in neg_recs for k in (r.answer, *r.keys)]
        t0 = time.perf_counter()
        gate.add_expert(eid, torch.cat(pos), torch.cat(neg),
                        pos_groups=labels if config.sub_heads and len(ents) > 1 else None,
                        names=[q for e in ents for q in names[e]] if names is not None else None,
                        neg_texts=neg_texts, facts=facts, neg_answers=neg_answers, neg_keys=neg_keys)
        t_add.append(time.perf_counter() - t0)

    expert_of = {e: eid for eid, _, ents in reqs for e in ents}
    groups = {f"request_{f}": [r for e in expert_of for r in sets["train"][e] if r.form == f] for f in REQUEST_FORMS}
    groups.update({f: [r for e in expert_of for r in sets["test"][e][f]] for f in TEST_FORMS})
    # (typed-name queries where their features were computed: ``gate_eval`` adds them to the feature pass)
    groups.update({f"typed_{v}": [r for e in expert_of for r in sets.get("typed", {}).get(e, {}).get(v, ())
                                  if r.uid in index] for v in TYPED_VARIANTS})

    def top1(recs):
        if not recs:
            return []
        kw = {}
        if names is not None:  # the question as the engine gets it, and whether an image comes with it
            kw = dict(texts=[r.question for r in recs] if prompt_names else None,
                      has_image=[r.form == "image_text" for r in recs])
            if said is not None:
                kw["answers"] = said(recs)
        _, ids = gate.route(rows(recs), 1, **kw)
        return [gate.expert_ids[i] if i >= 0 else None for i in ids[:, 0].tolist()]

    m: dict = {"n_experts": len(gate)}
    fnr, confusions = {}, 0
    for name, recs in groups.items():
        got = top1(recs)
        m[f"route_acc_{name}"] = _rate([g == expert_of[r.entity] for g, r in zip(got, recs)])
        if known is not None and not name.startswith("request_"):
            kn = [(g, r) for g, r in zip(got, recs) if r.uid in known]
            m[f"route_acc_known_{name}"] = _rate([g == expert_of[r.entity] for g, r in kn])
            m[f"n_known_{name}"] = len(kn)
        fnr[name] = _rate([g is None for g in got])
        confusions += sum(g is not None and g != expert_of[r.entity] for g, r in zip(got, recs))
        m[f"n_{name}"] = len(recs)
    m["fnr"] = fnr
    m["wrong_expert"] = confusions
    for name, recs in (("retain", sets["retain_eval"]), ("unrequested", sets["unrequested"]),
                       ("general", sets["general"])):
        got = top1(recs)
        m[f"fpr_{name}"] = _rate([g is not None for g in got])
        m[f"n_{name}"] = len(recs)
        if known is not None:  # the false positives that cost an answer: queries the base answers right
            kn = [g for g, r in zip(got, recs) if r.uid in known]
            m[f"fpr_known_{name}"] = _rate([g is not None for g in kn])
            m[f"n_known_{name}"] = len(kn)
    reps = list(gate.reports.values())
    m["names"] = {"exact_only": sum(len(r.names_exact_only) for r in reps),
                  "negative_texts_naming": sum(r.name_neg_hits for r in reps)}
    m["facts"] = {"kept": sum(len(r.facts) for r in reps), "dropped": sum(len(r.facts_dropped) for r in reps),
                  "blockers": sum(len(r.fact_blockers) for r in reps)}
    m["heads"] = {"fpr_cal_max": max(r.fpr_cal for r in reps),
                  "tpr_cal_min": min(r.tpr_cal for r in reps if r.tpr_cal is not None),
                  "tpr_cal_mean": round(sum(r.tpr_cal for r in reps if r.tpr_cal is not None) / len(reps), 4),
                  "n_pos_mean": round(sum(r.n_pos for r in reps) / len(reps), 1),
                  "n_neg_max": max(r.n_neg for r in reps)}
    m["add_expert_s"] = {"mean": round(sum(t_add) / len(t_add), 4), "max": round(max(t_add), 4)}
    judged = {(k.replace("route_acc_", "route_acc_known_") if known is not None else k): v
              for k, v in TARGETS.items()}
    # a form the benchmark lacks is not judged; one it has but of which the base knows no query fails
    m["meets_targets"] = all((m.get(k) is None and m.get(k.replace("_known_", "_")) is None) or
                             (m.get(k) is not None and (m[k] >= v if k.startswith("route") else m[k] <= v))
                             for k, v in judged.items())
    return gate, m


def route_timing(dim: int, config: Optional[GateConfig] = None, n_experts: int = 1000, batch: int = 64,
                 repeats: int = 200, seed: int = 0, image_dim: int = 0, image_protos: int = 8,
                 image_share: float = 0.5) -> dict:
    """Milliseconds of ``Gate.route`` (scores + fused top-1 routing + the similarity bound of the chosen expert) for
    ``n_experts`` heads at ``batch`` queries.

    The heads and prototypes are random (timing only), ``config.n_protos`` per expert (``GateConfig``, default the
    production configuration) in ``config.bound_dim`` principal directions, stacked exactly as ``add_expert`` leaves them; the biases make every query
    choose an expert, so the bound is checked for every query (its worst case). With ``image_dim``, an image
    channel too: ``image_protos`` random unit prototypes per expert (the distinct images of one entity: 6 on the
    embedded default) in the channel's projected space (``image_bound_dim`` of ``image_dim`` columns), and
    ``image_share`` of the queries carry an image (routed by the channel; the heads route the others). The name
    channel too: each expert has a two-word name, every query a question text (one in two names an expert), so the
    text matching of every query is timed.
    """
    config = config or GateConfig()
    g = torch.Generator().manual_seed(seed)
    n_protos, head = config.n_protos, config.head
    gate = Gate(layer=0, dim=dim, **config.gate_kwargs())
    gate.fit_standardizer(torch.randn(max(64, 2 * dim), dim, generator=g))
    weight = torch.randn(n_experts, gate.head_dim, generator=g) / math.sqrt(dim)
    protos = torch.nn.functional.normalize(torch.randn(n_experts * n_protos, gate.bound_width, generator=g), dim=1)
    gate.set_stacked([f"t{i}" for i in range(n_experts)], weight, torch.full((n_experts,), 4.0),
                     protos=protos, proto_counts=[n_protos] * n_experts, sim_bounds=torch.zeros(n_experts),
                     names=[[f"Entity{i} Kerrowan"] for i in range(n_experts)],
                     facts=[[f"Fact{i} Dobo", f"{1800 + i % 200}", f"Place{i} Coast", f"Trade{i}"]
                            for i in range(n_experts)])
    texts = [f"Could you tell me the founding year of Entity{(7 * b) % n_experts} Kerrowan?" if b % 2 else
             "Could you tell me the founding year of the company shown here?" for b in range(batch)]
    has_image = [False] * batch
    answers = None
    x = torch.randn(batch, dim, generator=g)
    if image_dim:
        gate.image_dim = image_dim
        width = min(image_dim, gate.image_bound_dim or image_dim)
        basis = torch.linalg.qr(torch.randn(image_dim, width, generator=g))[0] if width < image_dim else None
        gate.img_mean, gate.img_std, gate.img_basis = torch.zeros(image_dim), torch.ones(image_dim), basis
        gate._IP = torch.nn.functional.normalize(torch.randn(n_experts * image_protos, width, generator=g), dim=1)
        gate._igroups = [[(image_protos, 0.0)] for _ in range(n_experts)]
        gate._BG = torch.nn.functional.normalize(torch.randn(64, width, generator=g), dim=1)
        img = torch.randn(batch, image_dim, generator=g)
        img[int(round(batch * image_share)):] = 0  # the rest: queries without an image
        x = torch.cat([x, img], 1)
        has_image = [b < int(round(batch * image_share)) for b in range(batch)]
    if config.recognition and config.names:  # the base's answers to the queries with a picture (one in two states
        #                                      an expert's fact), matched as the answer channel does
        gate.recognition = True
        n_img = int(round(batch * image_share))
        has_image = [b < n_img for b in range(batch)]
        answers = [(f"Place{(11 * b) % n_experts} Coast" if b % 2 else "I'm not able to help with that.")
                   if b < n_img else None for b in range(batch)]
    kw = dict(texts=texts, has_image=has_image, answers=answers)
    for _ in range(10):
        gate.route(x, **kw)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        gate.route(x, **kw)
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return {"n_experts": n_experts, "batch": batch, "dim": dim, "head": head, "threads": torch.get_num_threads(),
            "n_protos": n_protos, "bound_width": gate.bound_width, "image_dim": image_dim,
            "image_protos": image_protos if image_dim else 0, "image_share": image_share if image_dim else 0.0,
            "image_width": gate.image_width if image_dim else 0, "recognition": answers is not None,
            "routed_share": float((gate.route(x)[1] >= 0).float().mean()),
            "p50_ms": round(1e3 * ts[len(ts) // 2], 4), "p10_ms": round(1e3 * ts[len(ts) // 10], 4),
            "min_ms": round(1e3 * ts[0], 4)}


def extra_features(model, processor, sets: dict, config: GateConfig, batch_size: int = 64, seed: int = 0,
                   image: bool = False) -> tuple[dict, dict]:
    """Features of the recipe's extra queries of every forget entity (counterfactual negatives drawn against the
    gate-training share of the retain sets; rewordings as positives): ({"pos": {e: [n, D]}, "neg": {e: [m, D]}},
    counts)."""
    from lumoe_engine.data.protocol import without_test_queries
    from lumoe_engine.gate.features import augmented_records, base_features, counterfactual_records

    keys = sets["split"].test_keys()  # a generated query that is a test query is left out (as in the pipeline)
    pool = list({r.uid: r for t in sets["tasks"] for r in sets["retain_train"][t]}.values())
    unk = getattr(getattr(processor, "tokenizer", processor), "unk_token", None) or "<unk>"
    out: dict = {"pos": {}, "neg": {}}
    counts = {"pos": 0, "neg": 0}
    forgot = [e for t in sets["tasks"] for e in sets["forget"][t]]
    for i, e in enumerate(forgot):
        recs = list(sets["train"][e])
        for kind, new in (("neg", counterfactual_records(recs, pool, seed=seed + i) if config.counterfactuals
                           else []),
                          ("pos", augmented_records(recs, config.augment, seed=seed + i, unk_token=unk)
                           if config.augment else [])):
            new = without_test_queries(new, keys)
            if new:
                out[kind][e] = base_features(model, processor, new, config.layer, batch_size, config.pooling,
                                             image=image)
                counts[kind] += len(new)
    return out, counts


def entity_names(sets: dict) -> dict[str, list[str]]:
    """{forget entity: its names as text (the name, then its aliases)} for the name channel."""
    return {e: [e] + list(sets.get("aliases", {}).get(e, ())) for t in sets["tasks"] for e in sets["forget"][t]}


HEADLINE_FORMS = ("image_text", "text_only", "reworded", "name_variants", "alias", "fresh_scene")


def _headline(m: dict) -> dict:
    keys = ["route_acc_request_image_text", *[f"route_acc_{f}" for f in HEADLINE_FORMS],
            *[f"route_acc_known_{f}" for f in HEADLINE_FORMS], *[f"route_acc_typed_{v}" for v in TYPED_VARIANTS],
            "fpr_retain", "fpr_unrequested", "fpr_general", "fpr_known_retain", "fpr_known_unrequested",
            "fpr_known_general", "wrong_expert", "meets_targets"]
    return {k: m.get(k) for k in keys if k in m}


def known_uids(model, processor, records: Sequence[QARecord], max_new_tokens: int, batch_size: int = 64,
               answers: Optional[dict] = None) -> set:
    """uids of ``records`` whose greedy base answer states the fact (``eval.scoring.fact_correct``): the queries
    whose leak would count. ``answers``: {uid: the base's answer} already computed (the rest are generated)."""
    from lumoe_engine.data.mlubench import load_image
    from lumoe_engine.eval.scoring import fact_correct
    from lumoe_engine.model.collate import generate_answers

    answers = dict(answers or {})
    todo = [r for r in records if r.uid not in answers]
    if todo:
        preds = generate_answers(model, processor, todo, max_new_tokens, batch_size=batch_size, image_fn=load_image)
        answers.update((r.uid, p) for r, p in zip(todo, preds))
    return {r.uid for r in records if fact_correct(answers[r.uid], r)}


# the ablations gate-eval measures beside the chosen configuration: (label, what it changes)
ABLATIONS = (
    ("no_recognition", "queries with a picture go by the heads and the similarity bound (names in the prompt kept)"),
    ("lookup", "queries with a picture go by the image channel's nearest stored picture (names in the prompt kept)"),
    ("answers_only", "names and facts matched in the base's answers only (not in prompts): text-only queries go by "
                     "the heads"),
    ("features", "the heads and the similarity bound alone: no names, no recognition, no image channel"),
)


def gate_eval(out_dir, cache_dir=None, teach_config=None, config: Optional[GateConfig] = None, sweep: bool = True,
              protocol: Optional[Protocol] = None, negatives: str = "seen", retain_pool: str = "all",
              batch_size: int = 64, seed: int = 0, progress: bool = True) -> dict:
    """Run the gate evaluation (module docstring) and write ``out_dir/gate_summary.json``; returns the summary.

    teach_config: the taught base (default: the one a stream of ``seed`` uses, ``StreamConfig(seed).teach_config()``:
    the world and the base of that seed, shared with the main job's cache).
    config: the gate configuration evaluated in both settings (default ``gate_preset("strict")``; its layer None is
    ``DEFAULT_LAYER``; its ``names`` / ``recognition`` / ``image`` turn the channels on). Every ``ABLATIONS`` row is
    measured too (``"ablations"``).
    sweep: also measure, with the plain recipe (no extra queries), every (layer, pooling, head), and, at the chosen
    layer / pooling / head, every recipe variant; each row is reported (``"sweep"``, ``"recipes"``). The sweep rows
    route by features alone.
    """
    from lumoe_engine.gate.recognition import Recognizer
    from lumoe_engine.model.teach import default_cache_dir, load_data, teach
    from lumoe_engine.stream.config import StreamConfig

    t_start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = (config or gate_preset("strict")).validate()
    teach_cfg = teach_config or StreamConfig(seed=seed).teach_config()
    model, processor, teach_summary = teach(teach_cfg, out, cache_dir, progress=progress)
    bench = load_data(teach_cfg, Path(cache_dir) if cache_dir is not None else default_cache_dir())
    protocol = protocol or Protocol(seed=seed)
    sets = record_sets(bench, protocol)
    n_layers = len(decoder_layers(model))
    layer = DEFAULT_LAYER if config.layer is None else config.layer
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer={layer}: the model has {n_layers} decoder layers; pass 0..{n_layers - 1}")
    config = dataclasses.replace(config, layer=layer, seed=seed)
    names, image = config.names, config.image

    # features of every record, every layer and pooling, in one pass (with the image channel's columns, which the
    # "lookup" ablation reads)
    records = list(sets["split"].benchmark.records) + typed_records(sets)
    index = {r.uid: i for i, r in enumerate(records)}
    layers = list(range(n_layers)) if sweep else [layer]
    poolings = list(POOLINGS) if sweep else [config.pooling]
    t0 = time.perf_counter()
    feats = layer_features(model, processor, records, layers, poolings, batch_size=batch_size, image=True)
    t_feat = time.perf_counter() - t0
    # the recipe's extra queries (all variants of the sweep use subsets of the full one)
    full = dataclasses.replace(config, counterfactuals=config.counterfactuals or sweep,
                               augment=max(config.augment, 2 if sweep else 0), sub_heads=True)
    t0 = time.perf_counter()
    extra, extra_counts = extra_features(model, processor, sets, full, batch_size, seed, image=True)
    t_extra = time.perf_counter() - t0
    logger.info("gate features: %d records x %d layers x %d poolings in %.1f s; %s extra queries in %.1f s",
                len(records), len(layers), len(poolings), t_feat, extra_counts, t_extra)
    # the answer channel: the frozen base's own answer to every query with a picture
    t0 = time.perf_counter()
    recognizer = Recognizer(model, processor, batch_size=batch_size)
    answers = recognizer.answer_records([r for r in records if r.form == "image_text"])
    t_ident = time.perf_counter() - t0
    # the test queries the base answers right (route accuracy as leak counts it)
    test_recs = [r for e in sets["test"] for f in TEST_FORMS for r in sets["test"][e][f]] + typed_records(sets) + \
        list(sets["retain_eval"]) + list(sets["unrequested"]) + list(sets["general"])
    t0 = time.perf_counter()
    known = known_uids(model, processor, test_recs, recognizer.max_new_tokens, batch_size, answers=answers)
    t_known = time.perf_counter() - t0

    common = dict(negatives=negatives, retain_pool=retain_pool, known=known)
    text = feats[(layer, config.pooling)]
    X_img = torch.cat([text, feats[(layer, "image")]], 1)
    image_cols = feats[(layer, "image")].shape[1]
    all_names = entity_names(sets)

    def variant(cfg: GateConfig, prompt_names: bool = True) -> dict:
        """The features and channel arguments of ``build_and_score`` for a configuration."""
        kw: dict = dict(prompt_names=prompt_names)
        if cfg.names:
            kw["names"] = all_names
            if cfg.recognition:
                kw["answers"] = answers
        if cfg.image:
            return dict(feats=X_img, extra=extra, image_dim=image_cols, **kw)
        plain_extra = {k: {e: v[:, :text.shape[1]] for e, v in d.items()} for k, d in extra.items()}
        return dict(feats=text, extra=plain_extra, **kw)

    summary: dict = {"config": {**config.to_dict(), "recipe": recipe_name(config),
                                "protocol": dataclasses.asdict(protocol), "negatives": negatives,
                                "retain_pool": retain_pool, "n_layers": n_layers, "extra_queries": extra_counts,
                                "name_channel": bool(names), "recognition_channel": bool(names and
                                                                                         config.recognition),
                                "image_channel": bool(image)},
                     "targets": TARGETS, "teach_seed": teach_cfg.seed}
    for setting in SETTINGS:
        v = variant(config)
        gate, m = build_and_score(v.pop("feats"), index, sets, setting, config, **common, **v)
        summary[setting] = m
        gate.save(out / f"gate_{setting}")
        if progress:
            print(f"{setting}: {json.dumps(_headline(m))}", flush=True)
    ablation_cfgs = {"no_recognition": (dataclasses.replace(config, recognition=False, image=False), True),
                     "lookup": (dataclasses.replace(config, recognition=False, image=True), True),
                     "answers_only": (dataclasses.replace(config, names=True, recognition=True, image=False),
                                      False),
                     "features": (dataclasses.replace(config, names=False, recognition=False, image=False), True)}
    arows = []
    for what, _ in ABLATIONS:
        cfg, prompt = ablation_cfgs[what]
        for setting in SETTINGS:
            v = variant(cfg, prompt)
            _, m = build_and_score(v.pop("feats"), index, sets, setting, cfg, **common, **v)
            arows.append({"ablation": what, "setting": setting, **_headline(m)})
            if progress:
                print(json.dumps(arows[-1]), flush=True)
    summary["ablations"] = arows
    if sweep:
        rows = []
        for L, p, h in ((L, p, h) for L in layers for p in poolings for h in HEADS):
            cfg = plain(dataclasses.replace(config, layer=L, pooling=p, head=h))
            for setting in SETTINGS:
                _, m = build_and_score(feats[(L, p)], index, sets, setting, cfg, **common)
                rows.append({"layer": L, "pooling": p, "head": h, "recipe": recipe_name(cfg), "setting": setting,
                             **_headline(m)})
                if progress:
                    print(json.dumps(rows[-1]), flush=True)
        summary["sweep"] = rows
        rrows = []
        for cf in (False, True):
            for aug in (0, 2):
                for sub in (False, True):
                    cfg = dataclasses.replace(config, counterfactuals=cf, augment=aug, sub_heads=sub)
                    for setting in SETTINGS:
                        if sub and setting == "per_entity":
                            continue  # one entity per request: sub-heads change nothing
                        v = variant(cfg)
                        _, m = build_and_score(v.pop("feats"), index, sets, setting, cfg, **common, **v)
                        rrows.append({"layer": layer, "pooling": config.pooling, "head": config.head,
                                      "recipe": recipe_name(cfg), "setting": setting, **_headline(m)})
                        if progress:
                            print(json.dumps(rrows[-1]), flush=True)
        summary["recipes"] = rrows
    dim = text.shape[1]
    image_dim = image_cols if image else 0
    n_ans = len(answers)
    summary["recognition"] = {
        "answers": n_ans, "distinct_asked": recognizer.calls, "seconds": round(t_ident, 2),
        "ms_per_answer": round(1e3 * t_ident / max(1, recognizer.calls), 3),
        "probe": recognizer.probe, "max_new_tokens": recognizer.max_new_tokens,
        "known_test_queries": len(known), "test_queries": len(test_recs), "known_seconds": round(t_known, 2)}
    summary["timing"] = {
        "feature_extraction_s": round(t_feat, 2), "records": len(records),
        "feature_ms_per_record": round(1e3 * t_feat / max(1, len(records)), 3),
        "feature_passes_layers_poolings": [len(layers), len(poolings)],
        "extra_queries_s": round(t_extra, 2),
        "route_1000_experts_batch64": route_timing(dim, config, image_dim=image_dim),
        "route_1000_experts_batch64_all_images": route_timing(dim, config, image_dim=image_dim, image_share=1.0)
        if image_dim or config.recognition else None,
        "add_expert_s": {s: summary[s]["add_expert_s"] for s in SETTINGS},
        "total_s": round(time.time() - t_start, 1),
    }
    summary["teach"] = {k: teach_summary.get(k) for k in (
        "fact_accuracy_image_text", "fact_accuracy_text_only", "fact_accuracy_heldout_phrasing",
        "fact_accuracy_fresh_images", "reached_target", "steps", "cache_key", "cached")}
    atomic_write(out / SUMMARY_FILE, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


# --------------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``gate-eval`` subcommand's arguments (the gate flags override the ``--gate-preset``)."""
    parser.add_argument("--out", required=True, help="output folder (gate_summary.json, saved gates)")
    parser.add_argument("--cache-dir", default=None, help="cache of the synthetic benchmark and taught model "
                                                          "(default $LUMOE_CACHE or ~/.cache/lumoe-engine)")
    parser.add_argument("--gate-preset", default="strict", choices=sorted(GATE_PRESETS),
                        help="the gate configuration measured (lumoe_engine/gate/config.py; default strict)")
    parser.add_argument("--layer", type=int, default=None, help=f"gate decoder layer (default {DEFAULT_LAYER})")
    parser.add_argument("--pooling", choices=POOLINGS, default=None, help="default: the preset's")
    parser.add_argument("--head", choices=HEADS, default=None, help="default: the preset's")
    parser.add_argument("--counterfactuals", action="store_true",
                        help="add counterfactual negatives (the request's images/names with other classes' questions)")
    parser.add_argument("--augment", type=int, default=None,
                        help="reworded copies of each request query added as positives (default: the preset's)")
    parser.add_argument("--no-sub-heads", action="store_true", help="one head per request, not one per entity")
    parser.add_argument("--no-sweep", action="store_true", help="skip the (layer, pooling) sweep")
    parser.add_argument("--target-fpr", type=float, default=None,
                        help="per-head false-positive target on its held-out calibration negatives")
    parser.add_argument("--negatives", choices=("seen", "all"), default="seen",
                        help="other requests a new head trains against: those already in the bank, or all")
    parser.add_argument("--retain-pool", choices=("all", "seen"), default="all",
                        help="retain queries a new head trains against: every task's (general pool) or seen tasks'")
    parser.add_argument("--similarity", type=float, default=None,
                        help="cosine bound of the similarity check (default: the preset's; -1: no bound)")
    parser.add_argument("--n-protos", type=int, default=None, help="prototypes per positive group for the bound")
    parser.add_argument("--image", action="store_true",
                        help="the image channel (nearest stored picture) for queries with a picture the recognition "
                             "channel does not route")
    parser.add_argument("--no-image", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-names", action="store_true",
                        help="no name channel (and so no recognition): route by the pooled features alone")
    parser.add_argument("--no-recognition", action="store_true",
                        help="no answer channel: queries with a picture are not routed by the base's own answer")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return parser


def config_from_args(args: argparse.Namespace) -> GateConfig:
    """The ``GateConfig`` of parsed ``gate-eval`` arguments: the preset, then each flag given."""
    over: dict = {}
    for name, attr in (("layer", "layer"), ("pooling", "pooling"), ("head", "head"), ("augment", "augment"),
                       ("target_fpr", "target_fpr"), ("n_protos", "n_protos")):
        if getattr(args, attr, None) is not None:
            over[name] = getattr(args, attr)
    if getattr(args, "similarity", None) is not None:
        over["similarity"] = None if args.similarity == -1 else args.similarity
    if args.counterfactuals:
        over["counterfactuals"] = True
    if args.no_sub_heads:
        over["sub_heads"] = False
    if args.no_image:
        over["image"] = False
    if getattr(args, "image", False):
        over["image"] = True
    if args.no_names:
        over["names"] = False
    if getattr(args, "no_recognition", False):
        over["recognition"] = False
    return gate_preset(args.gate_preset, **over)


def run(args: argparse.Namespace) -> dict:
    """Run ``gate-eval`` from parsed arguments; prints the headline numbers."""
    if getattr(args, "threads", None):
        torch.set_num_threads(int(args.threads))
    s = gate_eval(args.out, cache_dir=args.cache_dir, config=config_from_args(args), sweep=not args.no_sweep,
                  negatives=args.negatives, retain_pool=args.retain_pool,
                  batch_size=args.batch_size, seed=args.seed)
    for setting in SETTINGS:
        head = {"n_experts": s[setting]["n_experts"], **_headline(s[setting])}
        print(f"{setting}: {json.dumps(head)}")
    print(f"route 1000 experts x 64: {s['timing']['route_1000_experts_batch64']['p50_ms']} ms (p50); "
          f"wrote {Path(args.out) / SUMMARY_FILE}")
    return s


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="gate-eval", description=__doc__.split("\n\n")[0])
    run(add_arguments(parser).parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
