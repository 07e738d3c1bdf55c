"""Expert bank: one LoRA expert per unlearning request — storage on disk, residency in memory, peft interop.

An expert is a LoRA adapter (rank r, alpha; scale = alpha / r) over some target linears of the base model, named by
their full dotted path (``model.language_model.layers.0.self_attn.q_proj``): ``delta(x) = scale * (x @ A^T) @ B^T``.

Legend: E resident experts (slots in use), C slot capacity, r rank of one expert, R max rank (R_max),
H input features of a target linear (H_in), N its output features (H_out).

In memory, every target module keeps stacked weights in the layout of the grouped LoRA kernels (docs/KERNELS.md,
one slice per module): ``lora_a [1, C, R, H]``, ``lora_b [C, N, R]``, ``ranks [C]`` int32 (0 where the expert has no
weights for that module), ``scales [C]`` fp32. ``stacked(module)`` returns views over the E slots in use.
Adds write into free slots of these buffers (no re-stacking). Slot capacity doubles up to ``slot_chunk`` slots
(1, 2, 4, ..., 64), then grows by ``slot_chunk`` slots at a time (128, 192, ...): the unused tail stays under
``slot_chunk`` slots, so resident bytes per expert tend to the expert's own LoRA bytes (padded to R), where doubling
would waste up to half. Measured (CPU, 16 modules, H = 1024, r = 8: 1 MiB per expert, 320 adds): resident bytes
1.000x the LoRA bytes at full capacity, process RSS growth per added expert 1.00x (in memory) to 1.01x (with files)
between N = 128 and 320. Each growth reallocates and copies every module buffer (amortised over ``slot_chunk`` adds);
``open`` and ``add_many`` size the buffers once, and ``reserve(n)`` allocates n slots ahead (a stream reserves one per
request: every add then writes into a free slot, nothing is reallocated). Slots past the used ones are allocated but
never written until an expert is placed there, so on the CPU they cost no resident memory until used (on a GPU they
are reserved: the plan's resident experts). A larger rank than R re-pads every buffer to the new R (R never shrinks).
``stats`` counts what changes cost: slots written (an add or an LRU load writes one per expert), reallocations and
the bytes they copied. ``to(device, dtype)`` moves the stacks once (e.g. onto the model's GPU in its compute dtype,
where the wrapped linears read them as views).

Routing ids are bank indices (positions in ``ids``, the order of addition); ``slot_of`` translates them (or string
ids) into slots, -1 staying -1. Without a residency limit every expert is resident and slot == bank index. With
``max_resident = K`` at most K experts are resident; ``ensure_resident`` loads the others from disk into the
least-recently-used slots.

On disk (``root``):
  ``root/experts/<id>.safetensors``: tensors ``<module>.lora_A.weight`` [r, H] and ``<module>.lora_B.weight``
  [N, r] in the dtype they were added with; the header metadata holds ``id``, ``rank``, ``alpha`` and the expert's
  metadata (JSON).
  ``root/manifest.json``: format name and version, the experts in order with rank, alpha, file, byte size, sha256,
  module shapes and metadata.
Every write is atomic (temporary file in the same folder, fsync, ``os.replace``, fsync of the folder). An expert
file is written before the manifest that names it, and the manifest is rewritten before a revoked expert's file is
deleted, so a crash leaves at most an unreferenced file (ignored), never a manifest naming a missing file.
Integrity: ``open`` checks that every file exists with the recorded size (cheap, catches truncation); the sha256 is
checked whenever a file is read (eager loading without a residency limit, ``ensure_resident``, ``get``,
``export_peft``), and for all files at once by ``verify()`` or ``open(..., verify=True)``. Only safetensors is read,
never pickle (``safetensors.torch.load`` on the bytes just hashed; ``load_file`` for peft adapters). One writer per
root; not thread-safe.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import load_file as _st_load_file
from safetensors.torch import save as _st_save

from lumoe_engine.fileio import atomic_write, fsync_dir, validate_expert_id  # noqa: F401 (re-exported)

BANK_FORMAT = "lumoe-expert-bank"
BANK_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
EXPERTS_DIR = "experts"
PEFT_PREFIX = "base_model.model."
SLOT_CHUNK = 64

_MODULE_RE = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ----------------------------------------------------------------------------------------------------------- errors

class UnknownExpertError(KeyError):
    """An expert id (or bank index) that the bank does not hold."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else "unknown expert"


class ExpertFileError(ValueError):
    """An expert file (or the manifest) that is missing, truncated, corrupt or inconsistent; names the file."""


class ExpertNotResidentError(LookupError):
    """An expert that exists but whose weights are not in memory; call ``ensure_resident`` first."""


# ----------------------------------------------------------------------------------------------------------- expert

