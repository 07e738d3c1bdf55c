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

Later subcommands (gate-eval, the default stream, submit, revoke) register beside ``teach`` in ``build_parser``.
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

    return stream.run(args)


def _add_gate_eval(sub) -> None:
    from lumoe_engine.gate import evaluate

    p = sub.add_parser("gate-eval", help="gate routing accuracy / false positives on the taught embedded default")
    evaluate.add_arguments(p)
    p.set_defaults(func=evaluate.run)


COMMANDS = ("teach", "stream", "gate-eval")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["stream"] + argv  # the main job: the stream on the embedded default
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    main()
