"""The real path at the real shapes on a CPU: a llava-1.5 / llava-v1.6 checkpoint of full width (hidden 4096, MLP
11008, 32 heads, CLIP ViT-L/14 at 336 px) with the depth cut to a few layers and random weights, loaded in 4-bit
through ``--model``, a two-request stream, gate features at the preset's layer, export to peft; measured against the
dry-run plan of the same configuration.

    python benchmarks/real_shape.py --preset llava-1.5-7b --depth 2 --out DIR
    python benchmarks/real_shape.py --preset llava-v1.6-vicuna-7b --depth 2 --out DIR
    python benchmarks/real_shape.py --preset llava-1.5-7b --depth 2 --image-size 112 --out DIR   (64 image tokens)

What it does, top to bottom:

1. ``model.shapes.build_checkpoint``: config (``shape_preset``: the preset's sizes, ``--depth`` decoder and vision
   layers, the gate layer ``min(preset's, depth - 2)``), seeded random weights saved in bf16, a tokenizer with
   llava-1.5's vocabulary layout, the processor; cached under ``--cache`` (a second run reuses it);
2. ``model.shapes.write_mini_benchmark``: four entities in MLUBench format with real image files;
3. the stream (``stream.run_stream``): ``--model DIR --load-in-4bit --data ... --stream ab``, the preset's LoRA rank,
   alpha and targets, ``--steps`` x ``--batch-size``: two requests, each trained, guarded, banked and gated, every
   request evaluated after each step;
4. in a fresh load of the checkpoint (4-bit again): the run's bank and gate on the model's device and dtype
   (``placement``); the first request's gate fit (its features at the gate layer) timed with the principal
   directions from the Gram matrix and the linear dedupe, and again with the scatter-matrix directions and the former
   dedupe loop (``gate_fit_seconds_before`` / ``_after``); ``--rss-experts`` experts of the same shape added to a copy
   of the bank (and their heads to the gate) with a routed forward before and after: process RSS growth per expert
   (after glibc ``malloc_trim``) against the expert's LoRA bytes, per-layer stack copies counted; the first expert
   exported to peft (``bank.export_peft``) and its logits under ``PeftModel.from_pretrained`` compared with the
   engine's routed logits;
5. ``DIR/real_shape.json``: every number, with ``plan_bytes_per_expert`` from ``model.plan.dry_run_plan`` of the
   same configuration, and the full preset's request-parallel throughput plan with the measured tokens per step.

Letters: K experts added for the memory measurement, r LoRA rank.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

if "TRITON_INTERPRET" not in os.environ:
    import torch as _t

    if not _t.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _rss() -> int:
    _trim()
    return psutil.Process().memory_info().rss


def _resident_bytes(tensors) -> int:
    """Bytes of the pages backing ``tensors`` that are resident now (Linux ``mincore``; 0 elsewhere): what the
    stacks really occupy, whatever the allocator reused."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for t in tensors:
        if t.device.type != "cpu" or not t.numel():
            continue
        start = t.data_ptr() // page * page
        end = -(-(t.data_ptr() + t.numel() * t.element_size()) // page) * page
        n = (end - start) // page
        vec = (ctypes.c_ubyte * n)()
        if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(end - start), vec) != 0:
            return 0
        total += sum(v & 1 for v in vec) * page
    return total


def _stack_tensors(bank) -> list:
    """The bank's whole stacked buffers (every slot of every module), not views over the used slots."""
    out = []
    for m in bank.modules:
        a, b, _, _ = bank.stacked(m)
        out += [a.untyped_storage(), b.untyped_storage()]
    return [torch.tensor([], dtype=torch.uint8).set_(s) for s in out]


def _old_distinct(u, others=None):
    """The image channel's former dedupe: per candidate, the kept rows gathered and compared again (O(n^2) rows)."""
    from lumoe_engine.gate.gate import Gate

    keep = []
    for i in range(len(u)):
        if keep and float((u[keep] @ u[i]).max()) >= Gate._SAME:
            continue
        if others is not None and len(others) and float((others @ u[i]).max()) >= Gate._SAME:
            continue
        keep.append(i)
    return torch.tensor(keep, dtype=torch.long)


def _scatter_directions(z, k):
    """The former principal directions: fp64 eigendecomposition of the D x D scatter matrix."""
    z = z.double()
    z = z - z.mean(0)
    _, vecs = torch.linalg.eigh(z.t() @ z)
    return vecs[:, -k:].flip(1).float().contiguous()


