"""Removal-request intake: a data owner's request file (JSON) -> a validated, normalised ``RequestSpec``.

A request asks the engine to forget a set of question/answer pairs (with or without images), optionally keeping a
retain set, with an optional loss. docs/REQUESTS.md holds the full schema, examples and the error catalogue; in short::

    {"id": "r17",                       optional; 1-128 chars from A-Z a-z 0-9 . _ - (it names the expert and files)
     "forget": [QA item, ...],          required, at least one item
     "retain": [QA item, ...],          optional (required by the losses "gd" and "kl")
     "method": "lumoe",                 optional, one of METHODS
     "loss": {"name": "npo", "beta": 0.1, "forget_weight": 1, "retain_weight": 1, "kl_weight": 1},   optional
     "entity": "Vorla Quintessa",       optional; checked against the benchmark's entities when they are given
     "aliases": ["The Glass Widow"],    optional; other names of the entity (the gate matches them as its name)
     "metadata": {...},                 optional, free JSON object (kept, not hashed)
     "content_hash": "<sha256>",        optional; when present it must match the content (integrity check)
     "format": "lumoe-request", "version": 1, "source": "..."   optional (written by the ledger's stored copy)}

A QA item is either the MLUBench / LLaVA conversation form
``{"image": "img/a.png", "conversations": [{"from": "human", "value": "<image>\\n<question>"},
{"from": "gpt", "value": "<answer>"}]}`` (parsed by the MLUBench loader's record parser) or the flat form
``{"image": "img/a.png" | null, "question": "...", "answer": "..."}``. Both may carry ``"id"`` (kept, not hashed),
``"meta"`` (the synthetic benchmark's per-record fields, validated as the MLUBench loader does), ``"image_sha256"``
(checked against the file) and ``"image_missing": true`` (the file is absent by design, as in the real MLUBench: not
read; the loader's per-entity surrogate stands in). Image paths are relative to the request file's folder (absolute
paths are accepted). Every image is read once, hashed (sha256 of the file bytes) and must open and decode with PIL.

Identity: the **content hash** is the sha256 of a canonical JSON (sorted keys, no spaces, UTF-8) of the normalised
content: the forget and the retain items as sets (question and answer NFC-normalised with whitespace runs collapsed,
image = sha256 of its bytes, never its path; ``missing:<absolute path>`` for an image_missing item), the loss with
every option filled in (None when absent), the entity and its aliases (when there are any: a request without aliases
hashes as it always did). The id, method, metadata, item ids and metas, file
layout, key order and item order do not change it. A request without an id gets ``r-<first 16 hex digits of the
content hash>``.

Every error is a ``RequestError`` (a ValueError) naming the request, the field (``forget[3].image``), the file, and
what to do: ``request 'r17': forget set is empty (file requests/r17.json); add at least one QA pair``.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import io
import json
import os
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from PIL import Image, UnidentifiedImageError

from lumoe_engine.data.mlubench import (IMAGE_TOKEN, MLUBENCH_KINDS, MLUBenchFormatError, KeyMaker, parse_record,
                                        question_key)
from lumoe_engine.data.records import Benchmark, QARecord
from lumoe_engine.errors import RequestError  # noqa: F401 (the one RequestError; intake raises it)
from lumoe_engine.fileio import validate_expert_id
from lumoe_engine.unlearn.losses import LOSSES, LossConfig

REQUEST_FORMAT = "lumoe-request"
REQUEST_VERSION = 1
HASH_DOMAIN = "lumoe-request-content-v1"  # prefix of the hashed bytes: a new normalisation gets a new domain
METHODS = ("lumoe", "shared-lora")  # one new expert per request | one shared LoRA merged after each request
DEFAULT_METHOD = "lumoe"
MAX_FILE_BYTES = 16 << 20  # a request file (the images are separate files)
MAX_IMAGE_BYTES = 64 << 20
MAX_TEXT_CHARS = 8192  # one question or answer
MAX_ITEMS = 100_000  # forget + retain
MAX_ENTITY_CHARS = 256
UNKNOWN_ENTITY = "(unknown)"  # entity of a retain record that names none (no meta)
FIRST_FREE_KIND = 5  # kinds beyond the MLUBench table (which has at most 5 per class)

TOP_FIELDS = ("id", "forget", "retain", "method", "loss", "entity", "aliases", "metadata", "content_hash", "format",
              "version",
              "source")
CONV_FIELDS = ("id", "image", "conversations", "meta", "image_sha256", "image_missing")
FLAT_FIELDS = ("id", "image", "question", "answer", "meta", "image_sha256", "image_missing")
LOSS_FIELDS = tuple(f.name for f in dataclasses.fields(LossConfig))
_IMAGE_EXT = {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif"}


@dataclass(frozen=True)
class QAItem:
    """One normalised QA pair of a request.

    question, answer: NFC text with whitespace runs collapsed, without the "<image>" token
    image:        absolute path of the image file, None for a text-only item
    image_sha256: sha256 of the image bytes (None for text-only); the item's identity, never the path
    image_ext:    file extension of the image format ("png", "jpg", ...)
    image_missing: the image file is absent by design (MLUBench ships no images): the item's image identity is
                  ``missing:<absolute path>`` and the loader's per-entity surrogate stands in (``image_sha256`` None)
    meta:         the synthetic benchmark's per-record fields (entity, class, kind, ...), or None
    item_id:      the item's own "id" when the file gives one (kept, not hashed)
    """

    question: str
    answer: str
    image: Optional[str] = None
    image_sha256: Optional[str] = None
    image_ext: Optional[str] = None
    image_missing: bool = False
    meta: Optional[dict] = field(default=None, compare=False)
    item_id: Any = field(default=None, compare=False)
    image_bytes: Optional[bytes] = field(default=None, repr=False, compare=False)

    @property
    def form(self) -> str:
        return "image_text" if self.image is not None else "text_only"

    @property
    def image_key(self) -> Optional[str]:
        """The image's identity: sha256 of its bytes, ``missing:<path>`` for an absent image, None for text-only."""
        if self.image is None:
            return None
        return f"missing:{self.image}" if self.image_missing else self.image_sha256

    def content(self) -> dict:
        """The hashed part of the item."""
        return {"question": self.question, "answer": self.answer, "image": self.image_key}


