"""The development-seed sweep: the stream's learning rates chosen on seed 0 only, then frozen.

    python benchmarks/dev_sweep.py --out runs/dev-sweep [--methods lumoe,ga,...] [--write]

For every method and every candidate learning rate (``CANDIDATES``), the task stream (``--stream``, default abcd) on
the development seed (``--seed``, 0: its world, its taught base, its protocol split), one method at a time; each
run's test-data numbers give a score, and the best candidate per method is the choice:

    score = mean of (1 - mean worst test leak over the measured test forms, min(1, retain ratio on test data),
                     min(1, general utility ratio))                  (a term without data is left out)

so that forgetting everything (retain 0) and forgetting nothing (leak 1) both score low. With ``--write`` the choice
goes into lumoe_engine/stream/hyperparameters.json (with every candidate's numbers and score): the defaults every
later run uses. The reported results then come from other seeds (``run.py --compare --seeds 1,2,3``); never choose
on those. Writes ``OUT/dev_sweep.json`` (tidy rows) either way.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# NOTE: the candidates span a decade around the earlier defaults (LUMoE 1e-2, the baselines 1e-3 on world v1)
CANDIDATES = {"lumoe": (3e-3, 1e-2, 3e-2), "ga": (3e-4, 1e-3, 3e-3), "gd": (3e-4, 1e-3, 3e-3),
              "kl": (3e-4, 1e-3, 3e-3), "npo": (3e-4, 1e-3, 3e-3), "idk": (3e-4, 1e-3, 3e-3),
              "idk-po": (3e-4, 1e-3, 3e-3)}


def score(final: dict) -> tuple[float, dict]:
    """The sweep's score of one run's final numbers (module docstring) and its terms."""
    leaks = [v for v in final["test"]["leak"].values() if v is not None]
    terms = {"forget": 1.0 - sum(leaks) / len(leaks) if leaks else None,
             "retain": min(1.0, final["retain_ratio_test"]) if final.get("retain_ratio_test") is not None else None,
             "general": min(1.0, final["general_utility_ratio"]) if final.get("general_utility_ratio") is not None
             else None}
    got = [v for v in terms.values() if v is not None]
    return (sum(got) / len(got) if got else 0.0), terms


def main(argv=None) -> int:
    from lumoe_engine.stream import StreamConfig, run_stream
    from lumoe_engine.stream.config import HYPERPARAMETERS, HYPERPARAMETERS_FILE

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--methods", default=",".join(CANDIDATES))
    p.add_argument("--stream", default="abcd")
    p.add_argument("--seed", type=int, default=0, help="the development seed (never a reported one)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-per-set", type=int, default=None)
    p.add_argument("--write", action="store_true", help="freeze the choice in lumoe_engine/stream/hyperparameters.json")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = StreamConfig(stream=args.stream, seed=args.seed, threads=args.threads, progress=False)
    if args.max_per_set:
        base = dataclasses.replace(base, max_per_set=args.max_per_set)
    rows, chosen = [], {}
    for m in [x for x in args.methods.split(",") if x]:
        best = None
        for lr in CANDIDATES[m]:
            t0 = time.time()
            cfg = dataclasses.replace(base, method=m, out=str(out / f"{m}-lr{lr:g}"),
                                      **({"lr": lr} if m == "lumoe" else {"baseline_lrs": {m: lr}}))
            fin = run_stream(cfg)["methods"][m]["final"]
            sc, terms = score(fin)
            row = {"method": m, "lr": lr, "score": round(sc, 4), **{f"term_{k}": v for k, v in terms.items()},
                   "test_leak": fin["test"]["leak"], "retain_ratio_test": fin["retain_ratio_test"],
                   "general_utility_ratio": fin["general_utility_ratio"], "judge_forget": fin["test"]["judge_forget"],
                   "seconds": round(time.time() - t0, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if best is None or sc > best[0]:
                best = (sc, lr)
        chosen[m] = best[1]
    doc = {"dev_seed": args.seed, "stream": args.stream, "candidates": {m: CANDIDATES[m] for m in chosen},
           "chosen": chosen, "rows": rows}
    (out / "dev_sweep.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"chosen on seed {args.seed}: {chosen}; wrote {out / 'dev_sweep.json'}")
    if args.write:
        hp = dict(HYPERPARAMETERS)
        if "lumoe" in chosen:
            hp["lr"] = chosen["lumoe"]
        hp["baseline_lrs"] = {**hp.get("baseline_lrs", {}), **{m: v for m, v in chosen.items() if m != "lumoe"}}
        hp.update(dev_seed=args.seed, chosen_by=f"benchmarks/dev_sweep.py on seed {args.seed}, stream {args.stream}",
                  sweep=doc)
        HYPERPARAMETERS_FILE.write_text(json.dumps(hp, indent=1) + "\n")
        print(f"froze the choice in {HYPERPARAMETERS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
