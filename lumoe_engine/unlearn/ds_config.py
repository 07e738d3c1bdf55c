"""DeepSpeed configuration for training one expert at a time: ZeRO stage 0/2/3 (1 accepted), AdamW, bf16 on GPUs.

What is trained is one LoRA expert (tens of MB) on a frozen base, so ZeRO mostly partitions that expert's optimizer
state and gradients (stage >= 1 / >= 2); stage 3 also partitions parameters (the frozen base too, which needs a
shardable 4-bit storage dtype, see ``model.presets``).

On CPU (tests, the embedded default under the ``deepspeed`` launcher): ``"torch_adam": true`` (DeepSpeed's fused and
CPU Adam are compiled ops, not built with DS_BUILD_OPS=0), no bf16/fp16, no communication overlap.
"""
from __future__ import annotations

import copy
import math
import os
from typing import Any

STAGES = (0, 1, 2, 3)
STEPS_PER_PRINT = 10 ** 9  # the engine's own progress lines stay off; the trainer logs
# Gradient buckets, in elements. ZeRO-1/2 allocate ``reduce_bucket_size`` elements per gradient dtype, twice with
# overlap_comm (deepspeed 0.19 ``setup_buckets``): DeepSpeed's default 5e8 would hold 2 GB of bf16 buffers for an
# expert of ~20M parameters; 5e7 (100 MB in bf16, 2 buffers) still fits a whole rank-16 expert of a 13B model.
BUCKET_ELEMENTS = int(5e7)


def _merge(base: dict, over: dict) -> dict:
    """``base`` updated by ``over`` recursively (dicts merged, other values replaced); returns ``base``."""
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def build_ds_config(stage: int, micro_batch: int, grad_accum: int, lr: float, bf16: bool, cpu: bool,
                    offload: bool = False, **overrides: Any) -> dict:
    """A DeepSpeed config dict.

    stage: ZeRO stage 0..3; micro_batch: rows per GPU per micro step (``train_micro_batch_size_per_gpu``);
    grad_accum: micro steps per optimizer step; lr: AdamW learning rate; bf16: bf16 mixed precision (forced off when
    ``cpu``); cpu: no accelerator (torch AdamW, no overlap); offload: optimizer state (and parameters at stage 3) in
    CPU memory (GPU runs with stage >= 1; DeepSpeed's CPU Adam is compiled on first use).
    overrides: merged last, recursively, e.g. ``gradient_clipping=0.5`` or
    ``zero_optimization={"overlap_comm": False}`` (``bf16`` is the argument, not an override).
    """
    if isinstance(stage, bool) or stage not in STAGES:
        raise ValueError(f"stage={stage!r}: expected a ZeRO stage in {STAGES} (0 = plain data parallel, "
                         "2 = partitioned optimizer state + gradients, 3 = + parameters)")
    for name, v in (("micro_batch", micro_batch), ("grad_accum", grad_accum)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r}: expected an integer >= 1")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr={lr!r}: expected a finite learning rate > 0 (e.g. 1e-4)")
    if offload and stage == 0:
        raise ValueError("offload=True needs ZeRO stage >= 1 (offload_optimizer is a ZeRO feature); pass stage=2")
    if offload and cpu:
        raise ValueError("offload=True with cpu=True: everything is already in CPU memory; pass offload=False")

    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zero.update(contiguous_gradients=True, overlap_comm=not cpu, reduce_scatter=True,
                    reduce_bucket_size=BUCKET_ELEMENTS, allgather_bucket_size=BUCKET_ELEMENTS)
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size=int(5e7), stage3_param_persistence_threshold=int(1e5),
                    stage3_max_live_parameters=int(1e9), stage3_gather_16bit_weights_on_model_save=True)
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}

    params: dict[str, Any] = {"lr": float(lr), "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
    if cpu:
        params["torch_adam"] = True
    use_bf16 = bool(bf16) and not cpu
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "optimizer": {"type": "AdamW", "params": params},
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16},
        "fp16": {"enabled": False},
        "gradient_clipping": 1.0,
        "steps_per_print": STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
    }
    return _merge(cfg, overrides)


def launched_by_deepspeed() -> bool:
    """True when this process was started by a distributed launcher (``deepspeed``, which sets RANK, LOCAL_RANK and
    WORLD_SIZE for every process it starts; ``torchrun`` sets them too)."""
    return all(os.environ.get(k, "") != "" for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE"))
