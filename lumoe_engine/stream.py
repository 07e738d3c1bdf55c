"""The stream driver (the main job's body): a stream of unlearning requests learned one after the other, every request
so far measured after each one.

    python -m lumoe_engine.stream [--stream abcd] [--method lumoe] [--compare] [--out runs/default] ...
    deepspeed --num_gpus 2 --module lumoe_engine.stream ...        (ZeRO for expert training; rank 0 writes)

Top to bottom, as ``run_stream`` does it:

1. the taught base: ``teach`` (cached by config + data hash; taught when not cached) -> model, processor, benchmark;
2. the stream (``build_stream``: abcd | cabd | entity | synthetic:N) and its evaluator (``StreamEvaluator``): the
   taught base answers every evaluation query once (cached), which fixes the *known* queries;
3. LUMoE: the model wrapped above the gate layer (``LUMoEEngine``: bank + gate). For each request:
   check it -> train a NEW expert (``trainer.train_expert``; only that expert is active) -> ``bank.add`` (atomic) ->
   ``gate.add_expert`` (positives: the request's forget queries; negatives: its retain queries and every query of
   the requests learned before; calibrated), the gate saved -> evaluate every request so far (``engine.generate``,
   routed by the gate; the routing recorded) -> metrics rows;
4. the baselines (``--compare``, or ``--method ga|gd|kl|npo|idk|idk-po``): each on a fresh copy of the taught base,
   one shared LoRA merged after every request (``baselines.SequentialBaseline``), same step budget, same evaluation;
5. outputs in ``--out``: metrics.jsonl (rows, appended per step), summary.json (``methods.<m>.final...``), report.md,
   PNG plots, config.json (the resolved config and seeds), bank/ and gate/ (LUMoE's experts and gate state).

A bad request (empty forget set, unknown entity, an image that will not open, a loss that turns nan/inf) fails alone:
a clear error, nothing written to the bank or the gate for it, a ``"set": "failure"`` row in metrics.jsonl, a line in
summary.json's ``failures`` and in report.md; the stream goes on with the next request (the failed request is still
measured: its forget queries were not forgotten).

Letters: N evaluation queries, D gate feature width.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import inspect
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from lumoe_engine.data.records import Benchmark, QARecord
from lumoe_engine.data.streams import Request, build_stream
from lumoe_engine.eval.metrics import DEFAULT_MAX_PER_SET, MetricsWriter, StreamEvaluator, atomic_write_text, jsonable
from lumoe_engine.unlearn.baselines import BASELINES, SequentialBaseline, baseline_loss
from lumoe_engine.unlearn.losses import LOSSES, LossConfig, NonFiniteLossError
from lumoe_engine.unlearn.trainer import (RequestError, TrainConfig, barrier, init_distributed, train_expert)

logger = logging.getLogger("lumoe_engine.stream")

METHODS = ("lumoe",) + BASELINES
# The LUMoE expert's loss: refusal answers on the request's own queries, no retain term (retain_weight 0). NOTE:
# measured on the taught embedded default, task A, 30 steps, the expert applied to every query: IDK lr 1e-2 leaks
# 0.000 in all four forms; IDK + retain (weight 1) leaks 0.03 / 0.20 / 0.17 (image+text / text-only / paraphrase)
# while keeping 0.5 of never-requested facts; NPO + retain leaks 0.03 / 0.03 / 0.0 and breaks the retain answers
# (0.09). The gate keeps other queries away from an expert, so its own queries are all it must handle, and an expert
# that refuses everything also makes a query routed to the wrong expert leak nothing.
LUMOE_LOSS = "idk"


@dataclass
class StreamConfig:
    """Everything a stream run depends on (saved as config.json next to the results).

    stream: build_stream spec; method: "lumoe" or a baseline; compare: LUMoE then every baseline on the same stream.
    data / subset / synthetic / model / load_in_4bit / preset / cache: the taught base (``TeachConfig``).
    extra_eval: further MLUBench-format QA files (or folders of them), scored as the paraphrase form.
    max_per_set: evaluation queries per set per request; eval_batch_size, max_new_tokens (0 = teach's).
    steps / rank / alpha / batch_size: the budget of every request, the same for every method; lr: LUMoE's expert
        learning rate; baseline_lr: the baselines' (NOTE: at LUMoE's 1e-2 every baseline falls to retain ratio 0.0
        after the first request on the embedded default; at 1e-3 they trade forgetting against retain; 2e-4 forgets
        nothing in 30 steps: measured).
    loss: LUMoE's expert loss; retain_weight / beta: its LossConfig (the baselines keep the paper's: retain terms on,
        weight 1).
    gate_layer / gate_pooling / gate_head / target_fpr: the gate (None = the gate evaluation's defaults).
    gate_negatives: the negatives of a new head besides the forget queries of the requests learned before:
        "stream" = the retain queries of every request of the stream (the operator's retain data, known from the
        start), "seen" = only those of the requests arrived so far. Never-requested entities are never seen.
    threads: torch intra-op threads (None = torch's default; 1 is much faster on a machine shared by several jobs).
    teach_overrides: TeachConfig fields (tests: a short teaching budget).
    """

    stream: str = "abcd"
    method: str = "lumoe"
    compare: bool = False
    data: Optional[str] = None
    subset: Optional[int] = None
    synthetic: str = "default"
    model: Optional[str] = None
    load_in_4bit: bool = False
    preset: str = "tiny"
    cache: Optional[str] = None
    extra_eval: list = field(default_factory=list)
    out: str = "runs/default"
    seed: int = 0
    max_per_set: int = DEFAULT_MAX_PER_SET
    eval_batch_size: int = 64
    max_new_tokens: int = 0
    steps: int = 30
    lr: float = 1e-2
    baseline_lr: float = 1e-3
    rank: int = 8
    alpha: float = 16.0
    batch_size: int = 16
    loss: str = LUMOE_LOSS
    retain_weight: float = 0.0
    beta: float = 0.1
    zero_stage: int = 2
    gate_layer: Optional[int] = None
    gate_pooling: Optional[str] = None
    gate_head: Optional[str] = None
    target_fpr: float = 0.005
    gate_negatives: str = "stream"
    threads: Optional[int] = None
    teach_overrides: dict = field(default_factory=dict)
    progress: bool = True

    def validate(self) -> "StreamConfig":
        if self.method not in METHODS:
            raise ValueError(f"--method {self.method!r}: expected one of {METHODS}")
        if self.loss not in LOSSES:
            raise ValueError(f"--loss {self.loss!r}: expected one of {sorted(LOSSES)}")
        if isinstance(self.max_per_set, bool) or not isinstance(self.max_per_set, int) or self.max_per_set < 1:
            raise ValueError(f"--max-per-set {self.max_per_set!r}: expected an int >= 1")
        if self.gate_negatives not in ("stream", "seen"):
            raise ValueError(f"--gate-negatives {self.gate_negatives!r}: expected 'stream' or 'seen'")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads {self.threads}: expected >= 1")
        if self.eval_batch_size < 1 or self.max_new_tokens < 0:
            raise ValueError("--eval-batch-size must be >= 1 and --max-new-tokens >= 0")
        for p in self.extra_eval:
            if not Path(p).exists():
                raise FileNotFoundError(f"--extra-eval {p}: no such file or folder; pass MLUBench-format QA JSON "
                                        f"files (lists of {{'image', 'conversations'}} records) or folders of them")
        self.train_config()
        self.loss_config()
        return self

    def methods(self) -> list[str]:
        return list(METHODS) if self.compare else [self.method]

    def train_config(self, baseline: bool = False) -> TrainConfig:
        return TrainConfig(steps=self.steps, lr=self.baseline_lr if baseline else self.lr, rank=self.rank,
                           alpha=self.alpha,
                           batch_size=self.batch_size, retain_batch_size=self.batch_size, seed=self.seed,
                           zero_stage=self.zero_stage, progress=self.progress).validate()

    def loss_config(self) -> LossConfig:
        return LossConfig(name=self.loss, retain_weight=self.retain_weight, beta=self.beta).validate()

    def teach_config(self):
        from lumoe_engine.model.teach import TeachConfig

        cfg = TeachConfig(data=self.data, subset=self.subset, synthetic=self.synthetic, model=self.model,
                          load_in_4bit=self.load_in_4bit, preset=self.preset)
        for k, v in self.teach_overrides.items():
            if not hasattr(cfg, k):
                raise ValueError(f"teach_overrides: TeachConfig has no field {k!r}")
            setattr(cfg, k, v)
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ================================================================================================== the driver
def run_stream(cfg: StreamConfig, edit_stream: Optional[Callable[[list, Benchmark], list]] = None) -> dict:
    """Run the stream of ``cfg`` (module docstring); returns the summary document (summary.json's content; {} on
    ranks other than 0). edit_stream: (requests, benchmark) -> requests, applied after ``build_stream`` (tests inject
    bad requests with it)."""
    cfg.validate()
    t_start = time.time()
    rank, world = init_distributed()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    if rank == 0:
        _fresh_out(out)
    torch.manual_seed(cfg.seed)

    # 1. the taught base (rank 0 teaches first; the others load the cached result)
    model, processor, teach_summary, bench = _taught_base(cfg, rank)
    model.requires_grad_(False)
    max_new = cfg.max_new_tokens or int(teach_summary.get("max_new_tokens") or 16)

    # 2. the stream and its evaluation
    requests = build_stream(bench, cfg.stream)
    if edit_stream is not None:
        requests = edit_stream(requests, bench)
    evaluator = writer = None
    eval_info: dict = {}
    if rank == 0:
        eval_bench, eval_info = _evaluation_benchmark(bench, cfg.extra_eval)
        evaluator = StreamEvaluator(eval_bench, requests, max_per_set=cfg.max_per_set, seed=cfg.seed)
        t0 = time.time()
        evaluator.set_base(_base_predictions(model, processor, evaluator.queries(), max_new, cfg, teach_summary))
        eval_info["base_predictions_s"] = round(time.time() - t0, 2)
        writer = MetricsWriter(out)
    config_doc = _config_doc(cfg, teach_summary, bench, requests, max_new, world, eval_info)
    if rank == 0:
        atomic_write_text(out / "config.json", json.dumps(jsonable(config_doc), indent=1) + "\n")

    # 3.-4. the methods, each from the same taught base
    failures: dict[str, list] = {}
    extra: dict[str, dict] = {}
    methods = cfg.methods()
    for i, method in enumerate(methods):
        m_model = model if i == len(methods) - 1 else copy.deepcopy(model)  # LUMoE never edits the base
        runner = _run_lumoe if method == "lumoe" else _run_baseline
        failures[method], extra[method] = runner(method, m_model, processor, bench, requests, evaluator, writer,
                                                 cfg, out, rank, max_new)
        barrier()

    # 5. outputs
    if rank != 0:
        return {}
    summaries = {m: evaluator.summary(m) for m in evaluator.methods}
    for m, s in summaries.items():
        s.update(extra.get(m, {}))
        s["failures"] = failures.get(m, [])
    doc_extra = {"failures": failures, "teach": _teach_brief(teach_summary), "total_seconds": None,
                 "evaluation": eval_info}
    writer.write_summary(summaries, config=config_doc["config"], seeds=config_doc["seeds"], **doc_extra)
    summary = json.loads(writer.summary_path.read_text())
    _write_figures_and_report(out, summary, writer, config_doc, failures)
    summary["total_seconds"] = round(time.time() - t_start, 1)
    writer.write_summary(summary["methods"], config=summary["config"], seeds=summary["seeds"],
                         **{k: v for k, v in summary.items() if k not in ("methods", "config", "seeds",
                                                                           "schema_version")})
    _print_table(summary, out)
    return summary


# ----------------------------------------------------------------------------------------------------- LUMoE
def _run_lumoe(method, model, processor, bench, requests, evaluator, writer, cfg, out, rank, max_new):
    from lumoe_engine.engine import LUMoEEngine
    from lumoe_engine.model.bank import ExpertBank, lora_bytes

    bank = ExpertBank(out / "bank") if rank == 0 else ExpertBank(None)
    gate = _new_gate(cfg, model)
    engine = LUMoEEngine(model, processor, bank, gate, top_k=1)
    features = _FeatureCache(model, processor, gate)
    loss_cfg, train_cfg = cfg.loss_config(), cfg.train_config()
    learned: list[Request] = []
    failures, train_seconds, bytes_per_expert = [], [], None
    for step, req in enumerate(requests):
        t0 = time.perf_counter()
        cost: dict = {}
        try:
            _check_entities(req, bench)
            expert, stats = train_expert(model, processor, engine.ctx, req, loss_cfg, train_cfg, method=method)
            cost["train_seconds"] = stats["seconds"]
            train_seconds.append(stats["seconds"])
            if rank == 0:
                t1 = time.perf_counter()
                positives, negatives, groups = _gate_training_set(req, learned, requests, cfg)
                pos, neg = features(positives), features(negatives)
                bank.add(expert)  # atomic: file, then manifest
                try:
                    report = gate.add_expert(req.id, pos, neg, **({"pos_groups": groups} if groups else {}))
                except Exception:
                    bank.remove(req.id)  # nothing of a failed request stays in the bank
                    raise
                gate.save(out / "gate")
                bytes_per_expert = lora_bytes(expert)
                cost["gate_seconds"] = round(time.perf_counter() - t1, 3)
                cost["gate_tpr_cal"] = report.tpr_cal
                cost["gate_fpr_cal"] = report.fpr_cal
            learned.append(req)
        except (RequestError, NonFiniteLossError, ValueError, OSError) as exc:
            failures.append(_failure(method, step, req, exc))
        cost["seconds"] = round(time.perf_counter() - t0, 3)
        if rank == 0:
            t2 = time.perf_counter()
            preds, routing, tps = _answer_lumoe(engine, evaluator.queries(step), max_new, cfg.eval_batch_size)
            cost.update(tokens_per_s=tps, bytes_per_expert=bytes_per_expert, n_experts=len(gate),
                        resident_bytes=bank.resident_bytes, eval_seconds=round(time.perf_counter() - t2, 3))
            rows = evaluator.evaluate_step(step, method, preds, routing, cost=_numeric(cost))
            writer.append(rows + [f for f in failures if f["step"] == step])
            _log_step(method, step, req, evaluator, cost)
        barrier()
    engine.close()
    return failures, {"train_seconds_per_request": train_seconds, "flat_cost": _flat_cost(train_seconds),
                      "loss": dataclasses.asdict(loss_cfg), "train": train_cfg.to_dict(), "gate": gate.config()}


def _new_gate(cfg: StreamConfig, model):
    """A Gate at the configured (or the gate evaluation's default) layer, pooling and head."""
    from lumoe_engine.gate import evaluate as gate_eval
    from lumoe_engine.gate.features import decoder_layers, pooled_dim
    from lumoe_engine.gate.gate import Gate

    n_layers = len(decoder_layers(model))
    layer = cfg.gate_layer
    if layer is None:  # the tiny LLaVA's measured layer; the middle of the LM for a real model (as the presets)
        layer = min(gate_eval.DEFAULT_LAYER, n_layers - 2) if n_layers <= 8 else n_layers // 2 - 1
    if not 0 <= layer < n_layers - 1:
        raise ValueError(f"--gate-layer {layer}: expected 0..{n_layers - 2} (experts go on the layers above it)")
    pooling = cfg.gate_pooling or gate_eval.DEFAULT_POOLING
    hidden = model.config.get_text_config().hidden_size
    kw = dict(layer=layer, dim=pooled_dim(hidden, pooling), pooling=pooling, target_fpr=cfg.target_fpr,
              seed=cfg.seed)
    head = cfg.gate_head or getattr(gate_eval, "DEFAULT_HEAD", None)
    if head is not None and "head" in inspect.signature(Gate).parameters:
        kw["head"] = head
    return Gate(**kw)


def _gate_training_set(req: Request, learned: list, requests: list, cfg: StreamConfig):
    """(positives, negatives, groups) for the gate head of ``req``, by the gate evaluation's recipe
    (``gate.evaluate.DEFAULT_RECIPE`` when it has one):

    positives: the request's forget queries (+ ``augment`` word-level rewordings of each); negatives: the retain queries
    of the stream (``cfg.gate_negatives``: "stream" = every request's retain set, "seen" = those arrived so far), the
    forget queries of every request learned before (+ ``counterfactuals``: the request's images and names recombined
    with other classes' wordings); groups: the entity of each positive (one sub-head per entity) with ``sub_heads``
    when the request forgets several entities, else None.
    """
    from lumoe_engine.gate import evaluate as gate_eval
    from lumoe_engine.gate import features as gate_features

    recipe = getattr(gate_eval, "DEFAULT_RECIPE", None)
    retain_src = requests if cfg.gate_negatives == "stream" else learned + [req]
    retain = _dedupe([r for q in retain_src for r in q.retain])
    negatives = retain + [r for q in learned for r in q.forget]
    positives = list(req.forget)
    if recipe is not None and getattr(recipe, "augment", 0) and hasattr(gate_features, "augmented_records"):
        positives += gate_features.augmented_records(req.forget, recipe.augment, seed=cfg.seed)
    if recipe is not None and getattr(recipe, "counterfactuals", False) and retain and \
            hasattr(gate_features, "counterfactual_records"):
        negatives += gate_features.counterfactual_records(req.forget, retain, seed=cfg.seed)
    negatives = _dedupe(negatives)
    if not negatives:
        raise RequestError(f"request {req.id!r}: no negative queries for its gate head (no retain records and no "
                           f"earlier request); add retain QA pairs to the request")
    groups = None
    if recipe is not None and getattr(recipe, "sub_heads", False) and len({r.entity for r in positives}) > 1:
        groups = [r.entity for r in positives]
    return positives, negatives, groups


class _FeatureCache:
    """Gate features of records (the base model's pooled layer-L state of the prompt), computed once per uid."""

    def __init__(self, model, processor, gate):
        self.model, self.processor, self.gate = model, processor, gate
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, records: Sequence[QARecord]) -> torch.Tensor:
        from lumoe_engine.gate.features import base_features

        missing = _dedupe([r for r in records if r.uid not in self.cache])
        if missing:
            f = base_features(self.model, self.processor, missing, self.gate.layer, pooling=self.gate.pooling)
            self.cache.update((r.uid, row) for r, row in zip(missing, f))
        return torch.stack([self.cache[r.uid] for r in records])


def _answer_lumoe(engine, records: Sequence[QARecord], max_new: int, batch_size: int):
    """Greedy answers, routed by the gate: ({uid: text}, {uid: [expert ids]}, generated tokens per second)."""
    from lumoe_engine.data.mlubench import load_image

    t0 = time.perf_counter()
    images = [load_image(r) if r.form == "image_text" else None for r in records]
    res = engine.generate(images, [r.question for r in records], max_new_tokens=max_new, batch_size=batch_size)
    dt = time.perf_counter() - t0
    preds = {r.uid: t for r, t in zip(records, res.texts)}
    routing = {r.uid: list(d.expert_ids) for r, d in zip(records, res.routing)}
    n_tok = sum(len(t) for t in res.token_ids)
    return preds, routing, round(n_tok / dt, 1) if dt > 0 else None


# ------------------------------------------------------------------------------------------------- baselines
def _run_baseline(method, model, processor, bench, requests, evaluator, writer, cfg, out, rank, max_new):
    from lumoe_engine.model.collate import generate_answers
    from lumoe_engine.data.mlubench import load_image

    loss_cfg = baseline_loss(method, beta=cfg.beta)  # the paper's losses: retain terms on (weight 1)
    train_cfg = cfg.train_config(baseline=True)
    base = SequentialBaseline(model, processor, method, loss_cfg, train_cfg)
    failures, train_seconds = [], []
    for step, req in enumerate(requests):
        t0 = time.perf_counter()
        cost: dict = {}
        try:
            _check_entities(req, bench)
            stats = base.learn(req)
            cost["train_seconds"] = stats["seconds"]
            train_seconds.append(stats["seconds"])
        except (RequestError, NonFiniteLossError, ValueError, OSError) as exc:
            failures.append(_failure(method, step, req, exc))
        cost["seconds"] = round(time.perf_counter() - t0, 3)
        if rank == 0:
            t2 = time.perf_counter()
            queries = evaluator.queries(step)
            texts = generate_answers(model, processor, queries, max_new, batch_size=cfg.eval_batch_size,
                                     image_fn=load_image)
            cost["eval_seconds"] = round(time.perf_counter() - t2, 3)
            rows = evaluator.evaluate_step(step, method, {r.uid: t for r, t in zip(queries, texts)},
                                           cost=_numeric(cost))
            writer.append(rows + [f for f in failures if f["step"] == step])
            _log_step(method, step, req, evaluator, cost)
        barrier()
    base.close()
    return failures, {"train_seconds_per_request": train_seconds, "flat_cost": _flat_cost(train_seconds),
                      "loss": dataclasses.asdict(loss_cfg), "train": train_cfg.to_dict()}


# ----------------------------------------------------------------------------------------------------- pieces
def _fresh_out(out: Path) -> None:
    """Create ``out``; a previous run's bank/ and gate/ there are removed (metrics.jsonl is restarted too)."""
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("bank", "gate"):
        if (out / sub).exists():
            logger.info("removing the previous run's %s", out / sub)
            shutil.rmtree(out / sub)


def _taught_base(cfg: StreamConfig, rank: int):
    from lumoe_engine.model.teach import default_cache_dir, load_data, teach

    tcfg = cfg.teach_config()
    cache = Path(cfg.cache) if cfg.cache else default_cache_dir()
    out = Path(cfg.out)
    if rank != 0:
        barrier()  # rank 0 teaches (or loads) first and fills the cache
    import tempfile

    if rank == 0:
        model, processor, summary = teach(tcfg, out, cache, progress=cfg.progress)
    else:
        with tempfile.TemporaryDirectory(prefix=f"lumoe-rank{rank}-") as tmp:  # rank 0 writes the summary
            model, processor, summary = teach(tcfg, tmp, cache, progress=False)
    if rank == 0:
        barrier()
    bench = load_data(tcfg, cache)
    if torch.cuda.is_available() and not cfg.load_in_4bit:
        model = model.to(f"cuda:{torch.cuda.current_device()}")
    if not summary.get("reached_target", True):
        logger.warning("the taught base did not reach the teaching target (image+text %s, text-only %s): forgetting "
                       "is measured only over the queries it knows", summary.get("fact_accuracy_image_text"),
                       summary.get("fact_accuracy_text_only"))
    return model, processor, summary, bench


def _check_entities(req: Request, bench: Benchmark) -> None:
    unknown = [e for e in req.entities if e not in bench.entities]
    if unknown:
        raise RequestError(f"request {req.id!r}: entity {unknown[0]!r} is not in the benchmark at {bench.root} "
                           f"({len(bench.entities)} entities); check the spelling or add the entity's records")


def _failure(method: str, step: int, req: Request, exc: BaseException) -> dict:
    logger.error("%s: request %s (step %d) failed: %s: %s", method, req.id, step, type(exc).__name__, exc)
    return {"step": step, "method": method, "request": req.id, "request_index": step, "set": "failure",
            "form": None, "error_type": type(exc).__name__, "error": str(exc)}


def _dedupe(records: Sequence[QARecord]) -> list[QARecord]:
    seen, out = set(), []
    for r in records:
        if r.uid not in seen:
            seen.add(r.uid)
            out.append(r)
    return out


def _numeric(cost: dict) -> dict:
    return {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None)
            for k, v in cost.items()}


def _flat_cost(seconds: list) -> dict:
    """Training seconds of the first and last request and their ratio (flat cost: the last request's training must not
    cost more than the first's); ``ratio_last_second`` leaves out the first request's one-time warm-up."""
    if not seconds:
        return {"first": None, "last": None, "ratio_last_first": None, "ratio_last_second": None, "n": 0}
    ratio = lambda a, b: round(a / b, 3) if b > 0 else None  # noqa: E731
    return {"first": seconds[0], "last": seconds[-1], "ratio_last_first": ratio(seconds[-1], seconds[0]),
            "ratio_last_second": ratio(seconds[-1], seconds[1]) if len(seconds) > 1 else None,
            "max_over_min": ratio(max(seconds), min(seconds)), "n": len(seconds)}


def _base_predictions(model, processor, queries: Sequence[QARecord], max_new: int, cfg: StreamConfig,
                      teach_summary: dict) -> dict:
    """The taught base's greedy answers to every evaluation query, cached under ``<cache>/base_predictions``."""
    from lumoe_engine.data.mlubench import load_image
    from lumoe_engine.model.collate import generate_answers
    from lumoe_engine.model.teach import default_cache_dir

    key_src = json.dumps({"model": teach_summary.get("cache_key") or teach_summary.get("model_dir"),
                          "max_new": max_new, "uids": sorted(r.uid for r in queries),
                          "questions": hashlib.sha256("\x1f".join(r.question for r in queries).encode()).hexdigest()},
                         sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    path = (Path(cfg.cache) if cfg.cache else default_cache_dir()) / "base_predictions" / f"{key}.json"
    if path.is_file() and teach_summary.get("cache_key"):
        try:
            preds = json.loads(path.read_text())
            if all(r.uid in preds for r in queries):
                return preds
        except (OSError, ValueError):
            pass
    texts = generate_answers(model, processor, queries, max_new, batch_size=cfg.eval_batch_size, image_fn=load_image)
    preds = {r.uid: t for r, t in zip(queries, texts)}
    if teach_summary.get("cache_key"):
        atomic_write_text(path, json.dumps(preds))
    return preds


def _evaluation_benchmark(bench: Benchmark, extra: Sequence[str]) -> tuple[Benchmark, dict]:
    """The benchmark the evaluator samples from: ``bench`` minus records whose image file will not open, plus the
    ``--extra-eval`` records (as held-out phrasings: the paraphrase form)."""
    from lumoe_engine.data.mlubench import load_image

    bad_files, ok = set(), {}
    for r in bench.records:
        if r.form != "image_text" or r.image_missing:
            continue
        if r.image not in ok:
            try:
                load_image(r)
                ok[r.image] = True
            except Exception as exc:
                ok[r.image] = False
                bad_files.add(r.image)
                logger.warning("evaluation: image %s does not open (%s); its records are not evaluated", r.image, exc)
    records = [r for r in bench.records if not (r.form == "image_text" and r.image in bad_files)]
    info = {"unreadable_images": sorted(bad_files), "extra_eval_records": 0, "extra_eval_unmatched": 0}
    if extra:
        added, unmatched = read_extra_eval(extra, bench)
        records += added
        info.update(extra_eval_records=len(added), extra_eval_unmatched=unmatched,
                    extra_eval_files=[str(p) for p in extra])
    ev = dataclasses.replace(bench, records=records)
    return ev, info


def read_extra_eval(paths: Sequence[str], bench: Benchmark) -> tuple[list[QARecord], int]:
    """QA records from MLUBench-format JSON files (or folders of them): a list of ``{"id", "image"?, "conversations":
    [{"from": "human", "value": "<image>\\n<question>"}, {"from": "gpt", "value": "<answer>"}], "meta"?}``.

    Entity: ``meta.entity``, else the image folder ``.../<Class>/<Entity>/<file>``, else the file stem ("_" -> " ").
    Each record becomes a held-out phrasing (``heldout_phrasing=True``: the paraphrase form). Key facts, class and kind
    come from the benchmark's record of the same entity with the same answer (a rewording keeps the answer); an
    unmatched record keeps ``keys=()`` (scored by ROUGE-L recall) and is counted. Returns (records, unmatched)."""
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.rglob("*.json")) if p.is_dir() else [p]
    by_answer = {(r.entity, r.answer.strip()): r for r in bench.records}
    out, unmatched = [], 0
    for f in files:
        try:
            items = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"--extra-eval {f}: not a JSON list of QA records ({exc})") from None
        if not isinstance(items, list):
            raise ValueError(f"--extra-eval {f}: expected a JSON list of records, got {type(items).__name__}")
        for i, it in enumerate(items):
            conv = it.get("conversations") if isinstance(it, dict) else None
            if not isinstance(conv, list) or len(conv) < 2 or not all(isinstance(c, dict) for c in conv[:2]):
                raise ValueError(f"--extra-eval {f}, record {i}: expected 'conversations' = [human turn, gpt turn]")
            q = str(conv[0].get("value", "")).replace("<image>", "").strip()
            a = str(conv[1].get("value", "")).strip()
            meta = it.get("meta") if isinstance(it.get("meta"), dict) else {}
            img = it.get("image")
            entity = meta.get("entity")
            if entity is None and img:
                parts = Path(img).parts
                entity = parts[-2].replace("_", " ") if len(parts) >= 2 else None
            entity = entity or f.stem.replace("_", " ")
            image = None
            if img:
                cand = [Path(bench.root) / img, f.parent / img]
                image = str(next((c for c in cand if c.is_file()), cand[0]))
            base = by_answer.get((entity, a))
            uid = f"extra:{f.stem}#{it.get('id', i)}" + ("" if img else "#text")
            if base is None:
                unmatched += 1
            out.append(QARecord(uid=uid, entity=entity, cls=base.cls if base else bench.entities.get(entity, ""),
                                kind=base.kind if base else 0, phrasing=-1, question=q, answer=a,
                                form="image_text" if img else "text_only", image=image,
                                keys=base.keys if base else (), heldout_phrasing=True,
                                image_missing=bool(img) and not Path(image).is_file()))
    return out, unmatched


