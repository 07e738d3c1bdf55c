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
                         load_in_4bit=args.load_in_4bit, preset=args.preset)
    for name, attr in (("target_accuracy", "target"), ("time_budget_s", "time_budget"), ("max_steps", "max_steps"),
                       ("lr", "lr"), ("batch_size", "batch_size"), ("seed", "seed")):
        if getattr(args, attr) is not None:
            setattr(config, name, getattr(args, attr))
    _, _, summary = teach(config, args.out, cache_dir=args.cache, progress=not args.no_progress)
    print(f"teach: {summary['n_entities']} entities, {summary['n_qa']} QA pairs "
          f"({summary['n_teach']} taught), {summary['steps']} steps, cached={summary['cached']}")
    for key, label in SUMMARY_ROWS:
        v = summary.get(key)
        print(f"  {label:<30} {'n/a' if v is None else f'{v:.3f}'}")
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
    from lumoe_engine import stream

    p = sub.add_parser("stream", help="the lifelong unlearning stream (the default command)",
                       description="Teach (cached), then one LoRA expert per removal request, the gate, evaluation "
                                   "after every request, report and plots in --out.")
    stream.add_arguments(p)
    p.add_argument("--dry-run", action="store_true",
                   help="build the --preset's real architecture on the meta device and print the memory plan")
    p.set_defaults(func=cmd_stream)


def cmd_stream(args):
    if args.dry_run:
        from lumoe_engine.model import plan

        return plan.main(["--preset", args.preset])
    from lumoe_engine import stream
    from lumoe_engine.ledger import LedgerCorruptError, LedgerLockedError

    try:
        return stream.run(args)
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
    from lumoe_engine.service import StoreBusyError, StoreError

    return (StoreError, StoreBusyError, LedgerLockedError, LedgerCorruptError, ExpertFileError)


def cmd_submit(args) -> int:
    from lumoe_engine import service

    if not args.files and not args.watch:
        return _fail("submit: give request files, or --watch FOLDER")
    if args.once and not args.watch:
        return _fail("submit: --once goes with --watch FOLDER")
    if args.interval <= 0:
        return _fail(f"--interval {args.interval}: expected seconds > 0")
    try:
        store = service.Store(args.store, create=True)
        rc = 0
        if args.files:
            for r in service.submit_files(store, args.files, wait=args.wait):
                print(r.message, file=sys.stdout if r.ok else sys.stderr)
                rc = rc or (0 if r.ok else 2)
        if args.watch:
            rc = max(rc, 2 * service.watch(store, args.watch, interval=args.interval, once=args.once,
                                           out=lambda m: print(m, flush=True)))
        return rc
    except _store_errors() as e:
        return _fail(str(e))


def cmd_process(args) -> int:
    from lumoe_engine import service
    from lumoe_engine.stream import _parse_overrides

    try:
        store = service.Store(args.store)
        opts = service.ProcessOptions(model=args.model, load_in_4bit=args.load_in_4bit,
                                      teach=_parse_overrides(args.teach), cache=args.cache, steps=args.steps,
                                      lr=args.lr, rank=args.rank, alpha=args.alpha, batch_size=args.batch_size,
                                      retry_failed=args.retry_failed, only=args.only, threads=args.threads,
                                      progress=args.progress)
        results = service.process(store, opts, out=lambda m: print(m, flush=True))
    except service.UnknownRequestError as e:
        return _fail(str(e))
    except _store_errors() + (ValueError,) as e:  # (ValueError: a bad --steps / --lr ... or --teach value)
        return _fail(str(e))
    failed = [r for r, st in results.items() if st == "failed"]
    print(f"processed {len(results)} request(s): {len(results) - len(failed)} routed, {len(failed)} failed")
    return 1 if failed else 0


def cmd_status(args) -> int:
    from lumoe_engine import service

    try:
        rows = service.status(service.Store(args.store))
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
    from lumoe_engine import service

    target = Path(args.store or args.out)
    try:
        if args.out and not (target / service.STORE_JSON).is_file():
            if (target / "config.json").is_file():
                doc = service.revoke_run(target, args.id, args.reason) or {}
                if doc.get("changed", True):
                    print(f"{args.id}: revoked in the stream run {target} (expert removed: "
                          f"{doc.get('removed_expert')}, gate entry removed: {doc.get('removed_gate_entry')})")
                else:
                    print(f"{args.id}: already revoked in the stream run {target}")
                return 0
            return _fail(f"--out {target}: neither a store ({service.STORE_JSON}) nor a stream run (config.json)")
        service.revoke(service.Store(target), args.id, reason=args.reason, wait=args.wait)
        return 0
    except (service.UnknownRequestError, KeyError) as e:
        return _fail(f"{e}; nothing was changed")
    except _store_errors() as e:
        return _fail(str(e))


def cmd_verify(args) -> int:
    from lumoe_engine import service

    try:
        problems = service.verify(service.Store(args.store))
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
