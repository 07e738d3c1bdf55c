"""The stream driver (the main job's body): requests learned one after the other, every request so far measured after
each one. Top to bottom, as ``run_stream`` does it:

1. the taught base (``base.taught_base``: cached by config + data hash; taught when not cached) -> model, processor,
   benchmark;
2. the stream (``build_stream``: abcd | cabd | entity | synthetic:N) and its evaluator (``StreamEvaluator``): the
   taught base answers every evaluation query once (cached), which fixes the *known* queries;
3. each method on the same stream, from the same taught base (``run_method``, one loop for all): LUMoE
   (``lumoe.LUMoERunner``: every request through the one request pipeline, ``lumoe_engine.pipeline``) and the
   sequential baselines (``--compare`` or ``--method``: ``unlearn.baselines.SequentialRunner``, each on a fresh copy
   of the base). Per step: learn the request (a failure fails that request alone) -> answer the step's evaluation
   queries -> step record (``steps.StepLog``) -> metrics rows;
4. outputs (``outputs``): metrics.jsonl, summary.json (``methods.<m>.final...``), report.md, PNG plots, config.json,
   and LUMoE's bank/, gate/, ledger/ and steps/.

A bad request (empty forget set, unknown entity, an image that will not open, a loss that turns nan/inf, an expert
that collapsed) fails alone: a clear error, nothing written to the bank or the gate for it, a ``"set": "failure"``
row in metrics.jsonl, a line in summary.json's ``failures`` and in report.md, ledger state "failed" with the reason;
the stream goes on with the next request (the failed request is still measured: its forget queries were not
forgotten). ``--resume`` continues a killed run (``steps``); ``revoke`` withdraws a request (``revoke``).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from lumoe_engine.data.records import Benchmark
from lumoe_engine.eval.metrics import SCHEMA_VERSION, MetricsWriter, StreamEvaluator, jsonable
from lumoe_engine.fileio import atomic_write
from lumoe_engine.model.placement import is_quantized
from lumoe_engine.pipeline import LEARN_ERRORS
from lumoe_engine.stream.base import base_predictions, check_entities, stream_setup, taught_base
from lumoe_engine.stream.config import StreamConfig
from lumoe_engine.stream.lumoe import LUMoERunner, RecordedFailure
from lumoe_engine.stream.outputs import (config_document, failure_row, log_step, method_extra, numeric, over_seeds,
                                         print_table, write_outputs, write_seeds_report)
from lumoe_engine.stream.steps import MethodState, StepLog, check_resumable, replay
from lumoe_engine.unlearn.baselines import SequentialRunner, baseline_loss
from lumoe_engine.unlearn.trainer import barrier, broadcast_object, init_distributed

logger = logging.getLogger("lumoe_engine.stream")

# what fails one step's request alone (the request pipeline's errors, and a failure recorded before a crash)
STEP_ERRORS = LEARN_ERRORS + (RecordedFailure,)


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
        fresh_out(out)
        atomic_write(out / "config.json", json.dumps(jsonable({"config": cfg.to_dict(), "started": True}),
                                                     indent=1) + "\n")
    torch.manual_seed(cfg.seed)

    # 1. the taught base (rank 0 teaches first; the others load the cached result)
    model, processor, teach_summary, bench = taught_base(cfg, rank)
    model.requires_grad_(False)
    max_new = cfg.max_new_tokens or int(teach_summary.get("max_new_tokens") or 16)

    # 2. the stream (each request carries its request data: the protocol's split, over the evaluation benchmark:
    # records whose image will not open left out, --extra-eval records added) and its evaluation
    eval_bench, eval_info, split, requests, evaluator = stream_setup(cfg, bench, processor, evaluate=rank == 0)
    if edit_stream is not None:
        requests = edit_stream(requests, bench)
        if evaluator is not None:
            evaluator = StreamEvaluator(eval_bench, requests, split=split, vocab=evaluator.vocab,
                                        **cfg.evaluation_options())
    writer = None
    if rank == 0:
        t0 = time.time()
        evaluator.set_base(base_predictions(model, processor, evaluator.queries(), max_new, cfg, teach_summary))
        eval_info["base_predictions_s"] = round(time.time() - t0, 2)
        eval_info["never_requested_entities"] = len(evaluator.unrequested_entities)
        writer = MetricsWriter(out, resume=cfg.resume)
    config_doc = config_document(cfg, teach_summary, bench, requests, max_new, world, eval_info)
    if rank == 0:
        atomic_write(out / "config.json", json.dumps(jsonable(config_doc), indent=1) + "\n")

    # 3. the methods, each from the same taught base; a resumed run first replays the steps already evaluated
    methods = cfg.methods()
    done = replay(out, methods, requests, evaluator, writer) if rank == 0 else {}
    if world > 1:
        done = broadcast_object(done)
    failures: dict[str, list] = {}
    extra: dict[str, dict] = {}
    quantized = is_quantized(model)
    for i, method in enumerate(methods):
        state = done.get(method) or MethodState()
        if method != "lumoe" and 0 < len(state.records) < len(requests):
            # an unfinished baseline is rerun from its first request (its shared LoRA is merged into the model
            # after every request: nothing to resume from); it is deterministic, so it ends where it would have
            logger.info("%s: unfinished (%d of %d requests); rerun from the start", method, len(state.records),
                        len(requests))
            state = MethodState()
        gate_config, run_extra = None, {}
        if len(state.records) < len(requests) or method == "lumoe":
            # LUMoE never edits the base, nor a baseline on a 4-bit base (its LoRAs stay active, never merged): a copy
            # only where a baseline's merge would change the weights the next method starts from
            m_model = model if i == len(methods) - 1 or quantized else copy.deepcopy(model)
            runner = new_runner(method, m_model, processor, bench, requests, cfg, out, rank, max_new, split)
            try:
                run_method(runner, requests, evaluator, writer, out, rank, state)
                gate_config = runner.gate_config()
                run_extra = runner.summary_extra() if hasattr(runner, "summary_extra") else {}
            finally:
                runner.close()
        extra[method] = {**method_extra(method, cfg, state, gate_config), **run_extra}
        failures[method] = state.failures
        barrier()

    # 4. outputs
    if rank != 0:
        return {}
    summary = write_outputs(out, evaluator, writer, config_doc, teach_summary, failures, extra, eval_info)
    summary["total_seconds"] = round(time.time() - t_start, 1)
    writer.write_summary(summary["methods"], config=summary["config"], seeds=summary["seeds"],
                         **{k: v for k, v in summary.items() if k not in ("methods", "config", "seeds",
                                                                           "schema_version")})
    print_table(summary, out)
    return summary


def run_seeds(cfg: StreamConfig, edit_stream: Optional[Callable[[list, Benchmark], list]] = None) -> dict:
    """``run_stream`` once per seed of ``cfg.seeds`` (each in ``out/seed-<s>``, the whole chain from that seed:
    world, teaching, protocol, stream), then ``out/summary.json`` with every method's mean final and
    ``methods.<m>.over_seeds`` (per-seed finals, mean / min / max) and ``out/report.md``. Without ``cfg.seeds``:
    ``run_stream(cfg)``. Resumable per seed (``--resume``)."""
    if not cfg.seeds:
        return run_stream(cfg, edit_stream)
    t0 = time.time()
    out = Path(cfg.out)
    per_seed = {}
    for s in cfg.seeds:
        sub = dataclasses.replace(cfg, seed=int(s), seeds=[], out=str(out / f"seed-{s}"))
        per_seed[int(s)] = run_stream(sub, edit_stream)
    if not per_seed or not all(per_seed.values()):
        return {}  # ranks other than 0
    doc = {"schema_version": SCHEMA_VERSION, "seeds": sorted(per_seed), "methods": over_seeds(per_seed),
           "config": {**cfg.to_dict(), "runs": {s: str(out / f"seed-{s}") for s in per_seed}},
           "teach": {s: d.get("teach") for s, d in per_seed.items()},
           "seconds_per_seed": {s: d.get("total_seconds") for s, d in per_seed.items()},
           "total_seconds": round(time.time() - t0, 1)}
    atomic_write(out / "summary.json", json.dumps(jsonable(doc), indent=1) + "\n")
    write_seeds_report(out, doc)
    print_table(doc, out)
    return doc


def new_runner(method: str, model, processor, bench, requests, cfg: StreamConfig, out: Path, rank: int,
               max_new: int, split=None):
    """The runner of ``method`` over ``model`` (LUMoE, or a sequential baseline editing ``model`` in place).

    A baseline gets LUMoE's LoRA placement (the target linears above the gate layer) and step budget, its own
    learning rate (``StreamConfig.baseline_lr_of``: swept on the development seed), and the paper's loss (retain
    terms on, weight 1, with the request's retain data)."""
    if method == "lumoe":
        return LUMoERunner(model, processor, bench, requests, cfg, out, rank, max_new, split)
    from lumoe_engine.gate.features import decoder_layers

    n_layers = len(decoder_layers(model))
    layers = range(cfg.gate_config().resolve_layer(n_layers) + 1, n_layers)
    return SequentialRunner(model, processor, method, baseline_loss(method, beta=cfg.beta),
                            cfg.train_config(baseline=True, method=method), max_new, cfg.eval_batch_size,
                            validate=lambda r: check_entities(r, bench), layers=layers)


