"""The lifelong unlearning stream: a stream of removal requests learned one after the other, every request so far
measured after each one (the main job: ``python lumoe_engine/run.py``).

Rooms:

- ``config``: ``StreamConfig`` (everything a run depends on, saved as config.json), ``METHODS``;
- ``driver``: ``run_stream`` (top to bottom: taught base -> stream and evaluator -> each method -> outputs) and
  ``run_method``, the one step loop every method runs;
- ``lumoe``: LUMoE's runner: each request through the one request pipeline (``lumoe_engine.pipeline``), answers
  routed by the gate; the ledger of the run;
- ``base``: the taught base, the evaluation benchmark, the base's answers (what it knows);
- ``steps``: step records, ``--resume`` (replay, reconciling bank and gate with the ledger), comparing a resumed
  run with an uninterrupted one;
- ``revoke``: withdrawing a request of a finished run;
- ``outputs``: summary.json, report.md, plots, the final table.

The sequential baselines' runner lives beside the baselines (``lumoe_engine.unlearn.baselines.SequentialRunner``);
the command line in ``lumoe_engine/run.py``.
"""
from lumoe_engine.stream.config import LUMOE_LOSS, METHODS, StreamConfig
from lumoe_engine.stream.driver import run_seeds, run_stream
from lumoe_engine.stream.revoke import revoke
from lumoe_engine.stream.steps import (RESUME_IGNORED, RUN_KEYS, TIMING_KEYS, ResumeError, check_resumable,
                                       comparable_summary, saved_config)

__all__ = ["StreamConfig", "METHODS", "LUMOE_LOSS", "run_stream", "run_seeds", "revoke", "ResumeError", "check_resumable",
           "comparable_summary", "saved_config", "TIMING_KEYS", "RUN_KEYS", "RESUME_IGNORED"]
