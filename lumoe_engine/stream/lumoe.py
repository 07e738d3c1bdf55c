"""LUMoE in a stream run: every request through the one request pipeline, its queries answered by the engine.

``LUMoERunner`` is the driver's runner for method "lumoe". Opening it: the run's ledger (``out/ledger``), bank
(``out/bank``) and gate (``out/gate``, or a new one from the run's ``GateConfig``), the bank and gate reconciled with
the ledger (a resumed run), every request of the stream received into the ledger (``receive_all``: validated,
content-hashed; a request the intake refuses never enters it and fails at its step), the model wrapped above the
gate layer (``LUMoEEngine``) and a ``RequestPipeline`` over them. Each step: ``learn`` (the pipeline: train -> guard
-> bank -> gate, ledger events) and ``answer`` (every evaluation query of the step, routed by the gate in one mixed
batch); after the step's rows are written, the ledger records ``evaluated``. Resumable: a request continues from its
ledger state; the steps already evaluated are replayed first (``replay``: the gate feature cache fills as it did).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

from lumoe_engine.data.records import QARecord
from lumoe_engine.data.streams import Request
from lumoe_engine.errors import RequestError
from lumoe_engine.eval.metrics import jsonable
from lumoe_engine.stream.base import check_entities
from lumoe_engine.stream.config import StreamConfig
from lumoe_engine.stream.steps import reconcile_bank_and_gate
from lumoe_engine.unlearn.trainer import broadcast_object, dist_info

logger = logging.getLogger("lumoe_engine.stream")


class RecordedFailure(Exception):
    """A failure recorded before a crash (ledger state failed or revoked), reported again on resume as it was."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type


def request_spec(req: Request, cfg: StreamConfig):
    """The ledger's form of a stream request (``intake.spec_from_records``: validated, content-hashed)."""
    from lumoe_engine.data.intake import spec_from_records

    return spec_from_records(req.id, req.forget, req.retain, loss=dataclasses.asdict(cfg.loss_config()),
                             method="lumoe", entity=req.entities[0] if len(req.entities) == 1 else None,
                             metadata=jsonable(req.metadata), aliases=(req.metadata or {}).get("aliases") or ())


def receive_all(ledger, requests: Sequence[Request], cfg: StreamConfig) -> dict[str, BaseException]:
    """Record every request of the stream in the ledger (the same content again is the request already held);
    returns {request id: the intake error} for the requests the intake refuses (they never enter the ledger)."""
    errors: dict[str, BaseException] = {}
    t0 = time.perf_counter()
    for req in requests:
        if ledger is not None and req.id in ledger:
            continue  # received by the run being resumed (same config, hence the same stream)
        try:
            spec = request_spec(req, cfg)
            if ledger is not None:
                rid, _ = ledger.receive(spec)
                if rid != req.id:
                    raise RequestError(f"request {req.id!r}: same content as request {rid!r} of this stream; a "
                                       f"request is applied once")
        except (RequestError, ValueError, OSError) as exc:
            errors[req.id] = exc
    logger.info("ledger: %d requests received in %.1f s", len(requests), time.perf_counter() - t0)
    return errors


def answer_queries(engine, records: Sequence[QARecord], max_new: int, batch_size: int):
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


