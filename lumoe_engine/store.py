"""The store: removal requests from files, through a durable store, into experts and gate entries.

A **store** is one folder::

    store.json     the base model the experts are trained on (its directory; fixed by the first ``process``), the
                   gate (``GateConfig``), training and loss settings, and ``general_negatives``
    ledger/        ``lumoe_engine.ledger.Ledger``: every request and each of its state changes (docs/REQUESTS.md)
    bank/          ``lumoe_engine.model.bank.ExpertBank``: one LoRA expert per request (safetensors + manifest)
    gate/          ``lumoe_engine.gate.gate.Gate.save``: one calibrated head per expert
    work.lock      flock'ed while ``process`` or ``revoke`` changes the bank and the gate

Operations (``python lumoe_engine/run.py submit | process | status | revoke | verify``, see docs/REQUESTS.md):

- ``submit(store, files)``: validate each request file (``intake.parse_request_file`` through ``ledger.submit``) and
  record it (state ``received``); bad input leaves the store unchanged. ``watch`` does it for a folder, polling.
- ``process(store)``: for every pending request in ledger order, the one request pipeline
  (``lumoe_engine.pipeline.RequestPipeline.learn``, the same path a stream run takes): ``training`` -> train one
  expert on the frozen base -> collapse guard -> ``bank.add`` -> ``expert_saved`` -> ``gate.add_expert`` +
  ``gate.save`` -> ``gate_updated``. A request that fails (nan/inf loss, bad data, a collapsed expert) ends ``failed``
  with the reason; nothing of it stays in the bank or the gate. Idempotent after a crash: an expert already in the
  bank for a request in state ``training``/``expert_saved`` (same content hash in its metadata) is not trained again,
  a gate entry already saved is not added again; revoked or failed requests whose expert or gate entry is still there
  (a crash in between) are cleaned up first. The gate's negatives: the retain queries of every live request and a
  general pool of the taught benchmark's queries (``general_negatives``).
- ``revoke(store, id)``: ``ledger.revoke`` first, then the gate entry (gate saved), then the expert: a crash in
  between leaves a request revoked-but-still-forgotten for a moment, never the reverse, and the next ``revoke`` or
  ``process`` finishes the removal. While a ``process`` run holds the store, the revocation is recorded and that run
  removes the expert.
- ``status(store)``: one row per request: id, state, content hash, expert in the bank, entry in the gate, reason.

Locks: the ledger's writer lock is held only for each write (a submit, one state change), so ``submit``/``watch``
work while ``process`` trains; ``work.lock`` keeps a second ``process``/``revoke`` off the bank and the gate.

Only safetensors is ever read from the bank and the gate (``ExpertBank`` / ``Gate.load``); a manifest naming any
other file is refused, a planted pickle is never opened.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

from lumoe_engine.data.intake import parse_request_file
from lumoe_engine.errors import RequestError
from lumoe_engine.fileio import atomic_write
from lumoe_engine.gate.config import GateConfig
from lumoe_engine.ledger import Ledger, LedgerCorruptError, LedgerLockedError, UnknownRequestError

log = logging.getLogger("lumoe_engine.store")

STORE_FORMAT = "lumoe-store"
STORE_VERSION = 1
STORE_JSON = "store.json"
LEDGER_DIR, BANK_DIR, GATE_DIR, WORK_LOCK = "ledger", "bank", "gate", "work.lock"
# The expert loss a request without "loss" gets: the stream's LUMoE default (idk, no retain term; see
# stream/config.py).
DEFAULT_LOSS = {"name": "idk", "retain_weight": 0.0, "beta": 0.1}
COLLAPSE_CHECK_TOKENS = 16  # answer length of the collapse guard's check (unlearn.collapse.collapse_check)
DEFAULT_TRAIN = {"steps": 40, "lr": 1e-2, "rank": 8, "alpha": 16.0, "batch_size": 16, "seed": 0}
# queries of the taught benchmark's other entities added to every head's negatives (0 = none; only for the embedded
# taught base)
DEFAULT_GENERAL_NEGATIVES = 64
LEDGER_WAIT_S = 60.0  # how long ``process`` waits for a submit to release the ledger


class StoreError(ValueError):
    """A store folder that is missing, not a store, or whose store.json is damaged; the message says what to do."""


class StoreBusyError(RuntimeError):
    """Another ``process`` or ``revoke`` holds the store's work lock."""


