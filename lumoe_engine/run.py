"""lumoe-engine main job. With no subcommand: the unlearning stream (``stream``) on the embedded default.

  python lumoe_engine/run.py [--stream abcd|cabd|entity|synthetic:N] [--method lumoe|ga|gd|kl|npo|idk|idk-po]
                             [--compare] [--data DIR] [--subset N] [--model DIR] [--load-in-4bit] [--out DIR] ...
  python lumoe_engine/run.py --dry-run --preset llava-1.5-7b     (the large-model plan, no weights)
  deepspeed --num_gpus N lumoe_engine/run.py ...                 (experts trained under DeepSpeed ZeRO)

Subcommands:

  stream  the lifelong unlearning stream: teach (cached) -> one expert per request -> gate -> evaluation -> report
  gate-eval  route accuracy and false positives of the gate on the taught embedded default
  teach   teach the base model every entity of the benchmark (the embedded synthetic default, or --data DIR),
          cached by config + data hash; writes OUT/teach_summary.json and prints the numbers.

  python lumoe_engine/run.py teach --out runs/teach [--data DIR] [--subset N] [--model DIR] [--load-in-4bit]
                                   [--preset tiny] [--cache DIR]

Removal requests from files, through a store (one folder: ledger/, bank/, gate/, store.json; docs/REQUESTS.md):

  submit   validate request files and record them:  submit FILE... --store DIR  |  submit --watch FOLDER --store DIR
  process  train, save and route every pending request of the store (one expert each; failed ones say why)
  status   one line per request: id, state, content hash, expert in the bank, entry in the gate, reason
  revoke   withdraw a request: revoke ID --store DIR (ledger, then gate entry, then expert) | revoke ID --out RUN_DIR
  verify   check a store read-only (ledger, expert files, gate, agreement)

Exit status: 0 on success, 2 when a file or request was refused (the store unchanged for it), 1 otherwise.
"""
from __future__ import annotations

import os
import sys

# ``python lumoe_engine/run.py`` puts lumoe_engine/ first on sys.path, where data/, eval/, model/ would shadow other
# top-level modules: drop that entry before anything else is imported.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _HERE]

import argparse  # noqa: E402
import logging  # noqa: E402
from pathlib import Path  # noqa: E402

SUMMARY_ROWS = (
    ("fact_accuracy_image_text", "image+text (taught)"),
    ("fact_accuracy_text_only", "text-only (taught)"),
    ("fact_accuracy_heldout_phrasing", "held-out phrasing"),
    ("fact_accuracy_fresh_images", "fresh images"),
    ("fact_accuracy_noise_image", "noise image"),
    ("noise_chance_level", "  chance level (image-blind)"),
)
V2_SUMMARY_ROWS = (  # world v2 only: printed where the summary has them
    ("fact_accuracy_fresh_images_name", "held-out scenes: name"),
    ("fact_accuracy_fresh_images_facts", "held-out scenes: facts"),
    ("lookup_pixel", "  nearest request picture, pixels"),
    ("lookup_features", "  nearest request picture, features"),
    ("fact_accuracy_name_variants", "name variants (never taught)"),
    ("fact_accuracy_alias", "alias (never-taught wordings)"),
    ("fact_accuracy_general_scene", "general: scene questions"),
    ("fact_accuracy_general_world", "general: world facts"),
)


