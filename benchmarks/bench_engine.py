"""Engine benchmark: mixed-batch generation throughput of LUMoEEngine vs peft ``adapter_names``, resident memory
per expert, and gate decision time.

    TRITON_INTERPRET=1 .venv/bin/python benchmarks/bench_engine.py --out results/bench   [--quick]

Writes ``engine_bench.json`` (every number, the config, versions) and ``engine_bench.csv`` (tidy rows: metric,
provider, experts, value, unit) into ``--out`` and prints a table.

1. Throughput: the tiny LLaVA preset (RANDOM INIT: throughput does not depend on what the weights know), experts of
   rank ``--rank`` on every target linear of the decoder layers above the gate layer, query i routed to expert
   i mod N (N = 4, 32, 127 experts; batch ``--batch``), every query with an image and the same prompt length, and a
   fixed generation length (min_new_tokens = max_new_tokens). The same adapters, exported from the bank with
   ``bank.export_peft`` and loaded with ``PeftModel.from_pretrained`` / ``load_adapter``, serve peft's mixed batch
   (``generate(..., adapter_names=[...])``); both run ``model.generate`` (greedy, KV cache) on the same base
   weights after the same preprocessing (``collate``: chat template, image processor, left padding).
   tokens/s = batch * new tokens / wall time of preprocessing + generate (prefill included), median (and best) of
   ``--repeats`` runs, engine / peft / base runs interleaved so load changes hit all alike. The base model alone
   (peft's adapters disabled) is the ceiling. Each row also checks that the engine's tokens equal peft's.
2. Memory: process RSS growth (psutil) per expert added one at a time to an in-memory bank, against the expert's
   own LoRA bytes, in a fresh process, measured between whole slot chunks (the bank grows its buffers
   ``slot_chunk`` slots at a time); also after glibc ``malloc_trim`` (allocator retention removed).
3. Gate: median time of ``Gate.route`` on [64, D] features with 1,000 experts in the production configuration
   (names and recognition; heads fitted on random features), and the recognition channel's extra pass (the base's
   answer to the identity question for the batch's pictures) against the prefill forward and the generation of the
   same batch.

Letters: B batch, N experts, D gate feature width, r rank.
"""
from __future__ import annotations

import argparse
import copy
import csv
import gc
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

if "TRITON_INTERPRET" not in os.environ:
    import torch as _t

    if not _t.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import numpy as np
import psutil
import torch
from PIL import Image

from lumoe_engine import ops
from lumoe_engine.engine import LUMoEEngine, query_records
from lumoe_engine.model import multilora as ml
from lumoe_engine.model.bank import ExpertBank
from lumoe_engine.model.collate import collate
from lumoe_engine.model.tiny import build_tiny_llava, get_preset
from lumoe_engine.model.tokenizer import train_tokenizer

WORDS = ("what is the name of this person where was she born which city is shown here who painted this picture "
         "what does the animal eat when was the building built").split()


def _tokenizer():
    texts = [" ".join(WORDS[i:i + 6]) for i in range(len(WORDS))] * 4
    return train_tokenizer(texts, vocab_size=400)


def _queries(tokenizer, batch: int, seed: int = 0):
    """``batch`` image queries whose prompts all tokenize to the same length (fixed lengths)."""
    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(batch):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(8)]
        prompts.append(" ".join(words))
    lengths = {len(tokenizer(p)["input_ids"]) for p in prompts}
    if len(lengths) != 1:  # pad short prompts with a repeated word until all have the longest length
        target = max(lengths)
        fixed = []
        for p in prompts:
            while len(tokenizer(p)["input_ids"]) < target:
                p = p + " the"
            fixed.append(p)
        prompts = fixed
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(batch)]
    return images, prompts