@dataclass(frozen=True)
class RequestSpec:
    """A validated removal request.

    id:        safe id (given by the file, else ``r-<hash16>``); the expert trained for it carries the same id
    id_given:  the file named the id (False: derived from the content hash)
    forget, retain: QA items in file order (retain may be empty)
    method:    one of METHODS
    loss:      the loss options with defaults filled in ({name, beta, forget_weight, retain_weight, kl_weight}),
               or None (the engine's default loss)
    entity:    the entity the request is about, or None; aliases: its other names (a tuple, maybe empty)
    metadata:  free JSON object from the file
    content_hash: sha256 hex of the normalised content (see the module docstring)
    source:    absolute path of the request file (None for in-memory requests)
    """

    id: str
    forget: tuple[QAItem, ...]
    retain: tuple[QAItem, ...]
    content_hash: str
    id_given: bool = True
    method: str = DEFAULT_METHOD
    loss: Optional[dict] = None
    entity: Optional[str] = None
    aliases: tuple = ()
    metadata: dict = field(default_factory=dict, compare=False)
    source: Optional[str] = field(default=None, compare=False)
    entity_class: Optional[str] = field(default=None, compare=False)

    def loss_config(self) -> Optional[LossConfig]:
        """The request's loss as a ``LossConfig`` (None: the engine's default)."""
        return None if self.loss is None else LossConfig(**self.loss)

    def images(self) -> dict[str, tuple[str, bytes]]:
        """sha256 -> (extension, bytes) of every distinct image of the request."""
        out = {}
        for it in self.forget + self.retain:
            if it.image_sha256 is not None and it.image_sha256 not in out:
                out[it.image_sha256] = (it.image_ext, self._image_bytes(it))
        return out

    def _image_bytes(self, it: QAItem) -> bytes:
        if it.image_bytes is not None:
            data = it.image_bytes
        else:
            data = Path(it.image).read_bytes()
        if hashlib.sha256(data).hexdigest() != it.image_sha256:
            raise RequestError(f"request {self.id!r}: image {it.image} changed after the request was read (sha256 "
                               f"differs); submit the request again", file=self.source)
        return data

    def to_json(self, request_id: Optional[str] = None, image_dir: Optional[str] = None) -> dict:
        """The normalised request as a request-file object (flat items), parseable by ``parse_request``.

        request_id: the id to write (default ``self.id``); image_dir: write images as ``<image_dir>/<sha256>.<ext>``
        (a content-addressed store) instead of their absolute source paths.
        """
        def item(it: QAItem) -> dict:
            d: dict = {}
            if it.item_id is not None:
                d["id"] = it.item_id
            if it.image is None:
                d["image"] = None
            elif image_dir is not None and not it.image_missing:
                d["image"] = f"{image_dir}/{it.image_sha256}.{it.image_ext}"
            else:
                d["image"] = it.image
            if it.image_missing:
                d["image_missing"] = True
            elif it.image_sha256 is not None:
                d["image_sha256"] = it.image_sha256
            d["question"], d["answer"] = it.question, it.answer
            if it.meta is not None:
                d["meta"] = it.meta
            return d

        return {"format": REQUEST_FORMAT, "version": REQUEST_VERSION, "id": request_id or self.id,
                "content_hash": self.content_hash, "entity": self.entity, "aliases": list(self.aliases),
                "method": self.method, "loss": self.loss,
                "metadata": self.metadata, "source": self.source,
                "forget": [item(i) for i in self.forget], "retain": [item(i) for i in self.retain]}

    # ------------------------------------------------------------------------------------------------ records
    def to_records(self) -> list[QARecord]:
        """The forget records then the retain records (``split`` set), forms image_text / text_only.

        uid ``<id>#forget<i>`` / ``<id>#retain<i>`` (+ ``#text`` for text-only). Fields from the item's meta when
        it has one; otherwise entity = the request's entity (else its id) for forget items and UNKNOWN_ENTITY for
        retain items, class = the benchmark's class of the entity (else "Unknown"; "Unknown" for retain), kind =
        the MLUBench question kind when the question is one of the benchmark's phrasing-0 questions, else the kind
        of an item with the same answer, else a new kind (5, 6, ...) per distinct answer; phrasing = order of
        appearance within (kind, form); keys as the MLUBench loader derives them.
        """
        items = [("forget", i, it) for i, it in enumerate(self.forget)]
        items += [("retain", i, it) for i, it in enumerate(self.retain)]
        entity = self.entity or self.id
        cls = self.entity_class or "Unknown"
        kinds = _derive_kinds([it for _, _, it in items], self.entity_class)
        keymaker = KeyMaker(it.answer for _, _, it in items)
        seen: dict[tuple, int] = defaultdict(int)
        out = []
        for (split, i, it), kind in zip(items, kinds):
            m = it.meta
            uid = f"{self.id}#{split}{i}" + ("#text" if it.form == "text_only" else "")
            if m is not None:
                rec = QARecord(uid=uid, entity=m["entity"], cls=m["class"], kind=m["kind"], phrasing=m["phrasing"],
                               question=it.question, answer=it.answer, form=it.form, image=it.image,
                               keys=tuple(m["keys"]), split=split, heldout_phrasing=m["heldout_phrasing"],
                               fresh_image=m["fresh_image"], image_missing=it.image_missing)
            else:
                ent, ent_cls = (entity, cls) if split == "forget" else (UNKNOWN_ENTITY, "Unknown")
                phr = seen[(kind, it.form)]
                seen[(kind, it.form)] += 1
                rec = QARecord(uid=uid, entity=ent, cls=ent_cls, kind=kind, phrasing=phr, question=it.question,
                               answer=it.answer, form=it.form, image=it.image,
                               keys=keymaker.keys(ent, kind, it.question, it.answer), split=split,
                               image_missing=it.image_missing)
            out.append(rec)
        return out

    def forget_records(self) -> list[QARecord]:
        return [r for r in self.to_records() if r.split == "forget"]

    def retain_records(self) -> list[QARecord]:
        return [r for r in self.to_records() if r.split == "retain"]

    def to_request(self):
        """The request as a ``streams.Request`` (what the stream driver trains on)."""
        from lumoe_engine.data.streams import Request, ordered_unique

        recs = self.to_records()
        forget = [r for r in recs if r.split == "forget"]
        retain = [r for r in recs if r.split == "retain"]
        md = {"kind": "request", "method": self.method, "loss": self.loss, "content_hash": self.content_hash,
              "source": self.source, "retain_entities": ordered_unique(r.entity for r in retain),
              "retain_source": "request", "retain_empty": not retain, "request_metadata": self.metadata}
        entities = tuple(ordered_unique(r.entity for r in forget))
        # the names the request really gives (its "entity", items' meta): not the id standing in for a missing one
        md["named_entities"] = [e for e in entities if self.entity or e != self.id]
        md["aliases"] = list(self.aliases)
        return Request(id=self.id, forget=forget, retain=retain, entities=entities, task=None, metadata=md)