def _add_teach(sub) -> None:
    p = sub.add_parser("teach", help="teach the base model the benchmark's entities (cached)",
                       description="Fine-tune a tiny LLaVA (or --model DIR) on every entity's image+text and "
                                   "text-only questions until greedy answers state >= --target of the facts.")
    p.add_argument("--out", required=True, help="output folder (teach_summary.json)")
    p.add_argument("--data", default=None, help="MLUBench-format root (default: the embedded synthetic benchmark)")
    p.add_argument("--subset", type=int, default=None, help="N entities per task split (load_benchmark subset)")
    p.add_argument("--synthetic", default="default", help="synthetic preset when --data is not given")
    p.add_argument("--model", default=None, help="start from this HF LLaVA / LLaVA-NeXT directory")
    p.add_argument("--load-in-4bit", action="store_true", help="4-bit NF4 base (with --model: measured, not taught)")
    p.add_argument("--model-teaching", default="lora", choices=("lora", "none"),
                   help="with --model: teach through one LoRA merged into the weights (default), or only measure")
    p.add_argument("--allow-surrogate-images", action="store_true",
                   help="--data: a missing image file becomes a surrogate picture (else an error naming the files)")
    p.add_argument("--preset", default="tiny", help="tiny LLaVA preset: micro | tiny | small")
    p.add_argument("--cache", default=None, help="cache folder (default $LUMOE_CACHE or ~/.cache/lumoe-engine)")
    p.add_argument("--target", type=float, default=None, help="target fact accuracy (default 0.95)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds of teaching at most")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_teach)


def cmd_teach(args) -> dict:
    from lumoe_engine.model.teach import TeachConfig, teach

    config = TeachConfig(data=args.data, subset=args.subset, synthetic=args.synthetic, model=args.model,
                         load_in_4bit=args.load_in_4bit, preset=args.preset, model_teaching=args.model_teaching,
                         allow_surrogate_images=args.allow_surrogate_images)
    for name, attr in (("target_accuracy", "target"), ("time_budget_s", "time_budget"), ("max_steps", "max_steps"),
                       ("lr", "lr"), ("batch_size", "batch_size"), ("seed", "seed")):
        if getattr(args, attr) is not None:
            setattr(config, name, getattr(args, attr))
    _, _, summary = teach(config, args.out, cache_dir=args.cache, progress=not args.no_progress)
    print(f"teach: {summary['n_entities']} entities, {summary['n_qa']} QA pairs "
          f"({summary['n_teach']} taught), {summary['steps']} steps, cached={summary['cached']}")
    for key, label in SUMMARY_ROWS + tuple(r for r in V2_SUMMARY_ROWS if summary.get(r[0]) is not None):
        v = summary.get(key)
        print(f"  {label:<36} {'n/a' if v is None else f'{v:.3f}'}")
    if "scene_checks_pass" in summary:
        print(f"  picture checks: held-out scenes recognised {summary['scene_recognition']:.3f} (target >= "
              f"{summary['scene_target']}), nearest-picture lookup <= {summary['lookup_ceiling']} in pixels and "
              f"features: {'pass' if summary['scene_checks_pass'] else 'FAIL'}")
    print(f"  reached target: {summary['reached_target']}   seconds: {summary['seconds']:.1f} "
          f"(teaching {summary['train_seconds']:.1f}, evaluation {summary['eval_seconds']:.1f})")
    print(f"  summary: {Path(args.out) / 'teach_summary.json'}   model: {summary.get('model_dir')}")
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lumoe", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_teach(sub)
    _add_stream(sub)
    _add_gate_eval(sub)
    _add_store_commands(sub)
    return parser


def _add_stream(sub) -> None:
    p = sub.add_parser("stream", help="the lifelong unlearning stream (the default command)",
                       description="Teach (cached), then one LoRA expert per removal request, the gate, evaluation "
                                   "after every request, report and plots in --out.")
    add_stream_arguments(p)
    p.add_argument("--dry-run", action="store_true",
                   help="build the --preset's real architecture on the meta device and print the memory plan and "
                        "the request-parallel throughput assumptions")
    p.add_argument("--tokens-per-step", type=int, default=None,
                   help="--dry-run: tokens of one training step as measured (benchmarks/real_shape.py)")
    p.set_defaults(func=cmd_stream)