# ================================================================================================== the store
class Store:
    """The store folder ``root`` (see the module docstring). ``Store(root, create=True)`` makes a new one."""

    def __init__(self, root: Union[str, Path], create: bool = False):
        self.root = Path(root)
        self.config_path = self.root / STORE_JSON
        self.ledger_dir, self.bank_dir, self.gate_dir = (self.root / LEDGER_DIR, self.root / BANK_DIR,
                                                         self.root / GATE_DIR)
        if not self.config_path.is_file():
            if not create:
                raise StoreError(f"{self.root} is not a request store ({STORE_JSON} not found); create one with "
                                 f"'python lumoe_engine/run.py submit FILE --store {self.root}'")
            if self.root.exists() and any(self.root.iterdir()):
                raise StoreError(f"{self.root} exists and is not empty but holds no {STORE_JSON}; choose an empty "
                                 f"or new folder for the store")
            self.root.mkdir(parents=True, exist_ok=True)
            doc = {"format": STORE_FORMAT, "version": STORE_VERSION, "created": round(time.time(), 3),
                   "model": None, "gate": GateConfig().to_dict(), "general_negatives": DEFAULT_GENERAL_NEGATIVES,
                   "train": dict(DEFAULT_TRAIN), "loss": dict(DEFAULT_LOSS)}
            self._write_config(doc)
        self.config = self._read_config()

    # ---------------------------------------------------------------------------------------------- config
    def _read_config(self) -> dict:
        try:
            doc = json.loads(self.config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise StoreError(f"{self.config_path}: cannot be read as JSON ({e}); restore it from a backup") from None
        if not isinstance(doc, dict) or doc.get("format") != STORE_FORMAT or doc.get("version") != STORE_VERSION:
            raise StoreError(f"{self.config_path}: not a {STORE_FORMAT!r} v{STORE_VERSION} file; point --store at a "
                             f"folder made by 'run.py submit'")
        for key, default in (("gate", GateConfig().to_dict()), ("train", DEFAULT_TRAIN), ("loss", DEFAULT_LOSS)):
            if not isinstance(doc.get(key), dict):
                raise StoreError(f"{self.config_path}: '{key}' must be an object like {default}")
            doc[key] = {**default, **doc[key]} if key != "gate" else dict(doc[key])
        gate = doc["gate"]
        if "general_negatives" in gate:  # stores made before the gate had its own config kept it there
            doc.setdefault("general_negatives", gate.pop("general_negatives"))
        doc.setdefault("general_negatives", DEFAULT_GENERAL_NEGATIVES)
        try:
            self.gate_config = GateConfig.from_dict(gate, where=f"{self.config_path}: 'gate'")
        except (TypeError, ValueError) as e:
            raise StoreError(f"{e}; fix store.json or make a new store") from None
        if doc.get("model") is not None and not (isinstance(doc["model"], dict)
                                                 and isinstance(doc["model"].get("dir"), str)):
            raise StoreError(f"{self.config_path}: 'model' must be null or an object with 'dir' (the base model's "
                             f"directory)")
        return doc

    def _write_config(self, doc: dict) -> None:
        atomic_write(self.config_path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())

    def set_model(self, record: dict) -> None:
        """Fix the base model (the first ``process``): every expert of the store is trained on it."""
        doc = self._read_config()
        doc["model"] = record
        self._write_config(doc)
        self.config = doc

    # ----------------------------------------------------------------------------------------------- parts
    @contextlib.contextmanager
    def ledger(self, readonly: bool = False, wait: float = 0.0) -> Iterator[Ledger]:
        """The store's ledger, opened for this block (writer lock held for the block; ``wait`` seconds of retries
        when another writer holds it)."""
        if readonly and not self.ledger_dir.is_dir():
            raise StoreError(f"{self.ledger_dir} is missing; the store is damaged: restore it from a backup")
        deadline = time.monotonic() + wait
        while True:
            try:
                led = Ledger(self.ledger_dir, readonly=readonly)
                break
            except LedgerLockedError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)
        try:
            yield led
        finally:
            led.close()

    @contextlib.contextmanager
    def work_lock(self) -> Iterator[None]:
        """Exclusive right to change the bank and the gate (StoreBusyError when a process/revoke holds it)."""
        path = self.root / WORK_LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "?"
                raise StoreBusyError(f"store {self.root} is busy: a 'process' or 'revoke' (pid {holder}) is changing "
                                     f"its bank and gate; wait for it to finish") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)

    def open_bank(self, create: bool = False, lazy: bool = False):
        """The expert bank (None when the store has none yet and not ``create``). ``lazy``: no weights loaded
        (enough to add or remove experts). Refuses a damaged bank (ExpertFileError naming the file)."""
        from lumoe_engine.model.bank import ExpertBank

        if not (self.bank_dir / "manifest.json").exists() and not create:
            return None
        return ExpertBank.open(self.bank_dir, max_resident=1 if lazy else None, create=create)

    def load_gate(self, convert: bool = False, out: Callable[[str], None] = print):
        """The gate (None when the store has none yet). Refuses a damaged gate (StoreError naming the file).

        A gate of an older format whose names are token ids (``GateFormatError``): with ``convert`` (``process``
        and ``revoke``, which hold the work lock), its experts' names are read again as text from the ledger's
        stored requests (``pipeline.request_names``: entities and aliases) and the gate is saved in the current
        format; without, a StoreError saying to run ``process``."""
        from lumoe_engine.gate.gate import GATE_JSON, Gate, GateFormatError

        if not (self.gate_dir / GATE_JSON).exists():
            return None
        try:
            return Gate.load(self.gate_dir)
        except GateFormatError as e:
            if not convert:
                raise StoreError(f"gate {self.gate_dir}: {e}") from None
            try:
                gate = Gate.load(self.gate_dir, names=_names_from_ledger_of(self))
            except GateFormatError as e2:
                raise StoreError(f"gate {self.gate_dir}: cannot convert it from the ledger ({e2})") from None
            gate.save(self.gate_dir)
            out(f"gate: names of {sum(bool(n) for n in gate.names)} experts rewritten as text from the ledger "
                f"(gate format v{json.loads((self.gate_dir / GATE_JSON).read_text())['version']})")
            return gate
        except (KeyError, TypeError, ValueError, OSError) as e:
            raise StoreError(f"gate {self.gate_dir} cannot be loaded ({type(e).__name__}: {e}); restore it from a "
                             f"backup") from None


