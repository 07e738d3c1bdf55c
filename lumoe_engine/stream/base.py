"""The stream's starting point: the taught base, the benchmark, and what the base knows before any request.

``taught_base`` teaches (or loads from the cache) the base model on the benchmark (``model.teach``; rank 0 first, the
other DeepSpeed ranks load the cached result); with ``--model DIR`` the checkpoint is used as it is (``given_base``:
loaded onto this rank's device, 4-bit or not, never taught unless ``--teach model_teaching=lora`` asks for it), so
what it knows is what it answers right; ``evaluation_benchmark`` is the benchmark the evaluator samples from
(records whose image will not open left out, ``--extra-eval`` records added as held-out phrasings: ``read_extra_eval``);
``base_predictions`` are the taught base's greedy answers to every evaluation query (cached), which fix the *known*
queries leak is counted over; ``load_run`` does all of it again for a saved run (revocation).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

import torch

from lumoe_engine.data.records import Benchmark, QARecord
from lumoe_engine.data.streams import Request, build_stream
from lumoe_engine.errors import RequestError
from lumoe_engine.eval.metrics import StreamEvaluator
from lumoe_engine.fileio import atomic_write
from lumoe_engine.stream.config import StreamConfig
from lumoe_engine.unlearn.trainer import barrier

logger = logging.getLogger("lumoe_engine.stream")


def given_base(cfg: StreamConfig):
    """A checkpoint (``--model``) used as it is: (model, processor, summary, benchmark). The model is loaded onto
    this rank's device (``model.load``); the summary records no teaching, the checkpoint's fingerprint (the cache key
    of its answers) and the answer length (``max_new_tokens``: 2 + the longest answer of the benchmark in tokens)."""
    from lumoe_engine.model.load import checkpoint_fingerprint, load_model
    from lumoe_engine.model.teach import default_cache_dir, load_data

    tcfg = cfg.teach_config()
    cache = Path(cfg.cache) if cfg.cache else default_cache_dir()
    bench = load_data(tcfg, cache)
    model, processor = load_model(cfg.model, load_in_4bit=cfg.load_in_4bit)
    tok = processor.tokenizer
    longest = max((len(tok(" " + r.answer, add_special_tokens=False)["input_ids"]) for r in bench.records), default=8)
    summary = {"trained": False, "teaching": "none", "cached": False, "model_dir": str(cfg.model),
               "load_in_4bit": bool(cfg.load_in_4bit), "max_new_tokens": 2 + longest,
               "cache_key": checkpoint_fingerprint(cfg.model, cfg.load_in_4bit), "seconds": 0.0,
               "surrogate_images": bench.surrogate_images, "n_entities": len(bench.entities),
               "n_qa": len(bench.records), "data": str(bench.root)}
    return model, processor, summary, bench


def check_refusal(cfg: StreamConfig, processor) -> None:
    """Refuse a refusal text the base's tokenizer cannot write (an expert taught to say it would answer unknown
    tokens, which decode to an empty string)."""
    from lumoe_engine.unlearn.refusal import unknown_tokens

    tok = getattr(processor, "tokenizer", processor)
    bad = unknown_tokens(tok, cfg.refusal)
    if bad:
        raise ValueError(f"--refusal {cfg.refusal!r}: the base's tokenizer has no token for {', '.join(map(repr, bad))}"
                         f" (it would be answered as an unknown token, i.e. an empty answer); write the refusal with "
                         f"words the base knows, or keep the default")


def taught_base(cfg: StreamConfig, rank: int):
    """The base of a stream run: the given checkpoint as it is, or the tiny LLaVA taught (cached) on the benchmark;
    (model, processor, teach summary, benchmark). Its tokenizer must be able to write ``cfg.refusal``."""
    model, processor, summary, bench = _base(cfg, rank)
    check_refusal(cfg, processor)
    return model, processor, summary, bench


def _base(cfg: StreamConfig, rank: int):
    from lumoe_engine.model.teach import default_cache_dir, load_data, teach

    tcfg = cfg.teach_config()
    if cfg.model and tcfg.model_teaching == "none":
        return given_base(cfg)
    cache = Path(cfg.cache) if cfg.cache else default_cache_dir()
    out = Path(cfg.out)
    if rank != 0:
        barrier()  # rank 0 teaches (or loads) first and fills the cache
    import tempfile

    if rank == 0:
        model, processor, summary = teach(tcfg, out, cache, progress=cfg.progress)
    else:
        with tempfile.TemporaryDirectory(prefix=f"lumoe-rank{rank}-") as tmp:  # rank 0 writes the summary
            model, processor, summary = teach(tcfg, tmp, cache, progress=False)
    if rank == 0:
        barrier()
    bench = load_data(tcfg, cache)
    if torch.cuda.is_available() and not cfg.load_in_4bit:  # (a fresh tiny LLaVA is built on the CPU)
        from lumoe_engine.model.placement import local_device

        model = model.to(local_device())
    if not summary.get("reached_target", True):
        logger.warning("the taught base did not reach the teaching target (image+text %s, text-only %s): forgetting "
                       "is measured only over the queries it knows", summary.get("fact_accuracy_image_text"),
                       summary.get("fact_accuracy_text_only"))
    return model, processor, summary, bench


def check_entities(req: Request, bench: Benchmark) -> None:
    unknown = [e for e in req.entities if e not in bench.entities]
    if unknown:
        raise RequestError(f"request {req.id!r}: entity {unknown[0]!r} is not in the benchmark at {bench.root} "
                           f"({len(bench.entities)} entities); check the spelling or add the entity's records")


def base_predictions(model, processor, queries: Sequence[QARecord], max_new: int, cfg: StreamConfig,
                      teach_summary: dict) -> dict:
    """The taught base's greedy answers to every evaluation query, cached under ``<cache>/base_predictions``."""
    from lumoe_engine.data.mlubench import load_image
    from lumoe_engine.model.collate import generate_answers
    from lumoe_engine.model.teach import default_cache_dir

    key_src = json.dumps({"model": teach_summary.get("cache_key") or teach_summary.get("model_dir"),
                          "max_new": max_new, "uids": sorted(r.uid for r in queries),
                          "questions": hashlib.sha256("\x1f".join(r.question for r in queries).encode()).hexdigest()},
                         sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    path = (Path(cfg.cache) if cfg.cache else default_cache_dir()) / "base_predictions" / f"{key}.json"
    if path.is_file() and teach_summary.get("cache_key"):
        try:
            preds = json.loads(path.read_text())
            if all(r.uid in preds for r in queries):
                return preds
        except (OSError, ValueError):
            pass
    texts = generate_answers(model, processor, queries, max_new, batch_size=cfg.eval_batch_size, image_fn=load_image)
    preds = {r.uid: t for r, t in zip(queries, texts)}
    if teach_summary.get("cache_key"):
        atomic_write(path, json.dumps(preds))
    return preds


def evaluation_benchmark(bench: Benchmark, extra: Sequence[str]) -> tuple[Benchmark, dict]:
    """The benchmark the evaluator samples from: ``bench`` minus records whose image file will not open, plus the
    ``--extra-eval`` records (as held-out phrasings: the paraphrase form)."""
    from lumoe_engine.data.mlubench import load_image

    bad_files, ok = set(), {}
    for r in bench.records:
        if r.form != "image_text" or r.image_missing:
            continue
        if r.image not in ok:
            try:
                load_image(r)
                ok[r.image] = True
            except Exception as exc:
                ok[r.image] = False
                bad_files.add(r.image)
                logger.warning("evaluation: image %s does not open (%s); its records are not evaluated", r.image, exc)
    records = [r for r in bench.records if not (r.form == "image_text" and r.image in bad_files)]
    info = {"unreadable_images": sorted(bad_files), "extra_eval_records": 0, "extra_eval_unmatched": 0}
    if extra:
        added, unmatched = read_extra_eval(extra, bench)
        records += added
        info.update(extra_eval_records=len(added), extra_eval_unmatched=unmatched,
                    extra_eval_files=[str(p) for p in extra])
    ev = dataclasses.replace(bench, records=records)
    return ev, info


def read_extra_eval(paths: Sequence[str], bench: Benchmark) -> tuple[list[QARecord], int]:
    """QA records from MLUBench-format JSON files (or folders of them): a list of ``{"id", "image"?, "conversations":
    [{"from": "human", "value": "<image>\\n<question>"}, {"from": "gpt", "value": "<answer>"}], "meta"?}``.

    Entity: ``meta.entity``, else the image folder ``.../<Class>/<Entity>/<file>``, else the file stem ("_" -> " ").
    Each record becomes a held-out phrasing (``heldout_phrasing=True``: the paraphrase form). Key facts, class and kind
    come from the benchmark's record of the same entity with the same answer (a rewording keeps the answer); an
    unmatched record keeps ``keys=()`` (scored by ROUGE-L recall) and is counted. Returns (records, unmatched)."""
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.rglob("*.json")) if p.is_dir() else [p]
    by_answer = {(r.entity, r.answer.strip()): r for r in bench.records}
    out, unmatched = [], 0
    for f in files:
        try:
            items = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"--extra-eval {f}: not a JSON list of QA records ({exc})") from None
        if not isinstance(items, list):
            raise ValueError(f"--extra-eval {f}: expected a JSON list of records, got {type(items).__name__}")
        for i, it in enumerate(items):
            conv = it.get("conversations") if isinstance(it, dict) else None
            if not isinstance(conv, list) or len(conv) < 2 or not all(isinstance(c, dict) for c in conv[:2]):
                raise ValueError(f"--extra-eval {f}, record {i}: expected 'conversations' = [human turn, gpt turn]")
            q = str(conv[0].get("value", "")).replace("<image>", "").strip()
            a = str(conv[1].get("value", "")).strip()
            meta = it.get("meta") if isinstance(it.get("meta"), dict) else {}
            img = it.get("image")
            entity = meta.get("entity")
            if entity is None and img:
                parts = Path(img).parts
                entity = parts[-2].replace("_", " ") if len(parts) >= 2 else None
            entity = entity or f.stem.replace("_", " ")
            image = None
            if img:
                cand = [Path(bench.root) / img, f.parent / img]
                image = str(next((c for c in cand if c.is_file()), cand[0]))
            base = by_answer.get((entity, a))
            uid = f"extra:{f.stem}#{it.get('id', i)}" + ("" if img else "#text")
            if base is None:
                unmatched += 1
            out.append(QARecord(uid=uid, entity=entity, cls=base.cls if base else bench.entities.get(entity, ""),
                                kind=base.kind if base else 0, phrasing=-1, question=q, answer=a,
                                form="image_text" if img else "text_only", image=image,
                                keys=base.keys if base else (), heldout_phrasing=True,
                                image_missing=bool(img) and not Path(image).is_file()))
    return out, unmatched