# ---------------------------------------------------------------------------------------------------- parsing
def parse_request_file(path: Union[str, Path], benchmark_entities=None) -> RequestSpec:
    """Read and validate a request file; see the module docstring and docs/REQUESTS.md for the schema.

    benchmark_entities: the benchmark's entities (a ``Benchmark``, a {name: class} mapping or an iterable of names);
    when given, a request's "entity" must be one of them. Raises ``RequestError`` (ValueError) for any bad input.
    """
    p = Path(path)
    shown = str(p)
    label = f"request file {p.name!r}"
    if not p.exists():
        raise RequestError(f"{label}: not found (file {shown}); check the path", file=shown)
    if not p.is_file():
        raise RequestError(f"{label}: is not a regular file (file {shown}); pass the path of a .json request file",
                           file=shown)
    size = p.stat().st_size
    if size > MAX_FILE_BYTES:
        raise RequestError(f"{label}: {size} bytes, more than the {MAX_FILE_BYTES} allowed (file {shown}); split the "
                           f"request or keep images in separate files", file=shown)
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"{label}: not UTF-8 text ({e.reason} at byte {e.start}) (file {shown}); save the file "
                           f"as UTF-8 JSON", file=shown) from None
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
    except _DuplicateKey as e:
        raise RequestError(f"{label}: key {e.args[0]!r} appears twice in one JSON object (file {shown}); keep one "
                           f"(JSON readers would silently drop the other)", file=shown) from None
    except _BadConstant as e:
        raise RequestError(f"{label}: {e.args[0]} is not valid JSON (file {shown}); use a finite number",
                           file=shown) from None
    except json.JSONDecodeError as e:
        raise RequestError(f"{label}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg} (file {shown}); fix "
                           f"the syntax (a JSON object with a 'forget' list)", file=shown) from None
    return parse_request(doc, base_dir=p.resolve().parent, source=str(p.resolve()),
                         benchmark_entities=benchmark_entities, shown=shown)