def _names_from_ledger_of(store: Store) -> dict:
    """{request id: its names as text (``pipeline.request_names``)} of every request whose stored copy reads."""
    from lumoe_engine.pipeline import request_names

    names = {}
    with store.ledger(readonly=True) as led:
        for rid in led.requests():
            try:
                names[rid] = request_names(led.spec(rid).to_request())
            except (LedgerCorruptError, RequestError) as e:
                log.warning("request %s: stored copy unreadable (%s); its gate entry keeps no names", rid, e)
    return names


def _expert_ids_on_disk(store: Store) -> tuple[set, set]:
    """(expert ids in the bank manifest, expert ids in gate.json), read as JSON only (no weights)."""
    out = []
    for path, key in ((store.bank_dir / "manifest.json", "experts"), (store.gate_dir / "gate.json", "expert_ids")):
        try:
            doc = json.loads(path.read_text())
            items = doc.get(key) or []
            out.append({x["id"] if isinstance(x, dict) else x for x in items})
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            out.append(set())
    return out[0], out[1]


# ================================================================================================= submit
@dataclasses.dataclass
class SubmitResult:
    """One request file's outcome: ``id`` (None on error), ``new`` (recorded now), ``message`` (one line)."""

    file: str
    id: Optional[str]
    new: bool
    message: str
    ok: bool


def _error_line(file: str, e: Exception) -> str:
    """``error: <file>: <request>: <field>: <problem> ...``: the field is inserted after the request's label when the
    message does not name it already."""
    msg = str(e)
    fld = getattr(e, "field", None)
    head = msg.split(" (file ")[0]
    label, sep, rest = msg.partition("': ")
    if not (sep and label.startswith("request")):
        label, sep, rest = "", "", msg
    if fld and f"{fld}:" not in head and f"'{fld}'" not in head and not rest.startswith(fld):
        msg = f"{label}{sep}{fld}: {rest}"
    return f"error: {file}: {msg}"


