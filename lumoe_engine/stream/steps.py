"""A stream run's step records and its resumption.

Each evaluated step leaves ``out/steps/<method>/NNNN.json`` (``StepLog``: answers, routing, cost, failure; atomic),
written before the step's metrics rows. ``--resume`` (same config: ``check_resumable``) replays those records
through the evaluator (``replay``: metrics.jsonl is rewritten from them; rows of a step without a record are dropped
and redone), makes the bank and gate agree with the ledger (``reconcile_bank_and_gate``), and the driver continues
each request from its ledger state. Everything is seeded, so a killed and resumed run ends with the same experts
(bit-equal tensors) and the same summary.json apart from ``TIMING_KEYS`` / ``RUN_KEYS`` (``comparable_summary``).
An unfinished baseline is rerun from its first request (its shared LoRA is merged into the model: nothing to resume
from), as is every method after an unfinished one; finished ones are replayed.
"""
from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lumoe_engine.eval.metrics import jsonable
from lumoe_engine.fileio import atomic_write
from lumoe_engine.stream.config import StreamConfig

logger = logging.getLogger("lumoe_engine.stream")

# StreamConfig fields that may differ between a run and its resumption: resume itself, progress bars, and the
# output folder's spelling (the folder is the run)
RESUME_IGNORED = ("resume", "progress", "out")
# summary.json keys whose values are wall-clock measurements (removed at any depth by ``comparable_summary``):
# seconds of a step / of training / of the gate update / of evaluation, tokens per second, and everything derived
# from them (per-request lists, means, the flat-cost ratios), the base answers' time, the whole run's time
TIMING_KEYS = frozenset({"seconds", "train_seconds", "gate_seconds", "eval_seconds", "tokens_per_s", "wave_seconds",
                         "seconds_per_request", "mean_seconds_per_request", "train_seconds_per_request", "flat_cost",
                         "base_predictions_s", "total_seconds", "time"})
# keys of summary.json that describe the process, not the result: the config's resume / progress / out (RESUME_IGNORED)
# and whether the taught base came from the cache (teach.cached, teach.seconds: the first run may teach, a later
# one loads)
RUN_KEYS = {"config": RESUME_IGNORED, "teach": ("cached", "seconds")}


class ResumeError(ValueError):
    """``--resume`` cannot continue the run in ``--out``: none is there, or it was started with another config."""


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
    # a field the saved run predates ran at its default (a run of an older version resumes when the new field is
    # left at its default)
    default = jsonable(type(cfg)().to_dict())
    diff = [f"{k}: run {saved.get(k, default.get(k, '<absent>'))!r}, now {now[k]!r}" for k in now
            if k not in RESUME_IGNORED and saved.get(k, default.get(k, "<absent>")) != now[k]]
    if diff:
        raise ResumeError(f"--resume: the run in {out} was started with another config ({'; '.join(diff)}); resume "
                          f"it with the same options, or start a new run in another --out folder")
    return saved


def saved_config(out: Path) -> StreamConfig:
    """The ``StreamConfig`` of the run in ``out`` (not resuming, no progress bars)."""
    path = Path(out) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{out} holds no stream run (no config.json); pass the --out folder of a stream run")
    cfg = StreamConfig.from_dict(json.loads(path.read_text(encoding="utf-8"))["config"])
    cfg.out, cfg.resume, cfg.progress = str(out), False, False
    return cfg


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


@dataclass
class MethodState:
    """What a method has done so far (replayed from its step records): records, failures."""

    records: list = field(default_factory=list)
    failures: list = field(default_factory=list)


class StepLog:
    """``out/steps/<method>/NNNN.json``: the raw results of one evaluated step (answers, routing, cost, failure),
    written atomically before the step's metrics rows; ``--resume`` replays them through the evaluator, so the
    resumed run's rows and summary are those of an uninterrupted run. ``revoke-NNN-<id>.json``: a revocation and
    the rows of the evaluation after it."""

    def __init__(self, out: Path, method: str):
        self.dir = Path(out) / "steps" / method

    def path(self, step: int) -> Path:
        return self.dir / f"{step:04d}.json"

    def save(self, step: int, doc: dict) -> None:
        atomic_write(self.path(step), json.dumps(jsonable(doc), separators=(",", ":")))

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
        atomic_write(path, json.dumps(jsonable(doc), separators=(",", ":")))
        return path


def replay(out: Path, methods: list, requests: list, evaluator, writer) -> dict[str, MethodState]:
    """Resume: every method's evaluated steps (its step records, a prefix of the stream) are replayed through the
    evaluator, and metrics.jsonl is rewritten from them (rows of a step without a record are dropped: the step is
    redone). A fresh run has no records: nothing happens."""
    states: dict[str, MethodState] = {}
    rows: list[dict] = []
    revs = StepLog(out, "lumoe").revocations()
    blocked = False  # a method after an unfinished one is rerun too: the rows keep the order of a straight run
    for method in methods:
        log = StepLog(out, method)
        recs = log.prefix(len(requests))
        if blocked or (method != "lumoe" and len(recs) < len(requests)):
            log.clear()  # an unfinished baseline is rerun from the start
            recs = []
        blocked = blocked or len(recs) < len(requests)
        st = states[method] = MethodState()
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
        atomic_write(writer.metrics_path, "".join(json.dumps(jsonable(r), ensure_ascii=False, allow_nan=False)
                                                  + "\n" for r in rows))
        logger.info("resume: replayed %s evaluated steps", {m: len(s.records) for m, s in states.items()})
    elif writer.metrics_path.exists():
        atomic_write(writer.metrics_path, "")
    return states


def reconcile_bank_and_gate(ledger, bank, gate, gate_dir: Path) -> None:
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
        gate.save(gate_dir)
    for e in [e for e in bank.ids if state.get(e) not in keep]:
        logger.info("resume: removing expert %s from the bank (ledger state %s)", e, state.get(e))
        bank.remove(e)


__all__ = ["StepLog", "MethodState", "replay", "check_resumable", "saved_config", "comparable_summary",
           "reconcile_bank_and_gate", "ResumeError", "RESUME_IGNORED", "TIMING_KEYS", "RUN_KEYS"]