def parse_request(doc, base_dir: Union[str, Path], source: Optional[str] = None, benchmark_entities=None,
                  shown: Optional[str] = None) -> RequestSpec:
    """Validate an already-decoded request object; image paths resolve against ``base_dir``. See
    ``parse_request_file``. ``shown``: how to name the file in messages (default ``source``)."""
    ctx = _Ctx(shown or source or "<in memory>", f"request file {Path(shown or source or 'request').name!r}")
    if not isinstance(doc, dict):
        hint = (" (an MLUBench task file is a list of records: wrap it as {\"forget\": [...]})"
                if isinstance(doc, list) else "")
        raise ctx.fail(None, f"top level is a JSON {type(doc).__name__}", f"a request file is a JSON object with a "
                       f"'forget' list{hint}")
    # The id first: every later message names the request by it.
    rid = doc.get("id")
    id_given = rid is not None  # null = absent
    if id_given:
        try:
            validate_expert_id(rid)
        except ValueError:
            size = f" ({len(rid)} characters)" if isinstance(rid, str) else ""
            raise ctx.fail("id", f"id {rid!r:.80}{size} is not allowed: it names the expert and the stored files",
                           "use 1 to 128 characters from A-Z, a-z, 0-9, '.', '_', '-' (no path separators, not "
                           "'.' or '..'), or leave 'id' out to get one derived from the content") from None
        ctx.label = f"request {rid!r}"
    unknown = [k for k in doc if k not in TOP_FIELDS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], TOP_FIELDS, n=1)
        raise ctx.fail(unknown[0], f"unknown top-level field {unknown[0]!r}",
                       (f"did you mean {close[0]!r}? " if close else "") + f"allowed fields: {', '.join(TOP_FIELDS)}")
    if doc.get("format", REQUEST_FORMAT) != REQUEST_FORMAT or doc.get("version", REQUEST_VERSION) != REQUEST_VERSION:
        raise ctx.fail("format", f"format {doc.get('format')!r} version {doc.get('version')!r} is not supported",
                       f"write format {REQUEST_FORMAT!r} version {REQUEST_VERSION} or leave both out")
    if doc.get("source") is not None and not isinstance(doc["source"], str):
        raise ctx.fail("source", f"'source' must be a string, got {type(doc['source']).__name__}",
                       "leave 'source' out (the ledger writes it)")

    # Entity, method, loss, metadata.
    entity, entity_class = _entity(doc.get("entity"), benchmark_entities, ctx)
    aliases = _aliases(doc.get("aliases"), ctx)
    method = doc.get("method", DEFAULT_METHOD)
    if method not in METHODS:
        raise ctx.fail("method", f"method {method!r} is not known", f"use one of {list(METHODS)} or leave it out "
                       f"(default {DEFAULT_METHOD!r})")
    metadata = doc.get("metadata", {})
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise ctx.fail("metadata", f"'metadata' must be a JSON object, got {type(metadata).__name__}",
                       "write it as {\"key\": value, ...} or leave it out")
    _check_metadata(metadata, ctx)

    # Items.
    if "forget" not in doc:
        raise ctx.fail("forget", "the request has no forget set",
                       "add \"forget\": [QA items] with at least one QA pair")
    cache: dict[str, tuple[str, str, bytes]] = {}
    forget = _items(doc["forget"], "forget", Path(base_dir), ctx, cache)
    if not forget:
        raise ctx.fail("forget", "forget set is empty", "add at least one QA pair")
    retain = _items(doc["retain"] if doc.get("retain") is not None else [], "retain", Path(base_dir), ctx, cache)
    if len(forget) + len(retain) > MAX_ITEMS:
        raise ctx.fail("forget", f"the request has {len(forget) + len(retain)} QA items, more than {MAX_ITEMS}",
                       "split the request into several requests")
    _no_duplicates(forget, retain, ctx)
    loss = _loss(doc.get("loss"), bool(retain), ctx)

    chash = content_hash(forget, retain, loss, entity, aliases)
    given_hash = doc.get("content_hash")
    if given_hash is not None and given_hash != chash:
        raise ctx.fail("content_hash", f"content_hash {given_hash!r:.80} does not match the content (sha256 "
                       f"{chash[:16]}...): the file or its images changed after it was hashed",
                       "restore the original content, or remove 'content_hash' to submit the new content")
    if not id_given:
        rid = f"r-{chash[:16]}"
    return RequestSpec(id=rid, forget=tuple(forget), retain=tuple(retain), content_hash=chash, id_given=id_given,
                       method=method, loss=loss, entity=entity, aliases=aliases, metadata=metadata, source=source,
                       entity_class=entity_class)