def _check_method(spec) -> None:
    if spec.method != "lumoe":
        raise RequestError(f"request {spec.id!r}: method {spec.method!r} cannot be served by a store (file "
                           f"{spec.source}); a store trains one expert per request: use \"method\": \"lumoe\" or "
                           f"leave it out", file=spec.source, field="method")


def submit_files(store: Store, files: Sequence[Union[str, Path]], wait: float = 0.0) -> list[SubmitResult]:
    """Validate and record each file (one ledger writer session for all). Bad files change nothing."""
    results = []
    with store.ledger(wait=wait) as led:
        for f in files:
            f = str(f)
            try:
                spec = parse_request_file(f)  # what ledger.submit does, with the store's method check between
                _check_method(spec)
                rid, new = led.receive(spec)
                msg = f"received as {rid}" if new else f"already received as {rid} (state {led.state(rid)})"
                results.append(SubmitResult(f, rid, new, f"{f}: {msg}", True))
            except (RequestError, LedgerCorruptError, OSError) as e:
                results.append(SubmitResult(f, None, False, _error_line(f, e), False))
    return results


def watch(store: Store, folder: Union[str, Path], interval: float = 5.0, once: bool = False,
          out: Callable[[str], None] = print, sleep: Callable[[float], None] = time.sleep) -> int:
    """Submit every ``*.json`` in ``folder``, then poll it every ``interval`` s for new or changed files until
    interrupted (``once``: a single pass). A file is submitted again only when its size or mtime changes (a file
    caught half-written is reported, then retried once it changes); content already received is reported as such.
    While another writer holds the ledger the pass is retried. Returns 1 when a file of the (last) pass failed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StoreError(f"--watch {folder}: not a folder; pass the folder the request files are dropped into")
    seen: dict[str, tuple] = {}
    rc = 0
    try:
        while True:
            todo = []
            for p in sorted(folder.glob("*.json")):
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                key = (st.st_size, st.st_mtime_ns)
                if seen.get(str(p)) != key:
                    todo.append((p, key))
            rc = 0
            if todo:
                try:
                    results = submit_files(store, [p for p, _ in todo])
                except LedgerLockedError as e:
                    out(f"store busy ({e}); retrying in {interval:g} s")
                    results = None
                if results is not None:
                    for (p, key), r in zip(todo, results):
                        seen[str(p)] = key
                        out(r.message)
                        rc = rc or (0 if r.ok else 1)
            if once:
                return rc
            sleep(interval)
    except KeyboardInterrupt:
        out("watch: stopped")
        return 0


# ================================================================================================ process
def _base_model(store: Store, model_dir: Optional[str], load_in_4bit: bool, teach_overrides: dict,
                cache: Optional[str], progress: bool):
    """(model, processor, model record) of the store's base; fixes it in store.json the first time."""
    from lumoe_engine.model.load import load_model
    from lumoe_engine.model.teach import TeachConfig, teach

    rec = store.config.get("model")
    if rec is not None:
        if model_dir is not None and os.path.abspath(model_dir) != rec["dir"]:
            raise StoreError(f"--model {model_dir}: the store's experts are trained on {rec['dir']} (store.json); "
                             f"experts only fit the base they were trained on: use a new store for another model")
        if Path(rec["dir"], "config.json").is_file():
            model, processor = load_model(rec["dir"], load_in_4bit=bool(rec.get("load_in_4bit")))
            return model, processor, rec
        if rec.get("source") != "taught":
            raise StoreError(f"the store's base model {rec['dir']} (store.json) is gone; restore that directory")
        log.warning("the taught base %s is gone from the cache: teaching it again with the recorded config",
                    rec["dir"])
        teach_overrides = rec.get("teach_config") or {}
    if model_dir is not None:
        if not Path(model_dir, "config.json").is_file():
            raise StoreError(f"--model {model_dir}: no config.json there; pass a Hugging Face LLaVA directory")
        model, processor = load_model(model_dir, load_in_4bit=load_in_4bit)
        rec = {"dir": os.path.abspath(model_dir), "source": "given", "load_in_4bit": bool(load_in_4bit)}
    else:
        cfg = TeachConfig()
        for k, v in teach_overrides.items():
            if not hasattr(cfg, k):
                raise StoreError(f"--teach {k}=...: TeachConfig has no field {k!r}")
            setattr(cfg, k, v)
        model, processor, summary = teach(cfg, store.root / "teach", cache_dir=cache, progress=progress)
        if not summary.get("model_dir"):
            raise StoreError("the taught base was cut by its time budget and is not cached: a store needs a fixed "
                             "base; teach without --teach time_budget_s, or pass --model DIR")
        rec = {"dir": str(summary["model_dir"]), "source": "taught", "load_in_4bit": False,
               "teach_config": cfg.to_dict(), "cache_key": summary.get("cache_key"), "cache": cache}
    if store.config.get("model") is None:
        store.set_model(rec)
    return model, processor, rec


