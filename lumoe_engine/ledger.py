"""Request ledger: the durable, append-only record of every removal request and of each of its state changes.

A data owner's request must never be lost, applied twice or silently undone. The ledger is the one place that says
which requests exist and how far each has gone; the stream driver writes a state change after each step and
``--resume`` continues from ``pending()``.

Layout of ``ledger_dir``::

    events.jsonl            one event per line (below), appended with one write and an fsync each
    requests/<id>.json      the normalised request (a request file in flat form, see docs/REQUESTS.md), written
                            atomically before its "received" event and never overwritten
    images/<sha256>.<ext>   content-addressed copies of the request's images: a request never depends on files
                            its owner may later move or delete
    ledger.lock             flock'ed by the one writer (holds its pid, for the error message only)

An event: ``{"seq": 1, "time": 1718000000.123, "request": "r17", "state": "received", "info": {...},
"check": "<16 hex>"}`` — canonical JSON (sorted keys, no spaces, UTF-8), ``seq`` counting from 1 without gaps,
``check`` = the first 16 hex digits of sha256 of the event without ``check``. A "received" event's info holds the
content hash, the payload file, item counts, entity, method and source file.

States and the legal transitions (``TRANSITIONS``)::

    received -> training -> expert_saved -> gate_updated -> evaluated
    received | training | expert_saved | gate_updated -> failed (reason=...);  failed -> training (a retry)
    every state but revoked -> revoked (terminal)

``advance`` to the state a request is already in writes nothing and returns False (so a step replayed after a crash
is harmless); any other illegal transition is a ValueError that writes nothing. ``pending()`` lists the requests
that are neither evaluated, failed nor revoked, in arrival order (failed ones with ``include_failed=True``).
Revocation: call ``revoke`` first, then remove the expert and its gate entry; on resume, remove the expert of every
request in ``requests("revoked")`` that the bank still holds (removal is idempotent), so a crash in between never
leaves a revoked request half-applied. A revoked request's content may be submitted again: it is a new request.

Why a JSONL file and not SQLite: the ledger is an audit trail (a few events per request, thousands of requests)
written by one process. An append-only text file keeps the whole history readable with ``cat``/``jq``, is never
rewritten in place, and has exactly one failure mode — a torn last line after a crash — which the per-line check
detects. SQLite (WAL) would give the same atomicity but hide the history in a binary file and add its own recovery
machinery for no gain at this scale.

Crash safety. An event is durable once ``advance``/``receive`` returns (write + fsync). On open, the last line is
ignored when it is torn (no newline, bad JSON or a wrong check: a write cut short by a kill or a power loss) and is
truncated by the next write; a damaged line followed by valid events is corruption in the middle and raises
``LedgerCorruptError`` (nothing is changed). A writer holds an exclusive ``fcntl.flock`` on ``ledger.lock``; a second
writer gets ``LedgerLockedError``. ``Ledger(path, readonly=True)`` reads without the lock and never writes.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from lumoe_engine.data.intake import RequestError, RequestSpec, parse_request_file
from lumoe_engine.fileio import atomic_write, fsync_dir, validate_expert_id

log = logging.getLogger(__name__)

EVENTS_NAME = "events.jsonl"
REQUESTS_DIR = "requests"
IMAGES_DIR = "images"
LOCK_NAME = "ledger.lock"
STATES = ("received", "training", "expert_saved", "gate_updated", "evaluated", "failed", "revoked")
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "received": ("training", "failed", "revoked"),
    "training": ("expert_saved", "failed", "revoked"),
    "expert_saved": ("gate_updated", "failed", "revoked"),
    "gate_updated": ("evaluated", "failed", "revoked"),
    "evaluated": ("revoked",),
    "failed": ("training", "revoked"),
    "revoked": (),
}
DONE_STATES = ("evaluated", "failed", "revoked")  # not pending (failed: unless include_failed)
_EVENT_KEYS = frozenset(("seq", "time", "request", "state", "info", "check"))


class LedgerLockedError(RuntimeError):
    """Another process holds the ledger's writer lock."""