@dataclass
class Expert:
    """One LoRA expert: ``delta_m(x) = (alpha / rank) * (x @ A_m^T) @ B_m^T`` for every target module m.

    id:       str, see ``validate_expert_id``
    rank:     r >= 1, shared by all modules of the expert
    alpha:    finite float; scale = alpha / r
    weights:  {module_name: (A [r, H] float, B [N, r] float)}, module_name the full dotted path in the HF model
    metadata: JSON-serialisable dict (request id, created time, method, loss, ...)
    """

    id: str
    rank: int
    alpha: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    metadata: dict = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(self.weights)

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """{module_name: (H, N)} of the linears this expert adapts."""
        return {m: (int(a.shape[1]), int(b.shape[0])) for m, (a, b) in self.weights.items()}

    def validate(self) -> None:
        """Raise ValueError naming the field (and module) if the expert is malformed or holds NaN/inf weights."""
        validate_expert_id(self.id)
        where = f"expert {self.id!r}"
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"{where}: rank must be an int >= 1, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ValueError(f"{where}: alpha must be a finite number, got {self.alpha!r}")
        if not isinstance(self.weights, Mapping) or not self.weights:
            raise ValueError(f"{where}: weights must be a non-empty dict {{module_name: (A [r, H], B [N, r])}}")
        for name, pair in self.weights.items():
            if not isinstance(name, str) or not _MODULE_RE.fullmatch(name):
                raise ValueError(f"{where}: module name {name!r} must be a dotted module path such as "
                                 f"'model.layers.0.self_attn.q_proj'")
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"{where}, module {name!r}: expected a pair (A [r, H], B [N, r])")
            a, b = pair
            for label, t in (("A", a), ("B", b)):
                if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPES or t.dim() != 2:
                    got = f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t)
                    raise ValueError(f"{where}, module {name!r}: {label} must be a 2-D float tensor, got {got}")
            if a.shape[0] != self.rank or a.shape[1] < 1:
                raise ValueError(f"{where}, module {name!r}: A has shape {tuple(a.shape)}, expected "
                                 f"[r={self.rank}, H>=1]")
            if b.shape[1] != self.rank or b.shape[0] < 1:
                raise ValueError(f"{where}, module {name!r}: B has shape {tuple(b.shape)}, expected "
                                 f"[N>=1, r={self.rank}]")
            for label, t in (("A", a), ("B", b)):
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{where}, module {name!r}: {label} holds NaN or inf values; refusing to store "
                                     f"a diverged expert (retrain it)")
        if not isinstance(self.metadata, Mapping):
            raise ValueError(f"{where}: metadata must be a dict, got {type(self.metadata).__name__}")
        try:
            json.dumps(dict(self.metadata), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: metadata must be JSON-serialisable without NaN/inf ({exc})") from None


def lora_bytes(expert: Expert, dtype: torch.dtype | None = None) -> int:
    """Bytes of the expert's A and B tensors, in ``dtype`` if given, else in their own dtypes."""
    total = 0
    for a, b in expert.weights.values():
        for t in (a, b):
            size = torch.empty((), dtype=dtype).element_size() if dtype is not None else t.element_size()
            total += t.numel() * size
    return total


@dataclass(frozen=True)
class ExpertInfo:
    """What the bank records about an expert (the manifest entry), plus whether it is resident now."""

    id: str
    rank: int
    alpha: float
    modules: dict[str, tuple[int, int]]
    metadata: dict
    file: str | None = None
    sha256: str | None = None
    nbytes: int | None = None
    added: float | None = None
    resident: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


# ------------------------------------------------------------------------------------------------------ file helpers

def _canonical_safetensors(blob: bytes) -> bytes:
    """The same safetensors file with its JSON header written with sorted keys (padded to 8 bytes with spaces, as
    the format asks): safetensors serialises ``__metadata__`` from a hash map whose order changes from one process to
    the next, so without this the same expert gives different bytes (and sha256) in two runs. Tensor offsets are
    relative to the data section, which is left as it is."""
    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + blob[8 + n:]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _safetensors_metadata(data: bytes, path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors payload (8-byte little-endian header size, then a JSON header)."""
    if len(data) < 8:
        raise ExpertFileError(f"{path}: {len(data)} bytes, too short for a safetensors file")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ExpertFileError(f"{path}: safetensors header claims {n} bytes but the file has {len(data) - 8} after "
                              f"the size field (truncated?)")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, ValueError) as exc:
        raise ExpertFileError(f"{path}: safetensors header is not valid JSON ({exc})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def _json_alpha(alpha: float) -> int | float:
    return int(alpha) if float(alpha).is_integer() else float(alpha)


# ------------------------------------------------------------------------------------------------------------- bank

class _ModuleStack:
    """Stacked weights of one target module over the C slots: a [1, C, R, H], b [C, N, R], ranks [C] int32.

    The slots past the ``used`` ones are allocated but never written until an expert is placed there (``_place``
    zeroes a slot before copying into it): on the CPU those pages cost no resident memory until then, so the
    capacity's tail does not inflate the memory an expert adds."""

    __slots__ = ("h_in", "h_out", "a", "b", "ranks")

    def __init__(self, h_in: int, h_out: int, capacity: int, rmax: int, device, dtype, used: int = 0) -> None:
        self.h_in, self.h_out = h_in, h_out
        self.a = torch.empty(1, capacity, rmax, h_in, device=device, dtype=dtype)
        self.b = torch.empty(capacity, h_out, rmax, device=device, dtype=dtype)
        self.a[:, :used].zero_()  # slots in use that this (new) module has no weights for: rank 0, zeros
        self.b[:used].zero_()
        self.ranks = torch.zeros(capacity, device=device, dtype=torch.int32)

    def resize(self, capacity: int, rmax: int, used: int, device=None, dtype=None) -> int:
        """New buffers of ``capacity`` slots padded to ``rmax`` (optionally on another device / dtype) holding the
        ``used`` slots; returns the bytes copied."""
        old_r = self.a.shape[2]
        c, r = min(used, capacity), min(old_r, rmax)
        device = self.a.device if device is None else device
        dtype = self.a.dtype if dtype is None else dtype
        a = torch.empty(1, capacity, rmax, self.h_in, device=device, dtype=dtype)
        b = torch.empty(capacity, self.h_out, rmax, device=device, dtype=dtype)
        ranks = torch.zeros(capacity, device=device, dtype=torch.int32)
        a[:, :c, :r] = self.a[:, :c, :r]
        b[:c, :, :r] = self.b[:c, :, :r]
        if rmax > r:  # rank growth: the new padding of the used slots is zero
            a[:, :c, r:].zero_()
            b[:c, :, r:].zero_()
        ranks[:c] = self.ranks[:c]
        self.a, self.b, self.ranks = a, b, ranks
        return c * r * (self.h_in + self.h_out) * a.element_size()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a, self.b, self.ranks))