def _general_negatives(store: Store, rec: dict, n: int, seed: int):
    """Up to ``n`` teaching queries of the taught benchmark (the embedded default's entities), seeded; [] for a
    given model (no benchmark is known)."""
    if n <= 0 or rec.get("source") != "taught":
        return []
    from lumoe_engine.model.teach import TeachConfig, load_data

    cfg = TeachConfig(**rec.get("teach_config") or {})
    bench = load_data(cfg, Path(rec["cache"]) if rec.get("cache") else None)
    pool = [r for r in bench.records if not r.heldout_phrasing and not r.fresh_image]
    rng = random.Random(seed)
    return rng.sample(pool, min(n, len(pool)))


def _norm(s: str) -> str:
    return " ".join(s.lower().split())


def reconcile(store: Store, led: Ledger, bank, gate) -> list[str]:
    """Remove the expert / gate entry of every revoked or failed request that still has one (a crash between the
    ledger event and the removal); returns the messages. Gate first (saved), then the bank."""
    msgs = []
    for rid in led.requests("revoked") + led.requests("failed"):
        if gate is not None and rid in gate:
            gate.remove_expert(rid)
            gate.save(store.gate_dir)
            msgs.append(f"{rid}: gate entry removed ({led.state(rid)})")
        if bank is not None and rid in bank:
            bank.remove(rid)
            msgs.append(f"{rid}: expert removed ({led.state(rid)})")
    return msgs


@dataclasses.dataclass
class ProcessOptions:
    """``process`` settings; None = store.json's. ``teach``: TeachConfig fields for the embedded base (first run)."""

    model: Optional[str] = None
    load_in_4bit: bool = False
    teach: dict = dataclasses.field(default_factory=dict)
    cache: Optional[str] = None
    steps: Optional[int] = None
    lr: Optional[float] = None
    rank: Optional[int] = None
    alpha: Optional[float] = None
    batch_size: Optional[int] = None
    retry_failed: bool = False
    only: Sequence[str] = ()
    threads: Optional[int] = None
    progress: bool = False