def _config_doc(cfg, teach_summary, bench, requests, max_new, world, eval_info) -> dict:
    conf = cfg.to_dict()
    conf.update(resolved_max_new_tokens=max_new, world_size=world, benchmark=str(bench.root),
                n_requests=len(requests), requests=[r.id for r in requests],
                surrogate_images=bench.surrogate_images, lumoe_loss=dataclasses.asdict(cfg.loss_config()),
                train=cfg.train_config().to_dict(), teach_config=cfg.teach_config().to_dict(),
                teach_model_dir=teach_summary.get("model_dir"), evaluation=eval_info)
    seeds = {"stream": cfg.seed, "teach": cfg.teach_config().seed, "torch": cfg.seed, "evaluation": cfg.seed}
    return {"config": conf, "seeds": seeds}


def _teach_brief(s: dict) -> dict:
    keys = ("fact_accuracy_image_text", "fact_accuracy_text_only", "fact_accuracy_heldout_phrasing",
            "fact_accuracy_fresh_images", "reached_target", "cached", "seconds", "cache_key", "model_dir")
    return {k: s.get(k) for k in keys}


def _log_step(method, step, req, evaluator, cost) -> None:
    agg = evaluator.summary(method)["final"]
    leak = agg["max_forget_leak"]
    logger.info("%s step %d (%s): retain ratio %s, worst leak image+text %s text-only %s paraphrase %s; %.1f s "
                "(eval %.1f s)", method, step, req.id, _fmt(agg["retain_ratio"]), _fmt(leak.get("image_text")),
                _fmt(leak.get("text_only")), _fmt(leak.get("paraphrase")), cost.get("seconds") or 0,
                cost.get("eval_seconds") or 0)


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def _write_figures_and_report(out: Path, summary: dict, writer: MetricsWriter, config_doc: dict, failures) -> None:
    from lumoe_engine.eval.metrics import read_rows
    from lumoe_engine.eval.plots import write_plots
    from lumoe_engine.eval.report import write_report

    write_plots(out, summary)
    path = write_report(out, summary, read_rows(writer.metrics_path), config_doc["config"])
    lines = [f"- {f['method']}, step {f['step']}, request `{f['request']}`: {f['error_type']}: {f['error']}"
             for fs in failures.values() for f in fs]
    flat = [(m, s.get("flat_cost", {})) for m, s in summary["methods"].items()]
    text = path.read_text(encoding="utf-8").rstrip("\n") + "\n\n## Failed requests\n\n"
    text += ("\n".join(lines) if lines else "None: every request was learned.") + "\n"
    text += "\n## Training cost per request\n\n| method | first (s) | last (s) | last / first |\n|---|---|---|---|\n"
    for m, fc in flat:
        text += f"| {m} | {_fmt(fc.get('first'))} | {_fmt(fc.get('last'))} | {_fmt(fc.get('ratio_last_first'))} |\n"
    atomic_write_text(path, text)