class ExpertBank:
    """The experts of all requests: stacked resident weights per target module, files on disk, peft interop.

    root:         folder of the bank (``manifest.json``, ``experts/``), or None for an in-memory bank
    max_resident: K, the most experts whose weights are in memory at once (None: all; needs ``root`` otherwise)
    device/dtype: of the stacked buffers (files keep the dtype the experts were added with)
    slot_chunk:   slot growth step once the capacity reaches it (see the module docstring)
    durable:      fsync every write (default); False keeps writes atomic but skips fsync (scratch banks, benchmarks)

    ``ExpertBank(root)`` creates a new bank (refused if ``root`` already holds one); ``ExpertBank.open(root)``
    loads one. Every failed call leaves the bank unchanged, in memory and on disk.
    """

    def __init__(self, root: Path | str | None, max_resident: int | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, slot_chunk: int = SLOT_CHUNK, durable: bool = True) -> None:
        self._setup(root, max_resident, device, dtype, slot_chunk, durable)
        if self.root is not None:
            manifest = self.root / MANIFEST_NAME
            if manifest.exists():
                raise FileExistsError(f"{manifest} exists: {self.root} already holds an expert bank; load it with "
                                      f"ExpertBank.open({str(self.root)!r})")
            self._experts_dir.mkdir(parents=True, exist_ok=True)
            self._write_manifest(self._entries.values())

    def _setup(self, root, max_resident, device, dtype, slot_chunk, durable) -> None:
        if max_resident is not None:
            if isinstance(max_resident, bool) or not isinstance(max_resident, int) or max_resident < 1:
                raise ValueError(f"max_resident must be None or an int >= 1, got {max_resident!r}")
            if root is None:
                raise ValueError("max_resident needs a root folder: evicted experts are reloaded from disk; "
                                 "pass root=... or max_resident=None")
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {_FLOAT_DTYPES}, got {dtype}")
        if isinstance(slot_chunk, bool) or not isinstance(slot_chunk, int) or slot_chunk < 1:
            raise ValueError(f"slot_chunk must be an int >= 1, got {slot_chunk!r}")
        self.root = Path(root) if root is not None else None
        self._experts_dir = self.root / EXPERTS_DIR if self.root is not None else None
        self.max_resident = max_resident
        self.device = torch.device(device)
        self.dtype = dtype
        self.slot_chunk = slot_chunk
        self.durable = bool(durable)
        self.version = 0
        self._entries: OrderedDict[str, ExpertInfo] = OrderedDict()
        self._position: dict[str, int] = {}
        self._module_shapes: dict[str, tuple[int, int]] = {}
        self._stacks: dict[str, _ModuleStack] = {}
        self._capacity = 0
        self._rmax = 0
        self._scales = torch.zeros(0, device=self.device, dtype=torch.float32)
        self._slot_ids: list[str] = []  # slot -> expert id
        self._slot: dict[str, int] = {}  # expert id -> slot
        self._lru: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self._table_cache: dict[torch.device, torch.Tensor] = {}
        self._table_version = -1
        # what changes cost: slots written (an add or an LRU load writes one per expert), buffer reallocations (a
        # capacity or rank growth, or a move) and the bytes they copied
        self.stats = {"slot_writes": 0, "reallocations": 0, "bytes_copied": 0}

    # ------------------------------------------------------------------------------------------------------ open

    @classmethod
    def open(cls, root: Path | str, max_resident: int | None = None, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, slot_chunk: int = SLOT_CHUNK, verify: bool = False,
             create: bool = False, durable: bool = True) -> "ExpertBank":
        """Load the bank at ``root``: manifest, existence and size of every file; sha256 of all when ``verify``.

        Without a residency limit every expert is loaded now (and its sha256 checked); with ``max_resident`` none
        is, until ``ensure_resident``. ``create=True`` makes a new bank when ``root`` holds none.
        """
        root = Path(root)
        manifest = root / MANIFEST_NAME
        if not manifest.exists():
            if create:
                return cls(root, max_resident=max_resident, device=device, dtype=dtype, slot_chunk=slot_chunk,
                           durable=durable)
            raise FileNotFoundError(f"{manifest} not found: {root} holds no expert bank; create one with "
                                    f"ExpertBank({str(root)!r}) or ExpertBank.open(..., create=True)")
        bank = cls.__new__(cls)
        bank._setup(root, max_resident, device, dtype, slot_chunk, durable)
        entries = bank._read_manifest(manifest)
        for e in entries:
            path = bank._experts_dir / e.file
            if not path.is_file():
                raise ExpertFileError(f"expert {e.id!r}: file {path} named by {manifest} is missing; restore it "
                                      f"from a backup, or drop the entry from the manifest (that revokes the expert)")
            size = path.stat().st_size
            if size != e.nbytes:
                raise ExpertFileError(f"expert {e.id!r}: file {path} has {size} bytes but {manifest} records "
                                      f"{e.nbytes} (truncated or replaced); restore it from a backup")
        for e in entries:
            bank._register(e)
        if verify:
            bank.verify()
        if bank.max_resident is None:
            loaded = [(e, bank._read_expert_file(e)) for e in entries]
            bank._ensure_capacity(len(loaded))
            for e, weights in loaded:
                bank._place(e, weights, bank._new_slot(e.id))
        bank.version = 1
        return bank

    def _read_manifest(self, manifest: Path) -> list[ExpertInfo]:
        try:
            doc = json.loads(manifest.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ExpertFileError(f"{manifest}: cannot be read as JSON ({exc}); restore it from a backup") from None
        if not isinstance(doc, dict) or doc.get("format") != BANK_FORMAT:
            raise ExpertFileError(f"{manifest}: not an expert bank manifest (expected format {BANK_FORMAT!r})")
        if doc.get("version") != BANK_FORMAT_VERSION:
            raise ExpertFileError(f"{manifest}: format version {doc.get('version')!r}, this engine reads version "
                                  f"{BANK_FORMAT_VERSION}")
        raw = doc.get("experts")
        if not isinstance(raw, list):
            raise ExpertFileError(f"{manifest}: 'experts' must be a list")
        entries: list[ExpertInfo] = []
        seen: set[str] = set()
        shapes: dict[str, tuple[int, int]] = {}
        for i, item in enumerate(raw):
            where = f"{manifest}, experts[{i}]"
            try:
                eid = validate_expert_id(item.get("id"))
                rank, alpha = item["rank"], item["alpha"]
                modules = {str(m): (int(s[0]), int(s[1])) for m, s in item["modules"].items()}
                entry = ExpertInfo(id=eid, rank=rank, alpha=float(alpha), modules=modules,
                                   metadata=dict(item.get("metadata") or {}), file=item["file"],
                                   sha256=str(item["sha256"]), nbytes=int(item["bytes"]),
                                   added=item.get("added"))
            except (AttributeError, KeyError, TypeError, ValueError, IndexError) as exc:
                raise ExpertFileError(f"{where}: malformed entry ({exc})") from None
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1 or not math.isfinite(entry.alpha):
                raise ExpertFileError(f"{where}: rank must be an int >= 1 and alpha finite, got {rank!r}, {alpha!r}")
            if entry.file != f"{eid}.safetensors":
                raise ExpertFileError(f"{where}: file {entry.file!r} must be '{eid}.safetensors'")
            if eid in seen:
                raise ExpertFileError(f"{where}: expert id {eid!r} appears twice")
            seen.add(eid)
            for m, s in modules.items():
                if shapes.setdefault(m, s) != s:
                    raise ExpertFileError(f"{where}: module {m!r} has shape (H, N) = {s}, earlier entries {shapes[m]}")
            entries.append(entry)
        return entries

    # ------------------------------------------------------------------------------------------------- queries

    @property
    def ids(self) -> tuple[str, ...]:
        """Expert ids in bank order (order of addition); routing ids are positions in this tuple."""
        return tuple(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, expert_id: object) -> bool:
        return isinstance(expert_id, str) and expert_id in self._entries

    def index(self, expert_id: str) -> int:
        """Bank index (routing id) of ``expert_id``."""
        self._entry(expert_id)
        return self._position[expert_id]

    def list(self) -> list[ExpertInfo]:
        """Every expert's record, in bank order."""
        return [self.info(eid) for eid in self._entries]

    def info(self, expert_id: str) -> ExpertInfo:
        e = self._entry(expert_id)
        return ExpertInfo(**{**e.__dict__, "modules": dict(e.modules), "metadata": json.loads(json.dumps(e.metadata)),
                             "resident": expert_id in self._slot})

    @property
    def modules(self) -> tuple[str, ...]:
        """Target modules of all experts in the bank."""
        return tuple(self._module_shapes)

    @property
    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """{module_name: (H, N)} over all experts."""
        return dict(self._module_shapes)

    @property
    def max_rank(self) -> int:
        """R: the rank the stacked buffers are padded to."""
        return self._rmax

    @property
    def capacity(self) -> int:
        """C: slots allocated in every module buffer."""
        return self._capacity

    @property
    def resident_ids(self) -> tuple[str, ...]:
        """Resident expert ids, in slot order."""
        return tuple(self._slot_ids)

    @property
    def num_resident(self) -> int:
        return len(self._slot_ids)

    def is_resident(self, expert_id: str) -> bool:
        self._entry(expert_id)
        return expert_id in self._slot

    def resident_bytes(self) -> int:
        """Bytes allocated by the stacked buffers (all C slots of every module, ranks and scales)."""
        return sum(s.nbytes() for s in self._stacks.values()) + self._scales.numel() * self._scales.element_size()

    def slot_bytes(self) -> int:
        """Bytes one resident slot takes in the stacks (every module's A and B padded to R, its rank, the scale)."""
        return sum((self._rmax * (st.h_in + st.h_out)) * st.a.element_size() + 4 for st in self._stacks.values()) + 4

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "ExpertBank":
        """Move the stacks to ``device`` and / or ``dtype`` (e.g. the model's GPU and compute dtype, so that the
        wrapped linears read them as views); the resident slots are copied once. Returns the bank."""
        device = self.device if device is None else torch.device(device)
        dtype = self.dtype if dtype is None else dtype
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {_FLOAT_DTYPES}, got {dtype}")
        if device == self.device and dtype == self.dtype:
            return self
        self._resize_all(self._capacity, device, dtype)
        self._scales = self._scales.to(device)
        self.device, self.dtype = device, dtype
        self._table_cache.clear()
        self.version += 1
        return self

    def reserve(self, capacity: int) -> None:
        """Allocate ``capacity`` slots now (at most ``max_resident``), so that the next adds up to it write into free
        slots without a reallocation. The unwritten slots cost no resident memory on the CPU until used."""
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity must be an int >= 0, got {capacity!r}")
        if self.max_resident is not None:
            capacity = min(capacity, self.max_resident)
        if capacity <= self._capacity:
            return
        self._resize_all(capacity)
        scales = self._scales.new_zeros(capacity)
        scales[:self._capacity] = self._scales
        self._scales, self._capacity = scales, capacity

    def get(self, expert_id: str) -> Expert:
        """The stored expert: read from its file when the bank has a root (the dtype it was added with), else
        copied out of the resident buffers (bank dtype). Does not change residency."""
        e = self._entry(expert_id)
        if self.root is not None:
            weights = self._read_expert_file(e)
        else:
            slot = self._slot[expert_id]
            weights = {}
            for m in e.modules:
                st = self._stacks[m]
                weights[m] = (st.a[0, slot, :e.rank].clone(), st.b[slot, :, :e.rank].clone())
        return Expert(id=e.id, rank=e.rank, alpha=_json_alpha(e.alpha), weights=weights,
                      metadata=json.loads(json.dumps(e.metadata)))

    def stacked(self, module_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views over the E resident slots of one module, in the kernels' layout.

        returns lora_a [1, E, R, H] (bank dtype), lora_b [E, N, R], ranks [E] int32 (0 where the expert has no
        weights for this module), scales [E] fp32. Valid until ``version`` changes.
        """
        st = self._stacks.get(module_name)
        if st is None:
            raise KeyError(f"module {module_name!r} is not a target of any expert in the bank; known modules: "
                           f"{list(self._module_shapes)[:8]}{' ...' if len(self._module_shapes) > 8 else ''}")
        n = len(self._slot_ids)
        return st.a[:, :n], st.b[:n], st.ranks[:n], self._scales[:n]

    def slot_table(self, device: str | torch.device | None = None) -> torch.Tensor:
        """[len(bank)] int64: the slot of each bank index, -1 where the expert is not resident. Cached per version."""
        device = torch.device(device) if device is not None else self.device
        if self._table_version != self.version:
            self._table_cache.clear()
            self._table_version = self.version
        table = self._table_cache.get(device)
        if table is None:
            host = torch.full((len(self._entries),), -1, dtype=torch.int64)
            for eid, slot in self._slot.items():
                host[self._position[eid]] = slot
            table = self._table_cache[device] = host.to(device)
        return table

    def slot_of(self, expert_ids: torch.Tensor | Sequence[str | None], check: bool = True) -> torch.Tensor:
        """Translate experts into resident slots, -1 staying -1.

        expert_ids: an integer tensor of bank indices (routing ids, any shape, -1 = no expert) -> int64 tensor of
                    the same shape and device; or a sequence of string ids (None = no expert) -> [len] int64 on the
                    bank's device.
        check:      raise if an expert is not resident (ExpertNotResidentError) or an index is out of range; with
                    a tensor this reads one flag back from the device. ``check=False`` maps those to -1.
        """
        if isinstance(expert_ids, torch.Tensor):
            ids = expert_ids
            if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
                raise ValueError(f"expert_ids: expected an integer tensor of bank indices, got {ids.dtype}")
            n = len(self._entries)
            table = self.slot_table(ids.device)
            idx = ids.long()
            valid = (idx >= 0) & (idx < n)
            out = torch.where(valid, table[idx.clamp(0, max(n - 1, 0))] if n else idx, torch.full_like(idx, -1))
            if check:
                bad_range = (idx < -1) | (idx >= n)
                if bool(bad_range.any()):
                    bad = int(idx[bad_range].flatten()[0])
                    raise UnknownExpertError(f"bank index {bad} is out of range: the bank holds {n} experts "
                                             f"(indices 0..{n - 1}, -1 = no expert)")
                missing = valid & (out < 0)
                if bool(missing.any()):
                    miss = sorted({self.ids[int(i)] for i in idx[missing].unique().tolist()})
                    raise ExpertNotResidentError(f"experts {miss[:8]} are not resident; call "
                                                 f"bank.ensure_resident(...) before translating their ids")
            return out
        ids = self._as_id_list(expert_ids)
        slots = []
        for eid in ids:
            if eid is None:
                slots.append(-1)
                continue
            self._entry(eid)
            slot = self._slot.get(eid, -1)
            if slot < 0 and check:
                raise ExpertNotResidentError(f"expert {eid!r} is not resident; call bank.ensure_resident(...) first")
            slots.append(slot)
        return torch.tensor(slots, dtype=torch.int64, device=self.device)

    # ------------------------------------------------------------------------------------------------ residency

    def ensure_resident(self, expert_ids: torch.Tensor | Sequence[str | None]) -> torch.Tensor:
        """Make the named experts resident (loading them from disk into the least-recently-used slots) and return
        ``slot_of(expert_ids)``. Raises ValueError if more than ``max_resident`` distinct experts are requested,
        ExpertFileError (naming the file) if one cannot be loaded; either way nothing changes. With a tensor of
        bank indices the distinct ids are read back to the host (one synchronisation)."""
        wanted = self._distinct(expert_ids)
        if self.max_resident is not None:
            if len(wanted) > self.max_resident:
                raise ValueError(f"ensure_resident: {len(wanted)} distinct experts requested at once but "
                                 f"max_resident is {self.max_resident}; split the batch or raise max_resident")
            missing = [eid for eid in wanted if eid not in self._slot]
            loaded = [(self._entries[eid], self._read_expert_file(self._entries[eid])) for eid in missing]
            if loaded:
                wanted_set = set(wanted)
                self._ensure_capacity(len(self._slot_ids) + len(loaded))
                for e, weights in loaded:
                    self._place(e, weights, self._acquire_slot(e.id, wanted_set))
                self.version += 1
            for eid in wanted:
                self._lru.move_to_end(eid)
        return self.slot_of(expert_ids)

    def _distinct(self, expert_ids) -> list[str]:
        if isinstance(expert_ids, torch.Tensor):
            if expert_ids.dtype.is_floating_point or expert_ids.dtype == torch.bool or expert_ids.is_complex():
                raise ValueError(f"expert_ids: expected an integer tensor of bank indices, got {expert_ids.dtype}")
            n = len(self._entries)
            out = []
            for i in expert_ids.unique().tolist():
                if i == -1:
                    continue
                if not 0 <= i < n:
                    raise UnknownExpertError(f"bank index {i} is out of range: the bank holds {n} experts "
                                             f"(indices 0..{n - 1}, -1 = no expert)")
                out.append(self.ids[i])
            return out
        out = []
        for eid in self._as_id_list(expert_ids):
            if eid is not None:
                self._entry(eid)
                if eid not in out:
                    out.append(eid)
        return out

    @staticmethod
    def _as_id_list(expert_ids) -> list:
        if isinstance(expert_ids, str):
            return [expert_ids]
        ids = list(expert_ids)
        for eid in ids:
            if eid is not None and not isinstance(eid, str):
                raise ValueError(f"expert_ids: expected string ids (or None), or an integer tensor of bank indices; "
                                 f"got {type(eid).__name__} {eid!r}")
        return ids

    # --------------------------------------------------------------------------------------------------- changes

    def add(self, expert: Expert) -> None:
        """Store a new expert (file, then manifest) and make it resident (evicting the least recently used one
        when ``max_resident`` slots are full). Refuses a duplicate id, a malformed expert, NaN/inf weights, or a
        module whose shape differs from the bank's."""
        self.add_many([expert])

    def add_many(self, experts: Iterable[Expert]) -> None:
        """``add`` for several experts with one manifest write (all or none). With ``max_resident = K`` only the
        last K of them are made resident."""
        experts = list(experts)
        shapes = dict(self._module_shapes)
        new_ids: set[str] = set()
        for ex in experts:
            if not isinstance(ex, Expert):
                raise ValueError(f"add: expected an Expert, got {type(ex).__name__}")
            ex.validate()
            if ex.id in self._entries or ex.id in new_ids:
                raise ValueError(f"expert id {ex.id!r} is already in the bank; remove it first or choose another id")
            new_ids.add(ex.id)
            for m, s in ex.module_shapes().items():
                if shapes.setdefault(m, s) != s:
                    raise ValueError(f"expert {ex.id!r}, module {m!r}: (H, N) = {s} but the bank holds {shapes[m]} "
                                     f"for this module; the expert was trained on another model")
        if not experts:
            return
        now = time.time()
        entries, written = [], []
        payloads = []
        for ex in experts:
            data = self._expert_payload(ex) if self.root is not None else b""
            entries.append(ExpertInfo(
                id=ex.id, rank=ex.rank, alpha=float(ex.alpha), modules=ex.module_shapes(),
                metadata=json.loads(json.dumps(dict(ex.metadata))),
                file=f"{ex.id}.safetensors" if self.root is not None else None,
                sha256=_sha256(data) if self.root is not None else None,
                nbytes=len(data) if self.root is not None else None, added=now))
            payloads.append(data)
        if self.root is not None:
            try:
                for e, data in zip(entries, payloads):
                    path = self._experts_dir / e.file
                    atomic_write(path, data, self.durable)
                    written.append(path)
                self._write_manifest([*self._entries.values(), *entries])
            except BaseException:
                for path in written:
                    try:
                        path.unlink()
                    except OSError:
                        pass
                raise
        del payloads
        # memory (nothing below can fail on valid input)
        for e in entries:
            self._register(e)
        place = list(zip(entries, experts))
        if self.max_resident is not None:
            place = place[-self.max_resident:]
        protect = {e.id for e, _ in place}
        self._ensure_capacity(len(self._slot_ids) + len(place))
        for e, ex in place:
            self._place(e, {m: (a.detach(), b.detach()) for m, (a, b) in ex.weights.items()},
                        self._acquire_slot(e.id, protect))
        self.version += 1

    def remove(self, expert_id: str) -> None:
        """Revoke an expert: drop it from the manifest, memory (later slots move down by one) and disk."""
        e = self._entry(expert_id)
        if self.root is not None:
            self._write_manifest([x for x in self._entries.values() if x.id != expert_id])
        del self._entries[expert_id]
        self._position = {eid: i for i, eid in enumerate(self._entries)}
        slot = self._slot.pop(expert_id, None)
        self._lru.pop(expert_id, None)
        if slot is not None:
            n = len(self._slot_ids)
            for st in self._stacks.values():
                st.a[:, slot:n - 1] = st.a[:, slot + 1:n].clone()
                st.b[slot:n - 1] = st.b[slot + 1:n].clone()
                st.ranks[slot:n - 1] = st.ranks[slot + 1:n].clone()
                st.a[:, n - 1].zero_()
                st.b[n - 1].zero_()
                st.ranks[n - 1] = 0
            self._scales[slot:n - 1] = self._scales[slot + 1:n].clone()
            self._scales[n - 1] = 0
            del self._slot_ids[slot]
            self._slot = {eid: s for s, eid in enumerate(self._slot_ids)}
        # modules no expert uses any more are dropped
        used: dict[str, tuple[int, int]] = {}
        for x in self._entries.values():
            used.update(x.modules)
        self._module_shapes = {m: s for m, s in self._module_shapes.items() if m in used}
        self._stacks = {m: st for m, st in self._stacks.items() if m in used}
        self.version += 1
        if self.root is not None:
            path = self._experts_dir / e.file
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise OSError(f"expert {expert_id!r} is revoked (gone from the manifest and memory) but its file "
                              f"{path} could not be deleted ({exc}); delete it by hand") from exc
            if self.durable:
                fsync_dir(self._experts_dir)

    def verify(self, expert_ids: Iterable[str] | None = None) -> None:
        """Check the sha256 of every (or the named) expert file; raise ExpertFileError naming each bad file."""
        if self.root is None:
            return
        bad = []
        for eid in (self.ids if expert_ids is None else list(expert_ids)):
            e = self._entry(eid)
            path = self._experts_dir / e.file
            try:
                data = path.read_bytes()
            except OSError as exc:
                bad.append(f"{path} ({exc})")
                continue
            if _sha256(data) != e.sha256:
                bad.append(f"{path} (sha256 {_sha256(data)[:12]}..., manifest {e.sha256[:12]}...)")
        if bad:
            raise ExpertFileError(f"{len(bad)} expert file(s) fail verification: {'; '.join(bad)}; restore them "
                                  f"from a backup")

    # -------------------------------------------------------------------------------------------------- peft

    def export_peft(self, expert_id: str, out_dir: Path | str, base_model_name_or_path: str = "",
                    target_modules: Sequence[str] | None = None, task_type: str | None = None) -> Path:
        """Write the expert as a standard peft LoRA adapter folder (``adapter_config.json`` and
        ``adapter_model.safetensors`` with keys ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``),
        loadable by ``peft.PeftModel.from_pretrained`` and by vLLM ``--lora-modules``.

        target_modules: the config's target names; default the expert's own modules by their exact dotted names
        (peft wraps exactly those, nothing else: no vision-tower or other-layer module with a zero delta, no
        missing-key warning); short names (e.g. ``["q_proj", "v_proj"]``) are allowed when a tool wants them, and
        peft then also wraps every other module ending so, with a zero delta. Every module of the expert must be
        covered (a name equal to it or ending it at a dot). task_type: None or e.g. "CAUSAL_LM".
        """
        ex = self.get(expert_id)
        if target_modules is None:
            target_modules = sorted(ex.weights)
        else:
            target_modules = [str(t) for t in target_modules]
            uncovered = [m for m in ex.weights if not any(m == t or m.endswith("." + t) for t in target_modules)]
            if uncovered:
                short = sorted({m.rsplit(".", 1)[-1] for m in ex.weights})
                raise ValueError(f"target_modules {target_modules} do not cover modules {uncovered[:4]} of expert "
                                 f"{expert_id!r}; include their short names {short} or leave target_modules unset")
        config = {
            "peft_type": "LORA",
            "task_type": task_type,
            "base_model_name_or_path": base_model_name_or_path or None,
            "r": ex.rank,
            "lora_alpha": _json_alpha(ex.alpha),
            "target_modules": list(target_modules),
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
            "rank_pattern": {},
            "alpha_pattern": {},
        }
        tensors = {}
        for m, (a, b) in ex.weights.items():
            tensors[f"{PEFT_PREFIX}{m}.lora_A.weight"] = a.contiguous()
            tensors[f"{PEFT_PREFIX}{m}.lora_B.weight"] = b.contiguous()
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "adapter_model.safetensors", _canonical_safetensors(_st_save(tensors, metadata={
            "format": "pt", "lumoe_expert_id": ex.id, "lumoe_metadata": json.dumps(ex.metadata, sort_keys=True)})))
        atomic_write(out / "adapter_config.json", (json.dumps(config, indent=2) + "\n").encode())
        return out

    def import_peft(self, adapter_dir: Path | str, expert_id: str,
                    module_shapes: Mapping[str, tuple[int, int]] | None = None,
                    metadata: Mapping | None = None) -> Expert:
        """Read a peft LoRA adapter folder (safetensors only) and add it as expert ``expert_id``; returns it.

        module_shapes: {module_name: (H, N)} of the model's target linears; when given, every adapter module must
        be one of them with these shapes. rsLoRA adapters are converted (alpha' = lora_alpha * sqrt(r), so that
        alpha' / r = lora_alpha / sqrt(r)); DoRA, LoRA bias, modules_to_save, fan_in_fan_out and per-module
        rank/alpha patterns are refused.
        """
        validate_expert_id(expert_id)
        if expert_id in self._entries:
            raise ValueError(f"expert id {expert_id!r} is already in the bank; remove it first or choose another id")
        folder = Path(adapter_dir)
        cfg_path = folder / "adapter_config.json"
        st_path = folder / "adapter_model.safetensors"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{cfg_path} not found: {folder} is not a peft adapter folder")
        if not st_path.is_file():
            if (folder / "adapter_model.bin").is_file():
                raise ValueError(f"{folder / 'adapter_model.bin'}: pickle-based adapter weights are refused; convert "
                                 f"to safetensors (load it with peft and save_pretrained(..., "
                                 f"safe_serialization=True))")
            raise FileNotFoundError(f"{st_path} not found in the peft adapter folder {folder}")
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"{cfg_path}: not valid JSON ({exc})") from None
        if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
            raise ValueError(f"{cfg_path}: peft_type is {cfg.get('peft_type') if isinstance(cfg, dict) else None!r}, "
                             f"only LORA adapters can be imported")
        for key, ok in (("use_dora", lambda v: not v), ("fan_in_fan_out", lambda v: not v),
                        ("bias", lambda v: v in (None, "none")), ("modules_to_save", lambda v: not v),
                        ("rank_pattern", lambda v: not v), ("alpha_pattern", lambda v: not v)):
            if not ok(cfg.get(key)):
                raise ValueError(f"{cfg_path}: {key} = {cfg.get(key)!r} is not supported (plain LoRA with one rank "
                                 f"and alpha for all modules only)")
        rank, lora_alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"{cfg_path}: r must be an int >= 1, got {rank!r}")
        if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha):
            raise ValueError(f"{cfg_path}: lora_alpha must be a finite number, got {lora_alpha!r}")
        alpha = lora_alpha * math.sqrt(rank) if cfg.get("use_rslora") else lora_alpha
        try:
            state = _st_load_file(str(st_path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
            raise ValueError(f"{st_path}: not a valid safetensors file ({exc})") from None
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in state.items():
            name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            for part in ("lora_A", "lora_B"):
                suffix = f".{part}.weight"
                if name.endswith(suffix):
                    pairs.setdefault(name[:-len(suffix)], {})[part] = t
                    break
            else:
                raise ValueError(f"{st_path}: tensor {key!r} is not a LoRA A/B weight "
                                 f"('base_model.model.<module>.lora_A.weight' / 'lora_B.weight')")
        if not pairs:
            raise ValueError(f"{st_path}: holds no LoRA weights")
        weights = {}
        for m, p in pairs.items():
            if set(p) != {"lora_A", "lora_B"}:
                raise ValueError(f"{st_path}: module {m!r} has {sorted(p)} but needs both lora_A and lora_B")
            a, b = p["lora_A"], p["lora_B"]
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
                raise ValueError(f"{st_path}: module {m!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do "
                                 f"not match r = {rank} from {cfg_path.name} (expected [r, H] and [N, r])")
            if module_shapes is not None:
                if m not in module_shapes:
                    raise ValueError(f"{st_path}: module {m!r} is not among the model's target modules "
                                     f"({len(module_shapes)} known, e.g. {list(module_shapes)[:3]})")
                h_in, h_out = module_shapes[m]
                if (a.shape[1], b.shape[0]) != (h_in, h_out):
                    raise ValueError(f"{st_path}: module {m!r}: adapter has (H, N) = ({a.shape[1]}, {b.shape[0]}) "
                                     f"(lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}) but the model's linear is "
                                     f"(H, N) = ({h_in}, {h_out})")
            weights[m] = (a, b)
        meta = {"source": "peft", "adapter_dir": str(folder),
                "base_model_name_or_path": cfg.get("base_model_name_or_path"), "peft_lora_alpha": lora_alpha,
                "peft_use_rslora": bool(cfg.get("use_rslora"))}
        meta.update(dict(metadata or {}))
        expert = Expert(id=expert_id, rank=rank, alpha=alpha, weights=weights, metadata=meta)
        self.add(expert)
        return expert

    # ---------------------------------------------------------------------------------------------- internals

    def _entry(self, expert_id: str) -> ExpertInfo:
        e = self._entries.get(expert_id) if isinstance(expert_id, str) else None
        if e is None:
            known = list(self._entries)
            raise UnknownExpertError(f"unknown expert id {expert_id!r}: the bank holds {len(known)} experts"
                                     f"{' (e.g. ' + ', '.join(map(repr, known[:3])) + ')' if known else ''}")
        return e

    def _register(self, e: ExpertInfo) -> None:
        self._entries[e.id] = e
        self._position[e.id] = len(self._entries) - 1
        for m, (h_in, h_out) in e.modules.items():
            if m not in self._module_shapes:
                self._module_shapes[m] = (h_in, h_out)
                self._stacks[m] = _ModuleStack(h_in, h_out, self._capacity, self._rmax, self.device, self.dtype,
                                               used=len(self._slot_ids))
        if e.rank > self._rmax:
            self._rmax = e.rank
            self._resize_all(self._capacity)

    def _acquire_slot(self, expert_id: str, protect: set[str]) -> int:
        """A slot for ``expert_id``: a new one while under the residency limit, else the least recently used
        resident expert's (never one in ``protect``)."""
        if self.max_resident is None or len(self._slot_ids) < self.max_resident:
            return self._new_slot(expert_id)
        victim = next(v for v in self._lru if v not in protect)
        slot = self._slot.pop(victim)
        del self._lru[victim]
        self._slot_ids[slot] = expert_id
        self._slot[expert_id] = slot
        self._lru[expert_id] = None
        return slot

    def _new_slot(self, expert_id: str) -> int:
        slot = len(self._slot_ids)
        self._ensure_capacity(slot + 1)
        self._slot_ids.append(expert_id)
        self._slot[expert_id] = slot
        self._lru[expert_id] = None
        return slot

    def _ensure_capacity(self, needed: int) -> None:
        if needed <= self._capacity:
            return
        cap = max(self._capacity, 1)
        while cap < needed:
            cap = cap * 2 if cap < self.slot_chunk else cap + self.slot_chunk
        if self.max_resident is not None:
            cap = min(cap, self.max_resident)
        self._resize_all(cap)
        scales = self._scales.new_zeros(cap)
        scales[:self._capacity] = self._scales
        self._scales = scales
        self._capacity = cap

    def _resize_all(self, capacity: int, device=None, dtype=None) -> None:
        for st in self._stacks.values():
            self.stats["bytes_copied"] += st.resize(capacity, self._rmax, len(self._slot_ids), device, dtype)
        if self._stacks and self._slot_ids:  # (the first buffers of an empty bank are an allocation, not a copy)
            self.stats["reallocations"] += 1

    def _place(self, e: ExpertInfo, weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]], slot: int) -> None:
        r = e.rank
        self.stats["slot_writes"] += 1
        for m, st in self._stacks.items():
            st.a[0, slot].zero_()
            st.b[slot].zero_()
            pair = weights.get(m)
            if pair is None:
                st.ranks[slot] = 0
                continue
            st.a[0, slot, :r].copy_(pair[0])
            st.b[slot, :, :r].copy_(pair[1])
            st.ranks[slot] = r
        self._scales[slot] = e.alpha / r

    def _read_expert_file(self, e: ExpertInfo) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Read, check (size, sha256, header, keys, shapes, finiteness) and return an expert's tensors."""
        path = self._experts_dir / e.file
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ExpertFileError(f"expert {e.id!r}: file {path} is missing; restore it from a backup") from None
        if len(data) != e.nbytes:
            raise ExpertFileError(f"expert {e.id!r}: file {path} has {len(data)} bytes but the manifest records "
                                  f"{e.nbytes} (truncated or replaced); restore it from a backup")
        digest = _sha256(data)
        if digest != e.sha256:
            raise ExpertFileError(f"expert {e.id!r}: file {path} is corrupt (sha256 {digest[:16]}..., manifest "
                                  f"{e.sha256[:16]}...); restore it from a backup")
        header = _safetensors_metadata(data, path)
        try:
            tensors = _st_load(data)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
            raise ExpertFileError(f"expert {e.id!r}: file {path} is not a valid safetensors file ({exc})") from None
        if header.get("id") != e.id or header.get("rank") != str(e.rank):
            raise ExpertFileError(f"expert {e.id!r}: file {path} holds expert {header.get('id')!r} of rank "
                                  f"{header.get('rank')!r}, the manifest expects {e.id!r} of rank {e.rank}")
        expected = {f"{m}.lora_{p}.weight" for m in e.modules for p in "AB"}
        if set(tensors) != expected:
            extra, lacking = sorted(set(tensors) - expected), sorted(expected - set(tensors))
            raise ExpertFileError(f"expert {e.id!r}: file {path} tensors differ from the manifest (missing "
                                  f"{lacking[:3]}, unexpected {extra[:3]})")
        weights = {}
        for m, (h_in, h_out) in e.modules.items():
            a, b = tensors[f"{m}.lora_A.weight"], tensors[f"{m}.lora_B.weight"]
            if tuple(a.shape) != (e.rank, h_in) or tuple(b.shape) != (h_out, e.rank):
                raise ExpertFileError(f"expert {e.id!r}: file {path}, module {m!r}: A {tuple(a.shape)}, "
                                      f"B {tuple(b.shape)}; expected ({e.rank}, {h_in}), ({h_out}, {e.rank})")
            weights[m] = (a, b)
        return weights

    @staticmethod
    def _expert_payload(ex: Expert) -> bytes:
        """The safetensors bytes of an expert file (tensors in their own dtype, header metadata)."""
        header = {"format": "pt", "id": ex.id, "rank": str(ex.rank), "alpha": repr(float(ex.alpha)),
                  "metadata": json.dumps(dict(ex.metadata), sort_keys=True)}
        tensors = {}
        for m, (a, b) in ex.weights.items():
            tensors[f"{m}.lora_A.weight"] = a.detach().to("cpu").contiguous()
            tensors[f"{m}.lora_B.weight"] = b.detach().to("cpu").contiguous()
        return _canonical_safetensors(_st_save(tensors, metadata=header))

    def _write_manifest(self, entries: Iterable[ExpertInfo]) -> None:
        doc = {"format": BANK_FORMAT, "version": BANK_FORMAT_VERSION, "experts": [
            {"id": e.id, "rank": e.rank, "alpha": _json_alpha(e.alpha), "file": e.file, "bytes": e.nbytes,
             "sha256": e.sha256, "modules": {m: list(s) for m, s in e.modules.items()}, "metadata": e.metadata,
             "added": e.added}
            for e in entries]}
        atomic_write(self.root / MANIFEST_NAME, (json.dumps(doc, indent=1) + "\n").encode(), self.durable)