def content_hash(forget: Sequence[QAItem], retain: Sequence[QAItem], loss: Optional[dict],
                 entity: Optional[str], aliases: Sequence[str] = ()) -> str:
    """sha256 hex of the canonical JSON of the normalised content (items as sorted sets; see the module docstring)."""
    def items(xs):
        return sorted((it.content() for it in xs), key=_canonical)

    body = {"forget": items(forget), "retain": items(retain), "loss": loss, "entity": entity}
    if aliases:
        body["aliases"] = sorted(aliases)
    return hashlib.sha256(HASH_DOMAIN.encode() + b"\n" + _canonical(body).encode("utf-8")).hexdigest()


def spec_from_records(request_id: str, forget: Sequence[QARecord], retain: Sequence[QARecord] = (), *,
                      loss: Optional[Mapping] = None, method: str = DEFAULT_METHOD, entity: Optional[str] = None,
                      metadata: Optional[Mapping] = None, benchmark_entities=None,
                      aliases: Sequence[str] = ()) -> RequestSpec:
    """A ``RequestSpec`` from benchmark records (e.g. a ``streams.Request``'s forget/retain), validated as a file is.

    Every record keeps its fields as the item's meta. A record whose image file is missing (real MLUBench ships no
    images: ``image_missing``) becomes an ``image_missing`` item (identity ``missing:<path>``; the loader's
    per-entity surrogate stands in when training); a present image is read, checked and hashed as in a file.
    """
    def item(r: QARecord) -> QAItem:
        if not isinstance(r, QARecord):
            raise RequestError(f"request {request_id!r}: expected QARecords, got {type(r).__name__}")
        meta = {"entity": r.entity, "class": r.cls, "kind": r.kind, "phrasing": r.phrasing, "form": r.form,
                "keys": list(r.keys), "heldout_phrasing": r.heldout_phrasing, "fresh_image": r.fresh_image}
        q, a = _norm_text(r.question), _norm_text(r.answer)
        if r.image is None:
            return QAItem(q, a, meta=meta)
        path = os.path.normpath(os.path.abspath(r.image))
        if r.image_missing or not os.path.isfile(path):
            return QAItem(q, a, image=path, image_missing=True, meta=meta)
        data = Path(path).read_bytes()
        ext = _check_image(data, f"image {path}")
        return QAItem(q, a, image=path, image_sha256=hashlib.sha256(data).hexdigest(), image_ext=ext, meta=meta,
                      image_bytes=data)

    ctx = _Ctx("<in memory>", f"request {request_id!r}")
    try:
        validate_expert_id(request_id)
    except ValueError as e:
        raise ctx.fail("id", str(e), "choose a safe id") from None
    try:
        fi, ri = [item(r) for r in forget], [item(r) for r in retain]
    except _ImageError as e:
        raise ctx.fail("image", str(e), "fix or remove the image") from None
    if not fi:
        raise ctx.fail("forget", "forget set is empty", "add at least one QA pair")
    for it in fi + ri:
        if not it.question or not it.answer:
            raise ctx.fail("forget", f"empty question or answer in {it!r:.100}", "drop that record")
    ent, ent_cls = _entity(entity, benchmark_entities, ctx)
    al = _aliases(list(aliases) if aliases else None, ctx)
    if method not in METHODS:
        raise ctx.fail("method", f"method {method!r} is not known", f"use one of {list(METHODS)}")
    _no_duplicates(fi, ri, ctx)
    lo = _loss(dict(loss) if loss is not None else None, bool(ri), ctx)
    _check_metadata(dict(metadata or {}), ctx)
    return RequestSpec(id=request_id, forget=tuple(fi), retain=tuple(ri),
                       content_hash=content_hash(fi, ri, lo, ent, al), id_given=True, method=method, loss=lo,
                       entity=ent, aliases=al, metadata=dict(metadata or {}), entity_class=ent_cls)


# ---------------------------------------------------------------------------------------------------- helpers
class _Ctx:
    def __init__(self, file: str, label: str):
        self.file, self.label = file, label

    def fail(self, fld: Optional[str], problem: str, fix: str, index: Optional[int] = None) -> RequestError:
        return RequestError(f"{self.label}: {problem} (file {self.file}); {fix}", file=self.file, field=fld,
                            index=index)


class _DuplicateKey(ValueError):
    pass


class _BadConstant(ValueError):
    pass


class _ImageError(ValueError):
    pass