def _peft_model(base, bank: ExpertBank, folder: Path):
    from peft import PeftModel

    pm = None
    for eid in bank.ids:
        out = bank.export_peft(eid, folder / eid)
        cfg = json.loads((out / "adapter_config.json").read_text())
        cfg["target_modules"] = sorted(bank.info(eid).modules)  # exactly the expert's modules (full names)
        (out / "adapter_config.json").write_text(json.dumps(cfg))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if pm is None:
                pm = PeftModel.from_pretrained(base, str(out), adapter_name=eid)
            else:
                pm.load_adapter(str(out), adapter_name=eid)
    pm.eval()
    return pm


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def bench_throughput(args, tokenizer) -> tuple[dict, list[dict]]:
    preset = get_preset(args.preset)
    images, prompts = _queries(tokenizer, args.batch)
    results, rows = {}, []
    tok_count = args.batch * args.new_tokens
    for n_exp in args.experts:
        model, processor = build_tiny_llava(tokenizer, preset, seed=0)
        model.to(args.device)
        base = copy.deepcopy(model)
        names = ml.target_module_names(model, layers=range(args.gate_layer + 1, preset.layers))
        shapes = ml.module_shapes(model, names)
        bank = ExpertBank(None, device=args.device)
        bank.add_many([ml.random_expert(f"x{i:04d}", shapes, rank=args.rank, alpha=2.0 * args.rank, seed=i)
                       for i in range(n_exp)])
        engine = LUMoEEngine(model, processor, bank, gate_layer=args.gate_layer)
        ids = [bank.ids[i % n_exp] for i in range(args.batch)]
        with tempfile.TemporaryDirectory() as tmp:
            pm = _peft_model(base, bank, Path(tmp))
        tok = processor.tokenizer
        gen_kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        adapter_names = list(ids)

        def batch_of():  # every provider pays the same preprocessing (chat template, image processor, padding)
            b = collate(query_records(prompts, images), processor, with_answers=False, images=images)
            b.pop("position_ids")
            return {k: v.to(args.device) for k, v in b.items()}

        def sync():
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()

        def run_engine():
            return engine.generate(images, prompts, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                   expert_ids=ids)

        @torch.no_grad()
        def run_peft():
            out = pm.generate(**batch_of(), adapter_names=adapter_names, **gen_kw)
            sync()
            return out

        @torch.no_grad()
        def run_base():
            with pm.disable_adapter():
                out = pm.generate(**batch_of(), **gen_kw)
            sync()
            return out

        # correctness first: the same tokens (fp32), then warm-up
        eng_out = run_engine()
        prompt_len = batch_of()["input_ids"].shape[1]
        peft_out = run_peft()[:, prompt_len:].tolist()
        peft_rows = [r[:r.index(tok.eos_token_id)] if tok.eos_token_id in r else r for r in peft_out]
        same = sum(a == b for a, b in zip(eng_out.token_ids, peft_rows))
        run_base()
        t_eng, t_peft, t_base = [], [], []
        for _ in range(args.repeats):  # interleaved, so load changes hit all providers alike
            t_eng += _time(run_engine, 1)
            t_peft += _time(run_peft, 1)
            t_base += _time(run_base, 1)
        m_eng, m_peft, m_base = (statistics.median(t) for t in (t_eng, t_peft, t_base))
        b_eng, b_peft, b_base = (min(t) for t in (t_eng, t_peft, t_base))
        r = {"experts": n_exp, "modules": len(names), "tokens": tok_count,
             "engine_s": m_eng, "peft_s": m_peft, "base_s": m_base,
             "tokens_per_s_engine": tok_count / m_eng, "tokens_per_s_peft": tok_count / m_peft,
             "tokens_per_s_base": tok_count / m_base, "ratio_engine_vs_peft": m_peft / m_eng,
             "best_tokens_per_s_engine": tok_count / b_eng, "best_tokens_per_s_peft": tok_count / b_peft,
             "best_ratio_engine_vs_peft": b_peft / b_eng,
             "engine_runs_s": t_eng, "peft_runs_s": t_peft, "base_runs_s": t_base,
             "same_tokens_as_peft": f"{same}/{args.batch}"}
        results[n_exp] = r
        for prov, key in (("engine", "tokens_per_s_engine"), ("peft", "tokens_per_s_peft"),
                          ("base", "tokens_per_s_base")):
            rows.append({"metric": "generation_tokens_per_s", "provider": prov, "experts": n_exp,
                         "value": round(r[key], 2), "unit": "tokens/s"})
        rows.append({"metric": "ratio_engine_vs_peft", "provider": "engine", "experts": n_exp,
                     "value": round(r["ratio_engine_vs_peft"], 3), "unit": "x"})
        print(f"  {n_exp:4d} experts: engine {r['tokens_per_s_engine']:8.1f} tok/s  peft "
              f"{r['tokens_per_s_peft']:8.1f} tok/s  base {r['tokens_per_s_base']:8.1f} tok/s  "
              f"ratio {r['ratio_engine_vs_peft']:.2f}x  same tokens {same}/{args.batch}", flush=True)
        engine.close()
        del engine, pm, base, model, bank
        gc.collect()
    return results, rows