def _print_table(summary: dict, out: Path) -> None:
    forms = ("image_text", "text_only", "paraphrase")
    print(f"\nstream results ({out}):")
    print(f"  {'method':<8} {'retain':>7} " + " ".join(f"{'leak ' + f:>16}" for f in forms) + f" {'s/request':>10}")
    for m, s in summary["methods"].items():
        fin = s["final"]
        leaks = " ".join(f"{_fmt(fin['max_forget_leak'].get(f)):>16}" for f in forms)
        print(f"  {m:<8} {_fmt(fin['retain_ratio']):>7} {leaks} {_fmt(s.get('mean_seconds_per_request')):>10}")
    fails = sum(len(s.get("failures", [])) for s in summary["methods"].values())
    if fails:
        print(f"  {fails} request(s) failed: see report.md")
    print(f"  summary: {out / 'summary.json'}  report: {out / 'report.md'}")


# ======================================================================================================= CLI
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The stream options (the main job's default command)."""
    d = StreamConfig()
    g = parser.add_argument_group("stream")
    g.add_argument("--stream", default=d.stream, help="abcd | cabd | entity | synthetic:N (default abcd)")
    g.add_argument("--method", default=d.method, choices=METHODS, help="lumoe or a sequential baseline")
    g.add_argument("--compare", action="store_true", help="LUMoE and every baseline on the same stream, one table")
    g.add_argument("--data", default=None, help="MLUBench-format root (default: the embedded synthetic benchmark)")
    g.add_argument("--subset", type=int, default=None, help="N entities per task split")
    g.add_argument("--synthetic", default=d.synthetic, help="synthetic preset: tiny | default | medium | large")
    g.add_argument("--model", default=None, help="HF LLaVA / LLaVA-NeXT directory (default: the tiny LLaVA)")
    g.add_argument("--load-in-4bit", action="store_true", help="4-bit NF4 base (LUMoE only: baselines merge)")
    g.add_argument("--preset", default=d.preset, help="tiny LLaVA preset: micro | tiny | small")
    g.add_argument("--cache", default=None, help="cache folder (default $LUMOE_CACHE or ~/.cache/lumoe-engine)")
    g.add_argument("--extra-eval", action="append", default=[], metavar="PATH",
                   help="further MLUBench-format QA files or folders, scored as the paraphrase form (repeatable)")
    g.add_argument("--out", default=d.out, help="output folder (default runs/default)")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--max-per-set", type=int, default=d.max_per_set, help="evaluation queries per set per request")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="0 = the teaching answers' length")
    g.add_argument("--steps", type=int, default=d.steps, help="optimizer steps per request (every method)")
    g.add_argument("--lr", type=float, default=d.lr, help="LUMoE expert learning rate")
    g.add_argument("--baseline-lr", type=float, default=d.baseline_lr, help="the sequential baselines' learning rate")
    g.add_argument("--rank", type=int, default=d.rank, help="LoRA rank of each expert / baseline LoRA")
    g.add_argument("--alpha", type=float, default=d.alpha)
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="forget (and retain) rows per step")
    g.add_argument("--loss", default=d.loss, choices=sorted(LOSSES), help="LUMoE's expert loss")
    g.add_argument("--retain-weight", type=float, default=d.retain_weight)
    g.add_argument("--zero-stage", type=int, default=d.zero_stage, help="DeepSpeed ZeRO stage (under deepspeed)")
    g.add_argument("--gate-layer", type=int, default=None)
    g.add_argument("--target-fpr", type=float, default=d.target_fpr)
    g.add_argument("--gate-negatives", default=d.gate_negatives, choices=("stream", "seen"),
                   help="retain queries a new gate head sees: of every request of the stream, or of those so far")
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    g.add_argument("--teach", action="append", default=[], metavar="FIELD=VALUE",
                   help="a TeachConfig field for the taught base, e.g. --teach time_budget_s=120 (repeatable)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    return parser


def config_from_args(args: argparse.Namespace) -> StreamConfig:
    d = StreamConfig()
    get = lambda name: getattr(args, name, getattr(d, name))  # noqa: E731
    return StreamConfig(stream=get("stream"), method=get("method"), compare=bool(get("compare")), data=get("data"),
                        subset=get("subset"), synthetic=get("synthetic"), model=get("model"),
                        load_in_4bit=bool(get("load_in_4bit")), preset=get("preset"), cache=get("cache"),
                        extra_eval=list(get("extra_eval") or []), out=get("out"), seed=get("seed"),
                        max_per_set=get("max_per_set"), eval_batch_size=get("eval_batch_size"),
                        max_new_tokens=get("max_new_tokens"), steps=get("steps"), lr=get("lr"),
                        baseline_lr=get("baseline_lr"), rank=get("rank"),
                        alpha=get("alpha"), batch_size=get("batch_size"), loss=get("loss"),
                        retain_weight=get("retain_weight"), zero_stage=get("zero_stage"),
                        gate_layer=get("gate_layer"), target_fpr=get("target_fpr"),
                        gate_negatives=get("gate_negatives"), threads=get("threads"),
                        teach_overrides=_parse_overrides(getattr(args, "teach", None) or []),
                        progress=not getattr(args, "no_progress", False))


def _parse_overrides(items: Sequence[str]) -> dict:
    """["max_steps=20", "lr=1e-3"] -> {"max_steps": 20, "lr": 0.001} (values parsed as JSON, else kept as text)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--teach {item!r}: expected FIELD=VALUE, e.g. --teach time_budget_s=120")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def run(args: argparse.Namespace) -> dict:
    """The main job's stream command: ``run_stream`` with the parsed options; returns the summary."""
    return run_stream(config_from_args(args))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="python -m lumoe_engine.stream",
                                                   description=__doc__.split("\n\n")[0]))
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
