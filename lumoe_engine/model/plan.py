"""Dry-run plan of a real run, without weights: the architecture built on the meta device, parameters counted, and
the memory per GPU of base + experts + optimizer + activations estimated, with the DeepSpeed config it would use.

    python -m lumoe_engine.model.plan --preset llava-1.5-7b [--world-size 8] [--resident-experts 1000] [--json]

Letters: P parameters, T tokens per micro batch (micro_batch x max_seq_len), H LM hidden, H_kv key/value width,
I MLP width, V vocabulary, r LoRA rank, N resident experts, W world size (GPUs), n_t decoder layers with experts.

Formulas (bytes; every number is an estimate from sizes, not a measurement):
- base, NF4 (bitsandbytes, blocksize 64, double quantisation), for each quantised linear of P weights:
  P/2 (two 4-bit codes per byte) + P/64 (one 8-bit absmax per block) + 4 * ceil(P/64/256) (fp32 absmax of the
  absmax, blocks of 256) + 4 * (16 + 256) + 4 (NF4 code, second-level code, offset) -- the layout
  ``bitsandbytes.functional.quantize_4bit`` returns (checked in tests/test_plan.py). About 0.516 byte/param.
  Quantised: every nn.Linear of the LM decoder; kept in bf16 (2 B/param): embeddings, norms, lm_head, the vision
  tower and the projector (``model.load.SKIP_4BIT``). ZeRO-3 partitions the base over W GPUs (with a bf16
  ``quant_storage``) and gathers two decoder layers at a time (one computing, one prefetched); ZeRO-0/1/2 keep a
  full copy per GPU.
- one expert: sum over wrapped linears of r * (H_in + H_out) parameters, in the preset's compute dtype (the dtype
  experts are stored and served in: 2 bytes each in bf16, 4 in fp32).
- the expert being trained: bf16 weights (2 B/param; /W under ZeRO-3) + fp32 master weights, Adam m and v
  (12 B/param; /W under ZeRO >= 1) + gradients: the bf16 .grad written by backward (2 B/param) and the fp32
  partition ZeRO reduces into (4 B/param; /W under ZeRO >= 2, whole under ZeRO-0/1) + ZeRO-1/2 reduction buckets
  (``reduce_bucket_size`` elements, twice with overlap_comm; fp32 under ZeRO-1, bf16 under ZeRO-2).
- activations (bf16, flash-attention: no [L, L] scores kept), per token and decoder layer that carries experts:
  a_layer = 2 * (6H + 2H_kv + 4I + n_targets * r): the inputs of the two RMSNorms and of every linear, q, k, v,
  the attention output, gate/up outputs, silu(gate), and the LoRA shrink outputs. Layers below the gate layer and
  the frozen vision tower keep nothing (nothing under them requires a gradient).
  checkpointing off: T * n_t * a_layer;  on: T * (n_t * 2H + a_layer) (layer inputs + one layer recomputed).
  Output head: T * V * 8 (bf16 logits, their bf16 gradient, fp32 log-softmax of the scored positions, bounded by
  all positions). Everything is kept for every forward with gradients of one step (gd: forget + retain = 2), and the
  frozen base's logits (T * V * 2) for every reference forward (npo, kl, idk-po).
- runtime allowance: 3 GB (CUDA context, NCCL, allocator fragmentation) -- an assumed allowance.

Request-parallel training (``--parallel requests``: each GPU trains its own request's expert, nothing partitioned):
per GPU the full base, the resident experts, the expert being trained in fp32 master weights (4 B/param) with its
fp32 gradients (4 B/param) and AdamW m, v (8 B/param), and the activations above. Throughput, assumed not measured:
FLOPs of one step = 2 * P_lm * T * (forwards with grad + reference forwards) (every decoder linear and the head
forward) + 2 * P_above * T * forwards with grad (the backward of the layers above the gate layer: activation
gradients only, the base is frozen) + 2 * P_vision * image tokens (the frozen vision tower, once per image); T the
tokens of one step (measured by ``benchmarks/real_shape.py`` on the real processor shape when given, else rows x
(image tokens + ``TEXT_TOKENS_PER_ROW``)); seconds per step = FLOPs / (``GPU_PEAK_FLOPS`` x ``ASSUMED_MFU``);
experts per hour per GPU = 3600 / (steps x seconds per step); the gate update and evaluation are not counted.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Optional, Sequence

import torch

from lumoe_engine.model.presets import RUN_PRESETS, RunPreset, get_run_preset
from lumoe_engine.unlearn.ds_config import build_ds_config

BF16 = 2
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
NF4_BLOCK = 64
NF4_BLOCK2 = 256
RUNTIME_ALLOWANCE = 3 * 10 ** 9  # assumed: CUDA context + NCCL buffers + fragmentation (not measured)
GB = 10 ** 9
GIB = 2 ** 30
# throughput assumptions of request-parallel training (not measured: no GPU run yet)
GPU_PEAK_FLOPS = {"A100-SXM4-80GB": 312e12, "H100-SXM5-80GB": 989e12}  # dense bf16 tensor-core peaks (datasheets)
ASSUMED_MFU = 0.25       # assumed: NF4 dequantisation in every linear, short (~0.6k token) rows, batch 16
TEXT_TOKENS_PER_ROW = 64  # assumed: chat template + MLUBench question + answer (a row's image tokens come on top)
STEPS_PER_REQUEST = 40   # the stream's default budget (StreamConfig.steps)
ROWS_PER_STEP = 16       # the stream's default batch (StreamConfig.batch_size)


def nf4_bytes(numel: int, blocksize: int = NF4_BLOCK, double_quant: bool = True) -> int:
    """Bytes of one weight of ``numel`` elements in NF4: packed codes + quantisation state (see module docstring)."""
    blocks = math.ceil(numel / blocksize)
    packed = math.ceil(numel / 2)
    if double_quant:
        state = blocks + 4 * math.ceil(blocks / NF4_BLOCK2) + 4 * (16 + 256) + 4
    else:
        state = 4 * blocks + 4 * 16
    return packed + state


def build_meta_model(preset: str | RunPreset):
    """The preset's architecture on the meta device: every parameter and buffer without storage (no download)."""
    p = get_run_preset(preset)
    config, cls = p.build_config(), p.model_class()
    with torch.device("meta"):
        model = cls(config)
    return model