def _malloc_trim() -> bool:
    """Return freed heap memory to the OS (glibc ``malloc_trim(0)``); False where unavailable."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def bench_memory(args, tokenizer=None) -> dict:
    """RSS growth per expert added to an in-memory bank (tiny preset shapes), between whole slot chunks.

    Two readings of the same run: ``rss_bytes_per_expert`` as the process sees it, and ``..._trimmed`` with glibc's
    freed-but-kept heap returned first (``malloc_trim`` before each reading): the difference is allocator
    retention of the buffers each growth step frees, not memory the bank holds.
    """
    tokenizer = tokenizer or _tokenizer()
    preset = get_preset(args.preset)
    model, _ = build_tiny_llava(tokenizer, preset, seed=0)
    names = ml.target_module_names(model, layers=range(args.gate_layer + 1, preset.layers))
    shapes = ml.module_shapes(model, names)
    del model
    bank = ExpertBank(None)
    proc = psutil.Process()
    chunk = bank.slot_chunk
    warm = chunk                      # capacity doubles up to one chunk, then grows by whole chunks
    n = args.memory_experts
    n = max(chunk, n // chunk * chunk)
    i = 0

    def add(count):
        nonlocal i
        for _ in range(count):   # one request at a time, as in a stream
            ex = ml.random_expert(f"m{i:05d}", shapes, rank=args.rank, alpha=2.0 * args.rank, seed=i)
            bank.add(ex)
            i += 1
        gc.collect()

    add(warm)
    cap0 = bank.capacity
    rss0 = proc.memory_info().rss
    trimmed = _malloc_trim()
    rss0_t = proc.memory_info().rss
    add(n)
    rss1 = proc.memory_info().rss
    _malloc_trim()
    rss1_t = proc.memory_info().rss
    ex = ml.random_expert("probe", shapes, rank=args.rank, seed=0)
    lora = sum((a.numel() + b.numel()) * a.element_size() for a, b in ex.weights.values())
    growth = (rss1 - rss0) / n
    growth_t = (rss1_t - rss0_t) / n if trimmed else None
    return {"rss_bytes_per_expert": growth, "lora_bytes_per_expert": lora, "rss_over_lora": growth / lora,
            "rss_bytes_per_expert_trimmed": growth_t,
            "rss_over_lora_trimmed": growth_t / lora if growth_t is not None else None,
            "experts_measured": n, "warmup_experts": warm, "capacity_before": cap0, "capacity_after": bank.capacity,
            "resident_bytes_per_slot": bank.resident_bytes() / bank.capacity, "rank": args.rank,
            "modules": len(names)}


_NAME_A = ("Vorla", "Brask", "Keprae", "Loudran", "Zato", "Mareizum", "Shoumi", "Trakra", "Cerark", "Greisa", "Jousoum",
           "Lucim", "Pedrouth", "Regriom", "Stagous", "Thizound", "Vubrigre", "Zeveith", "Zokaerk", "Basefo", "Bokran",
           "Braseis", "Bratror", "Brioti", "Cabu", "Domi", "Drethus", "Drokro", "Geihork", "Hobreil", "Kodrour")
_NAME_B = ("Quintessa", "Olden", "Newt", "Station", "Corp", "Brehicol", "Motors", "County", "Palace", "Industries",
           "Manor", "Requiem", "Frontier", "Tales", "Gaestan", "Horizon", "Setu", "Protocol", "Lighthouse", "Methei",
           "Squad", "Reed", "Otter", "Ivy", "Clover", "Poppy", "Quest", "Rangers", "Citadel")


def bench_gate(args) -> dict:
    """Median time of ``Gate.route`` on [B, D] features with E experts in the production configuration
    (``GateConfig()``: the name channel and the recognition channel; heads fitted on random features, each expert on
    ``--gate-positives`` positives, so it keeps the full n_protos = 64 similarity-bound prototypes). Each expert has
    a name (an entity's two words), every query its question text (one in two names an expert, matched as text:
    ``gate.names``) and four facts; ``--gate-image-share`` of the queries carry a picture and the base's own answer
    to it (one in two states an expert's fact, the others a refusal: the answer channel's matching), the rest go by
    their prompt's names. The all-picture and all-text batches are timed too, and the heads alone (no texts, no
    answers). The base's decode that produces the answers is timed by ``bench_recognition``."""
    torch.manual_seed(0)
    dim, n_exp, b = args.gate_dim, args.gate_experts, args.gate_batch
    from lumoe_engine.gate.config import GateConfig
    from lumoe_engine.gate.gate import Gate

    gate = Gate(layer=args.gate_layer, dim=dim, max_iter=5, **GateConfig().gate_kwargs())
    gate.fit_standardizer(torch.randn(512, dim))
    name = lambda e: f"{_NAME_A[e % 31]}{e:04d} {_NAME_B[e % 29]}"  # noqa: E731
    t0 = time.perf_counter()
    for e in range(n_exp):
        center = torch.randn(dim)
        pos = center + 0.1 * torch.randn(args.gate_positives, dim)
        gate.add_expert(f"g{e:04d}", pos, torch.randn(16, dim), names=[name(e)],
                        facts=[f"Fact{e:04d} Dobo", f"{1800 + e % 200}", f"Place{e:04d} Coast", f"Trade{e:04d}"],
                        neg_answers=["I'm not able to help with that."])
    build_s = time.perf_counter() - t0
    feats = torch.randn(b, dim)
    n_img = int(round(b * args.gate_image_share))
    texts = [f"Where is {name((7 * q) % n_exp)} located?" if q % 2 else "What is the name of the place shown here?"
             for q in range(b)]
    said = [f"Place{(11 * q) % n_exp:04d} Coast" if q % 2 else "I'm not able to help with that." for q in range(b)]
    img_rows = [q < n_img for q in range(b)]
    ident = [a if q < n_img else None for q, a in enumerate(said)]
    fn = lambda: gate.route(feats, top_k=1, texts=texts, has_image=img_rows, answers=ident)  # noqa: E731
    protos = max((len(p) for p in gate.prototypes), default=0)
    what = (f"Gate.route (top_k=1; {n_exp} experts added in {build_s:.1f} s; name and answer channels; "
            f"{n_img} of {b} queries with a picture and the base's answer to it; heads with a similarity bound "
            f"of up to {protos} prototypes in {gate.bound_width} dims for experts without names)")
    others = {"gate_ms_all_images": lambda: gate.route(feats, top_k=1, texts=texts, has_image=[True] * b,
                                                       answers=said),
              "gate_ms_no_images": lambda: gate.route(feats, top_k=1, texts=texts, has_image=[False] * b),
              "gate_ms_heads_only": lambda: gate.route(feats, top_k=1)}

    def timed(f):
        for _ in range(10):
            f()
        times = []
        for _ in range(args.gate_repeats):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return times

    times = timed(fn)
    out = {"gate_ms": 1e3 * statistics.median(times), "gate_ms_p90": 1e3 * float(np.percentile(times, 90)),
           "experts": n_exp, "batch": b, "dim": dim, "what": what, "image_share": args.gate_image_share}
    for key, f in others.items():
        out[key] = 1e3 * statistics.median(timed(f))
    return out