def add_stream_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The stream options (the main job's default command), one per ``StreamConfig`` field."""
    from lumoe_engine.gate.config import GATE_PRESETS
    from lumoe_engine.stream import METHODS, StreamConfig
    from lumoe_engine.unlearn.losses import LOSSES

    d = StreamConfig()
    g = parser.add_argument_group("stream")
    g.add_argument("--stream", default=d.stream, help="abcd | cabd | entity | synthetic:N (default abcd)")
    g.add_argument("--method", default=d.method, choices=METHODS, help="lumoe or a sequential baseline")
    g.add_argument("--compare", action="store_true", help="LUMoE and every baseline on the same stream, one table")
    g.add_argument("--data", default=None, help="MLUBench-format root (default: the embedded synthetic benchmark)")
    g.add_argument("--subset", type=int, default=None, help="N entities per task split")
    g.add_argument("--synthetic", default=d.synthetic,
                   help="synthetic preset: default | tiny-v2 | medium | large (world v2), v1 | tiny (world v1)")
    g.add_argument("--model", default=None, help="HF LLaVA / LLaVA-NeXT directory, used as it is (default: the "
                                                     "tiny LLaVA, taught)")
    g.add_argument("--load-in-4bit", action="store_true",
                   help="4-bit NF4 base (the baselines keep their LoRAs active instead of merging them)")
    g.add_argument("--allow-surrogate-images", action="store_true",
                   help="--data: a missing image file becomes a surrogate picture, counted in the report (else an "
                        "error naming the files)")
    g.add_argument("--preset", default=d.preset, help="tiny LLaVA preset: micro | tiny | small")
    g.add_argument("--cache", default=None, help="cache folder (default $LUMOE_CACHE or ~/.cache/lumoe-engine)")
    g.add_argument("--extra-eval", action="append", default=[], metavar="PATH",
                   help="further MLUBench-format QA files or folders, scored as the paraphrase form (repeatable)")
    g.add_argument("--out", default=d.out, help="output folder (default runs/default)")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--max-per-set", type=int, default=d.max_per_set, help="evaluation queries per set per request")
    g.add_argument("--audit", type=int, default=None, metavar="N",
                   help="bounded evaluation (long streams): after each request measure it and a seeded sample of N "
                        "earlier ones (default: every earlier request, after each one)")
    g.add_argument("--sweep-every", type=int, default=d.sweep_every, metavar="K",
                   help="with --audit: measure every request so far after every K-th request (and always after the "
                        "last; 0 = only then)")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="0 = the teaching answers' length")
    g.add_argument("--steps", type=int, default=d.steps, help="optimizer steps per request (every method)")
    g.add_argument("--lr", type=float, default=d.lr, help="LUMoE expert learning rate")
    g.add_argument("--baseline-lr", type=float, default=d.baseline_lr, help="the sequential baselines' learning rate")
    g.add_argument("--rank", type=int, default=d.rank, help="LoRA rank of each expert / baseline LoRA")
    g.add_argument("--alpha", type=float, default=d.alpha)
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="forget (and retain) rows per step")
    g.add_argument("--loss", default=d.loss, choices=sorted(LOSSES), help="LUMoE's expert loss")
    g.add_argument("--retain-weight", type=float, default=d.retain_weight)
    g.add_argument("--zero-stage", type=int, default=d.zero_stage, help="DeepSpeed ZeRO stage (under deepspeed)")
    g.add_argument("--gate-preset", default="default", choices=sorted(GATE_PRESETS),
                   help="the gate's configuration (lumoe_engine/gate/config.py); the gate flags below override it")
    g.add_argument("--gate-layer", type=int, default=None, help="gate decoder layer (default: the preset's rule)")
    g.add_argument("--target-fpr", type=float, default=None, help="per-head false-positive target (default 0.005)")
    g.add_argument("--no-gate-image", action="store_true",
                   help="no image channel: a query with an image is routed by the heads over its pooled prompt")
    g.add_argument("--no-gate-names", action="store_true",
                   help="no name channel: a query naming a forgotten entity is routed by its pooled features alone")
    g.add_argument("--refusal", default=d.refusal, help=f"what a forgotten query answers (default {d.refusal!r})")
    g.add_argument("--seeds", default="", metavar="S,S,...",
                   help="run the whole chain (world, teaching, protocol, stream) for each seed into OUT/seed-<s> and "
                        "report mean/min/max over them (e.g. 1,2,3; seed 0 is the development seed)")
    g.add_argument("--carry-families", type=float, default=d.carry_families,
                   help="share of an entity's taught wordings a request carries (the rest is test data)")
    g.add_argument("--carry-pictures", type=float, default=d.carry_pictures,
                   help="share of an entity's taught pictures a request carries (the rest is test data)")
    g.add_argument("--general-pool", type=int, default=d.general_pool,
                   help="taught general queries the gate may use as negatives (the rest is test data)")
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    g.add_argument("--parallel", default=d.parallel, choices=("requests", "data"),
                   help="under deepspeed with N ranks: train N requests at once, one expert per rank (default), or "
                        "every request on all ranks with ZeRO data parallelism (a request too large for one device)")
    g.add_argument("--teach", action="append", default=[], metavar="FIELD=VALUE",
                   help="a TeachConfig field for the taught base, e.g. --teach time_budget_s=120 (repeatable)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out (killed or stopped) from its ledger: requests evaluated are kept, "
                        "the others redone; refused when --out holds no run or one with other options")
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    return parser


