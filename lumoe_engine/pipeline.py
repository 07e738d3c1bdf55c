"""One request pipeline: the single path from a removal request to a gated expert.

``RequestPipeline.learn(request, ...)`` takes one request from the ledger to the gate, each step a ledger event::

    ledger: training                   (the request is being learned; a failed one may be retried)
      -> train a NEW expert            trainer.train_expert: only that expert active, the base frozen
      -> collapse guard                unlearn.collapse.collapse_check: gibberish on its own queries -> it fails
      -> gate features                 the base model's layer-L features of the gate's training queries (cached)
      -> bank.add                      safetensors file + manifest entry, atomic
    ledger: expert_saved
      -> gate.add_expert + gate.save   positives: the request's forget queries (+ rewordings); negatives: the
                                       retain queries the caller names and the forget queries of the requests
                                       learned before; calibrated; the request's names (entities and aliases,
                                       as text) for the name channel
    ledger: gate_updated

A request whose expert is already in the bank (a run that stopped after saving it; with ``content_hash``, only an
expert of the same content) is not trained again; a gate entry already there is not fitted again. A request that
fails (``LEARN_ERRORS``: a bad request, a nan/inf loss, a collapsed expert, bad data, a disk error) leaves nothing
behind: its gate entry and expert are removed again, the ledger records ``failed`` with the reason, and the result
carries the error; the caller goes on with the next request.

Both callers are thin: the stream driver (``lumoe_engine.stream``: evaluation after each request, ``--compare``,
``--resume``, ``revoke``) and the store (``lumoe_engine.store``: ``submit / process / status / revoke / verify``).
They differ only in what they pass: which requests count as learned, whose retain queries are negatives (the
stream: its requests'; the store: every live request's and a general pool), how the ledger is opened (the stream
holds it; the store opens it per event, waiting for a submit), and the collapse guard's answer length.

Under DeepSpeed, only the writer (rank 0) touches ledger, bank and gate. ``--parallel data``: every rank trains each
request (ZeRO shards the batch). ``--parallel requests`` (``stream.parallel``): each rank runs ``train`` for its own
request of a wave, and the writer hands each result to ``learn(request, trained=...)`` in ledger order: the guard,
bank, gate and ledger steps are this same path.

Letters: P positive queries, Q negative queries.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional, Sequence

import torch

from lumoe_engine.data.protocol import check_disjoint
from lumoe_engine.data.records import QARecord
from lumoe_engine.data.streams import Request
from lumoe_engine.errors import ExpertCollapseError, RequestError
from lumoe_engine.gate.config import GateConfig
from lumoe_engine.ledger import LedgerCorruptError
from lumoe_engine.unlearn.collapse import collapse_check
from lumoe_engine.unlearn.losses import LossConfig, NonFiniteLossError
from lumoe_engine.unlearn.trainer import TrainConfig, train_expert

# what makes one request fail alone (anything else is a bug and propagates)
LEARN_ERRORS = (RequestError, LedgerCorruptError, NonFiniteLossError, ExpertCollapseError, ValueError, OSError)
# keys of an expert's metadata that hold wall-clock values: kept in the ledger, never in the expert file (so the same
# request trained again, after a crash or in another process, writes the same bytes)
EXPERT_TIMING_KEYS = ("seconds", "created")


# ------------------------------------------------------------------------------------------------ gate data
def dedupe(records: Sequence[QARecord]) -> list[QARecord]:
    """``records`` without repeated uids, in order."""
    seen, out = set(), []
    for r in records:
        if r.uid not in seen:
            seen.add(r.uid)
            out.append(r)
    return out


@dataclass
class GateData:
    """The queries a request's gate head is fitted on: positives [P], negatives [Q], and one group label per
    positive (the entity: one sub-head each) or None."""

    positives: list
    negatives: list
    groups: Optional[list]


def gate_training_set(request: Request, learned: Sequence[Request], retain_sources: Sequence[Request],
                      config: GateConfig, test_keys: Optional[set] = None) -> GateData:
    """The gate training set of ``request`` by ``config``'s recipe.

    positives: the request's forget queries, plus ``config.augment`` word-level rewordings of each
    (``features.augmented_records``); negatives: the retain queries of ``retain_sources`` (in order, without
    repeats), the forget queries of every request in ``learned``, plus (``config.counterfactuals``) the request's
    images and names recombined with other classes' wordings; groups: the entity of each positive when
    ``config.sub_heads`` and the request forgets several, else None. ``test_keys``: a generated record (rewording,
    recombination) that is a test query is left out (``protocol.without_test_queries``). RequestError when there is
    no negative."""
    from lumoe_engine.data.protocol import without_test_queries
    from lumoe_engine.gate.features import augmented_records, counterfactual_records

    def generated(records):
        return without_test_queries(records, test_keys) if test_keys else records

    retain = dedupe([r for q in retain_sources for r in q.retain])
    negatives = retain + [r for q in learned for r in q.forget]
    positives = list(request.forget)
    if config.augment:
        positives += generated(augmented_records(request.forget, config.augment, seed=config.seed))
    if config.counterfactuals and retain:
        negatives += generated(counterfactual_records(request.forget, retain, seed=config.seed))
    negatives = dedupe(negatives)
    if not negatives:
        raise RequestError(f"request {request.id!r}: no negative queries for its gate head (no retain records and no "
                           f"earlier request); add retain QA pairs to the request")
    groups = None
    if config.sub_heads and len({r.entity for r in positives}) > 1:
        groups = [r.entity for r in positives]
    return GateData(positives, negatives, groups)


class FeatureCache:
    """Gate features of records (``features.base_features``: the base model's layer-L state of the prompt, with the
    image channel's columns when the gate has one), computed once per uid. Records missing from the cache are
    computed in one batch, so the cache fills the same way in a run and in its resumption."""

    def __init__(self, model, processor, gate):
        self.model, self.processor, self.gate = model, processor, gate
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, records: Sequence[QARecord]) -> torch.Tensor:
        from lumoe_engine.gate.features import base_features

        missing = dedupe([r for r in records if r.uid not in self.cache])
        if missing:
            f = base_features(self.model, self.processor, missing, self.gate.layer, pooling=self.gate.pooling,
                              image=bool(self.gate.image_dim))
            self.cache.update((r.uid, row) for r, row in zip(missing, f))
        return torch.stack([self.cache[r.uid] for r in records])


def request_names(request: Request) -> list[str]:
    """The gate's names of a request, as text: the names of the entities it forgets (its
    ``metadata["named_entities"]`` when set: a request file's own names, never the id that stands in for a missing
    "entity"; else its ``entities``, else those of its forget records), then the aliases it lists
    (``metadata["aliases"]``), each once. The gate matches them in prompt texts (``gate.names``). No names: the
    request's expert is reached by the heads and the image channel only."""
    md = request.metadata or {}
    if "named_entities" in md:
        names = list(md["named_entities"])
    else:
        names = list(request.entities) or [r.entity for r in request.forget]
    names += [a for a in (md.get("aliases") or ()) if isinstance(a, str)]
    return list(dict.fromkeys(n.strip() for n in names if isinstance(n, str) and n.strip()))