def process(store: Store, opts: Optional[ProcessOptions] = None, out: Callable[[str], None] = print) -> dict:
    """Train, save and route every pending request (module docstring). Returns {id: final state} of the requests
    handled. Raises StoreBusyError when another process/revoke runs, ExpertFileError / StoreError for a damaged
    bank or gate (checked before the model is loaded)."""
    import torch

    from lumoe_engine.engine import LUMoEEngine
    from lumoe_engine.gate.gate import Gate
    from lumoe_engine.model.placement import compute_dtype, local_device, model_device, place_gate
    from lumoe_engine.pipeline import RequestPipeline
    from lumoe_engine.unlearn.losses import LossConfig
    from lumoe_engine.unlearn.trainer import TrainConfig

    opts = opts or ProcessOptions()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    results: dict[str, str] = {}
    with store.work_lock():
        bank = store.open_bank()  # validates every expert file before anything else happens
        gate = store.load_gate(convert=True, out=out)
        with store.ledger(wait=LEDGER_WAIT_S) as led:
            for m in reconcile(store, led, bank, gate):
                out(m)
            todo = [r for r in led.pending(include_failed=opts.retry_failed) if led.state(r) != "gate_updated"]
            if opts.only:
                for r in opts.only:
                    led.state(r)
                todo = [r for r in todo if r in set(opts.only)]
        if not todo:
            out("nothing to process")
            return results
        tr = {**store.config["train"], **{k: getattr(opts, k) for k in ("steps", "lr", "rank", "alpha",
                                                                          "batch_size")
                                      if getattr(opts, k) is not None}}
        train_cfg = TrainConfig(steps=int(tr["steps"]), lr=float(tr["lr"]), rank=int(tr["rank"]),
                                alpha=float(tr["alpha"]), batch_size=int(tr["batch_size"]),
                                retain_batch_size=int(tr["batch_size"]), seed=int(tr["seed"]),
                                progress=opts.progress).validate()
        default_loss = LossConfig(**store.config["loss"]).validate()
        gate_cfg = store.gate_config

        model, processor, rec = _base_model(store, opts.model, opts.load_in_4bit, dict(opts.teach), opts.cache,
                                            opts.progress)
        model.requires_grad_(False)
        if torch.cuda.is_available() and not rec.get("load_in_4bit"):  # (a taught tiny base is built on the CPU)
            model = model.to(local_device())
        bank = bank if bank is not None else store.open_bank(create=True)
        bank.to(model_device(model), compute_dtype(model))  # stacks and gate where the model computes
        gate = place_gate(gate if gate is not None else Gate.from_config(gate_cfg, model), model)
        engine = LUMoEEngine(model, processor, bank, gate, top_k=1)
        pipeline = RequestPipeline(engine, bank, gate, store.gate_dir, gate_cfg, train_cfg, default_loss,
                                   ledger=lambda: store.ledger(wait=LEDGER_WAIT_S),
                                   collapse_tokens=COLLAPSE_CHECK_TOKENS)
        general = _general_negatives(store, rec, int(store.config.get("general_negatives") or 0),
                                     int(gate_cfg.seed))
        requests: dict = {}  # id -> stream Request of the stored copy (None: unreadable), read once per run
        try:
            for rid in todo:
                results[rid] = _process_one(store, rid, pipeline, general, requests, out)
            with store.ledger(wait=LEDGER_WAIT_S) as led:  # revocations recorded while this run trained
                for m in reconcile(store, led, bank, gate):
                    out(m)
        finally:
            engine.close()
    return results


def _live_requests(store: Store, led: Ledger, cache: dict) -> tuple[list, list]:
    """(requests in the gate, every live request) as stream Requests, from the ledger's stored copies (cached)."""
    live, learned = [], []
    for rid in led.requests():
        st = led.state(rid)
        if st in ("revoked", "failed"):
            continue
        if rid not in cache:
            try:
                cache[rid] = led.spec(rid).to_request()
            except (LedgerCorruptError, RequestError) as e:
                log.warning("request %s: stored copy unreadable (%s); left out of the gate's negatives", rid, e)
                cache[rid] = None
        if cache[rid] is not None:
            live.append(cache[rid])
            if st == "gate_updated" or st == "evaluated":
                learned.append(cache[rid])
    return learned, live


def _process_one(store, rid, pipeline, general, cache, out) -> str:
    """One request of the store through the request pipeline: training -> expert_saved -> gate_updated, or failed
    (bank and gate as before). Returns the request's final state."""
    from lumoe_engine.data.streams import Request
    from lumoe_engine.unlearn.losses import LossConfig

    t0 = time.perf_counter()
    try:
        with store.ledger(wait=LEDGER_WAIT_S) as led:
            for m in reconcile(store, led, pipeline.bank, pipeline.gate):  # revocations recorded while training
                out(m)
            state = led.state(rid)
            if state in ("revoked", "gate_updated", "evaluated"):  # revoked meanwhile / done
                return state
            spec = led.spec(rid)  # re-read and re-checked from the ledger's own copy
            _check_method(spec)
            learned, live = _live_requests(store, led, cache)
        req = spec.to_request()
        cache[rid] = req
        loss_cfg = LossConfig(**spec.loss).validate() if spec.loss is not None else None
    except (RequestError, LedgerCorruptError, ValueError, OSError) as exc:
        with store.ledger(wait=LEDGER_WAIT_S) as led:
            if led.state(rid) not in ("revoked", "failed"):
                led.fail(rid, f"{type(exc).__name__}: {exc}")
        out(f"{rid}: failed: {type(exc).__name__}: {exc}")
        return "failed"
    # negatives: every other live request's retain queries, a general pool of the taught benchmark, its own retain
    sources = [r for r in live if r.id != rid]
    if general:
        ents = set(req.entities) | {r.entity for r in req.forget}
        answers = {_norm(r.answer) for r in req.forget}
        pool = [r for r in general if r.entity not in ents and _norm(r.answer) not in answers]
        sources.append(Request(id="_general", forget=[], retain=pool, entities=()))
    res = pipeline.learn(req, learned=learned, retain_sources=sources + [req], loss_cfg=loss_cfg,
                         content_hash=spec.content_hash, out=out)
    if res.error is not None:
        out(f"{rid}: failed: {type(res.error).__name__}: {res.error}")
        return res.state or "failed"
    out(f"{rid}: gate_updated ({time.perf_counter() - t0:.1f} s)")
    return "gate_updated"