def stream_setup(cfg: StreamConfig, bench: Benchmark, processor, evaluate: bool = True):
    """The evaluation benchmark, the protocol's split over it, the stream's requests (each carrying its request
    data) and, with ``evaluate``, the evaluator (base answers not yet set): (eval_bench, eval_info, split,
    requests, evaluator or None). The stream and a revocation of its run build them the same way."""
    from lumoe_engine.data.protocol import Split
    from lumoe_engine.eval.judge import vocab_words

    eval_bench, eval_info = evaluation_benchmark(bench, cfg.extra_eval)
    split = Split(eval_bench, cfg.protocol())
    requests = [split.carry(r) for r in build_stream(bench, cfg.stream)]
    evaluator = StreamEvaluator(eval_bench, requests, split=split, vocab=vocab_words(processor),
                                **cfg.evaluation_options()) if evaluate else None
    return eval_bench, eval_info, split, requests, evaluator


def load_run(cfg: StreamConfig):
    """The model, processor, teach summary, benchmark, requests, evaluator (base answers set), max new tokens and
    the base answers of a saved run."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model, processor, teach_summary, bench = taught_base(cfg, 0)
    model.requires_grad_(False)
    max_new = cfg.max_new_tokens or int(teach_summary.get("max_new_tokens") or 16)
    _, _, _, requests, evaluator = stream_setup(cfg, bench, processor)
    base_preds = base_predictions(model, processor, evaluator.queries(), max_new, cfg, teach_summary)
    evaluator.set_base(base_preds)
    return model, processor, teach_summary, bench, requests, evaluator, max_new, base_preds


__all__ = ["taught_base", "check_refusal", "check_entities", "base_predictions", "evaluation_benchmark",
           "read_extra_eval", "load_run",
           "stream_setup"]