class LUMoERunner:
    """The driver's runner for LUMoE (module docstring). ``rank`` 0 writes ledger, bank and gate; other DeepSpeed
    ranks train alongside and keep an empty bank and gate: each its own requests (``--parallel requests``,
    ``stream.parallel.WaveTrainer``) or the shards of every request's batch (``--parallel data``, ZeRO). ``split``:
    the protocol's split (its general pool joins every head's negatives; its test queries must never reach trainer
    or gate)."""

    name = "lumoe"

    def __init__(self, model, processor, bench, requests: Sequence[Request], cfg: StreamConfig, out: Path,
                 rank: int, max_new: int, split=None):
        from lumoe_engine.engine import LUMoEEngine
        from lumoe_engine.gate.gate import GATE_FORMAT_VERSION, GATE_JSON, Gate
        from lumoe_engine.ledger import Ledger
        from lumoe_engine.model.bank import ExpertBank
        from lumoe_engine.model.placement import compute_dtype, model_device, place_gate
        from lumoe_engine.pipeline import LEARN_ERRORS, RequestPipeline, request_names
        from lumoe_engine.stream.parallel import WaveTrainer

        self.cfg, self.bench, self.requests, self.out, self.rank = cfg, bench, list(requests), Path(out), rank
        self.max_new = max_new
        # the gate's fixed pool of general queries (the protocol's): negatives every head may see
        self.general = Request(id="_general", forget=[], retain=list(split.general_pool) if split else [],
                               entities=())
        self.ledger = Ledger(self.out / "ledger") if rank == 0 else None
        try:
            gate_cfg = cfg.gate_config()
            # bank stacks and gate state on this rank's model device, in the base's compute dtype (no copies per
            # layer or per routing call)
            where = dict(device=model_device(model), dtype=compute_dtype(model))
            if rank == 0:
                self.bank = ExpertBank.open(self.out / "bank", create=True, **where)
                gate_dir = self.out / "gate"
                self.gate = Gate.from_config(gate_cfg, model)
                if (gate_dir / GATE_JSON).is_file():
                    # (an older gate whose names are token ids gets its names as text from the stream's requests)
                    self.gate = Gate.load(gate_dir, names={r.id: request_names(r) for r in self.requests})
                    if json.loads((gate_dir / GATE_JSON).read_text()).get("version") != GATE_FORMAT_VERSION:
                        self.gate.save(gate_dir)
                reconcile_bank_and_gate(self.ledger, self.bank, self.gate, gate_dir)
                # one slot per request of the stream now: every add writes into a free slot, never a reallocation
                # (unwritten slots cost no resident memory on the CPU; on a GPU they are the plan's resident experts)
                self.bank.reserve(len(set(self.bank.ids) | {r.id for r in self.requests}))
            else:
                self.bank, self.gate = ExpertBank(None, **where), Gate.from_config(gate_cfg, model)
            place_gate(self.gate, model)
            errors = receive_all(self.ledger, self.requests, cfg) if rank == 0 else {}
            states = {r.id: (self.ledger.state(r.id) if r.id in self.ledger else None)
                      for r in self.requests} if rank == 0 else {}
            if dist_info()[1] > 1:
                errors, states = broadcast_object(({k: str(v) for k, v in errors.items()}, states))
                errors = {k: RequestError(v) for k, v in errors.items()}
            self.intake_errors, self.states = errors, states
            self.engine = LUMoEEngine(model, processor, self.bank, self.gate, top_k=1)
            ledger = self.ledger
            self.pipeline = RequestPipeline(self.engine, self.bank, self.gate, self.out / "gate", gate_cfg,
                                            cfg.train_config(), cfg.loss_config(),
                                            ledger=lambda: contextlib.nullcontext(ledger), collapse_tokens=max_new,
                                            writer=rank == 0, method="lumoe",
                                            test_keys=split.test_keys() if split is not None else None)
            world = dist_info()[1]
            self.parallel = (WaveTrainer(self.pipeline, self.requests, rank, world, self._needs_training,
                                         LEARN_ERRORS) if world > 1 and cfg.parallel == "requests" else None)
        except BaseException:
            if self.ledger is not None:
                self.ledger.close()
            raise
        self.learned: list[Request] = []
        self.bytes_per_expert: Optional[int] = None

    def _needs_training(self, step: int) -> bool:
        """Rank 0: whether the request at ``step`` will be trained when its step comes (request-parallel schedule):
        accepted at intake, not failed or revoked before, its expert not in the bank, its entities known."""
        req = self.requests[step]
        if req.id in self.intake_errors or self.states.get(req.id) in ("failed", "revoked") or req.id in self.bank:
            return False
        try:
            check_entities(req, self.bench)
        except RequestError:
            return False
        return True

    def retain_sources(self, req: Request) -> list[Request]:
        """Whose retain queries are the new head's negatives (the protocol): what exists when ``req`` arrives: the
        requests learned before, ``req`` itself, the general pool; never a later request."""
        return self.learned + [req, self.general]

    # -------------------------------------------------------------------------------------------- the runner
    def replay(self, records: Sequence[dict]) -> None:
        """The steps already evaluated (a resumed run): the gate feature cache fills as it did, the learned list and
        the expert size are restored, and a request whose rows were written before the crash becomes evaluated."""
        unfinished = len(records) < len(self.requests)
        for step, rec in enumerate(records):
            req = self.requests[step]
            if self.rank == 0 and rec.get("features") and unfinished:
                self.pipeline.warm_features(req, self.learned, self.retain_sources(req))
            if rec.get("learned"):
                self.learned.append(req)
            if rec.get("bytes_per_expert") is not None:
                self.bytes_per_expert = rec["bytes_per_expert"]
            if self.rank == 0 and req.id in self.ledger and self.ledger.state(req.id) == "gate_updated":
                self.ledger.advance(req.id, "evaluated", step=step)  # its rows were appended: the crash came after

    def new_record(self, step: int, req: Request) -> dict:
        return {"step": step, "method": self.name, "request": req.id, "learned": False, "features": False,
                "train_seconds": None}

    def learn(self, step: int, req: Request, rec: dict, cost: dict) -> None:
        """One request through the pipeline; raises the reason when it failed (the pipeline recorded it).
        Request-parallel: every rank first takes part in the training of the wave this step starts (if any); rank 0
        then learns the request from its gathered result, the other ranks have nothing more to do for it."""
        rid = req.id
        if self.parallel is not None:
            waves = len(self.parallel.waves)
            self.parallel.ensure(step)
            if self.rank != 0:
                return
            if len(self.parallel.waves) > waves:  # a wave of W requests was trained at this step
                cost["wave_seconds"] = self.parallel.waves[-1]["seconds"]
        st = self.states.get(rid)
        if rid in self.intake_errors:
            raise self.intake_errors[rid]
        if st == "failed":  # it failed before the crash: the same failure again, nothing retried
            from lumoe_engine.pipeline import latest_info

            info = latest_info(self.ledger, rid, "failed") if self.ledger is not None else {}
            raise RecordedFailure(info.get("error_type", "RequestError"), info.get("error", info.get("reason")))
        if st == "revoked":
            raise RecordedFailure("Revoked", f"request {rid!r} was revoked before it was learned")
        trained = self.parallel.take(rid) if self.parallel is not None else None
        res = self.pipeline.learn(req, learned=self.learned, retain_sources=self.retain_sources(req),
                                  validate=lambda r: check_entities(r, self.bench), fail_info={"step": step},
                                  trained=trained)
        rec["train_seconds"] = res.train_seconds
        rec["features"] = res.features
        if res.error is not None:
            raise res.error
        cost["train_seconds"] = rec["train_seconds"]
        if self.rank == 0:
            self.bytes_per_expert = res.expert_bytes
            cost["gate_seconds"] = res.gate_seconds
            cost["gate_tpr_cal"] = getattr(res.report, "tpr_cal", None)
            cost["gate_fpr_cal"] = getattr(res.report, "fpr_cal", None)
        self.learned.append(req)
        rec["learned"] = True

    def answer(self, queries: Sequence[QARecord]) -> tuple[dict, dict, dict]:
        preds, routing, tps = answer_queries(self.engine, queries, self.max_new, self.cfg.eval_batch_size)
        return preds, routing, {"tokens_per_s": tps, "bytes_per_expert": self.bytes_per_expert,
                                "n_experts": len(self.gate), "resident_bytes": self.bank.resident_bytes()}

    def record_extra(self) -> dict:
        return {"bytes_per_expert": self.bytes_per_expert}

    def after_step(self, step: int, req: Request, failure: Optional[dict]) -> None:
        if failure is None and self.ledger is not None:
            self.ledger.advance(req.id, "evaluated", step=step)

    def gate_config(self) -> dict:
        return self.gate.config()

    def summary_extra(self) -> dict:
        """For summary.json: every rank's placement (``model.placement.placement_report``) and, request-parallel,
        the waves trained (their requests and seconds). Collective: every rank calls it, after the last step."""
        from lumoe_engine.model.multilora import new_trainable_expert
        from lumoe_engine.model.placement import placement_report
        from lumoe_engine.unlearn.trainer import gather_object

        probe = new_trainable_expert(self.engine.ctx, rank=1)  # where a new expert's LoRA parameters are created
        placement = gather_object(placement_report(self.engine.model, self.bank, self.gate, probe))
        doc = {"placement": placement,
               "parallel": {"mode": self.cfg.parallel if self.parallel is not None else "single",
                            "world_size": dist_info()[1]}}
        if self.parallel is not None:
            doc["parallel"]["waves"] = self.parallel.waves
        return doc

    def close(self) -> None:
        try:
            self.engine.close()
        finally:
            if self.ledger is not None:
                self.ledger.close()


__all__ = ["LUMoERunner", "RecordedFailure", "receive_all", "request_spec", "answer_queries"]