# ================================================================================================= revoke
def revoke(store: Store, request_id: str, reason: Optional[str] = None, wait: float = 0.0,
           out: Callable[[str], None] = print) -> bool:
    """Revoke a request of the store: the ledger event first, then its gate entry (gate saved), then its expert.
    Idempotent (revoking again finishes an interrupted removal). UnknownRequestError (nothing changed) for an id
    the ledger does not hold. Returns True when the revocation was recorded now."""
    with store.ledger(readonly=True) as ro:
        ro.state(request_id)  # unknown id: the error, before any writer opens anything
    with store.ledger(wait=wait) as led:
        changed = led.revoke(request_id, reason=reason)
    out(f"{request_id}: {'revoked' if changed else 'already revoked'}")
    try:
        with store.work_lock():
            gate = store.load_gate(convert=True, out=out)
            if gate is not None and request_id in gate:
                gate.remove_expert(request_id)
                gate.save(store.gate_dir)
                out(f"{request_id}: gate entry removed")
            bank = store.open_bank(lazy=True)
            if bank is not None and request_id in bank:
                bank.remove(request_id)
                out(f"{request_id}: expert removed")
    except StoreBusyError:
        out(f"{request_id}: a 'process' run holds the store: it removes the expert and gate entry before its next "
            f"request")
    return changed


# ================================================================================================= status
@dataclasses.dataclass
class StatusRow:
    id: str
    state: str
    content_hash: str
    in_bank: bool
    in_gate: bool
    reason: Optional[str]

    def line(self) -> str:
        return (f"{self.id}\t{self.state}\t{self.content_hash[:16]}\texpert={'yes' if self.in_bank else 'no'}\t"
                f"gate={'yes' if self.in_gate else 'no'}" + (f"\t{self.reason}" if self.reason else ""))


def status(store: Store) -> list[StatusRow]:
    """One row per request, in arrival order (read-only: no lock taken, nothing written)."""
    bank_ids, gate_ids = _expert_ids_on_disk(store)
    rows = []
    with store.ledger(readonly=True) as led:
        for rid in led.requests():
            st = led.status(rid)
            rows.append(StatusRow(rid, st.state, st.content_hash, rid in bank_ids, rid in gate_ids, st.reason))
    return rows


def verify(store: Store) -> list[str]:
    """Check the whole store read-only: the ledger, every expert file (sha256, safetensors only), the gate, and that
    bank and gate agree with the ledger. Returns the problems found (raises on a damaged bank or gate)."""
    problems = []
    bank = store.open_bank()
    if bank is not None:
        bank.verify()
    gate = store.load_gate()
    with store.ledger(readonly=True) as led:
        for eid in (bank.ids if bank is not None else ()):
            if eid not in led:
                problems.append(f"expert {eid!r} is in the bank but not in the ledger")
            elif led.state(eid) in ("revoked", "failed"):
                problems.append(f"expert {eid!r} is still in the bank but the request is {led.state(eid)}: run "
                                f"'process' or 'revoke {eid}' again")
        for eid in (gate.expert_ids if gate is not None else ()):
            if bank is None or eid not in bank:
                problems.append(f"gate entry {eid!r} has no expert in the bank")
        for rid in led.requests("gate_updated") + led.requests("evaluated"):
            if bank is None or rid not in bank or gate is None or rid not in gate:
                problems.append(f"request {rid!r} is {led.state(rid)} but its expert or gate entry is missing")
    return problems


__all__ = ["Store", "StoreError", "StoreBusyError", "SubmitResult", "submit_files", "watch", "ProcessOptions",
           "process", "reconcile", "revoke", "status", "StatusRow", "verify", "UnknownRequestError",
           "LedgerLockedError"]