def run_method(runner, requests, evaluator, writer, out: Path, rank: int, state: MethodState) -> None:
    """One method over the stream, from the first step without a record: per step, ``runner.learn`` (a STEP_ERRORS
    failure fails that request alone), then on rank 0 ``runner.answer`` on the step's evaluation queries, the step
    record, the metrics rows, ``runner.after_step``. ``state`` gains each step's record and failure."""
    runner.replay(state.records)
    log = StepLog(out, runner.name)
    for step in range(len(state.records), len(requests)):
        req = requests[step]
        t0 = time.perf_counter()
        cost: dict = {}
        failure = None
        rec = runner.new_record(step, req)
        try:
            runner.learn(step, req, rec, cost)
        except STEP_ERRORS as exc:
            failure = failure_row(runner.name, step, req, exc)
        cost["seconds"] = round(time.perf_counter() - t0, 3)
        if rank == 0:
            t2 = time.perf_counter()
            preds, routing, more = runner.answer(evaluator.queries(step))
            cost.update(more)
            cost["eval_seconds"] = round(time.perf_counter() - t2, 3)
            rec.update(cost=numeric(cost), predictions=preds, routing=routing, failure=failure,
                       **runner.record_extra())
            log.save(step, rec)
            rows = evaluator.evaluate_step(step, runner.name, preds, routing, cost=rec["cost"])
            writer.append(rows + ([failure] if failure else []))
            runner.after_step(step, req, failure)
            log_step(runner.name, step, req, evaluator, cost)
        if failure is not None:
            state.failures.append(failure)
        state.records.append(rec)
        barrier()


def fresh_out(out: Path) -> None:
    """Create ``out``; a previous run's bank/, gate/, ledger/ and steps/ there are removed (metrics.jsonl is
    restarted too)."""
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("bank", "gate", "ledger", "steps"):
        if (out / sub).exists():
            logger.info("removing the previous run's %s", out / sub)
            shutil.rmtree(out / sub)


__all__ = ["run_stream", "run_seeds", "run_method", "new_runner", "fresh_out", "STEP_ERRORS"]
