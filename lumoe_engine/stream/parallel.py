"""Request-parallel training under the ``deepspeed`` launcher: W ranks train W requests at once, one expert each.

Experts are independent (each trains on the frozen base with only itself active), so nothing has to be all-reduced
between ranks: rank j of a wave trains the wave's j-th request alone (``RequestPipeline.train`` with
``use_deepspeed=False``: plain AdamW on its own device, the same seed, data and steps as a single process), the
results are gathered on rank 0 (``trainer.gather_object``), and rank 0 hands each to
``RequestPipeline.learn(request, trained=...)`` when the stream reaches that request's step: collapse guard, bank,
gate and ledger events run there in ledger order, exactly as in one process. A request whose training failed on some
rank fails at its step on rank 0 with that rank's error (recorded in the ledger as usual).

The schedule is fixed by rank 0 when the first step is reached: the stream's requests from that step on that still
need an expert (not refused at intake, not failed or revoked before a crash, not already in the bank, known
entities), in stream order, cut into waves of W. A wave is trained when the stream reaches its first request; so
with W ranks the training of W requests costs about one request's time, and the writer's own work (the gate, the
evaluation) runs between waves. Crash-safe like one process: trained experts live only in memory until rank 0
saves them through the pipeline; after a crash the ledger says which requests are done, and the others are trained
again (the same bytes: the same seeds).

Letters: W ranks (world size), j a rank's index in a wave.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional, Sequence

from lumoe_engine.data.streams import Request
from lumoe_engine.unlearn.trainer import broadcast_object, gather_object

logger = logging.getLogger("lumoe_engine.stream")


class WaveTrainer:
    """Trains the stream's requests in waves of one request per rank (module docstring).

    pipeline: the ``RequestPipeline`` of this rank (its ``train`` step); requests: the stream; rank, world: this
    process and the number of ranks; pending: on rank 0, ``step -> bool`` (the request at that step still needs
    an expert: the caller's ledger, bank and intake say so); errors: the exceptions a training may raise that fail
    one request (the pipeline's ``LEARN_ERRORS``).
    """

    def __init__(self, pipeline, requests: Sequence[Request], rank: int, world: int,
                 pending: Callable[[int], bool], errors: tuple):
        self.pipeline, self.requests, self.rank, self.world = pipeline, list(requests), int(rank), int(world)
        self.pending, self.errors = pending, errors
        self.schedule: Optional[list[str]] = None      # request ids to train, in stream order
        self.done: set[str] = set()                    # trained (or failed) in a wave already
        self.results: dict[str, object] = {}           # rank 0: id -> (Expert, stats) or the exception
        self.waves: list[dict] = []                    # per wave: ids, seconds (rank 0)

    def _plan(self, start: int) -> None:
        ids = [self.requests[s].id for s in range(start, len(self.requests)) if self.pending(s)] \
            if self.rank == 0 else None
        self.schedule = broadcast_object(ids)
        logger.info("request-parallel: %d requests to train on %d ranks (%d waves)", len(self.schedule),
                    self.world, -(-len(self.schedule) // self.world))

    def ensure(self, step: int) -> None:
        """Collective (every rank calls it at every step, in step order): when the request of ``step`` is the next
        one of the schedule not trained yet, train its wave (this rank's request of it) and gather the results on
        rank 0."""
        if self.schedule is None:
            self._plan(step)
        rid = self.requests[step].id
        if rid not in self.schedule or rid in self.done:
            return
        at = self.schedule.index(rid)
        wave = self.schedule[at:at + self.world]
        mine = wave[self.rank] if self.rank < len(wave) else None
        t0 = time.perf_counter()
        result = None
        if mine is not None:
            req = next(r for r in self.requests if r.id == mine)
            try:
                result = self.pipeline.train(req, use_deepspeed=False)
            except self.errors as exc:  # fails that request alone, at its step on rank 0
                result = exc
        gathered = gather_object((mine, result))
        seconds = round(time.perf_counter() - t0, 3)
        self.done.update(wave)
        if self.rank == 0:
            for got_id, got in gathered:
                if got_id is not None:
                    self.results[got_id] = got
            self.waves.append({"requests": list(wave), "seconds": seconds})

    def take(self, request_id: str):
        """Rank 0: the gathered training result of ``request_id`` (None when it was not trained in a wave)."""
        return self.results.pop(request_id, None)


__all__ = ["WaveTrainer"]