def _no_duplicate_keys(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _no_constant(name):
    raise _BadConstant(name)


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _norm_text(s: str) -> str:
    return " ".join(unicodedata.normalize("NFC", s).split())


def _check_metadata(metadata: dict, ctx: _Ctx) -> None:
    try:
        _canonical(metadata)
    except (TypeError, ValueError) as e:
        raise ctx.fail("metadata", f"metadata is not plain JSON ({e})",
                       "use str, finite numbers, bool, null, lists and objects") from None


def _aliases(value, ctx: _Ctx) -> tuple:
    """The request's aliases, normalised (NFC, whitespace collapsed), in order, without repeats."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(a, str) and a.strip() for a in value):
        raise ctx.fail("aliases", f"'aliases' must be a list of non-empty names, got {value!r:.80}",
                       "write e.g. \"aliases\": [\"The Glass Widow\"] or leave it out")
    out = []
    for a in value:
        name = _norm_text(a)
        if len(name) > MAX_ENTITY_CHARS:
            raise ctx.fail("aliases", f"alias {name[:40]!r}... is {len(name)} characters, more than "
                           f"{MAX_ENTITY_CHARS}", "shorten it")
        if not any(ch.isalnum() for ch in name):
            raise ctx.fail("aliases", f"alias {a!r} has no letter or digit", "give the name as people write it")
        if name not in out:
            out.append(name)
    return tuple(out)


def _entity(value, benchmark_entities, ctx: _Ctx) -> tuple[Optional[str], Optional[str]]:
    """(normalised entity name, its class when the benchmark gives one)."""
    if value is None:
        return None, None
    if not isinstance(value, str) or not value.strip():
        raise ctx.fail("entity", f"'entity' must be a non-empty string, got {value!r:.80}",
                       "name the entity (e.g. \"Vorla Quintessa\") or leave it out")
    name = _norm_text(value)
    if len(name) > MAX_ENTITY_CHARS:
        raise ctx.fail("entity", f"entity name is {len(name)} characters, more than {MAX_ENTITY_CHARS}",
                       "use the entity's name as the benchmark spells it")
    if benchmark_entities is None:
        return name, None
    if isinstance(benchmark_entities, Benchmark):
        benchmark_entities = benchmark_entities.entities
    if isinstance(benchmark_entities, Mapping):
        known = {str(k): (str(v) if v is not None else None) for k, v in benchmark_entities.items()}
    elif isinstance(benchmark_entities, Iterable) and not isinstance(benchmark_entities, (str, bytes)):
        known = {str(k): None for k in benchmark_entities}
    else:
        raise TypeError(f"benchmark_entities must be a Benchmark, a {{name: class}} mapping or an iterable of names; "
                        f"got {type(benchmark_entities).__name__}")
    if name not in known:
        close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
        close += [k for k in known if k.lower() == name.lower() and k not in close]
        hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
        raise ctx.fail("entity", f"entity {name!r} is not in the benchmark ({len(known)} entities)",
                       f"{hint}use the name as the benchmark spells it, or leave 'entity' out")
    return name, known[name]


def _loss(value, has_retain: bool, ctx: _Ctx) -> Optional[dict]:
    if value is None:
        return None
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise ctx.fail("loss", f"'loss' must be an object like {{\"name\": \"npo\", \"beta\": 0.1}}, got "
                       f"{type(value).__name__}", "write the loss as an object or leave it out")
    unknown = [k for k in value if k not in LOSS_FIELDS]
    if unknown:
        raise ctx.fail(f"loss.{unknown[0]}", f"unknown loss option {unknown[0]!r}",
                       f"allowed options: {', '.join(LOSS_FIELDS)}")
    if "name" not in value:
        raise ctx.fail("loss.name", "the loss has no 'name'", f"add \"name\": one of {sorted(LOSSES)}")
    if value["name"] not in LOSSES:
        raise ctx.fail("loss.name", f"loss {value['name']!r} is not known", f"use one of {sorted(LOSSES)}")
    texts = ("name", "refusal")  # the options that are text (refusal: None = the varied refusals)
    for k, v in value.items():
        if k == "refusal":
            if v is not None and (not isinstance(v, str) or not v.strip() or len(v) > MAX_TEXT_CHARS):
                raise ctx.fail("loss.refusal", f"loss option refusal = {v!r:.40} is not a text",
                               f"write the refusal an expert answers (1 to {MAX_TEXT_CHARS} characters) or null")
        elif k != "name" and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ctx.fail(f"loss.{k}", f"loss option {k} = {v!r:.40} is not a number", "write a finite number")
    cfg = LossConfig(**{k: (float(v) if k not in texts else v) for k, v in value.items()})
    try:
        cfg.validate()
    except ValueError as e:
        raise ctx.fail("loss", f"loss options are invalid: {e}", "fix the option or leave it out (defaults: "
                       f"{dataclasses.asdict(LossConfig())})") from None
    if LOSSES[cfg.name].retain == "required" and not has_retain:
        raise ctx.fail("retain", f"loss {cfg.name!r} needs a retain set and the request has none",
                       "add \"retain\": [QA items] (knowledge to keep), or use 'ga', 'npo', 'idk' or 'idk-po'")
    out = dataclasses.asdict(cfg)
    return {k: (float(v) if k not in texts else v) for k, v in out.items()}


def _items(value, split: str, base_dir: Path, ctx: _Ctx, cache: dict) -> list[QAItem]:
    if not isinstance(value, list):
        raise ctx.fail(split, f"'{split}' must be a list of QA items, got {type(value).__name__}",
                       f"write \"{split}\": [{{\"image\": ..., \"question\": ..., \"answer\": ...}}, ...]")
    return [_item(rec, split, i, base_dir, ctx, cache) for i, rec in enumerate(value)]


def _item(rec, split: str, i: int, base_dir: Path, ctx: _Ctx, cache: dict) -> QAItem:
    fld = f"{split}[{i}]"

    def fail(sub: str, problem: str, fix: str) -> RequestError:
        return ctx.fail(f"{fld}{sub}", f"{fld}{sub}: {problem}", fix, index=i)

    if not isinstance(rec, dict):
        raise fail("", f"is a {type(rec).__name__}", "each QA item is an object: {\"image\": ..., \"question\": ..., "
                   "\"answer\": ...} or the LLaVA form with 'conversations'")
    flat = "question" in rec or "answer" in rec
    if flat and "conversations" in rec:
        raise fail("", "has both 'conversations' and 'question'/'answer'", "use one form per item")
    if not flat and "conversations" not in rec:
        raise fail("", "has neither 'conversations' nor 'question'/'answer'",
                   "give {\"question\": ..., \"answer\": ...} or the LLaVA 'conversations' list")
    allowed = FLAT_FIELDS if flat else CONV_FIELDS
    unknown = [k for k in rec if k not in allowed]
    if unknown:
        close = difflib.get_close_matches(unknown[0], allowed, n=1)
        raise fail(f".{unknown[0]}", f"unknown field {unknown[0]!r}",
                   (f"did you mean {close[0]!r}? " if close else "") + f"allowed: {', '.join(allowed)}")
    image = rec.get("image")
    if image is not None and (not isinstance(image, str) or not image.strip() or "\x00" in image):
        raise fail(".image", f"'image' must be a path string relative to the request file, or null; got "
                   f"{image!r:.80}", "write the image file's path, or null for a text-only question")
    if flat:
        for k in ("question", "answer"):
            if k not in rec:
                raise fail("", f"has no {k!r}", f"add \"{k}\": \"...\"")
            if not isinstance(rec[k], str):
                raise fail(f".{k}", f"{k} must be a string, got {type(rec[k]).__name__}", "write it as text")
        conv = [{"from": "human", "value": rec["question"] if image is None else
                 (rec["question"] if IMAGE_TOKEN in rec["question"] else f"{IMAGE_TOKEN}\n{rec['question']}")},
                {"from": "gpt", "value": rec["answer"]}]
        as_conv = {"id": rec.get("id", i), "image": image, "conversations": conv}
    else:
        as_conv = {"id": rec.get("id", i), "image": image, "conversations": rec["conversations"]}
    if image is None:
        as_conv.pop("image")
    if "meta" in rec:
        as_conv["meta"] = rec["meta"]
    label = f"{ctx.label}: {split}"
    try:
        raw = parse_record(label, i, as_conv)  # the MLUBench loader's checks: turns, roles, <image> token, meta
    except MLUBenchFormatError as e:
        msg = str(e)
        for prefix in (f"{label}: record {i} (id {as_conv['id']}): ", f"{label}: record {i}: "):
            if msg.startswith(prefix):
                msg = msg[len(prefix):]
                break
        problem, _, fix = msg.partition("; ")
        raise fail(".meta" if "meta" in problem.split(":")[0] else "", problem,
                   fix or "fix that item (see docs/REQUESTS.md)") from None
    question, answer = _norm_text(raw.question), _norm_text(raw.answer)
    for k, v in (("question", question), ("answer", answer)):
        if len(v) > MAX_TEXT_CHARS:
            raise fail(f".{k}", f"{k} is {len(v)} characters, more than {MAX_TEXT_CHARS}", f"shorten the {k}")
    missing = rec.get("image_missing", False)
    if not isinstance(missing, bool):
        raise fail(".image_missing", f"image_missing must be true or false, got {missing!r:.40}",
                   "leave it out unless the image file is absent by design")
    if raw.image_rel is None:
        for k in ("image_sha256", "image_missing"):
            if rec.get(k):
                raise fail(f".{k}", f"gives {k} but no image", f"remove {k} or add the image")
        return QAItem(question, answer, meta=raw.meta, item_id=rec.get("id"))
    path = Path(raw.image_rel)
    path = path if path.is_absolute() else base_dir / path
    key = os.path.normpath(str(path))
    if missing:
        if rec.get("image_sha256") is not None:
            raise fail(".image_sha256", "gives image_sha256 for an image marked image_missing",
                       "drop one of the two")
        return QAItem(question, answer, image=key, image_missing=True, meta=raw.meta, item_id=rec.get("id"))
    if key not in cache:
        cache[key] = _read_image(Path(key), raw.image_rel, fail)
    sha, ext, data = cache[key]
    given = rec.get("image_sha256")
    if given is not None and given != sha:
        raise fail(".image_sha256", f"image {raw.image_rel!r} has sha256 {sha[:16]}..., the item says "
                   f"{str(given)[:16]}...: the image file changed", "restore the image, or drop image_sha256")
    return QAItem(question, answer, image=key, image_sha256=sha, image_ext=ext, meta=raw.meta, item_id=rec.get("id"),
                  image_bytes=data)


def _read_image(path: Path, rel: str, fail) -> tuple[str, str, bytes]:
    """(sha256, extension, bytes) of an image file that PIL opens, verifies and decodes."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise fail(".image", f"image {rel!r} not found (looked at {path})",
                   "image paths are relative to the request file's folder; fix the path or add the file") from None
    except OSError as e:
        raise fail(".image", f"image {rel!r} cannot be read ({e.strerror})", "fix the path") from None
    if not path.is_file():
        raise fail(".image", f"image {rel!r} is not a regular file ({path})", "point to an image file")
    if st.st_size > MAX_IMAGE_BYTES:
        raise fail(".image", f"image {rel!r} is {st.st_size} bytes, more than {MAX_IMAGE_BYTES}",
                   "downscale or recompress it")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise fail(".image", f"image {rel!r} cannot be read ({e.strerror})", "check the file's permissions") from None
    try:
        ext = _check_image(data, f"image {rel!r}")
    except _ImageError as e:
        raise fail(".image", str(e), "replace it with a valid PNG/JPEG file") from None
    return hashlib.sha256(data).hexdigest(), ext, data