def run(args) -> dict:
    from lumoe_engine.data.mlubench import load_benchmark, load_image
    from lumoe_engine.data.streams import Request
    from lumoe_engine.engine import LUMoEEngine
    from lumoe_engine.gate import bound as bound_mod
    from lumoe_engine.gate import image_channel as image_mod
    from lumoe_engine.gate.config import gate_preset
    from lumoe_engine.gate.gate import Gate
    from lumoe_engine.model.bank import ExpertBank, lora_bytes
    from lumoe_engine.model.collate import collate, image_token_count
    from lumoe_engine.model.load import load_model
    from lumoe_engine.model.multilora import random_expert
    from lumoe_engine.model.placement import compute_dtype, model_device, place_gate, placement_report
    from lumoe_engine.model.plan import dry_run_plan
    from lumoe_engine.model.presets import get_run_preset
    from lumoe_engine.model.shapes import build_checkpoint, mini_texts, shape_preset, write_mini_benchmark
    from lumoe_engine.pipeline import FeatureCache, gate_training_set, request_names
    from lumoe_engine.stream import StreamConfig, run_stream
    from lumoe_engine.stream.base import stream_setup
    from lumoe_engine.unlearn.trainer import RecordBatches

    t_all = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache) if args.cache else out / "cache"
    cuda = torch.cuda.is_available()
    dtype_name = args.compute_dtype or ("bfloat16" if cuda else "float32")  # NOTE: CPU bf16 matmuls: ~6x slower
    p = shape_preset(args.preset, depth=args.depth, vision_depth=args.vision_depth, image_size=args.image_size,
                     compute_dtype=dtype_name)
    doc: dict = {"preset": get_run_preset(args.preset).name, "shape_preset": p.name, "depth": args.depth,
                 "vision_depth": p.vision.layers, "image_size": p.vision.image_size, "hidden": p.lm.hidden,
                 "intermediate": p.lm.intermediate, "heads": p.lm.heads, "gate_layer": p.gate_layer,
                 "lora_rank": p.lora_rank, "lora_alpha": p.lora_alpha, "load_in_4bit": True,
                 "compute_dtype": dtype_name, "device": "cuda" if cuda else "cpu", "threads": torch.get_num_threads(),
                 "torch": torch.__version__, "python": platform.python_version(), "seconds_by_phase": {}}
    phase = doc["seconds_by_phase"]

    # 1-2. checkpoint and data
    t0 = time.perf_counter()
    ckpt = build_checkpoint(p, cache / "real_shape", mini_texts())
    phase["checkpoint"] = round(time.perf_counter() - t0, 2)
    doc["checkpoint"] = str(ckpt)
    data = write_mini_benchmark(out / "data", image_size=p.vision.image_size)

    # 3. the stream through --model, 4-bit
    cfg = StreamConfig(stream="ab", data=str(data), model=str(ckpt), load_in_4bit=True, out=str(out / "run"),
                       cache=str(cache), steps=args.steps, batch_size=args.batch_size, rank=p.lora_rank,
                       alpha=p.lora_alpha, max_per_set=args.max_per_set, max_new_tokens=args.max_new_tokens,
                       eval_batch_size=8, gate=gate_preset("default", layer=p.gate_layer), threads=args.threads,
                       progress=False)
    t0 = time.perf_counter()
    summary = run_stream(cfg)
    phase["stream"] = round(time.perf_counter() - t0, 2)
    lum = summary["methods"]["lumoe"]
    doc["stream"] = {"failures": lum.get("failures", []), "train_seconds_per_request": lum.get(
        "train_seconds_per_request"), "requests": summary["config"]["requests"], "steps": args.steps,
        "batch_size": args.batch_size, "resolved_max_new_tokens": summary["config"]["resolved_max_new_tokens"],
        "teach": summary.get("teach")}
    records = [json.loads(f.read_text()) for f in sorted((out / "run" / "steps" / "lumoe").glob("*.json"))]
    doc["stream"]["gate_seconds_per_request"] = [r["cost"].get("gate_seconds") for r in records]
    doc["gate_first_request_seconds"] = records[0]["cost"].get("gate_seconds") if records else None
    doc["bytes_per_expert"] = records[-1]["cost"].get("bytes_per_expert") if records else None
    manifest = json.loads((out / "run" / "bank" / "manifest.json").read_text())
    doc["file_bytes_per_expert"] = [e["bytes"] for e in manifest["experts"]]

    # 4. a fresh 4-bit load: placement, gate fit, memory growth, peft
    t0 = time.perf_counter()
    model, proc = load_model(ckpt, load_in_4bit=True, dtype=getattr(torch, dtype_name))
    model.requires_grad_(False)
    phase["load_4bit"] = round(time.perf_counter() - t0, 2)
    dev, dt = model_device(model), compute_dtype(model)
    bench = load_benchmark(data)
    # the stream's requests as the run had them: the protocol's request data (``stream_setup``), its general pool
    _, _, split, requests, _ = stream_setup(cfg, bench, proc, evaluate=False)
    general = Request(id="_general", forget=[], retain=list(split.general_pool), entities=())
    img_rec = next(r for r in requests[0].forget if r.form == "image_text")
    n_img = image_token_count(proc)
    if n_img is None:  # LLaVA-NeXT: as many as the processor expands this picture to
        b = collate([img_rec], proc, with_answers=False, image_fn=load_image)
        n_img = int((b["input_ids"] == proc.tokenizer.convert_tokens_to_ids(proc.image_token)).sum())
    doc["n_image_tokens"] = n_img
    doc["plan_bytes_per_expert"] = dry_run_plan(p)["expert"]["bytes"]

    rss_bank = out / "rss_bank"
    shutil.rmtree(rss_bank, ignore_errors=True)
    shutil.copytree(out / "run" / "bank", rss_bank)
    bank = ExpertBank.open(rss_bank, device=dev, dtype=dt, durable=False)
    gate = place_gate(Gate.load(out / "run" / "gate"), model)
    engine = LUMoEEngine(model, proc, bank, gate, top_k=1)
    doc["placement"] = placement_report(model, bank, gate)
    doc["lora_bytes_per_expert"] = lora_bytes(bank.get(bank.ids[0]), dt)

    # the first request's gate fit, after and before
    gcfg = cfg.gate_config()
    gdata = gate_training_set(requests[0], [], [requests[0], general], gcfg)  # as LUMoERunner.retain_sources
    t0 = time.perf_counter()
    feats = FeatureCache(model, proc, gate)
    pos, neg = feats(gdata.positives), feats(gdata.negatives)
    phase["gate_features"] = round(time.perf_counter() - t0, 2)
    names, neg_texts = request_names(requests[0]), [r.question for r in gdata.negatives]

    def fit() -> float:
        g = place_gate(Gate.from_config(gcfg, model), model)
        t = time.perf_counter()
        g.add_expert(requests[0].id, pos, neg, names=names, neg_texts=neg_texts,
                     **({"pos_groups": gdata.groups} if gdata.groups else {}))
        return round(time.perf_counter() - t, 3)

    doc["gate_features_shape"] = {"positives": list(pos.shape), "negatives": list(neg.shape)}
    doc["gate_fit_seconds_after"] = fit()
    # (the gate's rooms that use them: the similarity bound's and the image channel's directions, the image channel's
    # distinct pictures)
    saved = bound_mod.principal_directions, image_mod.principal_directions, image_mod.ImageChannel.__dict__["_distinct"]
    bound_mod.principal_directions = image_mod.principal_directions = _scatter_directions
    image_mod.ImageChannel._distinct = staticmethod(_old_distinct)
    try:
        doc["gate_fit_seconds_before"] = fit() if not args.skip_before else None
    finally:
        bound_mod.principal_directions, image_mod.principal_directions, image_mod.ImageChannel._distinct = saved

    # resident memory per added expert
    def routed_forward(eid):
        engine.score([load_image(img_rec)], [img_rec.question], [img_rec.answer], expert_ids=[eid])

    def grow(b, g, prefix):
        """K experts of the run's shape into bank ``b`` (and their heads into gate ``g``), a routed forward before
        and after; returns (RSS growth per expert after the bank adds, after the gate adds too)."""
        routed_forward(b.ids[0])
        r0 = _rss()
        s0 = _resident_bytes(_stack_tensors(b))
        b.reserve(len(b) + K)  # as the stream does: one slot per request of the stream, reserved at its start
        last = None
        for i in range(K):
            ex = random_expert(f"{prefix}{i:03d}", shapes, rank=p.lora_rank, alpha=p.lora_alpha, seed=i, dtype=dt)
            b.add(ex)
            last = ex.id
            del ex
        r1 = _rss()
        s1 = _resident_bytes(_stack_tensors(b))
        doc["resident_stack_growth_per_expert"] = (s1 - s0) / K
        if g is not None:
            for i in range(K):
                noise = 0.01 * torch.randn(pos.shape, generator=torch.Generator().manual_seed(i))
                g.add_expert(f"{prefix}{i:03d}", pos + noise, neg)
        routed_forward(last)
        r2 = _rss()
        return (r1 - r0) / K, (r2 - r0) / K

    K = args.rss_experts
    shapes = bank.module_shapes
    copies0 = engine.ctx.stack_copies
    stats0 = dict(bank.stats)
    bank_growth, total_growth = grow(bank, gate, "rss")
    doc["rss_experts"] = K
    doc["rss_growth_per_expert"] = total_growth
    doc["rss_growth_per_expert_bank_only"] = bank_growth
    doc["rss_growth_ratio"] = round(total_growth / doc["lora_bytes_per_expert"], 4)
    doc["bank_stats_during_adds"] = {k: bank.stats[k] - stats0[k] for k in bank.stats}  # (the reserve: 1 realloc)
    doc["stack_copies"] = engine.ctx.stack_copies - copies0
    doc["bank_capacity"] = bank.capacity
    doc["slot_bytes"] = bank.slot_bytes()

    # export to peft: its logits against the engine's routed ones
    from peft import PeftModel

    eid = bank.ids[0]
    bank.export_peft(eid, out / "peft" / eid, base_model_name_or_path=str(ckpt))
    batch = collate([img_rec], proc, with_answers=False, image_fn=load_image)
    batch.pop("position_ids")
    batch = {k: v.to(dev) for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(dt)
    with torch.no_grad():
        base_logits = model(**batch).logits[:, -1].float()
        with engine.ctx.routing(bank.ensure_resident([eid]).view(1, 1), token_mask=batch["attention_mask"]):
            ours = model(**batch).logits[:, -1].float()
    engine.close()
    t0 = time.perf_counter()
    pm = PeftModel.from_pretrained(model, str(out / "peft" / eid))
    with torch.no_grad():
        theirs = pm(**batch).logits[:, -1].float()
    phase["peft"] = round(time.perf_counter() - t0, 2)
    doc["peft"] = {"max_abs_diff": float((ours - theirs).abs().max()),
                   "max_abs_logit": float(ours.abs().max()),
                   "expert_effect_max_abs": float((ours - base_logits).abs().max())}

    # tokens of one training step (measured on the real processor shape) and the full preset's throughput plan
    full = get_run_preset(args.preset)
    loader = RecordBatches([r for r in bench.records if r.form == "image_text"], proc, batch_size=16, seed=0,
                           image_fn=load_image)
    _, tb = next(loader)
    doc["tokens_per_step"] = int(tb["input_ids"].numel())
    doc["tokens_per_step_rows"] = int(tb["input_ids"].shape[0])
    if p.vision.image_size == full.vision.image_size:
        rp = dry_run_plan(full, tokens_per_step=doc["tokens_per_step"])["request_parallel"]
        doc["plan_request_parallel"] = {k: rp[k] for k in ("tokens_per_step", "tokens_per_step_source",
                                                           "seconds_per_step", "experts_per_hour_per_gpu",
                                                           "experts_per_hour_per_node", "assumed_mfu")}
    doc["bytes_equal_plan"] = doc["bytes_per_expert"] == doc["plan_bytes_per_expert"]
    doc["seconds"] = round(time.perf_counter() - t_all, 1)
    (out / "real_shape.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return doc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", required=True, help="llava-1.5-7b | llava-v1.6-vicuna-7b | ... (model.presets)")
    ap.add_argument("--depth", type=int, default=2, help="decoder layers (>= 2)")
    ap.add_argument("--vision-depth", type=int, default=None, help="vision layers (default --depth)")
    ap.add_argument("--image-size", type=int, default=None, help="image side (default the preset's 336)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--cache", default=None, help="where the checkpoint is cached (default OUT/cache)")
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps per request")
    ap.add_argument("--batch-size", type=int, default=2, help="rows per step")
    ap.add_argument("--max-per-set", type=int, default=1, help="evaluation queries per set per request")
    ap.add_argument("--max-new-tokens", type=int, default=3)
    ap.add_argument("--rss-experts", type=int, default=8, help="experts added for the memory measurement")
    ap.add_argument("--compute-dtype", default=None, help="float32 (CPU default) | bfloat16 (CUDA default)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-before", action="store_true", help="do not time the former gate fit")
    args = ap.parse_args(argv)
    doc = run(args)
    keys = ("preset", "shape_preset", "n_image_tokens", "load_in_4bit", "bytes_per_expert", "plan_bytes_per_expert",
            "lora_bytes_per_expert", "rss_growth_per_expert", "rss_growth_ratio", "gate_first_request_seconds",
            "gate_fit_seconds_before", "gate_fit_seconds_after", "seconds")
    for k in keys:
        print(f"{k:28s} {doc.get(k)}")
    return 0 if doc["bytes_equal_plan"] and not doc["stream"]["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