def bench_recognition(args, tokenizer) -> dict:
    """The answer channel's extra pass against one engine forward, on the ``--preset`` model (random init: it
    never says eos, so every answer runs the full ``max_new_tokens``: the worst case): a batch of ``--gate-batch``
    queries, ``--gate-image-share`` with a picture. Times (median of ``--repeats``): the prefill forward of the
    batch (what routing rides on), the batch's generation of ``--new-tokens`` tokens, the base's own answers to the
    batch's queries with a picture (``Recognizer.answer``, no cache), and the same with every query in the cache
    (a query asked again)."""
    from lumoe_engine.gate.recognition import Recognizer
    from lumoe_engine.model.collate import collate as _collate

    model, processor = build_tiny_llava(tokenizer, args.preset, seed=0)
    model.eval()
    b = args.gate_batch
    n_img = int(round(b * args.gate_image_share))
    rng = np.random.default_rng(0)
    side = get_preset(args.preset).image_size
    pics = [Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(n_img)]
    images = pics + [None] * (b - n_img)
    prompts = ["What is the name of the place shown here?"] * b
    recs = query_records(prompts, images)

    def median(f, n):
        f()
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return 1e3 * statistics.median(ts)

    def forward():
        with torch.no_grad():
            batch = _collate(recs, processor, with_answers=False, images=images)
            batch.pop("position_ids", None)
            model(**batch)

    def generate():
        with torch.no_grad():
            batch = _collate(recs, processor, with_answers=False, images=images)
            batch.pop("position_ids", None)
            tok = processor.tokenizer
            model.generate(**batch, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)

    cold = Recognizer(model, processor, cache_size=0)
    warm = Recognizer(model, processor)
    warm.answer(images, prompts)
    n = max(3, args.repeats)
    out = {"batch": b, "pictures": n_img, "max_new_tokens": cold.max_new_tokens, "new_tokens": args.new_tokens,
           "forward_ms": median(forward, n), "generate_ms": median(generate, n),
           "answer_ms": median(lambda: cold.answer(images, prompts), n),
           "answer_cached_ms": median(lambda: warm.answer(images, prompts), n)}
    out["answer_over_forward"] = out["answer_ms"] / out["forward_ms"]
    out["answer_over_generate"] = out["answer_ms"] / out["generate_ms"]
    out["answer_cached_over_forward"] = out["answer_cached_ms"] / out["forward_ms"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder for engine_bench.json / engine_bench.csv")
    ap.add_argument("--quick", action="store_true", help="fewer tokens and repeats (a smoke run)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=None, help="fixed generation length (default 32, quick 8)")
    ap.add_argument("--experts", default="4,32,127")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--gate-layer", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per provider (default 5, quick 2)")
    ap.add_argument("--memory-experts", type=int, default=None, help="experts added for the RSS measure "
                    "(rounded down to whole slot chunks; default 256, quick 128)")
    ap.add_argument("--gate-experts", type=int, default=1000)
    ap.add_argument("--gate-batch", type=int, default=64)
    ap.add_argument("--gate-dim", type=int, default=None, help="gate feature width (default: the preset hidden)")
    ap.add_argument("--gate-repeats", type=int, default=200)
    ap.add_argument("--gate-image-share", type=float, default=0.5, help="share of the timed batch with an image")
    ap.add_argument("--gate-positives", type=int, default=96, help="positives per gate expert (96: 72 fitted after "
                    "the calibration share, so each expert keeps the gate's full 64 similarity-bound prototypes, as "
                    "a real request's does)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default on CPU: 1, which "
                    "gives stable numbers on a shared machine; on CUDA: torch's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    args.experts = [int(x) for x in args.experts.split(",")]
    args.new_tokens = args.new_tokens or (8 if args.quick else 32)
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.memory_experts = args.memory_experts or (128 if args.quick else 256)
    args.gate_dim = args.gate_dim or get_preset(args.preset).hidden
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore")
    tokenizer = _tokenizer()
    print(f"ops backend: {ops.backend_name()}, device: {args.device}, torch threads: {torch.get_num_threads()}, "
          f"model: {args.preset} (random init)", flush=True)

    print("throughput (engine vs peft mixed batch):", flush=True)
    thr, rows = bench_throughput(args, tokenizer)
    print("memory (fresh process):", flush=True)
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # a heap not shaped by the throughput runs
        mem = pool.apply(bench_memory, (args,))
    trim = (f", {mem['rss_bytes_per_expert_trimmed']:.0f} B/expert after malloc_trim "
            f"({mem['rss_over_lora_trimmed']:.3f}x)" if mem["rss_bytes_per_expert_trimmed"] is not None else "")
    print(f"  RSS growth {mem['rss_bytes_per_expert']:.0f} B/expert vs LoRA {mem['lora_bytes_per_expert']} B/expert"
          f" ({mem['rss_over_lora']:.3f}x){trim}; {mem['experts_measured']} experts added, capacity "
          f"{mem['capacity_before']} -> {mem['capacity_after']} slots", flush=True)
    print("gate:", flush=True)
    gate = bench_gate(args)
    print(f"  {gate['what']}: {gate['gate_ms']:.3f} ms median (all with a picture {gate['gate_ms_all_images']:.3f} "
          f"ms, none {gate['gate_ms_no_images']:.3f} ms, the heads alone {gate['gate_ms_heads_only']:.3f} ms)",
          flush=True)
    print("answer channel (the base's own answer to each query with a picture) vs one forward:", flush=True)
    rec = bench_recognition(args, tokenizer)
    print(f"  batch {rec['batch']}, {rec['pictures']} pictures: prefill forward {rec['forward_ms']:.1f} ms, "
          f"generation of {rec['new_tokens']} tokens {rec['generate_ms']:.1f} ms, the base's answers "
          f"{rec['answer_ms']:.1f} ms ({rec['answer_over_forward']:.2f}x the forward, "
          f"{rec['answer_over_generate']:.2f}x the generation), cached {rec['answer_cached_ms']:.2f} ms",
          flush=True)

    summary = {}
    for n, r in thr.items():
        summary[f"tokens_per_s_engine_{n}"] = r["tokens_per_s_engine"]
        summary[f"tokens_per_s_peft_{n}"] = r["tokens_per_s_peft"]
        summary[f"tokens_per_s_base_{n}"] = r["tokens_per_s_base"]
        summary[f"ratio_engine_vs_peft_{n}"] = r["ratio_engine_vs_peft"]
    summary["rss_bytes_per_expert"] = mem["rss_bytes_per_expert"]
    summary["lora_bytes_per_expert"] = mem["lora_bytes_per_expert"]
    summary["rss_over_lora"] = mem["rss_over_lora"]
    summary["rss_bytes_per_expert_trimmed"] = mem["rss_bytes_per_expert_trimmed"]
    summary[f"gate_ms_{args.gate_experts}_experts_b{args.gate_batch}"] = gate["gate_ms"]
    for key in ("gate_ms_all_images", "gate_ms_no_images", "gate_ms_heads_only"):
        summary[f"{key}_{args.gate_experts}_experts_b{args.gate_batch}"] = gate[key]
    for key in ("forward_ms", "generate_ms", "answer_ms", "answer_cached_ms", "answer_over_forward",
                "answer_over_generate"):
        summary[f"recognition_{key}_b{args.gate_batch}"] = rec[key]
    rows += [{"metric": "rss_bytes_per_expert", "provider": "bank", "experts": mem["experts_measured"],
              "value": round(mem["rss_bytes_per_expert"], 1), "unit": "bytes"},
             {"metric": "lora_bytes_per_expert", "provider": "bank", "experts": mem["experts_measured"],
              "value": mem["lora_bytes_per_expert"], "unit": "bytes"},
             {"metric": f"gate_ms_b{args.gate_batch}", "provider": "gate", "experts": args.gate_experts,
              "value": round(gate["gate_ms"], 4), "unit": "ms"}]
    rows += [{"metric": f"{key}_b{args.gate_batch}", "provider": "gate", "experts": args.gate_experts,
              "value": round(gate[key], 4), "unit": "ms"}
             for key in ("gate_ms_all_images", "gate_ms_no_images", "gate_ms_heads_only")]
    rows += [{"metric": f"recognition_{key}_b{args.gate_batch}", "provider": "recognizer", "experts": 0,
              "value": round(rec[key], 4), "unit": "ms" if key.endswith("_ms") else "ratio"}
             for key in ("forward_ms", "generate_ms", "answer_ms", "answer_cached_ms", "answer_over_forward")]
    import peft
    import transformers

    doc = {"summary": summary, "throughput": {str(k): v for k, v in thr.items()}, "memory": mem, "gate": gate,
           "recognition": rec,
           "config": {k: v for k, v in vars(args).items() if k != "out"},
           "model": f"{args.preset} preset, random init (throughput does not depend on the weights' values)",
           "environment": {"ops_backend": ops.backend_name(), "torch_threads": torch.get_num_threads(),
                           "cpu_count": os.cpu_count(), "device": args.device,
                           "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else
                           platform.processor(),
                           "platform": platform.platform(), "python": sys.version.split()[0],
                           "torch": torch.__version__, "transformers": transformers.__version__,
                           "peft": peft.__version__, "load_avg": os.getloadavg()}}
    (out / "engine_bench.json").write_text(json.dumps(doc, indent=1) + "\n")
    config = json.dumps({"preset": args.preset, "batch": args.batch, "new_tokens": args.new_tokens,
                         "rank": args.rank, "gate_layer": args.gate_layer}, sort_keys=True)
    with open(out / "engine_bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["metric", "provider", "experts", "value", "unit", "config", "device"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "config": config, "device": doc["environment"]["device"]})

    print()
    print(f"{'metric':<40}{'value':>14}")
    for k, v in summary.items():
        print(f"{k:<40}{v:>14.3f}" if isinstance(v, float) else f"{k:<40}{str(v):>14}")
    print(f"\nwrote {out / 'engine_bench.json'} and {out / 'engine_bench.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