class LedgerCorruptError(ValueError):
    """The event file (or a stored request) is damaged other than by a torn last line; names file, line and fix."""


class UnknownRequestError(KeyError):
    """A request id that the ledger does not hold."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else "unknown request"


@dataclass(frozen=True)
class RequestStatus:
    """Where one request stands.

    id, state, content_hash; received / updated: unix times of its first and latest events; reason: the reason of
    its latest failed or revoked event (None otherwise); history: its events (state, time, info), oldest first.
    """

    id: str
    state: str
    content_hash: str
    received: float
    updated: float
    reason: Optional[str]
    history: tuple[tuple[str, float, dict], ...]


class _BadLine(ValueError):
    pass


def _write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to ``fd`` (os.write may write less than asked)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _check(event: dict) -> str:
    return hashlib.sha256(_canonical(event)).hexdigest()[:16]


def _jsonable(value, where: str):
    """``value`` as plain JSON (tuples -> lists, paths -> str, numpy scalars -> numbers, nan/inf -> "nan"/"inf")."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: key {k!r} is not a string; event info must be a JSON object")
            out[k] = _jsonable(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return _jsonable(value.item(), where)
        except (TypeError, ValueError, RuntimeError):
            pass
    raise ValueError(f"{where} = {value!r:.80} ({type(value).__name__}) cannot be stored in the ledger; pass JSON "
                     f"values (str, int, float, bool, None, lists, dicts)")


class Ledger:
    """The request ledger in ``path`` (a folder, created when missing unless ``readonly``).

    readonly: read the events without taking the writer lock; every write raises. durable: fsync every event and
    stored file (False only for throwaway runs: still atomic, but a power loss may lose the latest events).
    Raises LedgerLockedError when another writer holds the folder, LedgerCorruptError when the history is damaged
    other than by a torn last line. Not thread-safe; one writer process per folder.
    """

    def __init__(self, path: Union[str, Path], readonly: bool = False, durable: bool = True):
        self.dir = Path(path)
        self.readonly, self.durable = bool(readonly), bool(durable)
        self.events_path = self.dir / EVENTS_NAME
        self._lock_fd: Optional[int] = None
        self._fd: Optional[int] = None
        self._events: list[dict] = []
        self._by_request: dict[str, list[dict]] = {}
        self._state: dict[str, str] = {}
        self._hash_of: dict[str, str] = {}
        self._live: dict[str, str] = {}  # content hash -> id, revoked requests excluded
        self._end = 0  # byte length of the valid events
        self._torn = 0  # bytes of a torn tail after _end (truncated by the next write)
        if readonly:
            if not self.dir.is_dir():
                raise FileNotFoundError(f"ledger folder {self.dir} not found; open it without readonly=True to "
                                        f"create it")
        else:
            new = not self.dir.exists()
            self.dir.mkdir(parents=True, exist_ok=True)
            if new:
                fsync_dir(self.dir.parent)
            self._lock()
            for sub in (REQUESTS_DIR, IMAGES_DIR):
                if not (self.dir / sub).is_dir():
                    (self.dir / sub).mkdir()
                    fsync_dir(self.dir)
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Close the event file and release the writer lock (the object can still be read, not written)."""
        for name in ("_fd", "_lock_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)
        self.readonly = True

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ------------------------------------------------------------------------------------------------- writing
    def receive(self, spec: RequestSpec) -> tuple[str, bool]:
        """Record a new request; returns ``(request_id, is_new)``.

        The same content (``spec.content_hash``) as a request already held (and not revoked) is that request:
        ``(its id, False)``, nothing written. Otherwise the images and the normalised request are stored, then the
        "received" event is appended: ``(id, True)``. A request without an id of its own that collides with a
        revoked one gets ``<id>-2``, ``-3``...; a given id already used for other content is a RequestError.
        """
        self._writable()
        if not isinstance(spec, RequestSpec):
            raise TypeError(f"receive: expected a RequestSpec (from intake.parse_request_file), got "
                            f"{type(spec).__name__}")
        have = self._live.get(spec.content_hash)
        if have is not None:
            log.info("request %r: already received as %r (state %s)", spec.id, have, self._state[have])
            return have, False
        rid = spec.id
        if rid in self._state:
            if spec.id_given:
                raise RequestError(
                    f"request {rid!r}: the id is already used in the ledger {self.dir} by a request with other "
                    f"content ({self._hash_of[rid][:16]}..., state {self._state[rid]}) (file {spec.source}); "
                    f"choose another id, or leave 'id' out to get one derived from the content",
                    file=spec.source, field="id")
            n = 2
            while f"{rid}-{n}" in self._state:
                n += 1
            rid = f"{rid}-{n}"
        validate_expert_id(rid)
        payload_path = self.dir / REQUESTS_DIR / f"{rid}.json"
        payload = (json.dumps(spec.to_json(request_id=rid, image_dir=f"../{IMAGES_DIR}"), indent=1,
                              ensure_ascii=False) + "\n").encode("utf-8")
        exists = payload_path.exists()
        if exists and not self._same_payload(payload_path, rid, spec.content_hash):
            raise LedgerCorruptError(
                f"{payload_path} exists with other content but no event names it (left by a crash between storing "
                f"a request and recording it); stored requests are never overwritten: move that file aside, then "
                f"submit again")
        images = spec.images()  # (checks that the image bytes still match their hashes)
        for sha, (ext, data) in images.items():
            self._store_image(sha, ext, data)
        if not exists:
            atomic_write(payload_path, payload, self.durable)
        info = {"content_hash": spec.content_hash, "payload": f"{REQUESTS_DIR}/{rid}.json",
                "forget": len(spec.forget), "retain": len(spec.retain), "entity": spec.entity,
                "method": spec.method, "source": spec.source}
        self._append(rid, "received", info)
        log.info("request %r: received (%d forget, %d retain items)", rid, len(spec.forget), len(spec.retain))
        return rid, True

    def advance(self, request_id: str, state: str, **info) -> bool:
        """Record that ``request_id`` reached ``state`` (with JSON ``info``); True when an event was written.

        Advancing to the current state writes nothing and returns False (a step replayed after a crash). Illegal
        transitions (see ``TRANSITIONS``) raise ValueError and write nothing; "failed" needs ``reason=...``.
        """
        self._writable()
        current = self.state(request_id)
        if state not in STATES:
            raise ValueError(f"state {state!r} is not a ledger state; use one of {list(STATES)}")
        if state == "received":
            raise ValueError("a request enters the ledger through receive(spec), not advance(..., 'received')")
        if state == current:
            return False
        if state not in TRANSITIONS[current]:
            nxt = TRANSITIONS[current]
            raise ValueError(f"request {request_id!r} is {current!r}: it cannot go to {state!r}; from {current!r} "
                             f"it can go to {list(nxt) if nxt else 'nothing (terminal)'}")
        if state == "failed" and not (isinstance(info.get("reason"), str) and info["reason"].strip()):
            raise ValueError(f"request {request_id!r}: a failure needs reason='<what went wrong>' (a non-empty str)")
        self._append(request_id, state, _jsonable(info, "info"))
        return True

    def fail(self, request_id: str, reason: str, **info) -> bool:
        """``advance(request_id, "failed", reason=reason, **info)``."""
        return self.advance(request_id, "failed", reason=reason, **info)

    def revoke(self, request_id: str, reason: Optional[str] = None, **info) -> bool:
        """Record that ``request_id`` is withdrawn (terminal); then remove its expert and gate entry (see the module
        docstring). Revoking a revoked request writes nothing and returns False."""
        if reason is not None:
            info["reason"] = reason
        return self.advance(request_id, "revoked", **info)

    # ------------------------------------------------------------------------------------------------- reading
    def state(self, request_id: str) -> str:
        """The current state of ``request_id`` (UnknownRequestError when the ledger does not hold it)."""
        st = self._state.get(request_id) if isinstance(request_id, str) else None
        if st is None:
            known = list(self._state)
            raise UnknownRequestError(f"unknown request id {request_id!r}: the ledger {self.dir} holds {len(known)} "
                                      f"requests{' (e.g. ' + ', '.join(map(repr, known[:3])) + ')' if known else ''}")
        return st

    def status(self, request_id: str) -> RequestStatus:
        """State, content hash, times, reason and history of ``request_id``."""
        state = self.state(request_id)
        evs = self._by_request[request_id]
        reason = next((e["info"].get("reason") for e in reversed(evs) if e["state"] in ("failed", "revoked")), None)
        if state not in ("failed", "revoked"):
            reason = None
        return RequestStatus(id=request_id, state=state, content_hash=self._hash_of[request_id],
                             received=evs[0]["time"], updated=evs[-1]["time"], reason=reason,
                             history=tuple((e["state"], e["time"], dict(e["info"])) for e in evs))

    def requests(self, state: Optional[str] = None) -> list[str]:
        """Every request id in arrival order (only those in ``state`` when given)."""
        if state is not None and state not in STATES:
            raise ValueError(f"state {state!r} is not a ledger state; use one of {list(STATES)}")
        return [r for r in self._state if state is None or self._state[r] == state]

    def pending(self, include_failed: bool = False) -> list[str]:
        """Requests not yet evaluated (nor revoked, nor failed unless ``include_failed``), in arrival order: what a
        resumed run continues."""
        skip = {"evaluated", "revoked"} | (set() if include_failed else {"failed"})
        return [r for r, s in self._state.items() if s not in skip]

    def find(self, content_hash: str) -> Optional[str]:
        """The id of the (not revoked) request with this content hash, else None."""
        return self._live.get(content_hash)

    def events(self, request_id: Optional[str] = None) -> list[dict]:
        """The events (copies), all or those of one request, oldest first."""
        if request_id is not None:
            self.state(request_id)
        src = self._events if request_id is None else self._by_request[request_id]
        return [json.loads(_canonical(e)) for e in src]

    def spec(self, request_id: str, benchmark_entities=None) -> RequestSpec:
        """The stored request, re-read and re-validated (images from the ledger's copies); its content hash must be
        the one recorded when it was received (else LedgerCorruptError)."""
        self.state(request_id)
        path = self.dir / REQUESTS_DIR / f"{request_id}.json"
        if not path.is_file():
            raise LedgerCorruptError(f"request {request_id!r}: its stored copy {path} is missing; restore the ledger "
                                     f"folder from a backup")
        try:
            spec = parse_request_file(path, benchmark_entities=benchmark_entities)
        except RequestError as e:
            raise LedgerCorruptError(f"request {request_id!r}: its stored copy does not validate any more ({e}); "
                                     f"restore {path} (and {self.dir / IMAGES_DIR}) from a backup") from None
        if spec.content_hash != self._hash_of[request_id] or spec.id != request_id:
            raise LedgerCorruptError(f"request {request_id!r}: its stored copy {path} holds other content "
                                     f"({spec.content_hash[:16]}...) than was received "
                                     f"({self._hash_of[request_id][:16]}...); restore it from a backup")
        return spec

    @property
    def torn_bytes(self) -> int:
        """Bytes of a torn last event ignored at open (0 when none; cleared by the next write)."""
        return self._torn

    def __contains__(self, request_id) -> bool:
        return request_id in self._state

    def __len__(self) -> int:
        return len(self._state)

    # ----------------------------------------------------------------------------------------------- internals
    def _writable(self) -> None:
        if self.readonly:
            raise PermissionError(f"ledger {self.dir} is open read-only (or closed); open Ledger(path) to write")

    def _lock(self) -> None:
        path = self.dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise LedgerLockedError(f"ledger {self.dir} is in use by another writer (lock {path} held by pid "
                                    f"{holder}); wait for it to finish, or open it with readonly=True to read") \
                from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    @staticmethod
    def _same_payload(path: Path, rid: str, content_hash: str) -> bool:
        """Whether a stored request file (an orphan of a crash before its event) holds this id and content."""
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return False
        return isinstance(doc, dict) and doc.get("id") == rid and doc.get("content_hash") == content_hash

    def _store_image(self, sha: str, ext: str, data: bytes) -> None:
        path = self.dir / IMAGES_DIR / f"{sha}.{ext}"
        try:
            if hashlib.sha256(path.read_bytes()).hexdigest() == sha:
                return
        except FileNotFoundError:
            pass
        atomic_write(path, data, self.durable)  # content-addressed: replacing a damaged copy is safe

    def _decode(self, line: bytes) -> dict:
        try:
            ev = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise _BadLine(f"not a JSON event ({e})") from None
        if not isinstance(ev, dict) or set(ev) != _EVENT_KEYS:
            raise _BadLine(f"not an event object with keys {sorted(_EVENT_KEYS)}")
        check = ev.pop("check")
        try:
            ok = _check(ev) == check
        except ValueError:
            ok = False
        if not ok:
            raise _BadLine("its check does not match its content")
        return ev

    def _apply(self, ev: dict, where: str) -> None:
        """Replay one checked event into the in-memory state (LedgerCorruptError when it breaks the rules)."""
        def bad(why: str) -> LedgerCorruptError:
            return LedgerCorruptError(f"{where}: {why}; the ledger was not changed: restore {self.events_path} from a "
                                      f"backup")

        if ev["seq"] != len(self._events) + 1:
            raise bad(f"event seq {ev['seq']!r} where {len(self._events) + 1} was expected (an event is missing "
                      f"or repeated)")
        rid, state, info = ev["request"], ev["state"], ev["info"]
        if not isinstance(rid, str) or state not in STATES or not isinstance(info, dict) \
                or not isinstance(ev["time"], (int, float)):
            raise bad(f"malformed event {ev!r:.120}")
        if state == "received":
            if rid in self._state:
                raise bad(f"request {rid!r} is received twice")
            h = info.get("content_hash")
            if not isinstance(h, str):
                raise bad(f"request {rid!r}: received without a content_hash")
            self._state[rid], self._hash_of[rid], self._by_request[rid] = state, h, []
            self._live.setdefault(h, rid)
        else:
            cur = self._state.get(rid)
            if cur is None:
                raise bad(f"event for request {rid!r}, which was never received")
            if state not in TRANSITIONS[cur]:
                raise bad(f"request {rid!r} goes from {cur!r} to {state!r}, which is not a legal transition")
            self._state[rid] = state
            if state == "revoked" and self._live.get(self._hash_of[rid]) == rid:
                del self._live[self._hash_of[rid]]
        self._events.append(ev)
        self._by_request[rid].append(ev)

    def _load(self) -> None:
        try:
            data = self.events_path.read_bytes()
        except FileNotFoundError:
            data = b""
        pos, n = 0, 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            n += 1
            where = f"{self.events_path}: line {n} (byte {pos})"
            if nl < 0:
                self._torn_tail(pos, len(data), n, "no newline at its end")
                return
            try:
                ev = self._decode(data[pos:nl])
            except _BadLine as e:
                self._bad_line(data, pos, nl, n, str(e))
                return
            self._apply(ev, where)
            pos = nl + 1
            self._end = pos

    def _bad_line(self, data: bytes, pos: int, nl: int, n: int, why: str) -> None:
        """A damaged line: a torn tail when no valid event follows it, else corruption."""
        rest = data[nl + 1:]
        for k, later in enumerate(rest.split(b"\n")):
            try:
                self._decode(later)
            except _BadLine:
                continue
            raise LedgerCorruptError(
                f"{self.events_path}: line {n} (byte {pos}) is damaged ({why}) but a valid event follows it on line "
                f"{n + 1 + k}: the history is corrupt in the middle, not torn at its end; the ledger was not changed: "
                f"restore {self.events_path} from a backup")
        self._torn_tail(pos, len(data), n, why)

    def _torn_tail(self, pos: int, size: int, n: int, why: str) -> None:
        self._torn = size - pos
        log.warning("%s: ignoring a torn last event at line %d (%d bytes from byte %d: %s) left by an interrupted "
                    "write; every earlier event is intact; the next write truncates it", self.events_path, n,
                    self._torn, pos, why)

    def _open_events(self) -> int:
        if self._fd is None:
            new = not self.events_path.exists()
            self._fd = os.open(self.events_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            if new and self.durable:
                fsync_dir(self.dir)
        return self._fd

    def _append(self, rid: str, state: str, info: dict) -> None:
        ev = {"seq": len(self._events) + 1, "time": round(time.time(), 3), "request": rid, "state": state,
              "info": info}
        line = _canonical({**ev, "check": _check(ev)}) + b"\n"
        fd = self._open_events()
        if self._torn or os.fstat(fd).st_size != self._end:
            os.ftruncate(fd, self._end)
            if self.durable:
                os.fsync(fd)
            self._torn = 0
        try:
            _write_all(fd, line)
            if self.durable:
                os.fsync(fd)
        except BaseException:
            try:  # take back a partly written line; if that fails too, the next open sees a torn tail
                os.ftruncate(fd, self._end)
            except OSError:
                pass
            raise
        self._end += len(line)
        self._apply(ev, f"{self.events_path}: new event")


# ------------------------------------------------------------------------------------------------------- front door
def submit(ledger: Ledger, path: Union[str, Path], benchmark_entities=None) -> tuple[str, bool, str]:
    """Parse the request file ``path`` and receive it: ``(request_id, is_new, message)`` where message is
    ``"received as <id>"`` or ``"already received as <id> (state <state>)"``. Bad input raises RequestError and
    leaves the ledger unchanged."""
    spec = parse_request_file(path, benchmark_entities=benchmark_entities)
    rid, is_new = ledger.receive(spec)
    msg = f"received as {rid}" if is_new else f"already received as {rid} (state {ledger.state(rid)})"
    return rid, is_new, msg


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m lumoe_engine.ledger DIR submit FILE... | status [ID...] | revoke ID [--reason R]``."""
    ap = argparse.ArgumentParser(prog="python -m lumoe_engine.ledger", description="the removal-request ledger")
    ap.add_argument("ledger", help="ledger folder")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("submit", help="validate and record request files")
    p.add_argument("files", nargs="+")
    p = sub.add_parser("status", help="state of every request (or of the given ids)")
    p.add_argument("ids", nargs="*")
    p = sub.add_parser("revoke", help="withdraw a request")
    p.add_argument("id")
    p.add_argument("--reason", default=None)
    args = ap.parse_args(argv)
    rc = 0
    if args.cmd == "status":
        with Ledger(args.ledger, readonly=True) as led:
            for rid in args.ids or led.requests():
                st = led.status(rid)
                print(f"{rid}\t{st.state}\t{st.content_hash[:16]}" + (f"\t{st.reason}" if st.reason else ""))
        return 0
    with Ledger(args.ledger) as led:
        if args.cmd == "submit":
            for f in args.files:
                try:
                    print(f"{f}: {submit(led, f)[2]}")
                except RequestError as e:
                    print(f"error: {e}", file=sys.stderr)
                    rc = 2
        else:
            changed = led.revoke(args.id, reason=args.reason)
            print(f"{args.id}: {'revoked' if changed else 'already revoked'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