# --------------------------------------------------------------------------------------------------- the path
@dataclass
class LearnResult:
    """What ``learn`` did for one request.

    trained: a new expert was trained now (False: the bank held it already, or the request failed first);
    train_seconds / steps / loss: of that training (train_seconds from the ledger when it was trained by an earlier
    run); expert_bytes: the expert's LoRA bytes; gate_added: its gate entry was fitted now; report: the gate's
    ``HeadReport``; gate_seconds: the gate step's time; features: the gate features were computed (a resumed stream
    warms its feature cache with the same requests); error: the exception that made the request fail (None: it is
    gated), with ``state`` its final ledger state."""

    request_id: str
    state: Optional[str] = None
    trained: bool = False
    train_seconds: Optional[float] = None
    steps: Optional[int] = None
    loss: Optional[float] = None
    expert_bytes: Optional[int] = None
    gate_added: bool = False
    report: object = None
    gate_seconds: Optional[float] = None
    features: bool = False
    error: Optional[BaseException] = None

    @property
    def ok(self) -> bool:
        return self.error is None


class RequestPipeline:
    """The request pipeline over one wrapped model, bank and gate (module docstring).

    engine: the ``LUMoEEngine`` (its model, processor and LoRA context train the experts);
    bank, gate: where experts and gate entries go (None on DeepSpeed ranks other than the writer);
    gate_dir: the folder ``gate.save`` writes after each gate update;
    gate_config: the recipe of each head's training set and the channels (``GateConfig``);
    train_cfg / loss_cfg: the expert budget and the default loss (a request may bring its own loss);
    ledger: a callable returning a context manager that yields the ``Ledger`` for one step (the stream holds one
        open: ``lambda: contextlib.nullcontext(ledger)``; the store opens it per event); None = no ledger;
    collapse_tokens: answer length of the collapse guard's check; writer: this process writes ledger, bank, gate;
    test_keys: the (image, question) of every test query (``data.protocol.Split.test_keys``): a request whose data,
        or whose gate training set, holds one fails with ``ProtocolError`` before it reaches trainer or gate.
    """

    def __init__(self, engine, bank, gate, gate_dir, gate_config: GateConfig, train_cfg: TrainConfig,
                 loss_cfg: LossConfig, ledger: Optional[Callable[[], ContextManager]] = None,
                 collapse_tokens: int = 16, writer: bool = True, method: str = "lumoe",
                 test_keys: Optional[set] = None):
        self.engine, self.bank, self.gate, self.gate_dir = engine, bank, gate, gate_dir
        self.gate_config, self.train_cfg, self.loss_cfg = gate_config, train_cfg, loss_cfg
        self._ledger = ledger
        self.collapse_tokens, self.writer, self.method = int(collapse_tokens), bool(writer), method
        self.features = FeatureCache(engine.model, engine.processor, gate) if gate is not None else None
        self.test_keys = test_keys

    # ------------------------------------------------------------------------------------------------ pieces
    def ledger(self) -> ContextManager:
        return self._ledger() if (self._ledger is not None and self.writer) else contextlib.nullcontext(None)

    def gate_data(self, request: Request, learned: Sequence[Request], retain_sources: Sequence[Request]) -> GateData:
        data = gate_training_set(request, learned, retain_sources, self.gate_config, self.test_keys)
        if self.test_keys:  # what remains comes from the requests' own data: a test query there is an error
            check_disjoint(data.positives + data.negatives, self.test_keys,
                           f"request {request.id!r}: its gate training set")
        return data

    def warm_features(self, request: Request, learned: Sequence[Request], retain_sources: Sequence[Request]) -> None:
        """Compute (cache) the gate features of ``request``'s training set as ``learn`` did: a resumed stream
        replays the requests it had learned, so that later features come from the same batches."""
        data = self.gate_data(request, learned, retain_sources)
        self.features(data.positives), self.features(data.negatives)

    def _expert_held(self, rid: str, content_hash: Optional[str], out) -> bool:
        """Whether the bank holds this request's expert already; one of other content (``content_hash`` differs)
        is removed with its gate entry first (the request is trained again)."""
        if rid not in self.bank:
            return False
        if content_hash is not None and self.bank.info(rid).metadata.get("content_hash") != content_hash:
            out(f"{rid}: the bank holds an expert of other content under this id: replacing it")
            if rid in self.gate:
                self.gate.remove_expert(rid)
                self.gate.save(self.gate_dir)
            self.bank.remove(rid)
            return False
        out(f"{rid}: expert already in the bank (an earlier run stopped after saving it): not trained again")
        return True

    def check_request_data(self, request: Request) -> None:
        """``ProtocolError`` when the request's forget or retain data holds a test query (``test_keys``): checked
        before any training, on every rank (request-parallel ranks train without ``learn``'s own check)."""
        if self.test_keys:
            check_disjoint(list(request.forget) + list(request.retain), self.test_keys,
                           f"request {request.id!r}: its forget and retain data")

    def train(self, request: Request, loss_cfg: Optional[LossConfig] = None, use_deepspeed: Optional[bool] = None):
        """The training step alone: a NEW expert for ``request`` on the frozen base -> (Expert, stats). Request-
        parallel training runs it on every rank for a different request, then hands each result to ``learn``
        (``trained=``) on the writer, in ledger order. ``use_deepspeed``: as ``train_expert`` (False: this process
        trains alone, whatever launched it)."""
        self.check_request_data(request)
        model, processor, ctx = self.engine.model, self.engine.processor, self.engine.ctx
        return train_expert(model, processor, ctx, request, loss_cfg or self.loss_cfg, self.train_cfg,
                            method=self.method, use_deepspeed=use_deepspeed)

    # -------------------------------------------------------------------------------------------------- learn
    def learn(self, request: Request, *, learned: Sequence[Request], retain_sources: Sequence[Request],
              loss_cfg: Optional[LossConfig] = None, content_hash: Optional[str] = None,
              validate: Optional[Callable[[Request], None]] = None, fail_info: Optional[dict] = None,
              out: Callable[[str], None] = lambda msg: None, trained=None) -> LearnResult:
        """Take ``request`` from the ledger to a gated expert (module docstring); returns a ``LearnResult`` (with
        ``error`` set when the request failed; nothing of it is left in bank or gate then).

        learned: the requests whose experts the gate holds (their forget queries are the head's negatives);
        retain_sources: the requests whose retain queries are the head's negatives; loss_cfg: this request's loss
        (default the pipeline's); content_hash: the request's content hash (stored in the expert's metadata; an
        expert of other content under the same id is replaced); validate: a check run once the request is
        "training" (raise RequestError to refuse it); fail_info: extra ledger info of a failure; out: progress lines;
        trained: the result of ``train`` for this request when another process trained it (request-parallel: an
        (Expert, stats) pair, or the exception its training raised, which fails the request here as if raised now).
        """
        rid = request.id
        res = LearnResult(rid)
        model, processor, ctx = self.engine.model, self.engine.processor, self.engine.ctx
        try:
            with self.ledger() as led:
                state = led.state(rid) if led is not None else None
                if led is not None and state in ("received", "failed", "training"):
                    led.advance(rid, "training")
            if validate is not None:
                validate(request)
            self.check_request_data(request)
            held = self.writer and self._expert_held(rid, content_hash, out)
            if held:
                with self.ledger() as led:
                    if led is not None:
                        res.train_seconds = latest_info(led, rid, "expert_saved").get("train_seconds")
            else:
                if isinstance(trained, BaseException):
                    raise trained
                expert, stats = trained if trained is not None else self.train(request, loss_cfg)
                res.trained, res.train_seconds, res.steps = True, stats["seconds"], stats["steps"]
                res.loss = stats["final"]["loss"]
                expert.metadata = {k: v for k, v in expert.metadata.items() if k not in EXPERT_TIMING_KEYS}
                if content_hash is not None:
                    expert.metadata["content_hash"] = content_hash
                collapse_check(model, processor, ctx, expert, request, self.collapse_tokens)
                if not self.writer:
                    return res
                self.warm_features(request, learned, retain_sources)
                res.features = True
                self.bank.add(expert)  # atomic: file, then manifest
                with self.ledger() as led:
                    if led is not None:
                        from lumoe_engine.model.bank import lora_bytes

                        led.advance(rid, "expert_saved", train_seconds=stats["seconds"], bytes=lora_bytes(expert),
                                    steps=stats["steps"], loss=res.loss)
            t1 = time.perf_counter()
            self._gate_update(request, learned, retain_sources, res)
            res.gate_seconds = round(time.perf_counter() - t1, 3)
            with self.ledger() as led:
                res.state = led.state(rid) if led is not None else "gate_updated"
            return res
        except LEARN_ERRORS as exc:
            res.error = exc
            if self.writer:
                self._roll_back(rid, exc, fail_info or {})
                with self.ledger() as led:
                    res.state = led.state(rid) if led is not None and rid in led else "failed"
            return res

    def _gate_update(self, request: Request, learned, retain_sources, res: LearnResult) -> None:
        """The request's gate entry (fitted and saved unless the gate holds it), then ``gate_updated``."""
        from lumoe_engine.model.bank import lora_bytes

        rid = request.id
        # the features even when the gate already holds the head (a run resumed after gate.save): the cache must
        # fill as in an uninterrupted run, since a batch's composition changes features in the last bits
        data = self.gate_data(request, learned, retain_sources)
        pos, neg = self.features(data.positives), self.features(data.negatives)
        res.features = True
        if rid not in self.gate:
            names, neg_texts = (request_names(request), [r.question for r in data.negatives]) \
                if self.gate_config.names else (None, None)
            facts = neg_answers = neg_keys = None
            recognizer = getattr(self.engine, "recognizer", None)
            if neg_texts is not None and recognizer is not None:  # the answer channel (gate.recognition)
                from lumoe_engine.gate.recognition import request_facts

                said = [t for t in recognizer.answer_records(data.negatives).values() if t]
                neg_texts += said  # a name whose typo match fires on the base's answer to a negative: exact only
                facts = request_facts(request.forget)
                neg_answers, neg_keys = said, [k for r in data.negatives for k in (r.answer, *r.keys)]
            self.gate.add_expert(rid, pos, neg, **({"pos_groups": data.groups} if data.groups else {}), names=names,
                                 neg_texts=neg_texts, facts=facts, neg_answers=neg_answers, neg_keys=neg_keys)
            self.gate.save(self.gate_dir)
            res.gate_added = True
        res.report = report = self.gate.reports.get(rid)
        res.expert_bytes = lora_bytes(self.bank.get(rid))
        info = {} if report is None else {"threshold": report.threshold, "tpr_cal": report.tpr_cal,
                                          "fpr_cal": report.fpr_cal, "n_pos": report.n_pos, "n_neg": report.n_neg}
        with self.ledger() as led:
            if led is not None and led.state(rid) == "expert_saved":  # (evaluated already: its step record was lost)
                led.advance(rid, "gate_updated", **info)

    def _roll_back(self, rid: str, exc: BaseException, fail_info: dict) -> None:
        """A failed request leaves nothing: its gate entry (saved again when it was on disk) and expert are removed,
        then the ledger records ``failed`` with the reason."""
        if self.gate is not None and rid in self.gate:
            on_disk = _gate_file_ids(self.gate_dir)
            self.gate.remove_expert(rid)
            if rid in on_disk:
                self.gate.save(self.gate_dir)
        if self.bank is not None and rid in self.bank:
            self.bank.remove(rid)
        error_type = getattr(exc, "error_type", type(exc).__name__)
        with self.ledger() as led:
            if led is not None and rid in led and led.state(rid) not in ("failed", "revoked"):
                led.fail(rid, reason=f"{error_type}: {exc}", error_type=error_type, error=str(exc), **fail_info)


def latest_info(led, rid: str, state: str) -> dict:
    """The info of the latest ``state`` event of ``rid`` in ledger ``led`` ({} when none)."""
    for ev in reversed(led.events(rid)):
        if ev["state"] == state:
            return ev["info"]
    return {}


def _gate_file_ids(gate_dir) -> set:
    """The expert ids of the gate saved in ``gate_dir`` (read as JSON only; empty when none)."""
    import json
    from pathlib import Path

    try:
        return set(json.loads((Path(gate_dir) / "gate.json").read_text()).get("expert_ids") or [])
    except (OSError, ValueError, AttributeError, TypeError):
        return set()


__all__ = ["RequestPipeline", "LearnResult", "GateData", "gate_training_set", "FeatureCache", "request_names",
           "dedupe", "latest_info", "LEARN_ERRORS", "EXPERT_TIMING_KEYS"]
