"""Compare two stream runs' results: byte-equal experts, the same gate file hash, the same metrics rows.

    python benchmarks/compare_runs.py RUN_A RUN_B [--json OUT.json]

RUN_A / RUN_B: ``--out`` folders of ``python lumoe_engine/run.py`` (the main job, ``--stream synthetic:N``,
``--compare`` ...), typically the same options and seeds run from two commits. Compared:

- ``bank/``: the same expert ids, and each expert's safetensors file byte-equal (sha256);
- ``gate/``: the same ``gate.json`` sha256 of the tensor file, and ``gate.json`` equal apart from the head reports'
  fitting time (``reports.*.seconds``);
- ``metrics.jsonl``: the same rows in the same order, apart from wall-clock values (``TIMING_KEYS``);
- ``summary.json``: its ``methods`` section equal apart from wall-clock values and the run's layout over ranks
  (``LAYOUT_KEYS``); the ``config`` section is not compared (its shape may change between commits).

Exit status 0 when everything matches, 1 otherwise (each difference printed).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

# wall-clock values: never compared (the same list the stream's resume test uses)
TIMING_KEYS = frozenset({"seconds", "train_seconds", "gate_seconds", "eval_seconds", "tokens_per_s",
                         "seconds_per_request", "mean_seconds_per_request", "train_seconds_per_request", "flat_cost",
                         "base_predictions_s", "total_seconds", "time", "wave_seconds"})
# how a run was laid out over ranks (request-parallel waves, each rank's placement), not what it computed: a 2-rank
# ``--parallel requests`` run and a single process compare equal when their experts, gate and metrics are
LAYOUT_KEYS = frozenset({"parallel", "placement"})


def _strip(x):
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in TIMING_KEYS}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compare_bank(a: Path, b: Path) -> list[str]:
    diffs = []
    ea = {p.name: _sha(p) for p in sorted((a / "bank").rglob("*.safetensors"))}
    eb = {p.name: _sha(p) for p in sorted((b / "bank").rglob("*.safetensors"))}
    if set(ea) != set(eb):
        diffs.append(f"bank: experts differ: only in A {sorted(set(ea) - set(eb))}, only in B "
                     f"{sorted(set(eb) - set(ea))}")
    for name in sorted(set(ea) & set(eb)):
        if ea[name] != eb[name]:
            diffs.append(f"bank: {name} differs (sha256 {ea[name][:12]} vs {eb[name][:12]})")
    if not ea and not eb:
        diffs.append("bank: no expert files in either run (nothing compared)")
    return diffs


def compare_gate(a: Path, b: Path) -> list[str]:
    ja, jb = a / "gate" / "gate.json", b / "gate" / "gate.json"
    if not ja.is_file() or not jb.is_file():
        return [f"gate: gate.json missing ({ja.is_file()=}, {jb.is_file()=})"]
    ga, gb = json.loads(ja.read_text()), json.loads(jb.read_text())
    diffs = []
    if ga.get("sha256") != gb.get("sha256"):
        diffs.append(f"gate: tensor file hash differs ({ga.get('sha256', '')[:12]} vs {gb.get('sha256', '')[:12]})")
    if _strip(ga) != _strip(gb):
        keys = sorted(k for k in set(ga) | set(gb) if _strip(ga.get(k)) != _strip(gb.get(k)))
        diffs.append(f"gate: gate.json differs in {keys}")
    return diffs


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def compare_metrics(a: Path, b: Path) -> list[str]:
    ra, rb = _rows(a / "metrics.jsonl"), _rows(b / "metrics.jsonl")
    diffs = []
    if len(ra) != len(rb):
        diffs.append(f"metrics: {len(ra)} rows vs {len(rb)}")
    for i, (x, y) in enumerate(zip(ra, rb)):
        x, y = _strip(x), _strip(y)
        if x != y:
            keys = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
            diffs.append(f"metrics: row {i} ({x.get('method')} step {x.get('step')} {x.get('request')} "
                         f"{x.get('form')}) differs in {keys}")
            if len(diffs) > 20:
                diffs.append("metrics: ... (more differences not shown)")
                break
    return diffs


def compare_summary(a: Path, b: Path) -> list[str]:
    sa, sb = json.loads((a / "summary.json").read_text()), json.loads((b / "summary.json").read_text())
    ma, mb = _strip(sa.get("methods")), _strip(sb.get("methods"))
    if not isinstance(ma, dict) or not isinstance(mb, dict):
        return [] if ma == mb else ["summary: methods differ (missing in one run)"]
    diffs = []
    for m in sorted(set(ma) | set(mb)):
        xa, xb = ma.get(m) or {}, mb.get(m) or {}
        keys = sorted(k for k in set(xa) | set(xb) if k not in LAYOUT_KEYS and xa.get(k) != xb.get(k))
        if keys:
            diffs.append(f"summary: method {m} differs in {keys}")
    return diffs


def compare(a, b) -> list[str]:
    a, b = Path(a), Path(b)
    return compare_bank(a, b) + compare_gate(a, b) + compare_metrics(a, b) + compare_summary(a, b)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--json", default=None, help="write {equal, differences, experts, gate_sha256} here")
    args = p.parse_args(argv)
    diffs = compare(args.run_a, args.run_b)
    n_experts = len(list((Path(args.run_a) / "bank").rglob("*.safetensors")))
    gate = json.loads((Path(args.run_a) / "gate" / "gate.json").read_text()).get("sha256") \
        if (Path(args.run_a) / "gate" / "gate.json").is_file() else None
    n_rows = len(_rows(Path(args.run_a) / "metrics.jsonl")) if (Path(args.run_a) / "metrics.jsonl").is_file() else 0
    for d in diffs:
        print(d)
    print(f"{'EQUAL' if not diffs else 'DIFFERENT'}: {args.run_a} vs {args.run_b}: {n_experts} experts, gate "
          f"{(gate or '-')[:16]}, {n_rows} metrics rows")
    if args.json:
        Path(args.json).write_text(json.dumps({"equal": not diffs, "differences": diffs, "experts": n_experts,
                                               "gate_sha256": gate, "metrics_rows": n_rows}, indent=1) + "\n")
    return 0 if not diffs else 1


if __name__ == "__main__":
    sys.exit(main())