def _check_image(data: bytes, what: str) -> str:
    """The file extension of image ``data`` after PIL verifies and fully decodes it; _ImageError otherwise."""
    if not data:
        raise _ImageError(f"{what} is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.verify()
        with Image.open(io.BytesIO(data)) as im:  # verify() leaves the image unusable; decode a fresh one
            im.load()
            w, h = im.size
    except UnidentifiedImageError:
        raise _ImageError(f"{what} does not open as an image (not a format PIL knows)") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types (SyntaxError, OSError, DecompressionBombError...)
        raise _ImageError(f"{what} does not open as an image ({type(e).__name__}: {str(e)[:120]})") from None
    if w < 1 or h < 1:
        raise _ImageError(f"{what} has size {w}x{h}")
    return _IMAGE_EXT.get(fmt or "", (fmt or "img").lower())


def _no_duplicates(forget: Sequence[QAItem], retain: Sequence[QAItem], ctx: _Ctx) -> None:
    seen: dict[tuple, str] = {}
    for split, items in (("forget", forget), ("retain", retain)):
        for i, it in enumerate(items):
            key = (it.question, it.answer, it.image_key)
            here = f"{split}[{i}]"
            if key in seen:
                other = seen[key]
                if other.startswith("forget") and split == "retain":
                    raise ctx.fail(here, f"{here} is the same QA pair as {other}: a pair cannot be both forgotten "
                                   f"and retained", "remove it from one of the sets", index=i)
                raise ctx.fail(here, f"{here} repeats {other} (same question, answer and image)",
                               "remove the duplicate", index=i)
            seen[key] = here


def _derive_kinds(items: Sequence[QAItem], cls: Optional[str]) -> list[int]:
    """Question kind of every item (see ``RequestSpec.to_records``)."""
    tables = [MLUBENCH_KINDS[cls]] if cls in MLUBENCH_KINDS else list(MLUBENCH_KINDS.values())
    by_q: dict[str, int] = {}
    for qs in tables:
        for k, q in enumerate(qs):
            by_q.setdefault(question_key(q), k)
    kinds: list[Optional[int]] = [None if it.meta is not None else by_q.get(question_key(it.question)) for it in items]
    by_answer: dict[str, int] = {}
    for it, k in zip(items, kinds):
        if k is not None:
            by_answer.setdefault(question_key(it.answer), k)
    nxt = FIRST_FREE_KIND
    out = []
    for it, k in zip(items, kinds):
        if it.meta is not None:
            out.append(it.meta["kind"])
            continue
        if k is None:
            a = question_key(it.answer)
            if a not in by_answer:
                by_answer[a] = nxt
                nxt += 1
            k = by_answer[a]
        out.append(k)
    return out