def _numel(module) -> int:
    return sum(t.numel() for t in module.parameters())


def count_targets(model, preset: RunPreset) -> tuple[list[tuple[str, int, int]], str]:
    """The linears that carry experts: [(name, H_in, H_out)] and how they were found.

    With ``model.multilora`` importable, its ``wrap_model`` wraps the meta model's targets (an in-memory bank; no
    tensor is allocated) and the wrapped modules are counted; the names must equal a direct walk of
    ``named_modules`` (nn.Linear matching the preset's target names), else RuntimeError. Without it: the direct walk.
    """
    wanted = set(preset.target_module_names())
    direct = [(n, m.in_features, m.out_features) for n, m in model.named_modules()
              if n in wanted and isinstance(m, torch.nn.Linear)]
    missing = wanted - {n for n, _, _ in direct}
    if missing:
        raise ValueError(f"preset {preset.name!r}: {len(missing)} target linears not found in the model "
                         f"(e.g. {sorted(missing)[0]!r}); the module layout differs from transformers 5.x LLaVA")
    try:
        from lumoe_engine.model.bank import ExpertBank
        from lumoe_engine.model.multilora import unwrap_model, wrap_model
    except ImportError:
        return direct, "direct walk of named_modules() (model.multilora not importable)"
    ctx = wrap_model(model, ExpertBank(None), targets=preset.lora_targets, layers=preset.expert_layers)
    try:
        wrapped = [(n, m.in_features, m.out_features) for n, m in ctx.modules.items()]
    finally:
        unwrap_model(model)
    if sorted(wrapped) != sorted(direct):
        raise RuntimeError(f"preset {preset.name!r}: multilora.wrap_model wrapped {len(wrapped)} linears, the direct "
                           f"walk finds {len(direct)} targets; they must agree")
    return wrapped, "multilora.wrap_model on the meta model (equal to a direct walk of named_modules())"


def _zero_bases(p: RunPreset, parts: dict, world: int) -> int:
    """Base bytes resident on one GPU (see module docstring)."""
    base = parts["base_total"]
    if p.zero_stage < 3:
        return base
    per_layer = parts["base_per_decoder_layer"]
    return math.ceil(base / world) + 2 * per_layer


