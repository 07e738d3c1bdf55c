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
   PNG plots, config.json (the resolved config and seeds), bank/ and gate/ (LUMoE's experts and gate state),
   ledger/ (every request and its state changes), steps/ (the raw results of every evaluated step).

A bad request (empty forget set, unknown entity, an image that will not open, a loss that turns nan/inf, an expert
that collapsed: ``collapse_check``) fails alone: a clear error, nothing written to the bank or the gate for it, a
``"set": "failure"`` row in metrics.jsonl, a line in summary.json's ``failures`` and in report.md, ledger state
"failed" with the reason; the stream goes on with the next request (the failed request is still measured: its forget
queries were not forgotten).

Reliability (LUMoE). Every request of the stream is received into the ledger ``out/ledger`` first (``intake``
``spec_from_records``: validated, content-hashed, its images stored content-addressed; a request the intake refuses
never enters the ledger and fails as above), then advanced step by step: "training" -> "expert_saved" (after
``bank.add``) -> "gate_updated" (after ``gate.save``) -> "evaluated" (after its metrics rows are appended and
fsynced), or "failed". Each evaluated step also leaves ``out/steps/<method>/NNNN.json`` (answers, routing, cost,
failure; atomic). ``--resume`` (same config: ``check_resumable``) replays those records through the evaluator
(metrics.jsonl is rewritten from them: rows of a step without a record are dropped and redone), makes the bank and
gate agree with the ledger (``_cleanup_bank_and_gate``: revoked requests lose expert and gate entry, an expert whose
request is not past "training" is removed and trained again), then continues each request from its state: an expert
already saved is not trained again, a gate head already saved is not fitted again. Everything is seeded (training
per request id, gate heads per expert id, evaluation samples per request id, gate features computed in the same
batches as an uninterrupted run), so a killed and resumed run ends with the same experts (tensors bit-equal) and
the same summary.json apart from ``TIMING_KEYS`` / ``RUN_KEYS`` (``comparable_summary``). An unfinished baseline
(``--compare``) is rerun from its first request (its shared LoRA is merged into the model: nothing to resume from),
as is every method after an unfinished one; finished ones are replayed. ``revoke(out, id, reason)`` withdraws a request: ledger first, then expert and gate entry,
then a new evaluation of every request so far (rows labelled ``after revoking <id>``), summary.json and report.md.

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
import re
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
from lumoe_engine.unlearn.trainer import (RequestError, TrainConfig, barrier, dist_info, init_distributed,
                                          train_expert)

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
        nothing in 30 steps: measured). 40 steps: at 30, with the gate routing every forget query right, two
        text-only queries of task A (seed 0) still answered the first word of a two-word fact ("Lost" for "Lost
        submarine": leak 0.033); at 40 and 60 none leaked (seeds 0 and 1; seed 1 leaked nothing at 30 either).
    loss: LUMoE's expert loss; retain_weight / beta: its LossConfig (the baselines keep the paper's: retain terms on,
        weight 1).
    gate_layer / gate_pooling / gate_head / target_fpr: the gate (None = the gate evaluation's defaults).
    gate_negatives: the negatives of a new head besides the forget queries of the requests learned before:
        "stream" = the retain queries of every request of the stream (the operator's retain data, known from the
        start), "seen" = only those of the requests arrived so far. Never-requested entities are never seen.
    gate_names: the gate's name channel: a query whose prompt names an entity of a request goes to its expert
        (``Gate.add_expert(names=...)``; off: the pooled features alone decide).
    gate_image: the gate's image channel: a query with an image is routed by its image (nearest image prototype of
        the experts, ``Gate``); off: by the heads over the pooled prompt, as a query without an image.
    threads: torch intra-op threads (None = torch's default; 1 is much faster on a machine shared by several jobs).
    teach_overrides: TeachConfig fields (tests: a short teaching budget).
    resume: continue the run in ``out`` (``check_resumable``: same config but ``RESUME_IGNORED``).
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
    steps: int = 40
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
    gate_names: bool = True
    gate_image: bool = True
    threads: Optional[int] = None
    teach_overrides: dict = field(default_factory=dict)
    progress: bool = True
    resume: bool = False

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
    bad requests with it). With ``cfg.resume`` the run in ``cfg.out`` is continued (``ResumeError`` when there is
    none, or when it was started with another config)."""
    cfg.validate()
    t_start = time.time()
    rank, world = init_distributed()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    if cfg.resume:
        check_resumable(out, cfg)  # every rank: nothing heavy happens before a refusal
    elif rank == 0:
        _fresh_out(out)
        atomic_write_text(out / "config.json", json.dumps(jsonable({"config": cfg.to_dict(), "started": True}),
                                                          indent=1) + "\n")
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
        eval_info["never_requested_entities"] = len(evaluator.unrequested_entities)
        writer = MetricsWriter(out, resume=cfg.resume)
    config_doc = _config_doc(cfg, teach_summary, bench, requests, max_new, world, eval_info)
    if rank == 0:
        atomic_write_text(out / "config.json", json.dumps(jsonable(config_doc), indent=1) + "\n")

    # 3.-4. the methods, each from the same taught base; a resumed run first replays the steps already evaluated
    methods = cfg.methods()
    done = _replay(out, methods, requests, evaluator, writer) if rank == 0 else {}
    if world > 1:
        done = _broadcast(done)
    failures: dict[str, list] = {}
    extra: dict[str, dict] = {}
    for i, method in enumerate(methods):
        state = done.get(method) or _MethodState()
        if method != "lumoe" and 0 < len(state.records) < len(requests):
            # an unfinished baseline is rerun from its first request (its shared LoRA is merged into the model
            # after every request: nothing to resume from); it is deterministic, so it ends where it would have
            logger.info("%s: unfinished (%d of %d requests); rerun from the start", method, len(state.records),
                        len(requests))
            state = _MethodState()
        if len(state.records) < len(requests) or method == "lumoe":
            m_model = model if i == len(methods) - 1 else copy.deepcopy(model)  # LUMoE never edits the base
            runner = _run_lumoe if method == "lumoe" else _run_baseline
            extra[method] = runner(method, m_model, processor, bench, requests, evaluator, writer, cfg, out, rank,
                                   max_new, state)
        else:
            extra[method] = _method_extra(method, cfg, state)
        failures[method] = state.failures
        barrier()

    # 5. outputs
    if rank != 0:
        return {}
    summary = _write_outputs(out, evaluator, writer, config_doc, teach_summary, failures, extra, eval_info)
    summary["total_seconds"] = round(time.time() - t_start, 1)
    writer.write_summary(summary["methods"], config=summary["config"], seeds=summary["seeds"],
                         **{k: v for k, v in summary.items() if k not in ("methods", "config", "seeds",
                                                                           "schema_version")})
    _print_table(summary, out)
    return summary


def _write_outputs(out, evaluator, writer, config_doc, teach_summary, failures, extra, eval_info) -> dict:
    """summary.json (every method's ``StreamEvaluator.summary`` + costs + failures + revocations), plots, report.md;
    returns the summary document."""
    summaries = {m: evaluator.summary(m) for m in evaluator.methods}
    for m, s in summaries.items():
        s.update(extra.get(m, {}))
        s["failures"] = failures.get(m, [])
    revs = _StepLog(out, "lumoe").revocations()
    if revs and "lumoe" in summaries:
        summaries["lumoe"]["revocations"] = [{k: v for k, v in r.items() if k != "rows"} for r in revs]
    doc_extra = {"failures": failures, "teach": _teach_brief(teach_summary), "total_seconds": None,
                 "evaluation": eval_info}
    writer.write_summary(summaries, config=config_doc["config"], seeds=config_doc["seeds"], **doc_extra)
    summary = json.loads(writer.summary_path.read_text())
    _write_figures_and_report(out, summary, writer, config_doc, failures)
    return summary


# ------------------------------------------------------------------------------------------- resume: step records
class ResumeError(ValueError):
    """``--resume`` cannot continue the run in ``--out``: none is there, or it was started with another config."""


class ExpertCollapseError(RuntimeError):
    """A trained expert answers its own validation queries with gibberish (``collapse_check``); it is not saved."""


# StreamConfig fields that may differ between a run and its resumption: resume itself, progress bars, and the
# output folder's spelling (the folder is the run)
RESUME_IGNORED = ("resume", "progress", "out")


def check_resumable(out: Path, cfg: StreamConfig) -> dict:
    """The saved config of the run in ``out`` when ``cfg`` may resume it, else ``ResumeError`` saying why and what to
    do. Compared: every ``StreamConfig`` field but ``RESUME_IGNORED``."""
    path = Path(out) / "config.json"
    if not path.is_file():
        raise ResumeError(f"--resume: {out} holds no stream run (no {path.name}); start the run without --resume, "
                          f"or pass the --out folder of the run to continue")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))["config"]
        if not isinstance(saved, dict):
            raise TypeError("config is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ResumeError(f"--resume: {path} cannot be read ({exc}); the run in {out} cannot be continued: start "
                          f"a new one (another --out, or without --resume)") from None
    now = jsonable(cfg.to_dict())
    diff = [f"{k}: run {saved.get(k, '<absent>')!r}, now {now[k]!r}" for k in now
            if k not in RESUME_IGNORED and saved.get(k, "<absent>") != now[k]]
    if diff:
        raise ResumeError(f"--resume: the run in {out} was started with another config ({'; '.join(diff)}); resume "
                          f"it with the same options, or start a new run in another --out folder")
    return saved


@dataclass
class _MethodState:
    """What a method has done so far (replayed from its step records): records, failures, learned requests."""

    records: list = field(default_factory=list)
    failures: list = field(default_factory=list)


class _StepLog:
    """``out/steps/<method>/NNNN.json``: the raw results of one evaluated step (answers, routing, cost, failure),
    written atomically before the step's metrics rows; ``--resume`` replays them through the evaluator, so the
    resumed run's rows and summary are those of an uninterrupted run. ``revoke-NNN-<id>.json``: a revocation and
    the rows of the evaluation after it."""

    def __init__(self, out: Path, method: str):
        self.dir = Path(out) / "steps" / method

    def path(self, step: int) -> Path:
        return self.dir / f"{step:04d}.json"

    def save(self, step: int, doc: dict) -> None:
        atomic_write_text(self.path(step), json.dumps(jsonable(doc), separators=(",", ":")))

    def load(self, step: int) -> Optional[dict]:
        try:
            return json.loads(self.path(step).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # atomic writes: only a damaged disk gets here
            logger.warning("step record %s unreadable (%s): the step is redone", self.path(step), exc)
            return None

    def prefix(self, n: int) -> list[dict]:
        """The records of steps 0, 1, ... up to the first missing one (later ones are dropped: redone)."""
        recs = []
        for step in range(n):
            rec = self.load(step)
            if rec is None:
                for later in range(step + 1, n):
                    self.path(later).unlink(missing_ok=True)
                break
            recs.append(rec)
        return recs

    def clear(self) -> None:
        for p in self.dir.glob("[0-9]*.json"):
            p.unlink()

    def revocations(self) -> list[dict]:
        out = []
        for p in sorted(self.dir.glob("revoke-*.json")):
            try:
                out.append(json.loads(p.read_text(encoding="utf-8")))
            except (OSError, ValueError) as exc:
                logger.warning("revocation record %s unreadable (%s); ignored", p, exc)
        return out

    def save_revocation(self, doc: dict) -> Path:
        n = len(list(self.dir.glob("revoke-*.json")))
        path = self.dir / f"revoke-{n:03d}-{doc['request']}.json"
        atomic_write_text(path, json.dumps(jsonable(doc), separators=(",", ":")))
        return path


def _replay(out: Path, methods: list, requests: list, evaluator, writer) -> dict[str, _MethodState]:
    """Resume: every method's evaluated steps (its step records, a prefix of the stream) are replayed through the
    evaluator, and metrics.jsonl is rewritten from them (rows of a step without a record are dropped: the step is
    redone). A fresh run has no records: nothing happens."""
    states: dict[str, _MethodState] = {}
    rows: list[dict] = []
    revs = _StepLog(out, "lumoe").revocations()
    blocked = False  # a method after an unfinished one is rerun too: the rows keep the order of a straight run
    for method in methods:
        log = _StepLog(out, method)
        recs = log.prefix(len(requests))
        if blocked or (method != "lumoe" and len(recs) < len(requests)):
            log.clear()  # an unfinished baseline is rerun from the start
            recs = []
        blocked = blocked or len(recs) < len(requests)
        st = states[method] = _MethodState()
        for rec in recs:
            step = rec["step"]
            rows += evaluator.evaluate_step(step, method, rec["predictions"], rec["routing"], cost=rec["cost"])
            if rec.get("failure"):
                rows.append(rec["failure"])
                st.failures.append(rec["failure"])
            if method == "lumoe":
                rows += [r for rv in revs if rv["after_step"] == step for r in rv["rows"]]
            st.records.append(rec)
    if any(st.records for st in states.values()):
        atomic_write_text(writer.metrics_path, "".join(json.dumps(jsonable(r), ensure_ascii=False, allow_nan=False)
                                                       + "\n" for r in rows))
        logger.info("resume: replayed %s evaluated steps", {m: len(s.records) for m, s in states.items()})
    elif writer.metrics_path.exists():
        atomic_write_text(writer.metrics_path, "")
    return states


def _broadcast(obj):
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _method_extra(method: str, cfg: StreamConfig, state: _MethodState, gate_config: Optional[dict] = None) -> dict:
    train_seconds = [r["train_seconds"] for r in state.records if r.get("train_seconds") is not None]
    if method == "lumoe":
        loss_cfg, train_cfg = cfg.loss_config(), cfg.train_config()
    else:
        loss_cfg, train_cfg = baseline_loss(method, beta=cfg.beta), cfg.train_config(baseline=True)
    doc = {"train_seconds_per_request": train_seconds, "flat_cost": _flat_cost(train_seconds),
           "loss": dataclasses.asdict(loss_cfg), "train": train_cfg.to_dict()}
    if gate_config is not None:
        doc["gate"] = gate_config
    return doc


# ----------------------------------------------------------------------------------------------------- LUMoE
def _spec_of(req: Request, cfg: StreamConfig):
    """The ledger's form of a stream request (``intake.spec_from_records``: validated, content-hashed)."""
    from lumoe_engine.data.intake import spec_from_records

    return spec_from_records(req.id, req.forget, req.retain, loss=dataclasses.asdict(cfg.loss_config()),
                             method="lumoe", entity=req.entities[0] if len(req.entities) == 1 else None,
                             metadata=jsonable(req.metadata))


def _receive_all(ledger, requests: list, cfg: StreamConfig) -> dict[str, BaseException]:
    """Record every request of the stream in the ledger (the same content again is the request already held);
    returns {request id: the intake error} for the requests the intake refuses (they never enter the ledger)."""
    errors: dict[str, BaseException] = {}
    t0 = time.perf_counter()
    for req in requests:
        if ledger is not None and req.id in ledger:
            continue  # received by the run being resumed (same config, hence the same stream)
        try:
            spec = _spec_of(req, cfg)
            if ledger is not None:
                rid, _ = ledger.receive(spec)
                if rid != req.id:
                    raise RequestError(f"request {req.id!r}: same content as request {rid!r} of this stream; a "
                                       f"request is applied once")
        except (RequestError, ValueError, OSError) as exc:
            errors[req.id] = exc
    logger.info("ledger: %d requests received in %.1f s", len(requests), time.perf_counter() - t0)
    return errors


def _ledger_info(ledger, rid: str, state: str) -> dict:
    """The info of the latest ``state`` event of ``rid`` ({} when none)."""
    for ev in reversed(ledger.events(rid)):
        if ev["state"] == state:
            return ev["info"]
    return {}


def _cleanup_bank_and_gate(ledger, bank, gate, out: Path) -> None:
    """Resume: the bank and gate hold exactly the requests the ledger says were saved and not revoked.

    A revoked request still held (a crash between ``ledger.revoke`` and the removal) loses its expert and gate
    entry; so does an expert whose request is not past "training" (a crash between ``bank.add`` and its ledger
    event: it is trained again, deterministically) or failed; a gate entry without its expert is dropped."""
    keep = {"expert_saved", "gate_updated", "evaluated"}
    state = {rid: ledger.state(rid) for rid in ledger.requests()}
    drop_gate = [e for e in gate.expert_ids if state.get(e) not in keep or e not in bank]
    for e in drop_gate:
        logger.info("resume: removing gate entry %s (ledger state %s)", e, state.get(e))
        gate.remove_expert(e)
    if drop_gate:
        gate.save(out / "gate")
    for e in [e for e in bank.ids if state.get(e) not in keep]:
        logger.info("resume: removing expert %s from the bank (ledger state %s)", e, state.get(e))
        bank.remove(e)


def _run_lumoe(method, model, processor, bench, requests, evaluator, writer, cfg, out, rank, max_new,
               state: _MethodState):
    """LUMoE over the stream, each request recorded in the ledger (``out/ledger``) and resumable: a step with a
    record was replayed already (``state``); a later request continues from its ledger state."""
    from lumoe_engine.engine import LUMoEEngine
    from lumoe_engine.gate.gate import Gate
    from lumoe_engine.ledger import Ledger
    from lumoe_engine.model.bank import ExpertBank, lora_bytes

    ledger = Ledger(out / "ledger") if rank == 0 else None
    try:
        if rank == 0:
            bank = ExpertBank.open(out / "bank", create=True)
            gate = Gate.load(out / "gate") if (out / "gate" / "gate.json").is_file() else _new_gate(cfg, model)
            _cleanup_bank_and_gate(ledger, bank, gate, out)
        else:
            bank, gate = ExpertBank(None), _new_gate(cfg, model)
        intake_errors = _receive_all(ledger, requests, cfg) if rank == 0 else {}
        states = {r.id: (ledger.state(r.id) if r.id in ledger else None) for r in requests} if rank == 0 else {}
        if dist_world() > 1:
            intake_errors, states = _broadcast(({k: str(v) for k, v in intake_errors.items()}, states))
            intake_errors = {k: RequestError(v) for k, v in intake_errors.items()}
        engine = LUMoEEngine(model, processor, bank, gate, top_k=1)
        features = _FeatureCache(model, processor, gate)
        loss_cfg, train_cfg = cfg.loss_config(), cfg.train_config()
        learned: list[Request] = []
        bytes_per_expert = None
        start = len(state.records)
        for step, rec in enumerate(state.records):  # replay: the gate features cache fills as it did
            req = requests[step]
            if rank == 0 and rec.get("features") and start < len(requests):
                pos, neg, _ = _gate_training_set(req, learned, requests, cfg)
                features(pos), features(neg)
            if rec.get("learned"):
                learned.append(req)
            if rec.get("bytes_per_expert") is not None:
                bytes_per_expert = rec["bytes_per_expert"]
            if rank == 0 and req.id in ledger and ledger.state(req.id) == "gate_updated":
                ledger.advance(req.id, "evaluated", step=step)  # its rows were appended: the crash came after
        for step in range(start, len(requests)):
            req = requests[step]
            rid = req.id
            t0 = time.perf_counter()
            cost: dict = {}
            failure = None
            rec = {"step": step, "method": method, "request": rid, "learned": False, "features": False,
                   "train_seconds": None}
            st = states.get(rid)
            try:
                if rid in intake_errors:
                    raise intake_errors[rid]
                if st == "failed":  # it failed before the crash: the same failure again, nothing retried
                    info = _ledger_info(ledger, rid, "failed") if ledger is not None else {}
                    raise _Recorded(info.get("error_type", "RequestError"), info.get("error", info.get("reason")))
                if st == "revoked":
                    raise _Recorded("Revoked", f"request {rid!r} was revoked before it was learned")
                if st in (None, "received", "training"):
                    if ledger is not None:
                        ledger.advance(rid, "training")
                    _check_entities(req, bench)
                    expert, stats = train_expert(model, processor, engine.ctx, req, loss_cfg, train_cfg,
                                                 method=method)
                    rec["train_seconds"] = stats["seconds"]
                    # the expert file holds no wall-clock values: a resumed run writes the same bytes
                    expert.metadata = {k: v for k, v in expert.metadata.items() if k not in EXPERT_TIMING_KEYS}
                    collapse_check(model, processor, engine.ctx, expert, req, max_new)
                    if rank == 0:
                        positives, negatives, groups = _gate_training_set(req, learned, requests, cfg)
                        features(positives), features(negatives)
                        rec["features"] = True
                        bank.add(expert)  # atomic: file, then manifest
                        ledger.advance(rid, "expert_saved", train_seconds=stats["seconds"],
                                       bytes=lora_bytes(expert), steps=stats["steps"])
                elif ledger is not None:  # expert_saved or gate_updated before the crash: the expert is in the bank
                    rec["train_seconds"] = _ledger_info(ledger, rid, "expert_saved").get("train_seconds")
                cost["train_seconds"] = rec["train_seconds"]
                if rank == 0:
                    t1 = time.perf_counter()
                    # the features even when the gate already holds the head (resumed after gate.save): the cache
                    # must fill as in an uninterrupted run, since a batch's composition changes features in the
                    # last bits (measured: a head fitted later differed by ~1e-5)
                    positives, negatives, groups = _gate_training_set(req, learned, requests, cfg)
                    pos, neg = features(positives), features(negatives)
                    rec["features"] = True
                    if rid not in gate:
                        try:
                            gate.add_expert(rid, pos, neg, **({"pos_groups": groups} if groups else {}),
                                            names=request_names(req, processor) if cfg.gate_names else None)
                        except Exception:
                            bank.remove(rid)  # nothing of a failed request stays in the bank
                            raise
                        gate.save(out / "gate")
                    report = gate.reports.get(rid)
                    if ledger.state(rid) == "expert_saved":  # (evaluated already: its step record was lost)
                        ledger.advance(rid, "gate_updated", threshold=getattr(report, "threshold", None))
                    bytes_per_expert = lora_bytes(bank.get(rid))
                    cost["gate_seconds"] = round(time.perf_counter() - t1, 3)
                    cost["gate_tpr_cal"] = getattr(report, "tpr_cal", None)
                    cost["gate_fpr_cal"] = getattr(report, "fpr_cal", None)
                learned.append(req)
                rec["learned"] = True
            except (RequestError, NonFiniteLossError, ExpertCollapseError, ValueError, OSError, _Recorded) as exc:
                failure = _failure(method, step, req, exc)
                if ledger is not None and rid in ledger and ledger.state(rid) not in ("failed", "revoked"):
                    ledger.fail(rid, reason=f"{failure['error_type']}: {failure['error']}",
                                error_type=failure["error_type"], error=failure["error"], step=step)
            cost["seconds"] = round(time.perf_counter() - t0, 3)
            if rank == 0:
                t2 = time.perf_counter()
                preds, routing, tps = _answer_lumoe(engine, evaluator.queries(step), max_new, cfg.eval_batch_size)
                cost.update(tokens_per_s=tps, bytes_per_expert=bytes_per_expert, n_experts=len(gate),
                            resident_bytes=bank.resident_bytes, eval_seconds=round(time.perf_counter() - t2, 3))
                rec.update(cost=_numeric(cost), predictions=preds, routing=routing, failure=failure,
                           bytes_per_expert=bytes_per_expert)
                _StepLog(out, method).save(step, rec)
                rows = evaluator.evaluate_step(step, method, preds, routing, cost=rec["cost"])
                writer.append(rows + ([failure] if failure else []))
                if failure is None:
                    ledger.advance(rid, "evaluated", step=step)
                _log_step(method, step, req, evaluator, cost)
            if failure is not None:
                state.failures.append(failure)
            state.records.append(rec)
            barrier()
        engine.close()
        return _method_extra(method, cfg, state, gate.config())
    finally:
        if ledger is not None:
            ledger.close()


class _Recorded(Exception):
    """A failure recorded before a crash (ledger state failed or revoked), reported again on resume as it was."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type


# the keys of an expert's metadata that hold wall-clock values (kept in the ledger, not in the expert file)
EXPERT_TIMING_KEYS = ("seconds", "created")


def dist_world() -> int:
    return dist_info()[1]



def _new_gate(cfg: StreamConfig, model):
    """A Gate at the configured (or the gate evaluation's default) layer, pooling and head."""
    from lumoe_engine.gate import evaluate as gate_eval
    from lumoe_engine.gate.features import decoder_layers, image_token_id_of, pooled_dim
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
    image_id = image_token_id_of(model)
    if image_id is not None:  # tells queries with an image (Gate.text_by_name), with or without the image channel
        kw["image_token_id"] = image_id
    if cfg.gate_image and image_id is not None:  # the image channel (Gate): [mean, max] of layer L's image states
        kw["image_dim"] = 2 * hidden
    return Gate(**kw)


def request_names(req: Request, processor) -> list[list[int]]:
    """The gate's name-channel token sequences of a request: the names of the entities it forgets (its
    ``metadata["named_entities"]`` when set: a request file's own names, never the id that stands in for a missing
    "entity"; else its ``entities``, else those of its forget records), as the processor's tokenizer writes them
    inside a prompt. No names: the request's expert is reached by the heads and the image channel only."""
    from lumoe_engine.gate.gate import name_token_ids

    if "named_entities" in (req.metadata or {}):
        names = list(dict.fromkeys(req.metadata["named_entities"]))
    else:
        names = list(dict.fromkeys(list(req.entities) or [r.entity for r in req.forget]))
    return name_token_ids(processor, [n for n in names if n and n.strip()])


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
            f = base_features(self.model, self.processor, missing, self.gate.layer, pooling=self.gate.pooling,
                              image=bool(getattr(self.gate, "image_dim", 0)))
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
def _run_baseline(method, model, processor, bench, requests, evaluator, writer, cfg, out, rank, max_new,
                  state: _MethodState):
    """A sequential baseline over the whole stream (an unfinished one is rerun from the start: see run_stream)."""
    from lumoe_engine.model.collate import generate_answers
    from lumoe_engine.data.mlubench import load_image

    loss_cfg = baseline_loss(method, beta=cfg.beta)  # the paper's losses: retain terms on (weight 1)
    train_cfg = cfg.train_config(baseline=True)
    base = SequentialBaseline(model, processor, method, loss_cfg, train_cfg)
    log = _StepLog(out, method)
    for step, req in enumerate(requests):
        t0 = time.perf_counter()
        cost: dict = {}
        failure = None
        rec = {"step": step, "method": method, "request": req.id, "train_seconds": None}
        try:
            _check_entities(req, bench)
            stats = base.learn(req)
            cost["train_seconds"] = rec["train_seconds"] = stats["seconds"]
        except (RequestError, NonFiniteLossError, ValueError, OSError) as exc:
            failure = _failure(method, step, req, exc)
        cost["seconds"] = round(time.perf_counter() - t0, 3)
        if rank == 0:
            t2 = time.perf_counter()
            queries = evaluator.queries(step)
            texts = generate_answers(model, processor, queries, max_new, batch_size=cfg.eval_batch_size,
                                     image_fn=load_image)
            cost["eval_seconds"] = round(time.perf_counter() - t2, 3)
            preds = {r.uid: t for r, t in zip(queries, texts)}
            rec.update(cost=_numeric(cost), predictions=preds, routing=None, failure=failure)
            log.save(step, rec)
            rows = evaluator.evaluate_step(step, method, preds, cost=rec["cost"])
            writer.append(rows + ([failure] if failure else []))
            _log_step(method, step, req, evaluator, cost)
        if failure is not None:
            state.failures.append(failure)
        state.records.append(rec)
        barrier()
    base.close()
    return _method_extra(method, cfg, state)


# ----------------------------------------------------------------------------------------------------- pieces
def _fresh_out(out: Path) -> None:
    """Create ``out``; a previous run's bank/, gate/, ledger/ and steps/ there are removed (metrics.jsonl is
    restarted too)."""
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("bank", "gate", "ledger", "steps"):
        if (out / sub).exists():
            logger.info("removing the previous run's %s", out / sub)
            shutil.rmtree(out / sub)



# ------------------------------------------------------------------------------------------- collapse guard
COLLAPSE_QUERIES = 8        # validation queries per expert: half forget (both forms), half retain when it has any
COLLAPSE_MAX_SHARE = 0.5    # the expert collapsed when more than this share of its answers is degenerate
_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*", re.UNICODE)
_GLUED = re.compile(r"[^\W\d_]{3,}\d+|\d+[^\W\d_]{3,}\d*", re.UNICODE)  # "seasons5", "5Drosork": no word


def degenerate_answer(text: str, vocab: Optional[set] = None) -> Optional[str]:
    """Why ``text`` is not an answer a working model gives (None when it looks like one).

    Degenerate: a replacement character or an unknown-token marker; no word at all; one word repeated three times
    in a row (``"the the the"``); a word of 4+ letters twice in a row (``"Fekroun Fekroun"``, digits ignored); a
    word of 3+ letters glued to digits (``"seasons5"``, ``"Drosork555"``: the word tokenizer's babble); one word
    making up more than half of an answer of at least four words; under half
    of its characters letters/digits/spaces/common punctuation; and, given the tokenizer's ``vocab`` (lower-cased
    words), under half of its alphabetic words known to it. An IDK refusal ("I don't know anything about that
    person.") passes every rule; the babble of a collapsed expert fails at least one (measured on the micro LLaVA
    taught 150 steps: an expert with its B matrices scaled up answers "Atlas Atlas Atlas ...", "printers5 printers5
    Fekroun Kobratror printers", "Quashind seasons Drosork53 Fekroun Fekroun": 8 of 8 flagged; its base answers
    "Trailing runner", "Tarouth Nequiox": 0 of 8).

    An empty answer is NOT degenerate: it is a refusal by silence — an IDK expert early in its training ends the
    answer at once (measured: micro LLaVA, 12-40 IDK steps, idk loss ~3.9: 7-8 of 8 validation answers empty) —
    and it reveals nothing."""
    t = (text or "").strip()
    if not t:
        return None
    if "\ufffd" in t or "<unk>" in t.lower() or "[unk]" in t.lower():
        return "unknown-token marker in the answer"
    words = [w.lower() for w in _WORD.findall(t)]
    if not words:
        return "no word in the answer"
    for a, b, c in zip(words, words[1:], words[2:]):
        if a == b == c:
            return f"the word {a!r} three times in a row"
    glued = [w for w in words if _GLUED.fullmatch(w)]
    if glued:
        return f"letters and digits glued into one word ({glued[0]!r})"
    stems = [w.strip("0123456789") for w in words]
    for a, b in zip(stems, stems[1:]):
        if a == b and len(a) >= 4:
            return f"the word {a!r} twice in a row"
    if len(words) >= 4:
        top = max(words.count(w) for w in set(words))
        if top / len(words) > 0.5:
            return "one word is more than half of the answer"
    ok = sum(ch.isalnum() or ch.isspace() or ch in ".,;:!?'’\"-()/&%$#" for ch in t)
    if ok / len(t) < 0.5:
        return "mostly not text characters"
    alpha = [w for w in words if w.isalpha()]  # numbers and codes are not vocabulary words, nor gibberish
    if vocab and alpha:
        known = sum(w in vocab for w in alpha)
        if known / len(alpha) < 0.5:
            return "most words are not in the tokenizer's vocabulary"
    return None


def _vocab_words(processor) -> Optional[set]:
    """The lower-cased whole words of the tokenizer's vocabulary (word-piece markers ▁ / Ġ stripped), or None."""
    tok = getattr(processor, "tokenizer", processor)
    try:
        vocab = tok.get_vocab()
    except Exception:  # noqa: BLE001 - a tokenizer without a vocabulary: the rule is skipped
        return None
    words = {w.lstrip("▁Ġ").lower() for w in vocab}
    return {w for w in words if w and any(ch.isalpha() for ch in w)} or None


def validation_queries(request: Request, n: int = COLLAPSE_QUERIES) -> list[QARecord]:
    """A few of the request's own queries for ``collapse_check``: up to n/2 forget records (image+text and text-only
    alternating) and the rest retain records (forget again when it has none); deterministic (spread over uid order)."""
    def spread(recs, k):
        recs = sorted(recs, key=lambda r: r.uid)
        if len(recs) <= k:
            return recs
        return [recs[(i * len(recs)) // k] for i in range(k)]

    forms = [[r for r in request.forget if r.form == f] for f in ("image_text", "text_only")]
    k_ret = min(n // 2, len(request.retain))
    k_fgt = n - k_ret
    fgt = [r for pair in zip(*(spread(f, k_fgt) for f in forms)) for r in pair]
    fgt += [r for f in forms for r in spread(f, k_fgt) if r not in fgt]
    return fgt[:k_fgt] + spread(request.retain, k_ret)


def collapse_check(model, processor, ctx, expert, request: Request, max_new: int,
                   n: int = COLLAPSE_QUERIES) -> dict:
    """The collapse guard: the freshly trained ``expert`` (a bank ``Expert``, not yet saved) answers a few of its
    request's own queries (``validation_queries``) with only itself active; when more than ``COLLAPSE_MAX_SHARE`` of
    the answers are degenerate (``degenerate_answer``) while the base model's answers to the same queries are not
    (an untaught base that answers nothing proves nothing about the expert), it raises ``ExpertCollapseError``
    naming the request, the reasons and an example. Returns {"answers", "base_answers", "degenerate",
    "base_degenerate"} otherwise."""
    from lumoe_engine.data.mlubench import load_image
    from lumoe_engine.model.collate import generate_answers
    from lumoe_engine.model.multilora import TrainableExpert

    queries = validation_queries(request, n)
    if not queries:
        return {"answers": [], "degenerate": 0}
    ref = next(model.parameters())
    te = TrainableExpert(rank=expert.rank, alpha=float(expert.alpha),
                         weights={m: (a.to(ref.device), b.to(ref.device)) for m, (a, b) in expert.weights.items()})
    ctx.clear()
    with torch.no_grad():
        base = generate_answers(model, processor, queries, max_new, batch_size=len(queries), image_fn=load_image)
        with ctx.training(te):
            texts = generate_answers(model, processor, queries, max_new, batch_size=len(queries),
                                     image_fn=load_image)
    vocab = _vocab_words(processor)
    why = [degenerate_answer(t, vocab) for t in texts]
    bad = [(q, t, w) for q, t, w in zip(queries, texts, why) if w]
    base_bad = sum(degenerate_answer(t, vocab) is not None for t in base)
    if len(bad) > COLLAPSE_MAX_SHARE * len(texts) and base_bad <= COLLAPSE_MAX_SHARE * len(base):
        q, t, w = bad[0]
        raise ExpertCollapseError(
            f"request {request.id!r}: the trained expert collapsed: {len(bad)} of its {len(texts)} validation "
            f"answers are gibberish ({', '.join(sorted({w for _, _, w in bad}))}; e.g. {q.question!r} -> {t!r:.80}); "
            f"it was not saved: lower --lr (now {getattr(expert, 'metadata', {}).get('lr', '?')}) or --steps")
    return {"answers": texts, "base_answers": base, "degenerate": len(bad), "base_degenerate": base_bad}


# ------------------------------------------------------------------------------------------------- revocation
def revoke(out_dir, request_id: str, reason: Optional[str] = None) -> dict:
    """Withdraw request ``request_id`` of the stream run in ``out_dir``: the ledger records it as revoked first,
    then its expert leaves the bank and its entry the gate (saved), then every request learned so far is evaluated
    again (rows appended to metrics.jsonl with ``"revocation": <id>`` and ``"step_label": "after revoking <id>"``;
    their relapse is None: the revoked request's leak comes back by design) and summary.json / report.md are
    rewritten (``methods.lumoe.revocations``: one entry per revocation with the revoked request's leak per form
    before and after, and the aggregate after).

    Idempotent: revoking again changes nothing and returns the recorded result with ``"changed": False``. Refused
    (``LedgerLockedError``) while a stream process writes the run. Returns {request, reason, changed, removed_expert,
    removed_gate_entry, after_step, leak_before, leak_after, final}."""
    from lumoe_engine.gate.gate import Gate
    from lumoe_engine.ledger import Ledger
    from lumoe_engine.model.bank import ExpertBank

    out = Path(out_dir)
    saved = _saved_config(out)
    log = _StepLog(out, "lumoe")
    with Ledger(out / "ledger") as ledger:
        changed = ledger.revoke(request_id, reason=reason)  # UnknownRequestError for an id it does not hold
        removed_gate = removed_expert = False
        if (out / "gate" / "gate.json").is_file():
            gate = Gate.load(out / "gate")
            if request_id in gate:
                gate.remove_expert(request_id)
                gate.save(out / "gate")
                removed_gate = True
        if (out / "bank" / "manifest.json").is_file():
            bank = ExpertBank.open(out / "bank")
            if request_id in bank:
                bank.remove(request_id)
                removed_expert = True
        done = next((r for r in log.revocations() if r["request"] == request_id), None)
        if done is not None:
            return {**{k: v for k, v in done.items() if k != "rows"}, "changed": changed or removed_gate
                    or removed_expert}
        doc = _evaluate_after_revocation(out, saved, request_id, reason)
        doc.update(removed_expert=removed_expert, removed_gate_entry=removed_gate)
        if doc.get("rows") is not None:
            log.save_revocation(doc)
            MetricsWriter(out, resume=True).append(doc["rows"])
            _rewrite_outputs(out, saved)
        return {**{k: v for k, v in doc.items() if k != "rows"}, "changed": True}


def _saved_config(out: Path) -> StreamConfig:
    path = out / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{out} holds no stream run (no config.json); pass the --out folder of a stream run")
    saved = json.loads(path.read_text(encoding="utf-8"))["config"]
    names = {f.name for f in dataclasses.fields(StreamConfig)}
    cfg = StreamConfig(**{k: v for k, v in saved.items() if k in names})
    cfg.out, cfg.resume, cfg.progress = str(out), False, False
    return cfg


def _load_run(cfg: StreamConfig):
    """The model, processor, teach summary, benchmark, requests, evaluator (base answers set), max new tokens and
    the base answers of a saved run."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model, processor, teach_summary, bench = _taught_base(cfg, 0)
    model.requires_grad_(False)
    max_new = cfg.max_new_tokens or int(teach_summary.get("max_new_tokens") or 16)
    requests = build_stream(bench, cfg.stream)
    eval_bench, eval_info = _evaluation_benchmark(bench, cfg.extra_eval)
    evaluator = StreamEvaluator(eval_bench, requests, max_per_set=cfg.max_per_set, seed=cfg.seed)
    base_preds = _base_predictions(model, processor, evaluator.queries(), max_new, cfg, teach_summary)
    evaluator.set_base(base_preds)
    return model, processor, teach_summary, bench, requests, evaluator, max_new, base_preds


def _evaluate_after_revocation(out: Path, cfg: StreamConfig, request_id: str, reason) -> dict:
    from lumoe_engine.engine import LUMoEEngine
    from lumoe_engine.gate.gate import Gate
    from lumoe_engine.model.bank import ExpertBank

    log = _StepLog(out, "lumoe")
    doc = {"request": request_id, "reason": reason, "time": round(time.time(), 3), "after_step": None,
           "leak_before": None, "leak_after": None, "final": None, "rows": None}
    model, processor, _, _, requests, evaluator, max_new, base_preds = _load_run(cfg)
    recs = log.prefix(len(requests))
    if not recs:
        return doc  # nothing evaluated yet: the next step of the stream evaluates without the expert
    last = len(recs) - 1
    for rec in recs[:-1]:  # the history (relapse is measured against it)
        evaluator.evaluate_step(rec["step"], "lumoe", rec["predictions"], rec["routing"], cost=rec["cost"])
    before = StreamEvaluator(evaluator.benchmark, requests, max_per_set=cfg.max_per_set, seed=cfg.seed)
    before.set_base(base_preds)
    prev_rows = before.evaluate_step(last, "lumoe", recs[-1]["predictions"], recs[-1]["routing"])
    bank = ExpertBank.open(out / "bank", create=True)
    gate = Gate.load(out / "gate") if (out / "gate" / "gate.json").is_file() else _new_gate(cfg, model)
    engine = LUMoEEngine(model, processor, bank, gate, top_k=1)
    t0 = time.perf_counter()
    preds, routing, tps = _answer_lumoe(engine, evaluator.queries(last), max_new, cfg.eval_batch_size)
    engine.close()
    cost = _numeric({"eval_seconds": round(time.perf_counter() - t0, 3), "tokens_per_s": tps,
                     "n_experts": len(gate), "resident_bytes": bank.resident_bytes})
    rows = evaluator.evaluate_step(last, "lumoe", preds, routing, cost=cost)
    label = f"after revoking {request_id}"
    for r in rows:
        r.update(revocation=request_id, step_label=label, relapse=None)

    def leak_of(rs):
        return {r["form"]: r["leak"] for r in rs if r["set"] == "forget" and r["request"] == request_id}

    doc.update(after_step=last, leak_before=leak_of(prev_rows), leak_after=leak_of(rows),
               final=evaluator.summary("lumoe")["final"], rows=rows)
    return doc


def _rewrite_outputs(out: Path, cfg: StreamConfig) -> None:
    """summary.json and report.md again (after a revocation), when the run wrote them; the summary keeps its
    measured values and gains ``methods.lumoe.revocations``."""
    path = out / "summary.json"
    if not path.is_file():
        return
    summary = json.loads(path.read_text(encoding="utf-8"))
    revs = _StepLog(out, "lumoe").revocations()
    if "lumoe" in summary.get("methods", {}):
        summary["methods"]["lumoe"]["revocations"] = [{k: v for k, v in r.items() if k != "rows"} for r in revs]
    writer = MetricsWriter(out, resume=True)
    writer.write_summary(summary["methods"], config=summary.get("config"), seeds=summary.get("seeds"),
                         **{k: v for k, v in summary.items() if k not in ("methods", "config", "seeds",
                                                                           "schema_version")})
    config_doc = json.loads((out / "config.json").read_text(encoding="utf-8"))
    _write_figures_and_report(out, summary, writer, config_doc, summary.get("failures", {}))


# ------------------------------------------------------------------------------------- comparing two runs
# summary.json keys whose values are wall-clock measurements (removed at any depth by ``comparable_summary``):
# seconds of a step / of training / of the gate update / of evaluation, tokens per second, and everything derived
# from them (per-request lists, means, the flat-cost ratios), the base answers' time, the whole run's time
TIMING_KEYS = frozenset({"seconds", "train_seconds", "gate_seconds", "eval_seconds", "tokens_per_s",
                         "seconds_per_request", "mean_seconds_per_request", "train_seconds_per_request", "flat_cost",
                         "base_predictions_s", "total_seconds", "time"})
# keys of summary.json that describe the process, not the result: the config's resume / progress / out (RESUME_IGNORED)
# and whether the taught base came from the cache (teach.cached, teach.seconds: the first run may teach, a later
# one loads)
RUN_KEYS = {"config": RESUME_IGNORED, "teach": ("cached", "seconds")}


def comparable_summary(doc: dict) -> dict:
    """``doc`` (summary.json) without ``TIMING_KEYS`` (at any depth) and ``RUN_KEYS``: what an interrupted and
    resumed run must reproduce exactly."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in TIMING_KEYS}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    doc = strip(copy.deepcopy(doc))
    for section, keys in RUN_KEYS.items():
        for k in keys:
            (doc.get(section) or {}).pop(k, None)
    return doc



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
            "form": None, "error_type": getattr(exc, "error_type", type(exc).__name__), "error": str(exc)}


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
    revs = summary["methods"].get("lumoe", {}).get("revocations") or []
    if revs:
        text += ("\n## Revocations\n\nEach revoked request's expert and gate entry were removed, then every request "
                 "so far was evaluated again (rows with `revocation` in metrics.jsonl): the revoked request's leak "
                 "comes back.\n\n| request | reason | after step | leak before -> after (image+text / text-only / "
                 "paraphrase) | retain ratio after |\n|---|---|---|---|---|\n")
        for r in revs:
            lb, la = r.get("leak_before") or {}, r.get("leak_after") or {}
            leaks = " / ".join(f"{_fmt(lb.get(f))} -> {_fmt(la.get(f))}" for f in ("image_text", "text_only",
                                                                                    "paraphrase"))
            fin = r.get("final") or {}
            text += (f"| `{r['request']}` | {r.get('reason') or '–'} | {r.get('after_step')} | {leaks} | "
                     f"{_fmt(fin.get('retain_ratio'))} |\n")
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
    g.add_argument("--no-gate-image", action="store_true",
                   help="no image channel: a query with an image is routed by the heads over its pooled prompt")
    g.add_argument("--no-gate-names", action="store_true",
                   help="no name channel: a query naming a forgotten entity is routed by its pooled features alone")
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    g.add_argument("--teach", action="append", default=[], metavar="FIELD=VALUE",
                   help="a TeachConfig field for the taught base, e.g. --teach time_budget_s=120 (repeatable)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out (killed or stopped) from its ledger: requests evaluated are kept, "
                        "the others redone; refused when --out holds no run or one with other options")
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
                        gate_negatives=get("gate_negatives"), gate_names=not getattr(args, "no_gate_names", False),
                        gate_image=not getattr(args, "no_gate_image", False),
                        threads=get("threads"),
                        teach_overrides=_parse_overrides(getattr(args, "teach", None) or []),
                        progress=not getattr(args, "no_progress", False), resume=bool(get("resume")))


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
