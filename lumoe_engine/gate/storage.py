"""Saving and loading a gate: ``gate.json`` (format, version, config, expert ids, names, head reports, the tensor
file's name and sha256) and ``gate-<sha>.safetensors`` (heads, standardiser, prototypes, bounds, image channel),
each written atomically, the JSON last (the commit point). Format versions: 5 adds the answer channel (its flag
``config.recognition`` and each expert's ``facts``; a v1-v4 file loads with it off: the gate it was), 4 names as text, 3 names as token ids
(refused with ``GateFormatError`` unless ``names`` are given as text), 2 prototypes and similarity bounds, 1 heads
alone. ``Gate.save`` / ``Gate.load`` call these.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Mapping, Optional, Sequence

from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from lumoe_engine.fileio import atomic_write
from lumoe_engine.gate.heads import HeadReport

GATE_FORMAT = "lumoe-gate"
GATE_FORMAT_VERSION = 5  # module docstring
GATE_JSON = "gate.json"


class GateFormatError(ValueError):
    """A gate file this version cannot read as it is (e.g. a v3 file whose name channel holds token ids)."""


def save_gate(self, path) -> Path:
    """Write the gate into folder ``path``: ``gate-<sha>.safetensors`` (weight [H, F], bias [H], threshold [H],
    mean [D], std [D]) then ``gate.json`` (config, expert ids in routing order, head reports, the tensor file's
    name and sha256), each atomically; the JSON is the commit point, older tensor files are deleted after it.
    Returns the folder."""
    import hashlib

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"weight": self.weight.detach().cpu().contiguous().clone(),
               "bias": self.bias.detach().cpu().contiguous().clone(),
               "threshold": self.thresholds.detach().cpu().contiguous().clone()}
    if self.mean is not None:
        tensors.update(mean=self.mean.detach().cpu().clone(), std=self.std.detach().cpu().clone())
    if self.basis is not None:
        tensors["basis"] = self.basis.detach().cpu().contiguous().clone()
    tensors.update(protos=self._P[:sum(self._pcount)].detach().cpu().contiguous().clone(),
                   sim_bounds=self.sim_bounds.contiguous())
    if self.img_mean is not None:
        tensors.update(img_mean=self.img_mean.detach().cpu().clone(), img_std=self.img_std.detach().cpu().clone(),
                       image_protos=self._IP[:self._n_image].detach().cpu().contiguous().clone(),
                       image_background=self._BG.detach().cpu().contiguous().clone())
        if self.img_basis is not None:
            tensors["img_basis"] = self.img_basis.detach().cpu().contiguous().clone()
    data = _st_save(tensors)
    sha = hashlib.sha256(data).hexdigest()
    name = f"gate-{sha[:16]}.safetensors"
    atomic_write(folder / name, data)
    meta = {"format": GATE_FORMAT, "version": GATE_FORMAT_VERSION, "config": self.config(),
            "expert_ids": list(self.expert_ids), "heads": list(self._heads), "proto_counts": list(self._pcount),
            "names": [list(n) for n in self._names], "names_exact": [list(n) for n in self._names_exact],
            "facts": [list(f) for f in self._facts], "fact_blockers": [list(b) for b in self._fact_blockers],
            "facts_ambiguous": [list(f) for f in self._facts_ambiguous],
            "image_groups": [[[c, t] for c, t in g] for g in self._igroups],
            "tensors": name, "sha256": sha,
            "reports": {k: asdict(v) for k, v in self.reports.items()}}
    atomic_write(folder / GATE_JSON, (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())
    for old in folder.glob("gate-*.safetensors"):
        if old.name != name:
            try:
                old.unlink()
            except OSError:
                pass
    return folder

def load_gate(cls, path, names: Optional[Mapping[str, Sequence[str]]] = None):
    """A gate saved by ``save`` into folder ``path`` (checks format, sha256 and shapes).

    Versions 1-2 load without a name channel, version 3 without names if it had none. A version-3 file whose
    name channel holds token ids (the names as one tokenizer wrote them) cannot be read as text: it is a
    ``GateFormatError`` unless ``names`` gives {expert id: its names as text} for every expert (the requests'
    entities and aliases, e.g. from a ledger); save it again to write format v4."""
    import hashlib

    folder = Path(path)
    jpath = folder / GATE_JSON
    if not jpath.is_file():
        raise FileNotFoundError(f"{jpath} not found: expected a folder written by Gate.save")
    try:
        meta = json.loads(jpath.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{jpath}: not valid JSON ({exc})") from None
    if meta.get("format") != GATE_FORMAT or meta.get("version") not in (1, 2, 3, 4, GATE_FORMAT_VERSION):
        raise ValueError(f"{jpath}: format {meta.get('format')!r} v{meta.get('version')!r}, expected "
                         f"{GATE_FORMAT!r} v{GATE_FORMAT_VERSION}")
    tpath = folder / meta["tensors"]
    if not tpath.is_file():
        raise FileNotFoundError(f"{tpath} (named by {jpath}) not found")
    data = tpath.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise ValueError(f"{tpath}: sha256 does not match {jpath}; the file is corrupt")
    t = _st_load(data)
    config = dict(meta["config"])
    if meta.get("version") == 1:
        config.setdefault("similarity", None)  # version 1 gates had no similarity bound
        config.setdefault("bound_dim", None)
    gate = cls(**config)
    ids = list(meta["expert_ids"])
    heads = [int(h) for h in meta.get("heads", [1] * len(ids))]
    E, H = len(ids), sum(heads)
    if len(heads) != E or min(heads, default=1) < 1:
        raise ValueError(f"{jpath}: 'heads' {heads} must give a count >= 1 for each of the {E} experts")
    if tuple(t["weight"].shape) != (H, gate.head_dim) or tuple(t["bias"].shape) != (H,):
        raise ValueError(f"{tpath}: weight {tuple(t['weight'].shape)} / bias {tuple(t['bias'].shape)} do not "
                         f"match {H} sub-heads of width {gate.head_dim} in {jpath}")
    if "mean" in t:
        if tuple(t["mean"].shape) != (gate.dim,) or tuple(t["std"].shape) != (gate.dim,):
            raise ValueError(f"{tpath}: mean/std shapes {tuple(t['mean'].shape)} do not match dim {gate.dim}")
        gate.mean, gate.std = t["mean"], t["std"]
        if "basis" in t:
            if t["basis"].dim() != 2 or t["basis"].shape[0] != gate.dim:
                raise ValueError(f"{tpath}: basis {tuple(t['basis'].shape)} does not match dim {gate.dim}")
            gate.basis = t["basis"]
    elif E:
        raise ValueError(f"{tpath}: {E} experts but no standardiser (mean/std); the file is incomplete")
    counts = [int(c) for c in meta.get("proto_counts", [0] * E)]
    protos = t.get("protos")
    if len(counts) != E or (protos is None and sum(counts)) or \
            (protos is not None and tuple(protos.shape) != (sum(counts), gate.bound_width)) or \
            ("sim_bounds" in t and tuple(t["sim_bounds"].shape) != (E,)):
        raise ValueError(f"{tpath}: prototypes {None if protos is None else tuple(protos.shape)} / sim_bounds do "
                         f"not match proto_counts {counts} of {jpath}")
    names_doc, exact_doc = meta.get("names"), meta.get("names_exact")  # versions 1-2: no name channel
    if names_doc is not None and (not isinstance(names_doc, list) or len(names_doc) != E):
        raise ValueError(f"{jpath}: 'names' must hold one list of names per expert ({E})")
    if meta.get("version") == 3:  # names as token ids: not text
        exact_doc = None
        if names_doc is not None and any(names_doc):
            missing = [] if names is None else [e for e in ids if e not in names]
            if names is None or missing:
                n = sum(bool(x) for x in names_doc)
                raise GateFormatError(
                    f"{jpath}: a format v3 gate whose name channel holds token ids ({n} of {E} experts have "
                    f"names); this version (v{GATE_FORMAT_VERSION}) matches names as text and cannot turn token "
                    f"ids back into names. A store converts it from its ledger: run `run.py process --store "
                    f"STORE` once; a stream run: run it again into a new --out (or pass Gate.load(names=...) "
                    f"the names of every expert" + (f"; missing: {missing[:5]}" if missing else "") + ")")
            names_doc = [list(names[e]) for e in ids]
        else:
            names_doc = None
    if exact_doc is not None and (not isinstance(exact_doc, list) or len(exact_doc) != E):
        raise ValueError(f"{jpath}: 'names_exact' must hold one list of names per expert ({E})")
    facts_doc = meta.get("facts")  # versions 1-4: no answer channel
    if facts_doc is not None and (not isinstance(facts_doc, list) or len(facts_doc) != E):
        raise ValueError(f"{jpath}: 'facts' must hold one list of facts per expert ({E})")
    ambiguous_doc = meta.get("facts_ambiguous")
    if ambiguous_doc is not None and (not isinstance(ambiguous_doc, list) or len(ambiguous_doc) != E):
        raise ValueError(f"{jpath}: 'facts_ambiguous' must hold one list per expert ({E})")
    blockers_doc = meta.get("fact_blockers")
    if blockers_doc is not None and (not isinstance(blockers_doc, list) or len(blockers_doc) != E):
        raise ValueError(f"{jpath}: 'fact_blockers' must hold one list per expert ({E})")
    if E:
        gate.set_stacked(ids, t["weight"], t["bias"], t["threshold"], heads,
                         protos=protos if protos is not None else None,
                         proto_counts=counts if protos is not None else None, sim_bounds=t.get("sim_bounds"),
                         names=names_doc, names_exact=exact_doc, facts=facts_doc, fact_blockers=blockers_doc,
                         facts_ambiguous=ambiguous_doc)
    if "img_mean" in t:
        groups = meta.get("image_groups")
        n = sum(int(c) for g in (groups or []) for c, _ in g)
        if not isinstance(groups, list) or len(groups) != E or \
                tuple(t["img_mean"].shape) != (gate.image_dim,) or "image_protos" not in t or \
                t["image_protos"].shape[0] != n:
            raise ValueError(f"{tpath}: image channel tensors do not match image_groups / image_dim of {jpath}")
        gate.img_mean, gate.img_std = t["img_mean"], t["img_std"]
        gate.img_basis = t.get("img_basis")
        gate._IP, gate._BG = t["image_protos"], t["image_background"]
        gate._igroups = [[(int(c), float(tau)) for c, tau in g] for g in groups]
        gate._img_cache = None
    elif E and gate.image_dim:
        gate._igroups = [[] for _ in range(E)]
    gate.reports = {k: HeadReport(**v) for k, v in meta.get("reports", {}).items()}
    return gate


__all__ = ["save_gate", "load_gate", "GateFormatError", "GATE_FORMAT", "GATE_FORMAT_VERSION", "GATE_JSON"]