def stream_config_from_args(args: argparse.Namespace):
    """The ``StreamConfig`` of parsed stream options (``add_stream_arguments``)."""
    from lumoe_engine.gate.config import gate_preset
    from lumoe_engine.stream import StreamConfig

    d = StreamConfig()
    get = lambda name: getattr(args, name, getattr(d, name))  # noqa: E731
    gate_over: dict = {}
    if getattr(args, "no_gate_names", False):
        gate_over["names"] = False
    if getattr(args, "no_gate_image", False):
        gate_over["image"] = False
    if getattr(args, "gate_layer", None) is not None:
        gate_over["layer"] = args.gate_layer
    if getattr(args, "target_fpr", None) is not None:
        gate_over["target_fpr"] = args.target_fpr
    gate = gate_preset(getattr(args, "gate_preset", None) or "default", **gate_over)
    return StreamConfig(stream=get("stream"), method=get("method"), compare=bool(get("compare")), data=get("data"),
                        subset=get("subset"), synthetic=get("synthetic"), model=get("model"),
                        load_in_4bit=bool(get("load_in_4bit")), preset=get("preset"), cache=get("cache"),
                        extra_eval=list(get("extra_eval") or []), out=get("out"), seed=get("seed"),
                        max_per_set=get("max_per_set"), audit=get("audit"), sweep_every=get("sweep_every"),
                        eval_batch_size=get("eval_batch_size"),
                        max_new_tokens=get("max_new_tokens"), steps=get("steps"), lr=get("lr"),
                        baseline_lr=get("baseline_lr"), rank=get("rank"),
                        alpha=get("alpha"), batch_size=get("batch_size"), loss=get("loss"),
                        retain_weight=get("retain_weight"), zero_stage=get("zero_stage"), gate=gate,
                        refusal=get("refusal"), seeds=parse_seeds(getattr(args, "seeds", "") or ""),
                        carry_families=get("carry_families"), carry_pictures=get("carry_pictures"),
                        general_pool=get("general_pool"), threads=get("threads"), parallel=get("parallel"),
                        allow_surrogate_images=bool(get("allow_surrogate_images")),
                        teach_overrides=parse_overrides(getattr(args, "teach", None) or []),
                        progress=not getattr(args, "no_progress", False), resume=bool(get("resume")))