def dry_run_plan(preset_name: str | RunPreset, world_size: Optional[int] = None,
                 resident_experts: Optional[int] = None, loss: Optional[str] = None,
                 gradient_checkpointing: Optional[bool] = None, tokens_per_step: Optional[int] = None,
                 steps: int = STEPS_PER_REQUEST, rows_per_step: int = ROWS_PER_STEP) -> dict:
    """Build the preset's model on meta and estimate parameters, bytes and memory per GPU.

    world_size / resident_experts / loss / gradient_checkpointing: override the preset's values.
    tokens_per_step: tokens of one training step as measured (``benchmarks/real_shape.py``); default an estimate
    from ``rows_per_step`` rows of the preset's image tokens plus ``TEXT_TOKENS_PER_ROW``; steps: per request.
    Returns a JSON-serialisable dict (no tensors): params, bytes, memory per GPU, the DeepSpeed config, the
    request-parallel memory and throughput, assumptions.
    """
    from lumoe_engine.unlearn.losses import LOSSES, LossConfig

    p = get_run_preset(preset_name)
    W = p.world_size if world_size is None else world_size
    N = p.resident_experts if resident_experts is None else resident_experts
    loss = p.loss if loss is None else loss
    ckpt = p.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    if isinstance(W, bool) or not isinstance(W, int) or W < 1:
        raise ValueError(f"world_size={W!r}: expected an integer >= 1")
    if isinstance(N, bool) or not isinstance(N, int) or N < 0:
        raise ValueError(f"resident_experts={N!r}: expected an integer >= 0")
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r}: expected one of {sorted(LOSSES)}")

    p.model_class()  # import the modeling module first: build_seconds times the construction alone
    t0 = time.perf_counter()
    model = build_meta_model(p)
    build_s = time.perf_counter() - t0
    real = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if not t.is_meta]
    if real:
        raise RuntimeError(f"meta build: {len(real)} tensors have real storage (e.g. {real[0]!r})")

    inner = model.model
    lm_params = _numel(inner.language_model) + _numel(model.lm_head)
    vision_params = _numel(inner.vision_tower)
    projector_params = _numel(inner.multi_modal_projector)
    total = _numel(model)
    other = total - lm_params - vision_params - projector_params  # LLaVA-NeXT: image_newline

    # base bytes: NF4 for the LM decoder's linears, bf16 for the rest
    quant_numel, quant_bytes, n_quant = 0, 0, 0
    layer0_bytes = 0
    for name, m in inner.language_model.named_modules():
        if isinstance(m, torch.nn.Linear) and p.load_in_4bit:
            w = m.weight.numel()
            b = nf4_bytes(w, p.quant_blocksize, p.double_quant)
            quant_numel += w
            quant_bytes += b
            n_quant += 1
            if m.bias is not None:
                quant_bytes += m.bias.numel() * BF16
                quant_numel += m.bias.numel()
            if name.startswith("layers.0."):
                layer0_bytes += b
    layer0_bytes += sum(t.numel() * BF16 for n, t in inner.language_model.named_parameters()
                        if n.startswith("layers.0.") and "norm" in n)
    if not p.load_in_4bit:
        layer0_bytes = _numel(inner.language_model.layers[0]) * BF16
    bf16_numel = total - quant_numel
    parts = {"base_nf4": quant_bytes, "base_bf16": bf16_numel * BF16, "base_total": quant_bytes + bf16_numel * BF16,
             "base_per_decoder_layer": layer0_bytes}

    # experts
    targets, counted_by = count_targets(model, p)
    r = p.lora_rank
    expert_params = sum(r * (hi + ho) for _, hi, ho in targets)
    if p.compute_dtype not in DTYPE_BYTES:
        raise ValueError(f"preset {p.name!r}: compute_dtype={p.compute_dtype!r}, expected one of {sorted(DTYPE_BYTES)}")
    expert_bytes = expert_params * DTYPE_BYTES[p.compute_dtype]
    stage = p.zero_stage
    opt_per_gpu = math.ceil(expert_params * 12 / (W if stage >= 1 else 1))
    grads_per_gpu = expert_params * BF16 + math.ceil(expert_params * 4 / (W if stage >= 2 else 1))
    train_weights = math.ceil(expert_bytes / (W if stage == 3 else 1))
    ds = build_ds_config(stage, p.micro_batch, p.grad_accum, p.lr, bf16=True, cpu=False)
    zero = ds["zero_optimization"]
    buckets = 0
    if stage in (1, 2):
        buckets = zero["reduce_bucket_size"] * (4 if stage == 1 else BF16) * (2 if zero.get("overlap_comm") else 1)

    # activations
    lm = p.lm
    head_dim = lm.hidden // lm.heads
    h_kv = lm.kv_heads * head_dim
    T = p.micro_batch * p.max_seq_len
    n_t = len(p.expert_layers)
    a_layer = BF16 * (6 * lm.hidden + 2 * h_kv + 4 * lm.intermediate + len(p.lora_targets) * r)
    head = T * lm.vocab * 8
    act_off = T * n_t * a_layer + head
    act_on = T * (n_t * BF16 * lm.hidden + a_layer) + head
    spec = LOSSES[loss]
    cfg = LossConfig(name=loss)
    n_grad = len(spec.policy) + (1 if spec.retain != "unused" and cfg.retain_weight > 0 else 0)
    n_ref = len(spec.reference)
    act = (act_on if ckpt else act_off) * n_grad + n_ref * T * lm.vocab * BF16

    base_gpu = _zero_bases(p, parts, W)
    resident = N * expert_bytes
    fixed = base_gpu + train_weights + opt_per_gpu + grads_per_gpu + buckets + act + RUNTIME_ALLOWANCE
    total_gpu = fixed + resident
    free_for_experts = p.gpu_memory_bytes - fixed
    max_resident = max(0, free_for_experts // expert_bytes) if expert_bytes else 0

    # request-parallel: one expert per GPU, nothing partitioned (module docstring)
    rp_train = expert_params * (4 + 4 + 8)  # fp32 master weights, fp32 gradients, AdamW m and v
    rp_total = parts["base_total"] + resident + rp_train + act + RUNTIME_ALLOWANCE
    rp_free = p.gpu_memory_bytes - (rp_total - resident)
    above = sum(_numel(inner.language_model.layers[i]) for i in p.expert_layers)
    measured = tokens_per_step is not None
    if tokens_per_step is None:
        tokens_per_step = rows_per_step * (p.image_seq_length + TEXT_TOKENS_PER_ROW)
    passes = n_grad + n_ref
    step_flops = (2 * lm_params * tokens_per_step * passes + 2 * above * tokens_per_step * n_grad
                  + 2 * vision_params * (p.vision.patches + 1) * rows_per_step * passes)
    peak = GPU_PEAK_FLOPS.get(p.gpu)
    step_s = step_flops / (peak * ASSUMED_MFU) if peak else None
    per_hour = 3600 / (steps * step_s) if step_s else None
    request_parallel = {
        "memory_per_gpu": {"base": parts["base_total"], "resident_experts": resident,
                           "trained_expert": rp_train, "activations": act, "runtime_allowance": RUNTIME_ALLOWANCE,
                           "total": rp_total, "fits": rp_total <= p.gpu_memory_bytes,
                           "headroom": p.gpu_memory_bytes - rp_total},
        "max_resident_experts": int(max(0, rp_free // expert_bytes)) if expert_bytes else 0,
        "tokens_per_step": int(tokens_per_step), "tokens_per_step_source": "measured" if measured else "estimate",
        "rows_per_step": rows_per_step, "steps_per_request": steps, "flops_per_step": float(step_flops),
        "gpu_peak_flops": peak, "assumed_mfu": ASSUMED_MFU,
        "seconds_per_step": None if step_s is None else round(step_s, 4),
        "experts_per_hour_per_gpu": None if per_hour is None else round(per_hour, 1),
        "experts_per_hour_per_node": None if per_hour is None else round(per_hour * W, 1),
    }

    plan = {
        "preset": p.name, "model_id": p.model_id, "family": p.family, "local_dir": p.local_dir,
        "compute_dtype": p.compute_dtype,
        "world_size": W, "gpu": p.gpu, "gpu_memory_bytes": p.gpu_memory_bytes,
        "build_seconds": round(build_s, 3),
        "params": {"total": total, "language_model": lm_params, "vision": vision_params,
                   "projector": projector_params, "other": other, "quantized_linear": quant_numel,
                   "bf16": bf16_numel, "quantized_linear_modules": n_quant},
        "base_bytes": parts,
        "expert": {"rank": r, "alpha": p.lora_alpha, "targets": list(p.lora_targets),
                   "gate_layer": p.gate_layer, "layers": [p.expert_layers[0], p.expert_layers[-1]],
                   "wrapped_modules": len(targets),
                   "counted_by": counted_by, "params": expert_params, "bytes": expert_bytes},
        "training": {"loss": loss, "zero_stage": stage, "micro_batch": p.micro_batch, "grad_accum": p.grad_accum,
                     "global_batch": p.micro_batch * p.grad_accum * W, "max_seq_len": p.max_seq_len,
                     "max_image_tokens": p.max_image_tokens, "tokens_per_micro_batch": T,
                     "gradient_checkpointing": ckpt, "forwards_with_grad": n_grad, "reference_forwards": n_ref},
        "activations": {"per_token_per_layer": a_layer, "head": head, "checkpointing_on": act_on,
                        "checkpointing_off": act_off, "per_gpu": act},
        "memory_per_gpu": {"base": base_gpu, "resident_experts": resident, "resident_expert_count": N,
                           "trained_expert_weights": train_weights, "optimizer_state": opt_per_gpu,
                           "gradients": grads_per_gpu, "zero_buckets": buckets, "activations": act,
                           "runtime_allowance": RUNTIME_ALLOWANCE, "total": total_gpu,
                           "fits": total_gpu <= p.gpu_memory_bytes,
                           "headroom": p.gpu_memory_bytes - total_gpu},
        "max_resident_experts": int(max_resident),
        "request_parallel": request_parallel,
        "ds_config": ds,
        "assumptions": [
            "architecture sizes: the public config.json of the checkpoint (see model/presets.py)",
            "NF4 with double quantisation, blocksize 64, on the LM decoder linears; the rest bf16",
            "activations: flash-attention (no [L, L] scores kept), bf16, formula in model/plan.py",
            f"runtime allowance {RUNTIME_ALLOWANCE / GB:.0f} GB assumed (CUDA context, NCCL, fragmentation)",
            "wrapped modules: " + counted_by,
            f"request-parallel throughput: assumed MFU {ASSUMED_MFU} of the GPU's dense bf16 peak; tokens per step "
            f"{'measured' if measured else f'estimated as {rows_per_step} rows x (image tokens + {TEXT_TOKENS_PER_ROW})'}"
            f"; gate update and evaluation not counted",
        ],
    }
    del model
    return plan


def _b(n: int) -> str:
    """Bytes in a readable unit (decimal GB for totals, as GPU memory is sold)."""
    n = int(n)
    if abs(n) >= GB:
        return f"{n / GB:.2f} GB"
    if abs(n) >= 10 ** 6:
        return f"{n / 10 ** 6:.1f} MB"
    if abs(n) >= 10 ** 3:
        return f"{n / 10 ** 3:.1f} kB"
    return f"{n} B"


def _n(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def format_plan(plan: dict) -> str:
    """A readable table of ``dry_run_plan``'s result."""
    P, E, Tr, M, A = plan["params"], plan["expert"], plan["training"], plan["memory_per_gpu"], plan["activations"]
    R = plan["request_parallel"]
    RM = R["memory_per_gpu"]
    rows: list[tuple[str, str]] = [
        ("preset", f"{plan['preset']}  ({plan['model_id']}, {plan['family']})"),
        ("checkpoint dir", plan["local_dir"] + "  (placeholder: download the checkpoint there)"),
        ("node", f"{plan['world_size']} x {plan['gpu']} ({_b(plan['gpu_memory_bytes'])} each)"),
        ("meta build", f"{plan['build_seconds']:.2f} s, no weights"),
        ("", ""),
        ("params total", _n(P["total"])),
        ("  language model", _n(P["language_model"]) + " (decoder, embeddings, lm_head)"),
        ("  vision tower", _n(P["vision"])),
        ("  projector", _n(P["projector"]) + (f" (+ {P['other']} other)" if P["other"] else "")),
        ("  NF4 linears", f"{_n(P['quantized_linear'])} in {P['quantized_linear_modules']} modules"),
        ("base bytes", f"{_b(plan['base_bytes']['base_total'])} = NF4 {_b(plan['base_bytes']['base_nf4'])} + "
                       f"bf16 {_b(plan['base_bytes']['base_bf16'])}"),
        ("", ""),
        ("expert", f"rank {E['rank']}, alpha {E['alpha']:g}, {E['wrapped_modules']} linears "
                   f"(layers {E['layers'][0]}-{E['layers'][1]}, above gate layer {E['gate_layer']}: "
                   f"{', '.join(E['targets'])})"),
        ("  params / bytes", f"{_n(E['params'])} / {_b(E['bytes'])} ({plan.get('compute_dtype', 'bfloat16')})"),
        ("  counted by", E["counted_by"]),
        ("training", f"loss {Tr['loss']}, ZeRO-{Tr['zero_stage']}, micro batch {Tr['micro_batch']} x "
                     f"accum {Tr['grad_accum']} x {plan['world_size']} GPUs = {Tr['global_batch']} rows/step"),
        ("  sequence", f"{Tr['max_seq_len']} tokens (image up to {Tr['max_image_tokens']}), "
                       f"{Tr['tokens_per_micro_batch']} tokens per micro batch"),
        ("  forwards/step", f"{Tr['forwards_with_grad']} with grad, {Tr['reference_forwards']} reference"),
        ("  activations", f"checkpointing on {_b(A['checkpointing_on'])}, off {_b(A['checkpointing_off'])} "
                          f"per forward ({'on' if Tr['gradient_checkpointing'] else 'off'} here)"),
        ("", ""),
        ("memory per GPU", ""),
        ("  base", _b(M["base"])),
        ("  resident experts", f"{_b(M['resident_experts'])} ({M['resident_expert_count']} experts)"),
        ("  trained expert", _b(M["trained_expert_weights"])),
        ("  optimizer state", _b(M["optimizer_state"])),
        ("  gradients", _b(M["gradients"])),
        ("  ZeRO buckets", _b(M["zero_buckets"])),
        ("  activations", _b(M["activations"])),
        ("  runtime allowance", _b(M["runtime_allowance"])),
        ("  total", f"{_b(M['total'])} of {_b(plan['gpu_memory_bytes'])} -> "
                    f"{'fits' if M['fits'] else 'DOES NOT FIT'} (headroom {_b(M['headroom'])})"),
        ("max resident experts", f"{plan['max_resident_experts']} (with everything else above)"),
        ("", ""),
        ("request-parallel", f"--parallel requests: each GPU trains its own request's expert ({_b(RM['total'])} "
                             f"per GPU -> {'fits' if RM['fits'] else 'DOES NOT FIT'}, "
                             f"{R['max_resident_experts']} resident experts at most)"),
        ("  tokens per step", f"{R['tokens_per_step']} ({R['tokens_per_step_source']}; {R['rows_per_step']} rows), "
                              f"{R['flops_per_step'] / 1e12:.1f} TFLOP"),
        ("  seconds per step", "n/a (no peak for this GPU)" if R["seconds_per_step"] is None else
         f"{R['seconds_per_step']:.2f} s at MFU {R['assumed_mfu']} of {R['gpu_peak_flops'] / 1e12:.0f} TFLOPS "
         f"(assumed)"),
        ("  experts per hour", "n/a" if R["experts_per_hour_per_gpu"] is None else
         f"{R['experts_per_hour_per_gpu']:.1f} per GPU, {R['experts_per_hour_per_node']:.1f} per node "
         f"({R['steps_per_request']} steps each; gate and evaluation not counted)"),
        ("", ""),
        ("deepspeed", json.dumps(plan["ds_config"], separators=(",", ":"))),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" if k else "" for k, v in rows]
    lines.append("")
    lines.extend(f"note: {a}" for a in plan["assumptions"])
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lumoe_engine.model.plan",
                                 description="Dry-run plan of a real run (meta device, no weights).")
    ap.add_argument("--preset", required=True, help=f"one of {sorted(RUN_PRESETS)}")
    ap.add_argument("--world-size", type=int, default=None, help="GPUs (default: the preset's, 8)")
    ap.add_argument("--resident-experts", type=int, default=None, help="experts held in GPU memory")
    ap.add_argument("--loss", default=None, help="unlearning loss (default: the preset's)")
    ap.add_argument("--no-checkpointing", action="store_true", help="plan without gradient checkpointing")
    ap.add_argument("--tokens-per-step", type=int, default=None,
                    help="tokens of one training step as measured (benchmarks/real_shape.py writes it)")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = ap.parse_args(argv)
    try:
        plan = dry_run_plan(args.preset, world_size=args.world_size, resident_experts=args.resident_experts,
                            loss=args.loss, gradient_checkpointing=False if args.no_checkpointing else None,
                            tokens_per_step=args.tokens_per_step)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