def parse_seeds(text: str) -> list[int]:
    """"1,2,3" -> [1, 2, 3] (ValueError naming the bad item)."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if not item.isdigit():
            raise ValueError(f"--seeds {text!r}: {item!r} is not a non-negative int; pass e.g. --seeds 1,2,3")
        out.append(int(item))
    return out


def parse_overrides(items) -> dict:
    """["max_steps=20", "lr=1e-3"] -> {"max_steps": 20, "lr": 0.001} (values parsed as JSON, else kept as text)."""
    import json

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--teach {item!r}: expected FIELD=VALUE, e.g. --teach time_budget_s=120")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def cmd_stream(args):
    if args.dry_run:
        from lumoe_engine.model import plan

        extra = ["--tokens-per-step", str(args.tokens_per_step)] if args.tokens_per_step else []
        return plan.main(["--preset", args.preset] + extra)
    from lumoe_engine import stream
    from lumoe_engine.ledger import LedgerCorruptError, LedgerLockedError

    try:
        return stream.run_seeds(stream_config_from_args(args))
    except (stream.ResumeError, LedgerLockedError, LedgerCorruptError) as e:
        # the run's files were not changed: say why and what to do, without a traceback
        return _fail(str(e))


def _add_gate_eval(sub) -> None:
    from lumoe_engine.gate import evaluate

    p = sub.add_parser("gate-eval", help="gate routing accuracy / false positives on the taught embedded default")
    evaluate.add_arguments(p)
    p.set_defaults(func=evaluate.run)


# ------------------------------------------------------------------------------------------ requests and the store
def _add_store_commands(sub) -> None:
    p = sub.add_parser("submit", help="validate request files and record them in a store",
                       description="Validate each request file (docs/REQUESTS.md) and record it in the store's "
                                   "ledger (state 'received'); a refused file changes nothing. The store is "
                                   "created on first use.")
    p.add_argument("files", nargs="*", metavar="FILE", help="request files (JSON)")
    p.add_argument("--store", required=True, help="store folder (created when missing)")
    p.add_argument("--watch", metavar="FOLDER", default=None,
                   help="submit every *.json of FOLDER, then poll it for new or changed files until interrupted")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between polls of --watch (default 5)")
    p.add_argument("--once", action="store_true", help="with --watch: one pass, then exit")
    p.add_argument("--wait", type=float, default=0.0,
                   help="seconds to wait for another writer to release the ledger (default 0: fail at once)")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("process", help="train, save and route every pending request of a store",
                       description="For each pending request, in arrival order: one new LoRA expert on the frozen "
                                   "base (training -> expert_saved), its gate head (gate_updated). A failing "
                                   "request ends 'failed' with the reason; nothing of it stays in the bank or the "
                                   "gate. Safe to run again after a crash.")
    p.add_argument("--store", required=True)
    p.add_argument("--model", default=None, help="HF LLaVA directory as the base (the first run fixes it; default "
                                                 "the taught embedded default)")
    p.add_argument("--load-in-4bit", action="store_true", help="4-bit NF4 base (with --model)")
    p.add_argument("--teach", action="append", default=[], metavar="FIELD=VALUE",
                   help="TeachConfig field of the embedded base, first run only (repeatable)")
    p.add_argument("--cache", default=None, help="cache folder (default $LUMOE_CACHE or ~/.cache/lumoe-engine)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per expert (default store.json's)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--alpha", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--retry-failed", action="store_true", help="train the failed requests again too")
    p.add_argument("--only", action="append", default=[], metavar="ID", help="process only these requests")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--progress", action="store_true", help="progress bars")
    p.set_defaults(func=cmd_process)

    p = sub.add_parser("status", help="one line per request of a store")
    p.add_argument("--store", required=True)
    p.add_argument("ids", nargs="*", help="only these requests")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("revoke", help="withdraw a request (store or stream run)",
                       description="Record the revocation in the ledger, then remove the request's gate entry and "
                                   "expert. Idempotent: revoking again finishes an interrupted removal.")
    p.add_argument("id")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--store", default=None, help="a store folder")
    g.add_argument("--out", default=None, help="a store folder, or a stream run's output folder (config.json)")
    p.add_argument("--reason", default=None)
    p.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the ledger's writer lock")
    p.set_defaults(func=cmd_revoke)

    p = sub.add_parser("verify", help="check a store read-only")
    p.add_argument("--store", required=True)
    p.set_defaults(func=cmd_verify)


def _fail(msg: str, code: int = 2) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def _store_errors():
    from lumoe_engine.ledger import LedgerCorruptError, LedgerLockedError
    from lumoe_engine.model.bank import ExpertFileError
    from lumoe_engine.store import StoreBusyError, StoreError

    return (StoreError, StoreBusyError, LedgerLockedError, LedgerCorruptError, ExpertFileError)


def cmd_submit(args) -> int:
    from lumoe_engine import store as request_store

    if not args.files and not args.watch:
        return _fail("submit: give request files, or --watch FOLDER")
    if args.once and not args.watch:
        return _fail("submit: --once goes with --watch FOLDER")
    if args.interval <= 0:
        return _fail(f"--interval {args.interval}: expected seconds > 0")
    try:
        store = request_store.Store(args.store, create=True)
        rc = 0
        if args.files:
            for r in request_store.submit_files(store, args.files, wait=args.wait):
                print(r.message, file=sys.stdout if r.ok else sys.stderr)
                rc = rc or (0 if r.ok else 2)
        if args.watch:
            rc = max(rc, 2 * request_store.watch(store, args.watch, interval=args.interval, once=args.once,
                                           out=lambda m: print(m, flush=True)))
        return rc
    except _store_errors() as e:
        return _fail(str(e))


def cmd_process(args) -> int:
    from lumoe_engine import store as request_store

    try:
        store = request_store.Store(args.store)
        opts = request_store.ProcessOptions(model=args.model, load_in_4bit=args.load_in_4bit,
                                      teach=parse_overrides(args.teach), cache=args.cache, steps=args.steps,
                                      lr=args.lr, rank=args.rank, alpha=args.alpha, batch_size=args.batch_size,
                                      retry_failed=args.retry_failed, only=args.only, threads=args.threads,
                                      progress=args.progress)
        results = request_store.process(store, opts, out=lambda m: print(m, flush=True))
    except request_store.UnknownRequestError as e:
        return _fail(str(e))
    except _store_errors() + (ValueError,) as e:  # (ValueError: a bad --steps / --lr ... or --teach value)
        return _fail(str(e))
    failed = [r for r, st in results.items() if st == "failed"]
    print(f"processed {len(results)} request(s): {len(results) - len(failed)} routed, {len(failed)} failed")
    return 1 if failed else 0


def cmd_status(args) -> int:
    from lumoe_engine import store as request_store

    try:
        rows = request_store.status(request_store.Store(args.store))
    except _store_errors() as e:
        return _fail(str(e))
    known = {r.id for r in rows}
    missing = [i for i in args.ids if i not in known]
    if missing:
        return _fail(f"unknown request id {missing[0]!r}: the store {args.store} holds {len(rows)} requests")
    for r in rows:
        if not args.ids or r.id in args.ids:
            print(r.line())
    return 0


def cmd_revoke(args) -> int:
    from lumoe_engine import store as request_store

    target = Path(args.store or args.out)
    try:
        if args.out and not (target / request_store.STORE_JSON).is_file():
            if (target / "config.json").is_file():
                from lumoe_engine.stream import revoke as revoke_in_run

                doc = revoke_in_run(target, args.id, args.reason) or {}
                if doc.get("changed", True):
                    print(f"{args.id}: revoked in the stream run {target} (expert removed: "
                          f"{doc.get('removed_expert')}, gate entry removed: {doc.get('removed_gate_entry')})")
                else:
                    print(f"{args.id}: already revoked in the stream run {target}")
                return 0
            return _fail(f"--out {target}: neither a store ({request_store.STORE_JSON}) nor a stream run (config.json)")
        request_store.revoke(request_store.Store(target), args.id, reason=args.reason, wait=args.wait)
        return 0
    except (request_store.UnknownRequestError, KeyError) as e:
        return _fail(f"{e}; nothing was changed")
    except _store_errors() as e:
        return _fail(str(e))


def cmd_verify(args) -> int:
    from lumoe_engine import store as request_store

    try:
        problems = request_store.verify(request_store.Store(args.store))
    except _store_errors() as e:
        return _fail(str(e))
    for p in problems:
        print(f"problem: {p}")
    print(f"store {args.store}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


COMMANDS = ("teach", "stream", "gate-eval", "submit", "process", "status", "revoke", "verify")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["stream"] + argv  # the main job: the stream on the embedded default
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    rc = main()
    sys.exit(rc if isinstance(rc, int) else 0)
